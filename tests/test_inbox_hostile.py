"""Hostile inbox files on an unattended box, each made for real (a FIFO, /dev/zero, a socket, a link out of
the folder, EPS content under a .png name, a 300 KB PNG that declares 144 megapixels): each must be
skipped with its reason and counted, never hang, never exhaust memory, never reach Ghostscript.
The device-side decoder (export/infer_onnx.py, shipped with imagefile.py) must give the same pixels."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorsu_edge import imagefile
from lorsu_edge.errors import DataError
from lorsu_edge.imagefile import ImageLimits
from lorsu_edge.samples import MANIFEST_NAME, load_image, read_samples
from lorsu_edge.tiny import write_gray_png

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_hang():
    """A regression here blocks for ever (a FIFO read waits for a writer): fail after 60 s instead."""

    def _hung(*_):
        raise TimeoutError("reading the inbox hung")

    old = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _png(path: Path, value: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (value, 20, 30)).save(path)
    return path


def _reasons(result) -> dict[str, str]:
    return {p.name: r for p, r in result.skipped}


# --- files that are not regular files ----------------------------------------------------------


def test_fifo_named_like_an_image_is_skipped_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Bug: read_bytes() on a FIFO blocks for ever while adapt holds the workdir lock."""
    good = _png(tmp_path / "cat" / "1.png")
    os.mkfifo(tmp_path / "cat" / "9.png")
    result = read_samples(tmp_path)
    assert [s.path for s in result.samples] == [good.resolve()]
    assert _reasons(result) == {"9.png": "not a regular file (FIFO)"}
    with pytest.raises(DataError, match="FIFO"):  # the training-time reload does not hang either
        load_image(tmp_path / "cat" / "9.png")


def test_manifest_row_at_dev_zero_is_refused_not_read_until_memory_runs_out(tmp_path: Path) -> None:
    """Bug: /dev/zero was read whole (MemoryError, exit 1, or the OOM killer)."""
    _png(tmp_path / "a.png")
    rows = [{"image": "a.png", "label": "x"}, {"image": "/dev/zero", "label": "y"}]
    (tmp_path / MANIFEST_NAME).write_text("\n".join(json.dumps(r) for r in rows))
    confined = read_samples(tmp_path)
    assert "outside the data folder" in _reasons(confined)["zero"]
    allowed = read_samples(tmp_path, allow_outside=True)
    assert _reasons(allowed) == {"zero": "not a regular file (character device)"}
    assert len(allowed.samples) == 1


def test_unix_socket_is_skipped(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "1.png")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "cat" / "2.png"))
        result = read_samples(tmp_path)
    assert _reasons(result) == {"2.png": "not a regular file (socket)"}


# --- confinement --------------------------------------------------------------------------------


def test_links_and_manifest_paths_out_of_the_folder_need_allow_outside(tmp_path: Path) -> None:
    """Bug: a manifest row or a link could make adapt read (and hash, and train on) any file on the box."""
    inbox, elsewhere = tmp_path / "inbox", _png(tmp_path / "private" / "secret.png", value=99)
    inside = _png(inbox / "cat" / "1.png", value=1)
    (inbox / "cat" / "2.png").symlink_to(elsewhere)
    (inbox / "cat" / "3.png").symlink_to(inside)  # a link that stays inside is fine (and a duplicate)
    result = read_samples(inbox)
    assert [s.path for s in result.samples] == [inside.resolve()]
    reasons = _reasons(result)
    assert "outside the data folder" in reasons["secret.png"] and "--allow-outside-data" in reasons["secret.png"]
    assert reasons["1.png"].startswith("duplicate of")  # 3.png resolved to 1.png
    assert elsewhere.resolve() in [s.path for s in read_samples(inbox, allow_outside=True).samples]

    (inbox / MANIFEST_NAME).write_text(json.dumps({"image": "../private/secret.png", "label": "x"}) + "\n"
                                       + json.dumps({"image": "cat/1.png", "label": "cat"}) + "\n")
    via_manifest = read_samples(inbox)
    assert [s.path for s in via_manifest.samples] == [inside.resolve()]
    assert "outside the data folder" in _reasons(via_manifest)["secret.png"]


# --- formats and caps ---------------------------------------------------------------------------


def test_eps_content_under_a_png_name_never_reaches_ghostscript(tmp_path: Path) -> None:
    """Bug: Image.open without formats= hands any EPS/PS file, whatever its name, to Ghostscript."""
    eps = tmp_path / "cat" / "1.png"
    eps.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(eps, format="EPS")
    with Image.open(eps) as im:  # the file really is EPS to an unrestricted Pillow
        assert im.format == "EPS"
    _png(tmp_path / "cat" / "2.png")
    result = read_samples(tmp_path)
    assert "raster formats" in _reasons(result)["1.png"]
    with pytest.raises(DataError, match="raster formats"):
        load_image(eps)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gray_png(tmp_path_factory.mktemp("bomb") / "big.png", 12000)


