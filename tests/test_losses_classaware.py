"""The class-aware contrastive term: a zero-shot classifier over every known label, beside the in-batch loss."""

import math

import pytest
import torch

from lorsu_edge.losses import ContrastiveObjective, class_aware_loss, contrastive_loss
from lorsu_edge.load import load_model
from lorsu_edge.samples import read_samples
from lorsu_edge.tiny import save_knowing_clip, write_toy_images


def _reference(img, protos, scale, ids):
    """-log softmax over known classes, written out: mean_i [log sum_c exp(s cos(x_i, p_c)) - s cos(x_i, p_y)]."""
    total = 0.0
    for x, y in zip(img.tolist(), ids.tolist()):
        nx = math.sqrt(sum(v * v for v in x))
        cos = [sum(a * b for a, b in zip(x, p)) / nx for p in protos.tolist()]
        total += math.log(sum(math.exp(scale * c) for c in cos)) - scale * cos[y]
    return total / len(ids)


def test_class_aware_loss_equals_the_reference_formula():
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(5, 8, generator=gen)
    protos = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    ids = torch.tensor([0, 3, -1, 1, 3])  # -1: a VQA sample, left out
    got = class_aware_loss(img, protos, torch.tensor(7.0), ids)
    keep = ids >= 0
    assert got.item() == pytest.approx(_reference(img[keep], protos, 7.0, ids[keep]), rel=1e-5)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    loaded = load_model(str(save_knowing_clip(root / "model", steps=0)), device="cpu")  # captions that differ
    data = read_samples(write_toy_images(root / "data", labels=("red", "blue"), per_class=2))
    return loaded, data


def test_objective_mixes_both_terms_and_never_drops_the_in_batch_loss(clip):
    """Catches the class-aware term replacing the in-batch loss, or prototypes built from one random template."""
    loaded, data = clip
    templates = ("a photo of a {label}.", "{label}")
    classes = {"blue": templates, "green": templates, "red": templates, "cat": ("an image of {label}.",)}
    obj = ContrastiveObjective(loaded.model, loaded.spec, loaded.processor, templates, seed=0, classes=classes,
                               class_weight=0.25)
    batch = obj.make_batch(data.samples)
    assert batch.class_ids.tolist() == [classes_idx for classes_idx in
                                        [list(classes).index(s.label) for s in data.samples]]
    with torch.no_grad():
        got = obj(loaded.model, batch)
        from lorsu_edge.consumer import image_features
        img = image_features(loaded.model, loaded.spec, batch.inputs["pixel_values"])
        scale = loaded.model.logit_scale.exp()
        in_batch = contrastive_loss(img, obj.text_features(batch.inputs["captions"]), scale, batch.groups)
        rows = []
        for label, tpl in classes.items():  # prompt ensemble: mean of unit caption embeddings, renormalised
            e = torch.nn.functional.normalize(obj.text_features([t.format(label=label) for t in tpl]), dim=-1)
            rows.append(torch.nn.functional.normalize(e.mean(0), dim=0))
        ref = _reference(img, torch.stack(rows), scale.item(), batch.class_ids)
    assert got.item() == pytest.approx(0.75 * in_batch.item() + 0.25 * ref, rel=1e-5)
    plain = ContrastiveObjective(loaded.model, loaded.spec, loaded.processor, templates, seed=0)
    assert plain.make_batch(data.samples).class_ids is None
