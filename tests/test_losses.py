"""The perplexity objective: answer-only logits give transformers' own loss; targets end like the model's replies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lorsu_edge.losses import IGNORE, PerplexityObjective, answer_token_loss, vqa_text
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
