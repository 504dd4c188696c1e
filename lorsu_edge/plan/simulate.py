"""Activations measured on fake tensors: one forward + backward of the loss on the stand-in model.

The model is built inside `FakeTensorMode` (shapes and dtypes, no memory; the meta device cannot run
LLaVA's forward), the method's real update layers are injected with placeholder selections of the exact
size, and one forward + backward of the loss is run under `memory.LiveBytes`, which counts the bytes of
every tensor created and freed. That gives activations, transient gradients and autograd workspace as the
code allocates them (autocast's bf16 copies of fp32 weights included).

To stay fast on a 7B LLM, the stand-in keeps SIM_BLOCKS encoder blocks, SIM_LLM_LAYERS decoder layers and
SIM_TEXT_LAYERS text layers; what each simulated layer keeps alive for backward is measured and multiplied
out (the layers of a stack are identical). Batch dependence is measured at micro-batches 1 and 2 and
extrapolated linearly (tested).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from lorsu_edge.config import MethodConfig
from lorsu_edge.plan.arch import Arch
from lorsu_edge.plan.build import build, find_spec, language_model, quiet
from lorsu_edge.plan.checkpointing import apply_checkpointing


def activation_bytes(arch: Arch, kind: str, method: MethodConfig, dtype: str, micro_batch: int,
                     checkpointing: bool) -> int:
    """Simulated peak for any micro-batch, from simulations at 1 and 2 (activations are affine in it)."""
    one = _simulate(arch, kind, method, dtype, 1, checkpointing)
    if micro_batch == 1:
        return one
    two = _simulate(arch, kind, method, dtype, 2, checkpointing)
    return int(one + (two - one) * (micro_batch - 1))


def _simulate(arch: Arch, kind: str, method: MethodConfig, dtype: str, micro_batch: int,
              checkpointing: bool) -> int:
    """Peak bytes of everything one micro-batch's forward + backward creates (`kind`: train|importance)."""
    key = (arch.key, kind, json.dumps(method.to_dict(), sort_keys=True), dtype, micro_batch, checkpointing)
    if key not in _SIM_CACHE:
        with quiet():
            _SIM_CACHE[key] = _run_simulation(arch, kind, method, dtype, micro_batch, checkpointing)
    return _SIM_CACHE[key]


_SIM_CACHE: dict[tuple, int] = {}


def _run_simulation(arch, kind, method, dtype, micro_batch, checkpointing) -> int:
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorsu_edge.memory import LiveBytes

    with FakeTensorMode(), torch.enable_grad():
        model = build(arch.sim_cfg)
        spec = find_spec(model, arch.sim_cfg)
        keep = _prepare(model, spec, kind, method)
        if arch.llm_layers:  # load.py: the LLM in bf16 (or 4/8-bit, simulated as bf16), the rest fp32
            for p in [*language_model(model).parameters(), model.get_output_embeddings().weight]:
                p.data = p.data.to(torch.bfloat16)
        if checkpointing:
            apply_checkpointing(model, spec)
        model.train(kind == "train")  # compute_importance scores in eval mode; train() trains in train mode
        tracker = LiveBytes()
        tracker.ignore([*model.parameters(), *model.buffers(), *keep])
        forward_done: list[bool] = []
        stacks = {"tower": model.get_submodule(spec.blocks[0].path.rpartition(".")[0])}
        if arch.llm_layers:
            stacks["llm"] = language_model(model).layers
        kept = {name: _watch(layers, tracker, forward_done) for name, layers in stacks.items()}
        loss_fn = _ppl_loss if arch.loss == "ppl" else _clip_loss
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype != "fp32" else contextlib.nullcontext()
        with tracker:
            batch = _inputs(arch, spec, micro_batch, _vocab(arch.sim_cfg))
            with autocast:
                loss = loss_fn(model, batch)
            forward_done.append(True)
            loss.backward()
            del loss, batch
        return int(tracker.peak + _missing_layers(arch, stacks, kept))


