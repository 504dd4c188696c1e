"""Selection: importance scores in, index sets out. Pure tensor math (no models, no I/O).

Every selector returns sorted int64 indices so methods are swappable and budgets are exact.
"""

from __future__ import annotations

import math

import torch


def budget_count(numel: int, fraction: float) -> int:
    """Exactly floor(fraction * numel) entries (the documented budget), computed without float drift."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return min(numel, math.floor(fraction * numel + 1e-9))


def top_entries(grad: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat indices of the top `fraction` entries of |grad| (sorted ascending)."""
    count = budget_count(grad.numel(), fraction)
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    flat = grad.detach().reshape(-1).abs().float()
    return torch.topk(flat, count, sorted=False).indices.sort().values


def head_scores(grads: list[torch.Tensor], num_heads: int) -> torch.Tensor:
    """Sum of g^2 over each head's rows of q, k and v.

    `grads` holds one (hidden x in) gradient per projection: [g_q, g_k, g_v], or a fused (3 * hidden) x in
    gradient split with `.chunk(3)`. Each reshapes to (heads, head_dim, in), the layout attention uses.
    """
    stacked = torch.stack([g.detach().float() for g in grads])
    per_head = stacked.reshape(len(grads), num_heads, -1)
    return per_head.pow(2).sum(dim=(0, 2))


def top_heads(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest-scoring heads (sorted ascending)."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k must be in [0, {scores.numel()}], got {k}")
    return torch.topk(scores, k, sorted=False).indices.sort().values


def head_rows(heads: torch.Tensor, head_dim: int, parts: int = 1, part_stride: int = 0) -> torch.Tensor:
    """Weight rows of the given heads: for each part p (q, k, v of a fused weight), p * part_stride + h * head_dim + d."""
    within = (heads.reshape(-1, 1) * head_dim + torch.arange(head_dim)).reshape(-1)
    offsets = torch.arange(parts) * part_stride
    return (offsets.reshape(-1, 1) + within).reshape(-1)


def indices_to_mask(indices: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Boolean mask of `shape` that is True at the flat `indices`."""
    mask = torch.zeros(math.prod(shape), dtype=torch.bool)
    mask[indices] = True
    return mask.reshape(shape)
