"""The demo's anchor slice: animals the default model was never aligned on and the control set never holds."""

import importlib.util

import pytest

HAVE_ANIMALS = importlib.util.find_spec("animal_mnist") is not None


@pytest.mark.skipif(not HAVE_ANIMALS, reason="needs animal-mnist: pip install --no-deps animal-mnist==0.4")
def test_anchor_slice_is_disjoint_from_alignment_and_control_pixel_for_pixel():
    """Catches anchors drawn from the control split (the judge would be trained on) or pixel duplicates."""
    from lorsu_edge.demo import ANCHOR_IMAGES, anchor_indices
    from lorsu_edge.zoo.datasets import animal_mnist_arrays, animal_mnist_split
    from lorsu_edge.zoo.dual import DualBuildOptions

    build = DualBuildOptions()
    align, control = animal_mnist_split(build.seed, build.align_per_class, build.control_per_class)
    chosen = anchor_indices(align + control, ANCHOR_IMAGES, seed=0)
    images, labels = animal_mnist_arrays()
    seen = {images[i].tobytes() for i in align + control}
    pixels = [images[i].tobytes() for i in chosen]
    assert len(chosen) == ANCHOR_IMAGES and not seen & set(pixels) and len(set(pixels)) == len(pixels)
    assert len({int(labels[i]) for i in chosen}) == 10  # every animal is represented