def test_pixel_bomb_is_refused_from_its_header(tmp_path: Path, bomb: Path) -> None:
    """Bug: a 300 KB 16-bit 12000x12000 PNG (under Pillow's own bomb limit) was decoded at 4.9 GiB."""
    (tmp_path / "cat").mkdir()
    bomb = Path(shutil.copy(bomb, tmp_path / "cat" / "big.png"))
    assert bomb.stat().st_size < 1_000_000
    _png(tmp_path / "cat" / "ok.png")
    result = read_samples(tmp_path)
    assert _reasons(result) == {"big.png": "12000x12000 = 144.0 MP, over the 40 MP cap "
                                           "(raise it with --max-image-megapixels)"}
    assert len(read_samples(tmp_path, limits=ImageLimits(max_pixels=48)).samples) == 1  # 8x6: the cap is inclusive
    with pytest.raises(DataError, match="no usable image"):
        read_samples(tmp_path, limits=ImageLimits(max_pixels=47))


def test_byte_cap_and_exact_limit(tmp_path: Path) -> None:
    """The cap is inclusive: a file of exactly max_bytes is read, one byte more is refused."""
    png = _png(tmp_path / "cat" / "1.png")
    size = png.stat().st_size
    assert len(read_samples(tmp_path, limits=ImageLimits(max_bytes=size)).samples) == 1
    with pytest.raises(DataError, match="no usable image") as info:
        read_samples(tmp_path, limits=ImageLimits(max_bytes=size - 1))
    assert f"over the {size - 1:,}-byte cap" in info.value.message


def test_bad_limits_are_refused() -> None:
    for bad in (dict(max_bytes=0), dict(max_pixels=0)):
        with pytest.raises(ValueError):
            ImageLimits(**bad)


def test_cli_flags_reach_the_reader_and_bad_values_exit_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import lorsu_edge.adapt  # noqa: F401  (imported now: `eval` imports it, and it would bind the fake below)
    from lorsu_edge import samples
    from lorsu_edge.cli.main import app

    seen: list[dict] = []

    def fake_read(root, **kw):
        seen.append(kw)
        raise DataError("stop here", hint="test")

    monkeypatch.setattr(samples, "read_samples", fake_read)
    runner = CliRunner()
    args = ["eval", "--data", str(tmp_path), "--workdir", str(tmp_path / "wd")]
    res = runner.invoke(app, [*args, "--max-image-size", "2MB", "--max-image-megapixels", "1.5",
                              "--allow-outside-data"])
    assert res.exit_code == 3 and seen == [{"limits": ImageLimits(2_000_000, 1_500_000), "allow_outside": True}]
    res = runner.invoke(app, args)
    assert seen[-1] == {"limits": ImageLimits(), "allow_outside": False}
    for bad in (["--max-image-megapixels", "0"], ["--max-image-size", "12"]):
        res = runner.invoke(app, [*args, *bad])
        assert res.exit_code == 3 and bad[0] in res.output, res.output


# --- decoding without full-size int64/float64 copies ---------------------------------------------


def _reference_high_bit(im: Image.Image) -> np.ndarray:
    """The former whole-array formula (int64/float64 copies of every pixel): the chunked code must match it."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        finite = np.concatenate([arr[np.isfinite(arr)], [0.0] * bool(np.isnan(arr).any())])
        arr = np.nan_to_num(arr, nan=0.0, posinf=finite.max(), neginf=finite.min())  # inf: the finite extremes
        unit = arr.min() >= 0.0 and arr.max() <= 1.0
        lo, hi = float(arr.min()), float(arr.max())
        scaled = arr * 255.0 if unit else ((arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr))
    else:
        arr = arr.astype(np.int64)
        lo, hi = int(arr.min()), int(arr.max())
        if im.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
            scaled = arr / 257.0
        elif lo >= 0 and hi <= 255:
            scaled = arr.astype(np.float64)
        else:
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(arr.shape)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_bit_cases() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    f = rng.normal(3, 5, (37, 23)).astype(np.float32)
    f[0, 0], f[1, 1], f[2, 2] = np.nan, np.inf, -np.inf
    return {
        "I;16 full range": Image.fromarray(rng.integers(0, 65536, (37, 23), dtype=np.uint16)),
        "I 16-bit data": Image.fromarray(rng.integers(0, 60000, (37, 23)).astype(np.int32)),
        "I 8-bit data": Image.fromarray(rng.integers(0, 256, (37, 23)).astype(np.int32)),
        "I negative": Image.fromarray(rng.integers(-70000, 90000, (37, 23)).astype(np.int32)),
        "I flat": Image.fromarray(np.full((37, 23), -5, dtype=np.int32)),
        "F unit": Image.fromarray(rng.random((37, 23)).astype(np.float32)),
        "F stretched with nan/inf": Image.fromarray(f),
    }


@pytest.mark.parametrize("name", list(_high_bit_cases()))
def test_chunked_high_bit_conversion_equals_the_whole_array_formula(name: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of 50 pixels (2 rows of 23, the last band short): a band offset or a per-band min/max shows here."""
    monkeypatch.setattr(imagefile, "_CHUNK_PIXELS", 50)
    im = _high_bit_cases()[name]
    got = np.asarray(imagefile.high_bit_to_l(im))
    np.testing.assert_array_equal(got, _reference_high_bit(im))


_PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from lorsu_edge.imagefile import ImageLimits
    from lorsu_edge.samples import read_samples
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = read_samples(Path(sys.argv[1]), limits=ImageLimits(max_pixels=200_000_000))
    assert len(result.samples) == 1, result.skipped
    print(before * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def test_sixteen_bit_bomb_decodes_under_a_gib_when_the_cap_is_raised(tmp_path: Path, bomb: Path) -> None:
    """Bug: int64/float64 full-size copies in the high-bit path peaked at 4.9 GiB on this 144 MP image.
    Now: Pillow's own 288 MB (16-bit) + 144 MB (8-bit) + 432 MB (RGB) buffers, no float copy of the image."""
    (tmp_path / "cat").mkdir()
    shutil.copy(bomb, tmp_path / "cat" / "big.png")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    before, peak = map(int, out.stdout.split())
    assert peak - before < 1.0 * 2**30, f"decoding grew the process by {(peak - before) / 2**30:.2f} GiB"


# --- the device-side decoder ---------------------------------------------------------------------


def _mixed_images(folder: Path) -> list[Path]:
    """Every mode that decodes differently from a plain convert('RGB'), plus a plain JPEG."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    made = {
        "gray16.png": Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16)),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA"),
        "la.png": Image.fromarray(rng.integers(0, 256, (20, 30, 2), dtype=np.uint8), "LA"),
        "bilevel.png": Image.fromarray(rng.integers(0, 2, (20, 30)).astype(bool)),
        "float.tif": Image.fromarray(rng.normal(0, 9, (20, 30)).astype(np.float32)),
        "photo.jpg": Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)),
    }
    paths = []
    for name, im in made.items():
        im.save(folder / name)
        paths.append(folder / name)
    pal = Image.new("P", (30, 20), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.paste(1, (0, 0, 15, 20))
    pal.save(folder / "palette_transparent.png", transparency=0)
    rotated = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(folder / "rotated.jpg", exif=exif)
    return paths + [folder / "palette_transparent.png", folder / "rotated.jpg"]


_INFER_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import infer_onnx
    assert "lorsu_edge" not in sys.modules, "the shipped script must not need lorsu_edge"
    for i, p in enumerate(sys.argv[3:]):
        np.save(f"{sys.argv[2]}/{i}.npy", np.asarray(infer_onnx.load_rgb(p)))
    try:
        infer_onnx.load_rgb(sys.argv[2] + "/fifo.png")
    except infer_onnx.InferError as e:
        print(json.dumps(str(e)))
""")


def test_shipped_infer_script_decodes_bit_for_bit_as_training(tmp_path: Path) -> None:
    """Bug: infer_onnx.py decoded a 16-bit gray image to mean 254.5 (clipped) where training saw 127.5, and
    opened any format. Shipped as the README says (script + imagefile.py, no lorsu_edge), it must agree."""
    ship, out = tmp_path / "ship", tmp_path / "out"
    ship.mkdir()
    out.mkdir()
    shutil.copy(REPO / "export" / "infer_onnx.py", ship / "infer_onnx.py")
    shutil.copy(REPO / "lorsu_edge" / "imagefile.py", ship / "imagefile.py")
    os.mkfifo(out / "fifo.png")
    images = _mixed_images(tmp_path / "img")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", _INFER_SCRIPT, str(ship), str(out), *map(str, images)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "FIFO" in json.loads(run.stdout)
    for i, path in enumerate(images):
        device = np.load(out / f"{i}.npy")
        np.testing.assert_array_equal(device, np.asarray(load_image(path)), err_msg=path.name)
    gray16 = np.load(out / "0.npy")
    assert abs(gray16.mean() - 127.5) < 2  # uniform 16-bit noise, scaled, not clipped at 255
