"""Reading `--data DIR`: both layouts, every bad input's message, image modes, skips, duplicates."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorsu_edge import samples as samples_mod
from lorsu_edge.errors import DataError, ExitCode
from lorsu_edge.samples import MANIFEST_NAME, Sample, SampleSet, load_image, read_samples


# --- helpers ----------------------------------------------------------------------------------


def _png(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "PNG")
    return path


_colours = itertools.count(1)


def _distinct_pngs(folder: Path, names: list[str]) -> list[Path]:
    """One PNG per name, each a colour never used before so no two share a sha256."""
    return [_png(folder / n, color=(next(_colours) % 256, 7, 200)) for n in names]


def _manifest(root: Path, rows: list[object] | str) -> Path:
    text = rows if isinstance(rows, str) else "\n".join(json.dumps(r) for r in rows) + "\n"
    path = root / MANIFEST_NAME
    path.write_text(text, encoding="utf-8")
    return path


def _data_error(root: Path) -> DataError:
    with pytest.raises(DataError) as info:
        read_samples(root)
    err = info.value
    assert err.hint, "every DataError must carry a hint"
    assert "\n" not in err.message, "messages are one line"
    assert err.exit_code == ExitCode.BAD_INPUT
    return err


# --- manifest layout --------------------------------------------------------------------------


def test_manifest_label_rows_keep_order_resolve_paths_and_ignore_extras(tmp_path: Path) -> None:
    a, b = _distinct_pngs(tmp_path / "img", ["a.png", "b.png"])
    outside = _png(tmp_path.parent / f"{tmp_path.name}_outside.png", color=(1, 2, 3))
    _manifest(
        tmp_path,
        f'{{"image": "img/b.png", "label": "dog", "source": "phone", "extra": [1, 2]}}\n'
        "\n   \n"
        f'{{"image": "img/../img/a.png", "label": 7}}\n'
        f'{{"image": {json.dumps(str(outside))}, "label": " cat "}}\n',
    )
    result = read_samples(tmp_path, allow_outside=True)  # the absolute row is outside DIR
    assert [s.path for s in result.samples] == [b.resolve(), a.resolve(), outside.resolve()]
    assert [s.label for s in result.samples] == ["dog", "7", "cat"]
    assert result.labels == ["7", "cat", "dog"]
    assert result.kind == "label"
    assert not any(s.is_vqa for s in result.samples)
    assert result.skipped == []
    assert result.root == tmp_path.resolve()


def test_manifest_vqa_rows_and_mixed_kind(tmp_path: Path) -> None:
    _distinct_pngs(tmp_path, ["q.png", "l.png"])
    _manifest(tmp_path, [{"image": "q.png", "question": "How many?", "answer": 2}])
    vqa = read_samples(tmp_path)
    assert vqa.kind == "vqa"
    assert vqa.samples[0].is_vqa
    assert (vqa.samples[0].question, vqa.samples[0].answer) == ("How many?", "2")
    assert vqa.labels == []

    _manifest(tmp_path, [{"image": "q.png", "question": "What?", "answer": "x"}, {"image": "l.png", "label": "cat"}])
    mixed = read_samples(tmp_path)
    assert mixed.kind == "mixed"
    assert mixed.labels == ["cat"]


def test_manifest_takes_precedence_over_class_folders(tmp_path: Path) -> None:
    _distinct_pngs(tmp_path / "cat", ["1.png", "2.png"])
    _manifest(tmp_path, [{"image": "cat/2.png", "label": "kitten"}])
    result = read_samples(tmp_path)
    assert [(s.path.name, s.label) for s in result.samples] == [("2.png", "kitten")]


def test_manifest_with_bom_is_accepted(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / MANIFEST_NAME).write_bytes(b"\xef\xbb\xbf" + b'{"image": "a.png", "label": "a"}\n')
    assert read_samples(tmp_path).labels == ["a"]


# --- folder layout ----------------------------------------------------------------------------


def test_class_folders_interleaved_case_insensitive_extensions_hidden_ignored(tmp_path: Path) -> None:
    _distinct_pngs(tmp_path / "zebra", ["b.PNG", "a.png"])
    _distinct_pngs(tmp_path / "ant", ["x.Png"])
    _png(tmp_path / "ant" / "y.JPEG", color=(99, 99, 99))
    _png(tmp_path / "ant" / ".hidden.png", color=(5, 5, 5))  # hidden file
    _png(tmp_path / ".cache" / "c.png", color=(6, 6, 6))  # hidden folder
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    _png(tmp_path / "ant" / "nested" / "deep.png", color=(8, 8, 8))  # not recursed into
    result = read_samples(tmp_path)
    # sorted within a class, classes taken in turn
    assert [(s.label, s.path.name) for s in result.samples] == [
        ("ant", "x.Png"),
        ("zebra", "a.png"),
        ("ant", "y.JPEG"),
        ("zebra", "b.PNG"),
    ]
    assert result.labels == ["ant", "zebra"]
    assert result.skipped == []


def test_folder_order_is_deterministic_and_round_robin(tmp_path: Path) -> None:
    _distinct_pngs(tmp_path / "c", ["c3.png", "c1.png", "c2.png"])
    _distinct_pngs(tmp_path / "a", ["a2.png", "a1.png"])
    _distinct_pngs(tmp_path / "b", ["b1.png"])
    first = [s.path.name for s in read_samples(tmp_path).samples]
    assert first == ["a1.png", "b1.png", "c1.png", "a2.png", "c2.png", "c3.png"]
    assert first == [s.path.name for s in read_samples(tmp_path).samples]


# --- folder-level errors ----------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    err = _data_error(tmp_path / "nope")
    assert "does not exist" in err.message and "nope" in err.message
    assert "--data" in err.hint


def test_file_instead_of_folder(tmp_path: Path) -> None:
    f = _png(tmp_path / "a.png")
    err = _data_error(f)
    assert "not a folder" in err.message and "a.png" in err.message


def test_no_layout_says_what_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    err = _data_error(tmp_path)
    assert MANIFEST_NAME in err.message
    assert MANIFEST_NAME in err.hint and "<label>" in err.hint


def test_flat_images_hint_points_at_missing_labels(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    assert "no label" in _data_error(tmp_path).hint


def test_misnamed_manifest_hint_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "Manifest.json").write_text("{}")
    hint = _data_error(tmp_path).hint
    assert "Manifest.json" in hint and MANIFEST_NAME in hint


# --- manifest errors: each names file, line and field -----------------------------------------


@pytest.mark.parametrize(
    ("line3", "expected"),
    [
        ('{"image": "a.png", "label": "x",}', ["invalid JSON", "column"]),
        ('["a.png", "x"]', ["expected a JSON object", "an array"]),
        ('{"label": "x"}', ['missing field "image"']),
        ('{"image": "a.png"}', ['missing field "label"', '"question" + "answer"']),
        ('{"image": "a.png", "label": null}', ['missing field "label"']),
        ('{"image": "a.png", "question": "What?"}', ['missing field "answer"']),
        ('{"image": "a.png", "answer": "yes"}', ['missing field "question"']),
        ('{"image": "a.png", "label": ["x"]}', ['field "label" must be a string or a number', "an array"]),
        ('{"image": "a.png", "label": true}', ['field "label" must be a string or a number', "a boolean"]),
        ('{"image": "a.png", "label": {"name": "x"}}', ['field "label"', "an object"]),
        ('{"image": "a.png", "label": NaN}', ['field "label"', "non-finite"]),
        ('{"image": "a.png", "label": "  "}', ['field "label" is empty']),
        ('{"image": 5, "label": "x"}', ['field "image" must be a string', "a number"]),
        ('{"image": "a.png", "question": 3, "answer": "x"}', ['field "question" must be a string']),
        ('{"image": "a.png", "question": "Q?", "answer": []}', ['field "answer" must be a string or a number']),
    ],
)
def test_bad_manifest_row_names_file_line_and_problem(tmp_path: Path, line3: str, expected: list[str]) -> None:
    _png(tmp_path / "a.png")
    good = '{"image": "a.png", "label": "ok"}'
    _manifest(tmp_path, f"{good}\n\n{line3}\n{good}\n")
    err = _data_error(tmp_path)
    assert MANIFEST_NAME in err.message
    assert "line 3:" in err.message
    for part in expected:
        assert part in err.message


def test_bad_row_fails_before_any_image_is_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "a.png")
    _manifest(tmp_path, '{"image": "a.png", "label": "ok"}\n{oops\n')
    opened: list[object] = []
    monkeypatch.setattr(samples_mod, "decode_image", lambda *a, **k: opened.append(a))
    _data_error(tmp_path)
    assert opened == []


def test_empty_manifest(tmp_path: Path) -> None:
    _manifest(tmp_path, "\n  \n")
    err = _data_error(tmp_path)
    assert MANIFEST_NAME in err.message and "no rows" in err.message


def test_manifest_not_utf8(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(b'{"image": "a.png", "label": "caf\xe9"}\n')
    err = _data_error(tmp_path)
    assert MANIFEST_NAME in err.message and "UTF-8" in err.message


# --- image modes ------------------------------------------------------------------------------


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    p = tmp_path / "g.png"
    Image.new("L", (5, 4), 77).save(p)
    im = load_image(p)
    assert (im.mode, im.size) == ("RGB", (5, 4))
    assert im.getpixel((2, 2)) == (77, 77, 77)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # opaque red stays red
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black becomes white
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black becomes mid grey
    rgba.save(p)
    im = load_image(p)
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 0, 0)
    assert im.getpixel((1, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in im.getpixel((2, 0)))


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "t.gif", transparency=0)
    plain = load_image(tmp_path / "p.png")
    assert plain.mode == "RGB"
    assert [plain.getpixel((x, 0)) for x in range(2)] == [(0, 0, 255), (0, 255, 0)]
    transparent = load_image(tmp_path / "t.gif")
    assert [transparent.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 255, 0)]


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    p = tmp_path / "d.png"
    values = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(p)
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")  # the file really is high-bit
    im = load_image(p)
    assert im.mode == "RGB"
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [0, 100, 128, 255]


def test_float_image_in_unit_range_is_scaled(tmp_path: Path) -> None:
    p = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(p)
    im = load_image(p)
    assert [im.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    # Stored 64 wide x 32 high, red block in the stored top-left corner. Orientation 6 means
    # "rotate 90 degrees clockwise to display": upright it is 32 x 64 with the block top-right.
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    stored.save(p, "JPEG", quality=95, exif=exif.tobytes())
    im = load_image(p)
    assert im.size == (32, 64)
    r, g, b = im.getpixel((32 - 8, 8))
    assert r > 200 and g < 60 and b < 60, "stored top-left must land top-right"
    r, g, b = im.getpixel((8, 8))
    assert b > 200 and r < 60, "stored top-right (blue) must land top-left"


def test_load_image_errors_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read image"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot decode image") as info:
        load_image(bad)
    assert info.value.hint


# --- skipping bad files -----------------------------------------------------------------------


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    full = path.with_suffix(".full.jpg")
    noisy.save(full, "JPEG")
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    return path


def test_corrupt_files_are_skipped_counted_and_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _distinct_pngs(tmp_path / "cat", ["good1.png", "good2.png"])
    _truncated_jpeg(tmp_path / "cat" / "trunc.jpg")
    (tmp_path / "cat" / "garbage.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "cat" / "zero.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="lorsu_edge.samples"):
        result = read_samples(tmp_path)
    assert [s.path for s in result.samples] == [p.resolve() for p in good]
    reasons = {p.name: r for p, r in result.skipped}
    assert set(reasons) == {"trunc.jpg", "garbage.png", "zero.png"}
    assert reasons["zero.png"] == "empty file"
    assert "cannot decode" in reasons["trunc.jpg"] and "cannot decode" in reasons["garbage.png"]
    for name in reasons:
        assert any(name in rec.getMessage() for rec in caplog.records)


def test_manifest_missing_file_and_directory_are_skipped(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png")
    (tmp_path / "adir.png").mkdir()
    _manifest(
        tmp_path,
        [{"image": "gone.png", "label": "a"}, {"image": "adir.png", "label": "a"}, {"image": "ok.png", "label": "a"}],
    )
    result = read_samples(tmp_path)
    assert len(result.samples) == 1
    assert [(p.name, r) for p, r in result.skipped] == [("gone.png", "missing file"), ("adir.png", "not a file")]


def test_nothing_usable_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "zero.png").write_bytes(b"")
    err = _data_error(tmp_path)
    assert "no usable image" in err.message and "zero.png" in err.message and "empty file" in err.message


def test_warnings_are_capped_but_every_skip_is_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(samples_mod, "MAX_SKIP_WARNINGS", 2)
    _png(tmp_path / "cat" / "ok.png")
    for i in range(5):
        (tmp_path / "cat" / f"z{i}.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="lorsu_edge.samples"):
        result = read_samples(tmp_path)
    assert len(result.skipped) == 5
    assert len(caplog.records) == 3
    assert "3 more" in caplog.records[-1].getMessage()


# --- duplicates, hashing, cap -----------------------------------------------------------------


def test_duplicate_content_keeps_first(tmp_path: Path) -> None:
    first = _png(tmp_path / "cat" / "a.png", color=(1, 1, 1))
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "copy.png").write_bytes(first.read_bytes())
    _png(tmp_path / "dog" / "other.png", color=(2, 2, 2))
    result = read_samples(tmp_path)
    assert [(s.label, s.path.name) for s in result.samples] == [("cat", "a.png"), ("dog", "other.png")]
    assert result.skipped == [((tmp_path / "dog" / "copy.png").resolve(), f"duplicate of {first.resolve()}")]


def test_same_image_listed_twice_in_manifest_is_a_duplicate(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _manifest(tmp_path, [{"image": "a.png", "label": "x"}, {"image": "./a.png", "label": "y"}])
    result = read_samples(tmp_path)
    assert [s.label for s in result.samples] == ["x"]
    assert result.skipped[0][1].startswith("duplicate of")


def test_vqa_questions_on_one_image_are_distinct_samples(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "question": "What colour?", "answer": "dark"},
        {"image": "a.png", "question": "How many?", "answer": 1},
        {"image": "a.png", "question": "What colour?", "answer": "black"},  # same question again
    ]
    _manifest(tmp_path, rows)
    result = read_samples(tmp_path)
    assert [s.question for s in result.samples] == ["What colour?", "How many?"]
    assert len({s.sha256 for s in result.samples}) == 1
    assert len(result.skipped) == 1 and result.skipped[0][1].startswith("duplicate of")


def test_sha256_is_hash_of_file_bytes(tmp_path: Path) -> None:
    paths = _distinct_pngs(tmp_path / "x", ["a.png", "b.png"])
    result = read_samples(tmp_path)
    assert [s.sha256 for s in result.samples] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_max_samples_caps_usable_samples_and_stops_opening_files(tmp_path: Path) -> None:
    _distinct_pngs(tmp_path / "a", ["1.png", "2.png", "3.png"])
    (tmp_path / "a" / "0.png").write_bytes(b"")  # first in order: skipped, does not count
    (tmp_path / "a" / "9.png").write_bytes(b"")  # after the cap: never opened
    result = read_samples(tmp_path, max_samples=2)
    assert [s.path.name for s in result.samples] == ["1.png", "2.png"]
    assert [p.name for p, _ in result.skipped] == ["0.png"]
    assert len(read_samples(tmp_path, max_samples=100).samples) == 3


def test_max_samples_keeps_every_class_of_a_folder_layout(tmp_path: Path) -> None:
    for label in ["a", "b", "c"]:
        _distinct_pngs(tmp_path / label, [f"{i}.png" for i in range(5)])
    result = read_samples(tmp_path, max_samples=3)
    assert result.labels == ["a", "b", "c"]


def test_manifest_order_is_kept_under_a_cap(tmp_path: Path) -> None:
    _distinct_pngs(tmp_path, ["1.png", "2.png", "3.png"])
    _manifest(tmp_path, [{"image": f"{i}.png", "label": "same" if i < 3 else "other"} for i in (1, 2, 3)])
    assert read_samples(tmp_path, max_samples=2).labels == ["same"]


def test_max_samples_must_be_positive(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png")
    with pytest.raises(ValueError, match="max_samples"):
        read_samples(tmp_path, max_samples=0)


def test_dataclasses_are_usable_directly() -> None:
    s = Sample(path=Path("x.png"), sha256="0" * 64, question="Q?", answer="A")
    assert s.is_vqa
    empty = SampleSet(root=Path("."), samples=[])
    assert (empty.kind, empty.labels, empty.skipped) == ("label", [], [])


def test_verified_jpeg_still_loads_at_full_size(tmp_path: Path) -> None:
    # verification decodes JPEGs at reduced scale; loading for training must not
    p = tmp_path / "c" / "big.jpg"
    p.parent.mkdir()
    Image.new("RGB", (80, 48), (0, 128, 0)).save(p, "JPEG")
    (sample,) = read_samples(tmp_path).samples
    assert load_image(sample.path).size == (80, 48)


@pytest.mark.parametrize("ext", sorted(samples_mod.IMAGE_EXTENSIONS))
def test_every_accepted_extension_reads_and_loads_as_rgb(tmp_path: Path, ext: str) -> None:
    p = tmp_path / "c" / f"img{ext.upper()}"
    p.parent.mkdir()
    im = Image.new("RGB", (12, 10), (200, 40, 40))
    (im.quantize(4) if ext == ".gif" else im).save(p)
    (sample,) = read_samples(tmp_path).samples
    im = load_image(sample.path)
    assert (im.mode, im.size) == ("RGB", (12, 10))
    # lossy formats (jpeg, webp) move the colour a little
    assert all(abs(c - e) <= 12 for c, e in zip(im.getpixel((5, 5)), (200, 40, 40)))


def test_cmyk_and_bilevel_images_become_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("1", (4, 3), 1).save(tmp_path / "bw.bmp")
    red = load_image(tmp_path / "cmyk.jpg").getpixel((1, 1))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    assert load_image(tmp_path / "bw.bmp").getpixel((1, 1)) == (255, 255, 255)


# --- malformed inputs: exit 3 naming file and line (they were exit 1, "internal error") ----------


def test_nul_byte_in_a_manifest_path_names_the_line(tmp_path: Path) -> None:
    """Bug: Path.resolve() raised a bare ValueError ("embedded null byte"), exit 1."""
    _png(tmp_path / "a.png")
    _manifest(tmp_path, [{"image": "a.png", "label": "x"}, {"image": "a\u0000.png", "label": "y"}])
    err = _data_error(tmp_path)
    assert "line 2:" in err.message and "NUL" in err.message


def test_templates_not_utf8_names_the_line(tmp_path: Path) -> None:
    """Bug: UnicodeDecodeError escaped read_templates, exit 1."""
    _png(tmp_path / "cat" / "1.png")
    (tmp_path / "templates.txt").write_bytes(b"a photo of a {label}\n# caf\xc3\xa9 ok\na {label} caf\xe9\n")
    err = _data_error(tmp_path)
    assert "templates.txt line 3: not UTF-8" in err.message


@pytest.mark.parametrize("bad", ["a {label.nope}", "a {label} {0}", "{label[0][0][0]}", "a {label!z}", "no label"])
def test_bad_template_names_file_and_line(tmp_path: Path, bad: str) -> None:
    """Bug: `{label.nope}` raised AttributeError (exit 1): only Key/Index/ValueError were caught."""
    _png(tmp_path / "cat" / "1.png")
    (tmp_path / "templates.txt").write_text(f"a photo of a {{label}}\n\n{bad}\n", encoding="utf-8")
    err = _data_error(tmp_path)
    assert "templates.txt line 3: template" in err.message
    with pytest.raises(DataError, match="--template: template"):
        samples_mod.check_templates(("a {label}", bad), "--template")


def test_malformed_inputs_exit_3_through_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorsu_edge.cli.main import app

    _png(tmp_path / "a.png")
    _manifest(tmp_path, [{"image": "a\u0000.png", "label": "y"}])
    res = CliRunner().invoke(app, ["eval", "--data", str(tmp_path), "--workdir", str(tmp_path / "wd")])
    assert res.exit_code == 3 and "line 1:" in res.output and "internal error" not in res.output
