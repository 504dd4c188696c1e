"""Activation checkpointing as the plan assumes it: the simulation measures with it, and `adapt` applies
the same wrapping at run time when the plan chose it."""

from __future__ import annotations

import functools
from typing import Any

from lorsu_edge.plan.build import language_model


def apply_checkpointing(model: Any, spec: Any) -> int:
    """Activation checkpointing as the plan assumes it: every encoder block and every LLM decoder layer
    keeps only its input and recomputes the rest in backward (non-reentrant `torch.utils.checkpoint`).

    Unlike transformers' `gradient_checkpointing_enable` it also works in eval mode, so the importance
    pass (`score.compute_importance` runs in eval mode) is checkpointed too; it does nothing when grad is
    off (evaluation, export). A VLM's LLM gets `use_cache = False` (a KV cache would grow again on every
    recompute; `generate` sets its own). Undo with `remove_checkpointing`. Returns the layers wrapped.
    """
    layers = list(model.get_submodule(spec.blocks[0].path.rpartition(".")[0])) if spec.blocks else []
    if spec.role == "vlm":
        lm = language_model(model)
        layers += list(lm.layers)
        if getattr(lm.config, "use_cache", False):
            lm.config.use_cache = False
            lm._lorsu_use_cache = True
    for layer in layers:
        if "forward" not in vars(layer):
            layer.forward = _checkpointed(layer.forward)
    return len(layers)


def remove_checkpointing(model: Any) -> None:
    """Undo `apply_checkpointing`."""
    for m in model.modules():
        if getattr(vars(m).get("forward"), "_lorsu_checkpointed", False):
            del m.forward
        if vars(m).pop("_lorsu_use_cache", False):
            m.config.use_cache = True


def _checkpointed(forward):
    import torch
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run._lorsu_checkpointed = True
    return run
