"""Importance: the batch-size-weighted mean gradient of the candidate weights under the caller's loss.

Only candidate weights (fc1, q, k, v of the blocks the consumer uses) require grad, so no gradient of
anything else is ever materialised. Each gradient is folded into its fp32 accumulator as soon as it is
ready (a post-accumulate hook) and freed, so the peak is accumulators + one gradient, not 2x.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from lorsu_edge.distributed import sum_over_ranks
from lorsu_edge.families import EncoderSpec


def candidate_paths(spec: EncoderSpec, fc1: bool = True, attn: bool = True,
                    block_ids: Iterable[int] | None = None) -> list[str]:
    """Module paths of the candidate linears (fc1 and/or q, k, v or fused qkv) of the used blocks."""
    wanted = None if block_ids is None else set(block_ids)
    paths = []
    for block in spec.candidate_blocks:
        if wanted is not None and block.index not in wanted:
            continue
        if fc1:
            paths.append(block.fc1)
        if attn:
            paths.extend(block.attn.values())
    return paths


def compute_importance(
    model: nn.Module,
    paths: list[str],
    batches: Iterable[tuple[Any, int]],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    max_samples: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean gradient of each `paths` module's weight over up to `max_samples` samples.

    `batches` yields (batch, number of samples in it); `loss_fn(model, batch)` returns the mean loss of
    the batch, so weighting each gradient by the batch size gives the per-sample mean.
    Returns ({path: fp32 mean gradient}, samples used). Requires-grad flags are restored afterwards.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    weights = {path: model.get_submodule(path).weight for path in paths}
    acc = {path: torch.zeros_like(w, dtype=torch.float32) for path, w in weights.items()}
    scale = [0.0]
    hooks = []
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for path, w in weights.items():
            w.requires_grad_(True)
            hooks.append(w.register_post_accumulate_grad_hook(_folder(acc[path], scale)))
        model.eval()  # no dropout: scores should not depend on a random mask
        seen = 0
        for batch, size in batches:
            if seen >= max_samples:
                break
            scale[0] = float(size)
            with autocast():
                loss = loss_fn(model, batch)
            loss.backward()
            seen += size
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    seen = sum_over_ranks(acc, seen)  # data-parallel: every rank then selects the same entries and heads
    if seen == 0:
        raise ValueError("no samples to score importance on")
    return {path: a.div_(seen) for path, a in acc.items()}, seen


def _folder(acc: torch.Tensor, scale: list[float]) -> Callable[[torch.Tensor], None]:
    def fold(param: torch.Tensor) -> None:
        acc.add_(param.grad.float(), alpha=scale[0])
        param.grad = None

    return fold
