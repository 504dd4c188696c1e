"""Merge: fold every structured update into the base weights and restore the original architecture."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from lorsu_edge.families import EncoderSpec
from lorsu_edge.inject import adapter_modules, replace_module


def merge_all(model: nn.Module) -> int:
    """Merge every wrapper (safe: each checks finiteness before writing). Returns how many were merged."""
    wrappers = adapter_modules(model)
    for m in wrappers.values():
        m.merge()
    return len(wrappers)


def unmerge_all(model: nn.Module) -> None:
    """Undo `merge_all` exactly (original values are restored, not recomputed)."""
    for m in adapter_modules(model).values():
        m.unmerge()


def unload(model: nn.Module) -> None:
    """Merge, then put the plain base Linears back: the model has its original class layout and names."""
    for path, m in adapter_modules(model).items():
        m.merge()
        replace_module(model, path, m.base)


def encoder_state_dict(model: nn.Module, spec: EncoderSpec) -> dict[str, torch.Tensor]:
    """The encoder's tensors named exactly as in the full model's own state dict (call after `unload`): the
    tower's, plus the visual projection's once it was adapted (`spec.projection`)."""
    if adapter_modules(model):
        raise RuntimeError("unload() the adapters before taking the encoder state dict")
    prefixes = spec.encoder_prefixes
    return {k: v.detach() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: the identity of a set of weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
