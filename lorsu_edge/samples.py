"""Read a session's few-shot samples (`lorsu-edge adapt --data DIR`).

Two layouts are accepted, tried in this order:

1. `DIR/manifest.jsonl`: one JSON object per line, either
   `{"image": "relpath", "label": "..."}` or `{"image": ..., "question": ..., "answer": ...}`.
   Unknown fields are ignored, blank lines are allowed, paths are relative to DIR (absolute paths
   work too) and are resolved.
2. Class subfolders: `DIR/<label>/*.{jpg,jpeg,png,bmp,gif,webp,tif,tiff}` (extension
   case-insensitive, hidden files and folders ignored). Files are sorted within each class and
   the classes are interleaved (a1, b1, c1, a2, ...), so a `max_samples` cap keeps every class
   instead of filling up with the alphabetically first one.

Every image is read once: its bytes are hashed (sha256, which the workdir uses to know what was
already trained on) and decoded through the same path `load_image` takes, so a file that passes
here will also load during training. Unusable files are skipped with a logged warning and recorded
in `SampleSet.skipped`; malformed manifests are a `DataError` naming file, line and field.

An inbox on an unattended box is not trusted (`lorsu_edge.imagefile`): only regular files within
the byte and pixel caps of `ImageLimits`, in a raster format, are decoded, and every path (manifest
rows and class-folder files alike, after links are resolved) must lie inside DIR unless
`allow_outside=True` (`--allow-outside-data`). Refused files are skipped and counted like corrupt ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from lorsu_edge.errors import DataError, decode_utf8
from lorsu_edge.imagefile import ImageLimits, ImageRefused, decode_image, read_image_bytes

TEMPLATES_NAME = "templates.txt"
MANIFEST_NAME = "manifest.jsonl"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Past this many, per-file warnings become one summary line: a folder of 5,000 broken files
# should not bury the rest of the run's output. Every skip is still in `SampleSet.skipped`.
MAX_SKIP_WARNINGS = 20

_LAYOUTS_HINT = (
    f"put a {MANIFEST_NAME} in DIR (one JSON object per line: "
    '{"image": "cat/1.jpg", "label": "cat"} or {"image": ..., "question": ..., "answer": ...}) '
    "or one subfolder per class: DIR/<label>/*.jpg|png|..."
)
_ROW_HINT = (
    'each line must be one JSON object like {"image": "cat/1.jpg", "label": "cat"} '
    'or {"image": "x.jpg", "question": "What is it?", "answer": "a cat"}'
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One verified image with its label or its question/answer pair."""

    path: Path
    """Resolved path of the image file."""
    sha256: str
    """Hex sha256 of the file's bytes (the workdir uses it to know what was already trained on)."""
    label: str | None = None
    question: str | None = None
    answer: str | None = None
    limits: ImageLimits = field(default=ImageLimits(), compare=False)
    """The caps the image was verified under; `load_image(s.path, s.limits)` reloads it under the same ones."""

    @property
    def is_vqa(self) -> bool:
        """True for a question/answer sample, False for a label sample."""
        return self.question is not None


@dataclass
class SampleSet:
    """The usable samples of one data folder, in a deterministic order, plus what was skipped."""

    root: Path
    samples: list[Sample]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """(file, reason) for every missing, unreadable, corrupt or duplicate image."""
    templates: tuple[str, ...] = ()
    """Caption templates from DIR/templates.txt (one per line, with `{label}`); () = the defaults."""

    @property
    def labels(self) -> list[str]:
        """Sorted unique labels of the label (non-VQA) samples."""
        return sorted({s.label for s in self.samples if not s.is_vqa and s.label is not None})

    @property
    def kind(self) -> str:
        """"label", "vqa" or "mixed" ("label" for an empty set)."""
        vqa = sum(s.is_vqa for s in self.samples)
        if vqa == 0:
            return "label"
        return "vqa" if vqa == len(self.samples) else "mixed"


