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


@pytest.mark.skipif(not HAVE_ANIMALS, reason="needs animal-mnist: pip install --no-deps animal-mnist==0.4")
def test_vlm_demo_anchors_are_plain_animals_the_vlm_never_saw_and_no_demo_set_holds(tmp_path):
    """Catches anchors overlapping the VLM's alignment or held-out data, the demo's nights, target eval or
    control (pixel for pixel, negatives compared un-inverted), or anchors shown inverted."""
    from _vlm_demo import digest, gray, vlm_demo_data

    from lorsu_edge.demo import ANCHOR_IMAGES
    from lorsu_edge.samples import read_samples

    data, _, images, align, heldout = vlm_demo_data(tmp_path, sessions=2, shots=2, eval_per_class=2, extra_control=3)

    def plain(folder, invert: bool) -> list[str]:
        return [digest(255 - gray(s) if invert else gray(s)) for s in read_samples(folder).samples]

    shown = [*plain(data.control, False), *(h for f in [*data.sessions, data.target_eval] for h in plain(f, True))]
    seen = {digest(images[i]) for i in align + heldout} | set(shown)
    anchors = read_samples(data.anchor).samples
    digests = plain(data.anchor, False)
    assert len(anchors) == ANCHOR_IMAGES and len(set(digests)) == ANCHOR_IMAGES and not seen & set(digests)
    assert len({s.label for s in anchors}) == 10 and not any(s.is_vqa for s in anchors)
    assert all(gray(s).mean() < 128 for s in anchors)  # plain: light animal, dark ground
