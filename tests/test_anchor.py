"""Anchor distillation: zero (value and gradient) at the night-start weights, pulling back once they move."""

from contextlib import nullcontext

import pytest
import torch

from lorsu_edge.anchor import AnchorObjective, anchored, distillation_loss, read_anchor_images, start_features
from lorsu_edge.consumer import image_features
from lorsu_edge.errors import BadInputError
from lorsu_edge.load import load_model
from lorsu_edge.losses import Batch, make_objective
from lorsu_edge.samples import read_samples
from lorsu_edge.tiny import save_tiny, write_toy_images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("anchor")
    loaded = load_model(str(save_tiny("clip", root / "model")), device="cpu")
    data = read_samples(write_toy_images(root / "data", per_class=2))
    flat = root / "anchors"
    write_toy_images(root / "anchor_src", labels=("green", "yellow"), per_class=3, seed=5)
    flat.mkdir()
    for i, p in enumerate(sorted((root / "anchor_src").rglob("*.png"))):
        p.rename(flat / f"{i}.png")
    return loaded, data, flat


def _anchor_term(loaded, data, flat):
    task = make_objective("clip", loaded.model, loaded.spec, loaded.processor)
    anchors = read_anchor_images(flat, limit=4)
    obj = anchored(task, loaded.spec, loaded.processor, loaded.model, anchors, 10.0, nullcontext)
    return task, obj


def test_anchor_term_is_zero_with_zero_gradient_when_nothing_changed(setup):
    """Why the importance pass may leave it out: at the night-start weights it adds nothing."""
    loaded, data, flat = setup
    task, obj = _anchor_term(loaded, data, flat)
    assert isinstance(obj, AnchorObjective) and len(obj.anchors) == 4  # the first 4 of 6, sorted
    batch = obj.make_batch(data.samples[:2])
    fc1 = loaded.spec.blocks[0].fc1
    weight = loaded.model.get_submodule(fc1).weight
    weight.requires_grad_(True)
    try:
        new = image_features(loaded.model, loaded.spec, batch.inputs["anchor_pixels"])
        term = distillation_loss(new, obj.start[batch.inputs["anchor_rows"]])
        assert term.item() == pytest.approx(0.0, abs=1e-6)
        term.backward()
        assert weight.grad.abs().max().item() < 1e-5
    finally:
        weight.requires_grad_(False)
        weight.grad = None


def test_anchor_gradient_pulls_a_moved_encoder_back(setup):
    """A step against the anchor term's gradient brings the features back towards the night-start ones."""
    loaded, data, flat = setup
    _, obj = _anchor_term(loaded, data, flat)
    weight = loaded.model.get_submodule(loaded.spec.blocks[-1].fc1).weight
    original = weight.detach().clone()
    pixels = obj.make_batch(data.samples[:4]).inputs

    def term():
        return distillation_loss(image_features(loaded.model, loaded.spec, pixels["anchor_pixels"]),
                                 obj.start[pixels["anchor_rows"]])
    try:
        with torch.no_grad():
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        moved = weight.detach().clone()
        weight.requires_grad_(True)
        drift = term()
        assert drift.item() > 1e-4
        drift.backward()
        with torch.no_grad():
            weight.sub_(1.0 * weight.grad)  # plain gradient step on the distillation term
            assert term().item() < drift.item()
            # the step points back towards the night-start weights, not merely somewhere lower
            assert torch.sum((moved - weight) * (moved - original)) > 0
    finally:
        with torch.no_grad():
            weight.copy_(original)
        weight.requires_grad_(False)
        weight.grad = None


def test_anchor_slices_cycle_and_the_task_loss_is_kept(setup):
    loaded, data, flat = setup
    task, obj = _anchor_term(loaded, data, flat)
    rows = [obj.make_batch(data.samples[:3]).inputs["anchor_rows"].tolist() for _ in range(2)]
    assert rows == [[0, 1, 2], [3, 0, 1]]  # every anchor visited before one repeats
    batch = obj.make_batch(data.samples[:3])
    plain = Batch({k: v for k, v in batch.inputs.items() if not k.startswith("anchor_")}, batch.size, batch.groups)
    with torch.no_grad():  # the term is 0 at the start, so the sum is the task loss on the same batch
        assert obj(loaded.model, batch).item() == pytest.approx(task(loaded.model, plain).item(), abs=1e-5)
    assert start_features(loaded.model, loaded.spec, loaded.processor, obj.anchors, nullcontext).shape[0] == 4


def test_bad_anchor_folders_are_one_line_errors(tmp_path):
    with pytest.raises(BadInputError, match="not a folder"):
        read_anchor_images(tmp_path / "missing", 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no images"):
        read_anchor_images(tmp_path / "empty", 10)