@dataclass(frozen=True)
class _Row:
    """A sample before its image is verified."""

    path: Path
    label: str | None = None
    question: str | None = None
    answer: str | None = None


class _Unusable(Exception):
    """An image file that is skipped; the message is the reason recorded in `skipped`."""


def read_samples(root: Path, *, max_samples: int | None = None, limits: ImageLimits = ImageLimits(),
                 allow_outside: bool = False) -> SampleSet:
    """Read and verify the samples under `root` (manifest.jsonl, else class subfolders).

    `max_samples` caps the number of usable samples kept (the first ones in order: manifest
    order, or classes interleaved for folders); files after the cap are not opened. `limits` caps
    each file's bytes and pixels; `allow_outside` accepts paths that resolve outside `root`.
    Raises `DataError` for a missing folder, an unrecognised layout, a malformed manifest, or
    when no image at all is usable; `ValueError` for `max_samples < 1`.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    root = _check_root(Path(root))
    manifest = root / MANIFEST_NAME
    rows = _read_manifest(manifest, root) if manifest.is_file() else _scan_folders(root)
    sample_set = _verify(root, rows, max_samples, limits, allow_outside)
    sample_set.templates = read_templates(root / TEMPLATES_NAME)
    return sample_set


def read_templates(path: Path) -> tuple[str, ...]:
    """Caption templates, one per line, each with a `{label}` placeholder (blank lines and # comments skipped)."""
    if not path.is_file():
        return ()
    try:
        text = decode_utf8(path.read_bytes(), str(path), DataError, hint="save the templates as UTF-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}", hint="check the file's permissions") from e
    kept = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.strip().startswith("#"):
            kept.append(_check_template(line.strip(), f"{path} line {lineno}"))
    return tuple(kept)


def check_templates(templates: tuple[str, ...], where: str) -> tuple[str, ...]:
    """Each template must format with `label=` alone and contain `{label}`."""
    return tuple(_check_template(t, where) for t in templates)


def _check_template(template: str, where: str) -> str:
    try:
        ok = "{label}" in template and bool(template.format(label="x"))
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):  # {0}, {x}, {label.nope}, {label[0][0]}..
        ok = False
    if not ok:
        raise DataError(f"{where}: template {template!r} needs a {{label}} placeholder and no other braces",
                        hint='write e.g. "a photo of a {label}."')
    return template


