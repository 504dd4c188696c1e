"""Losses against their reference formulas: CLIP's and SigLIP's contrastive losses (written out by hand,
with same-caption positives), the ContrastiveObjective on tiny CLIP and SigLIP models, and the perplexity
objective (answer-only logits give transformers' own loss; targets end like the model's replies)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoProcessor, CLIPImageProcessor, LlavaForConditionalGeneration

from lorsu_edge import tiny
from lorsu_edge.consumer import embedding
from lorsu_edge.families import find_encoder
from lorsu_edge.losses import (IGNORE, ContrastiveObjective, PerplexityObjective, answer_token_loss,
                               contrastive_loss, vqa_text)
from lorsu_edge.samples import read_samples
from lorsu_edge.tiny import save_tiny, write_toy_images
from lorsu_edge.zoo import vlm


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory):
    path = save_tiny("llava", tmp_path_factory.mktemp("llava"))
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def test_answer_token_loss_equals_transformers_loss(tiny_llava, tmp_path: Path) -> None:
    model, processor = tiny_llava
    samples = read_samples(write_toy_images(tmp_path / "d", per_class=3, vqa=True)).samples
    batch = PerplexityObjective(model, None, processor).make_batch(samples)
    labels = batch.inputs["labels"]
    # rows differ in answer length, so the kept positions include other rows' padding
    assert len({int((row != IGNORE).sum()) for row in labels}) > 1
    tower = model.model.vision_tower if hasattr(model.model, "vision_tower") else model.vision_tower
    grads = []
    for loss_fn in (lambda: model(**batch.inputs).loss, lambda: answer_token_loss(model, batch.inputs)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in tower.parameters() if p.grad is not None])))
    (ref, g_ref), (ours, g_ours) = grads
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)


def test_target_ends_like_the_models_replies(tiny_llava) -> None:
    _, processor = tiny_llava
    # no chat template: LLaVA-1.5's prompt, the answer closed by eos
    prompt, full = vqa_text(processor, "What is it?", "a red")
    assert prompt == "USER: <image>\nWhat is it? ASSISTANT:" and full == prompt + " a red</s>"
    # the default VLM's template: its replies end with a newline (where generation stops), never eos
    processor.chat_template = vlm.CHAT_TEMPLATE
    try:
        prompt, full = vqa_text(processor, "What is it?", "a red")
    finally:
        processor.chat_template = None
    assert prompt == vlm.format_prompt("What is it?")
    assert full == vlm.format_prompt("What is it?") + vlm.format_answer("a red")


def _cosines(img: torch.Tensor, txt: torch.Tensor) -> list[list[float]]:
    """Cosine similarity of every (image, text) pair, in float64 Python numbers."""
    img, txt = img.double(), txt.double()
    return [[float(a @ b / (a.norm() * b.norm())) for b in txt] for a in img]


def clip_reference(img, txt, scale: float, groups: list) -> float:
    """CLIP's symmetric cross-entropy; row i's target mass is spread evenly over its group's members."""
    cos = _cosines(img, txt)
    n = len(cos)

    def one_side(logits: list[list[float]]) -> float:
        total = 0.0
        for i in range(n):
            log_z = math.log(sum(math.exp(v) for v in logits[i]))
            positives = [j for j in range(n) if groups[j] == groups[i]]
            total -= sum(logits[i][j] - log_z for j in positives) / len(positives)
        return total / n

    logits = [[scale * c for c in row] for row in cos]
    return (one_side(logits) + one_side([list(col) for col in zip(*logits)])) / 2


def siglip_reference(img, txt, scale: float, bias: float, groups: list) -> float:
    """SigLIP: -1/n sum_ij log sigmoid(z_ij (t cos_ij + b)), z = +1 for a positive pair, else -1."""
    cos = _cosines(img, txt)
    n = len(cos)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if groups[i] == groups[j] else -1.0
            total -= math.log(1 / (1 + math.exp(-z * (scale * cos[i][j] + bias))))
    return total / n


GROUPS = [0, 1, 0, 2, 1]


@pytest.mark.parametrize("groups", [None, GROUPS])
def test_contrastive_loss_is_clips_loss_with_group_positives(groups):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    want = clip_reference(img, txt, 3.0, groups or list(range(5)))
    got = contrastive_loss(img, txt, torch.tensor(3.0), None if groups is None else torch.tensor(groups))
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("groups", [None, GROUPS])
def test_contrastive_loss_with_a_bias_is_siglips_sigmoid_loss(groups):
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    want = siglip_reference(img, txt, 10.0, -2.5, groups or list(range(5)))
    got = contrastive_loss(img, txt, torch.tensor(10.0), None if groups is None else torch.tensor(groups),
                           bias=torch.tensor([-2.5]))
    assert float(got) == pytest.approx(want, rel=1e-5)


def _dual(kind: str, tmp_path: Path):
    """A tiny CLIP (its saved processor) or SigLIP (a BPE tokenizer + image processor, as a processor would hold)."""
    if kind == "clip":
        path = save_tiny("clip", tmp_path / "clip")
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    model = tiny.tiny_model("siglip")
    with torch.no_grad():  # init leaves scale 1 and bias 0: a dropped bias or exp() could not show
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.0)
    size = {"height": tiny.IMAGE_SIZE, "width": tiny.IMAGE_SIZE}
    return model, SimpleNamespace(image_processor=CLIPImageProcessor(size=size, crop_size=size),
                                  tokenizer=tiny._bpe_tokenizer([]))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_contrastive_objective_equals_the_reference_on_the_models_own_features(kind, tmp_path):
    """End to end: captions from the labels, same-label samples as positives, the model's own scale (and
    SigLIP's bias, with max-length padding as SigLIP was trained), gradients into the image tower only."""
    model, processor = _dual(kind, tmp_path)
    spec = find_encoder(model)
    samples = read_samples(write_toy_images(tmp_path / "d", labels=("red", "blue", "green"), per_class=2)).samples
    objective = ContrastiveObjective(model, spec, processor, seed=0)
    assert objective.sigmoid == (kind == "siglip")
    batch = objective.make_batch(samples)
    loss = objective(model, batch)
    loss.backward()
    with torch.no_grad():
        img = embedding(model.get_image_features(pixel_values=batch.inputs["pixel_values"]))
        padding = {"padding": "max_length", "max_length": 64} if kind == "siglip" else {"padding": True}
        tok = processor.tokenizer(batch.inputs["captions"], truncation=True, return_tensors="pt", **padding)
        tok.pop("token_type_ids", None)
        txt = embedding(model.get_text_features(**tok))
    assert (txt - txt[0]).abs().amax() > 1e-3  # captions embed differently (else groups could not show)
    labels = [s.label for s in samples]
    scale = float(model.logit_scale.detach().exp())
    if kind == "siglip":
        want = siglip_reference(img, txt, scale, float(model.logit_bias.detach()), labels)
        assert want != pytest.approx(clip_reference(img, txt, scale, labels), rel=1e-3)
    else:
        want = clip_reference(img, txt, scale, labels)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert all(p.grad is None for p in model.text_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_model.parameters())
