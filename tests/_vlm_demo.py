"""The VLM demo's data as the demo tests read it back: its folders, the animal-mnist pixels and the default
VLM's alignment/held-out split, and the gray pixels of a written sample (shared by test_demo and
test_demo_anchor)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def vlm_demo_data(tmp_path: Path, **sizes: int):
    """(DemoData, opts, animal-mnist images, VLM alignment indices, VLM held-out indices) of a small demo --vlm,
    its control `extra_control` images per class above the VLM's own held-out set."""
    from lorsu_edge.demo import DemoOptions, vlm_data
    from lorsu_edge.zoo import datasets
    from lorsu_edge.zoo.vlm import VlmBuildOptions

    build = VlmBuildOptions()
    extra = sizes.pop("extra_control")
    opts = DemoOptions.for_kind("vlm", workdir=tmp_path, control_per_class=build.eval_per_class + extra, **sizes)
    images, _ = datasets.animal_mnist_arrays()
    align, heldout = datasets.animal_mnist_split(build.seed, build.align_per_class, build.eval_per_class)
    return vlm_data(opts, tmp_path / "data"), opts, images, align, heldout


def gray(sample) -> np.ndarray:
    """A written sample's pixels as 8-bit gray."""
    from lorsu_edge.samples import load_image

    return np.asarray(load_image(sample.path).convert("L"))


def digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