def load_image(path: Path, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Load an image as 8-bit RGB with its EXIF orientation applied (`imagefile.decode_image`).

    Grayscale and palette images are converted; transparency (RGBA, LA, palette or colour-key)
    is composited on white; 16-bit and 32-bit/float grayscale are scaled down to 8 bits rather
    than clipped. Raises `DataError` if the file cannot be read or decoded, or is refused (not a
    regular file, over `limits`, not a raster format).
    """
    path = Path(path)
    try:
        data = read_image_bytes(path, limits)
    except ImageRefused as e:
        raise DataError(
            f"cannot read image {path}: {e}",
            hint="the file was readable when the samples were listed; check it was not moved or replaced",
        ) from None
    try:
        return decode_image(data, limits)
    except Exception as e:  # PIL's plugins raise many exception types on corrupt input
        raise DataError(
            f"cannot decode image {path}: {type(e).__name__}: {e}",
            hint="open the file in an image viewer; re-save or remove it",
        ) from e


# --- layout detection -------------------------------------------------------------------------


def _check_root(root: Path) -> Path:
    if not root.exists():
        hint = "pass --data DIR with an existing folder; " + _LAYOUTS_HINT
        raise DataError(f"data folder {root} does not exist", hint=hint)
    if not root.is_dir():
        hint = "pass the folder that holds the images; " + _LAYOUTS_HINT
        raise DataError(f"--data {root} is not a folder", hint=hint)
    return root.resolve()


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _scan_folders(root: Path) -> list[_Row]:
    """Rows from DIR/<label>/<image>: sorted within each class, classes interleaved round-robin."""
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p))
        per_class = [_class_rows(folder) for folder in folders]
    except OSError as e:
        hint = "check the folder's permissions"
        raise DataError(f"cannot list {root}: {e.strerror or e}", hint=hint) from e
    # round-robin over classes; zip_longest pads the shorter classes with None
    rows = [row for group in itertools.zip_longest(*per_class) for row in group if row is not None]
    if not rows:
        message = f"no {MANIFEST_NAME} and no class subfolders with images in {root}"
        raise DataError(message, hint=_no_layout_hint(root))
    return rows


def _class_rows(folder: Path) -> list[_Row]:
    return [
        _Row(path=f.resolve(), label=folder.name)
        for f in sorted(folder.iterdir())
        # not is_dir rather than is_file: a broken link is kept and then skipped as missing
        if f.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(f) and not f.is_dir()
    ]


def _no_layout_hint(root: Path) -> str:
    """Point at the likely mistake (flat images, misnamed manifest) before the generic advice."""
    try:
        names = [p.name for p in root.iterdir() if p.is_file() and not _is_hidden(p)]
    except OSError:
        names = []
    near = sorted(n for n in names if n.lower().endswith((".jsonl", ".json")))
    if near:
        found = ", ".join(near[:3])
        return f"found {found}: the manifest must be named exactly {MANIFEST_NAME}; " + _LAYOUTS_HINT
    if any(Path(n).suffix.lower() in IMAGE_EXTENSIONS for n in names):
        advice = "images directly in DIR have no label: move them into DIR/<label>/ or list them in a manifest; "
        return advice + _LAYOUTS_HINT
    return _LAYOUTS_HINT


# --- manifest ---------------------------------------------------------------------------------


def _read_manifest(path: Path, root: Path) -> list[_Row]:
    """Parse every line first, so a bad line fails fast before any image is opened."""
    try:
        # -sig: tolerate a BOM from Windows editors
        text = decode_utf8(path.read_bytes(), str(path), DataError, hint="save the manifest as UTF-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}", hint="check the file's permissions") from e
    # split on \n only: str.splitlines would also split on U+2028 etc., which are legal inside JSON strings
    rows = [
        _parse_row(line, path, lineno, root)
        for lineno, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]
    if not rows:
        raise DataError(f"{path} has no rows", hint=_ROW_HINT)
    return rows


def _parse_row(line: str, path: Path, lineno: int, root: Path) -> _Row:
    where = f"{path} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})", hint=_ROW_HINT) from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(obj)}", hint=_ROW_HINT)
    image = _text_field(obj, "image", where, numbers_ok=False)
    if image is None:
        raise DataError(f'{where}: missing field "image"', hint=_ROW_HINT)
    if "\0" in image:  # no file name holds one; resolving it would raise a bare ValueError
        raise DataError(f'{where}: field "image" contains a NUL character (\\u0000)', hint=_ROW_HINT)
    label = _text_field(obj, "label", where, numbers_ok=True)
    if obj.get("question") is None and obj.get("answer") is None:
        if label is None:
            message = f'{where}: missing field "label" (or "question" + "answer" for a VQA row)'
            raise DataError(message, hint=_ROW_HINT)
        return _Row(path=_resolve(image, root), label=label)
    question = _text_field(obj, "question", where, numbers_ok=False)
    answer = _text_field(obj, "answer", where, numbers_ok=True)  # "2" and 2 are the same answer
    for name, value in (("question", question), ("answer", answer)):
        if value is None:
            message = f'{where}: missing field "{name}" (a VQA row needs both "question" and "answer")'
            raise DataError(message, hint=_ROW_HINT)
    return _Row(path=_resolve(image, root), label=label, question=question, answer=answer)


def _text_field(obj: dict[str, Any], name: str, where: str, *, numbers_ok: bool) -> str | None:
    """The field as a stripped non-empty string, None if absent or null; DataError on a bad type."""
    value = obj.get(name)
    if value is None:
        return None
    # bool is an int subclass; `"label": true` is a mistake, not the label "True"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_number and numbers_ok and math.isfinite(value):
        return str(value)
    if not isinstance(value, str):
        allowed = "a string or a number" if numbers_ok else "a string"
        raise DataError(f'{where}: field "{name}" must be {allowed}, got {_json_type(value)}', hint=_ROW_HINT)
    if not value.strip():
        raise DataError(f'{where}: field "{name}" is empty', hint=_ROW_HINT)
    return value.strip()


def _json_type(value: object) -> str:
    """How a JSON value reads in an error message ("an array", "a boolean", ...)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return f"the non-finite number {value}"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), type(value).__name__)