def _prepare(model, spec, kind: str, method: MethodConfig) -> list:
    """Make the tensors trainable that the phase differentiates; returns tensors that pre-exist the step.

    Gradients of trainable parameters are dropped as soon as they are accumulated: the planner counts
    them itself (they live across micro-batches), so the simulation measures activations only.
    """
    import torch

    from lorsu_edge.inject import freeze, inject, shape_targets
    from lorsu_edge.score import candidate_paths

    if kind == "train":
        inject(model, shape_targets(model, spec, method), method)
        freeze(model, spec, method)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_drop_grad)
        return []
    for p in model.parameters():
        p.requires_grad_(False)
    accumulators = []
    for path in candidate_paths(spec, fc1=method.uses_fc1, attn=method.method == "lorsu"):
        w = model.get_submodule(path).weight
        w.requires_grad_(True)
        acc = torch.zeros_like(w, dtype=torch.float32)
        w.register_post_accumulate_grad_hook(functools.partial(_fold, acc))  # as score.compute_importance
        accumulators.append(acc)
    return accumulators


def _drop_grad(param) -> None:
    param.grad = None


def _fold(acc, param) -> None:
    acc.add_(param.grad.float())
    param.grad = None


def _watch(layers, tracker, forward_done: list) -> list[int]:
    """Bytes each layer leaves alive after its forward: what it keeps for backward (forward pass only)."""
    deltas: list[int] = []
    for layer in layers:
        start: list[int] = []

        def pre(_m, _a, start=start):
            if not forward_done:
                start.append(tracker.live)

        def post(_m, _a, _o, start=start):
            if not forward_done and start:
                deltas.append(tracker.live - start.pop())

        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)
    return deltas


def _missing_layers(arch: Arch, stacks: dict, kept: dict[str, list[int]]) -> int:
    """Memory the layers left out of the simulation would have kept alive (block 0 is not typical)."""
    extra = 0
    for name, layers in stacks.items():
        missing = arch.full_layers[name] - len(layers)
        typical = kept[name][1:] or kept[name]
        if missing > 0 and typical:
            extra += missing * max(0, max(typical))
    return extra


def _inputs(arch: Arch, spec, micro_batch: int, vocab: int) -> dict[str, Any]:
    import torch

    s = arch.image_size
    return dict(pixel_values=torch.randn(micro_batch, 3, s, s),
                input_ids=torch.randint(0, max(2, vocab), (micro_batch, arch.text_tokens)), spec=spec)


def _vocab(cfg: Any) -> int:
    text = getattr(cfg, "text_config", None) or cfg
    return int(getattr(text, "vocab_size", 2) or 2)


def _clip_loss(model, batch):
    import torch
    import torch.nn.functional as F

    from lorsu_edge.consumer import embedding

    img = embedding(model.get_image_features(pixel_values=batch["pixel_values"]))  # a tensor, or 5.x's output
    with torch.no_grad():  # the text tower is frozen
        ids = batch["input_ids"]
        out = model.text_model(input_ids=ids, attention_mask=torch.ones_like(ids))  # no pad scan
        txt = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
        head = getattr(model, "text_projection", None)
        txt = txt if head is None else head(txt)
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() * 100.0
    target = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.t().float(), target)) / 2


def _ppl_loss(model, batch):
    """Next-token loss with logits over the text positions, upcast to fp32.

    The objective (`losses.answer_token_loss`) projects only the answer positions onto the vocabulary;
    every text position is their upper bound (the prompt's text is short beside the image tokens).
    """
    import torch
    import torch.nn.functional as F

    from lorsu_edge.consumer import projector, vlm_features

    feats = projector(model)(vlm_features(model, batch["spec"], batch["pixel_values"]))
    emb = model.get_input_embeddings()(batch["input_ids"])
    x = torch.cat([emb[:, :1], feats.to(emb.dtype), emb[:, 1:]], dim=1)
    hidden = language_model(model)(inputs_embeds=x, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, 1 + feats.shape[1]:]).float()
    labels = torch.zeros(logits.shape[:2], dtype=torch.long)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())