def _resolve(image: str, root: Path) -> Path:
    p = Path(image)
    return (p if p.is_absolute() else root / p).resolve()


# --- verification -----------------------------------------------------------------------------


def _verify(root: Path, rows: list[_Row], max_samples: int | None, limits: ImageLimits,
            allow_outside: bool) -> SampleSet:
    """Hash and decode each row's image; keep the first of each duplicate; stop at the cap."""
    out = SampleSet(root=root, samples=[])
    first_seen: dict[tuple[str, str | None], Path] = {}
    for row in rows:
        if max_samples is not None and len(out.samples) >= max_samples:
            break
        try:
            _check_inside(row.path, root, allow_outside)
            digest = _check_image(row, first_seen, limits)
        except _Unusable as e:
            _skip(out, row.path, str(e))
            continue
        out.samples.append(Sample(row.path, digest, row.label, row.question, row.answer, limits))
    if len(out.skipped) > MAX_SKIP_WARNINGS:
        more = len(out.skipped) - MAX_SKIP_WARNINGS
        log.warning("... and %d more files skipped (%d in all)", more, len(out.skipped))
    if not out.samples:
        first = f" (first: {out.skipped[0][0]}: {out.skipped[0][1]})" if out.skipped else ""
        raise DataError(
            f"no usable image in {root}: {len(out.skipped)} file(s) skipped{first}",
            hint="check that the files open in an image viewer and that manifest paths are relative to DIR",
        )
    return out


def _check_inside(path: Path, root: Path, allow_outside: bool) -> None:
    """`path` is already resolved (links followed), so a link pointing out of DIR is caught too."""
    if not allow_outside and not path.is_relative_to(root):
        raise _Unusable(f"outside the data folder {root} (pass --allow-outside-data to accept it)")


def _check_image(row: _Row, first_seen: dict[tuple[str, str | None], Path], limits: ImageLimits) -> str:
    """Return the file's sha256 if it is a new, decodable image; raise `_Unusable` otherwise."""
    try:
        data = read_image_bytes(row.path, limits)
    except ImageRefused as e:
        raise _Unusable(str(e)) from None
    digest = hashlib.sha256(data).hexdigest()
    # VQA data often asks several questions about one image: those are distinct samples, so the
    # duplicate key includes the question. For label rows the same picture twice (even under two
    # labels) is a duplicate and only the first is kept.
    key = (digest, row.question)
    if key in first_seen:
        raise _Unusable(f"duplicate of {first_seen[key]}")
    try:
        decode_image(data, limits, reduced=True)
    except ImageRefused as e:
        raise _Unusable(str(e)) from None
    except Exception as e:  # PIL's plugins raise many exception types on corrupt input
        raise _Unusable(f"cannot decode image: {type(e).__name__}: {e}") from e
    first_seen[key] = row.path
    return digest


def _skip(out: SampleSet, path: Path, reason: str) -> None:
    out.skipped.append((path, reason))
    if len(out.skipped) <= MAX_SKIP_WARNINGS:
        log.warning("skipped %s: %s", path, reason)
