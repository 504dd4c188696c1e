"""Structured-update layers: a sparse delta on fc1 and head-masked LoRA on q/k/v.

Each wrapper owns its whole life: forward, `delta_weight()`, safe `merge()`, exact `unmerge()` and a
`merged` flag. Trainable state is O(selected): the sparse layer stores only the selected entries'
deltas (+ their flat indices) and the LoRA layer only the selected heads' rows, so the optimizer
never sees a dense fc1 or a full-size mask (the research code's memory sink).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _SparseDeltaLinearFn(torch.autograd.Function):
    """y = x (W + scatter(delta))^T + b, saving only x: W + delta is rebuilt in backward.

    Saving the effective weight (what a plain F.linear would do) costs one fc1-sized copy per block
    for the whole backward; recomputing it is one index_add per block.
    """

    @staticmethod
    def forward(ctx, x, weight, indices, delta, bias):  # noqa: D102 (autograd protocol)
        w = weight.reshape(-1).index_add(0, indices, delta.to(weight.dtype)).view_as(weight)
        ctx.save_for_backward(x, weight, indices, delta)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight, indices, delta = ctx.saved_tensors
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = weight.reshape(-1).index_add(0, indices, delta.to(weight.dtype)).view_as(weight)
            grad_x = grad_out @ w.to(grad_out.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[3]:
            # The dense weight gradient exists only transiently, one block at a time.
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
            grad_delta = grad_w.reshape(-1).index_select(0, indices).to(delta.dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_delta, grad_bias


class _Mergeable(nn.Module):
    """Shared merge bookkeeping: the exact original values of every touched entry are kept for unmerge."""

    base: nn.Linear

    def __init__(self, base: nn.Linear, train_bias: bool) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        has_bias = train_bias and base.bias is not None
        self.bias_delta = nn.Parameter(torch.zeros(base.out_features, device=base.weight.device)) if has_bias else None
        if self.bias_delta is not None:
            self.bias_delta._no_decay = True  # train.make_optimizer: biases are not decayed (as in PEFT/HF)
        self.merged = False
        self._saved: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _bias(self) -> torch.Tensor | None:
        if self.bias_delta is None:
            return self.base.bias
        return self.base.bias + self.bias_delta.to(self.base.bias.dtype)

    def _touched(self) -> torch.Tensor:
        """Flat indices into base.weight that the delta changes."""
        raise NotImplementedError

    def _touched_delta(self) -> torch.Tensor:
        """Delta values at `_touched()`, fp32."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the base weight. Safe: computed on a copy and checked before writing."""
        if self.merged:
            return
        flat = self.base.weight.view(-1)
        idx = self._touched()
        old_w = flat.index_select(0, idx)
        new_w = old_w + self._touched_delta().to(flat.dtype)
        new_b = None if self.bias_delta is None else self._bias()
        if not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all()):
            raise FloatingPointError(f"merge of {type(self).__name__} would write non-finite weights")
        self._saved = (old_w, None if new_b is None else self.base.bias.detach().clone())
        flat.index_copy_(0, idx, new_w)
        if new_b is not None:
            self.base.bias.copy_(new_b)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit-for-bit (from the saved originals, not by subtraction)."""
        if not self.merged or self._saved is None:
            return
        old_w, old_b = self._saved
        self.base.weight.view(-1).index_copy_(0, self._touched(), old_w)
        if old_b is not None:
            self.base.bias.copy_(old_b)
        self._saved, self.merged = None, False

    def delta_weight(self) -> torch.Tensor:
        """The dense fp32 weight delta (for inspection and tests; never used in training)."""
        dense = torch.zeros(self.base.weight.numel(), device=self.base.weight.device)
        dense.index_copy_(0, self._touched(), self._touched_delta().detach().float())
        return dense.view_as(self.base.weight)


class SparseDeltaLinear(_Mergeable):
    """fc1 with a trainable delta on a fixed set of entries (flat `indices`) and an optional bias delta."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, train_bias: bool = True) -> None:
        super().__init__(base, train_bias)
        self.register_buffer("indices", indices.to(torch.long).reshape(-1).to(base.weight.device).clone())
        self.delta = nn.Parameter(torch.zeros(self.indices.numel(), device=base.weight.device))

    def _touched(self) -> torch.Tensor:
        return self.indices

    def _touched_delta(self) -> torch.Tensor:
        return self.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return _SparseDeltaLinearFn.apply(x.to(dtype), self.base.weight, self.indices, self.delta, self._bias())


class HeadLoRALinear(_Mergeable):
    """LoRA whose update reaches only the selected heads' rows: dW[rows] = (alpha / r) * B A, per part.

    `parts` is 1 for a separate q, k or v projection and 3 for a fused qkv weight (separate factors for
    q, k and v, as if three LoRAs were attached). `rows` lists the touched rows part-major, so the
    low-rank output is computed for those rows only and scattered into the base output.
    """

    def __init__(self, base: nn.Linear, rows: torch.Tensor, rank: int, alpha: float, parts: int = 1,
                 train_bias: bool = True) -> None:
        super().__init__(base, train_bias)
        rows = rows.to(torch.long).reshape(-1)
        if rows.numel() % parts:
            raise ValueError(f"{rows.numel()} rows do not split into {parts} parts")
        dev = base.weight.device
        self.register_buffer("rows", rows.to(dev).clone())
        self.parts, self.rank, self.scaling = parts, rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(parts * rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(parts, rows.numel() // parts, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's init: B = 0 so the delta starts at 0

    def _row_delta(self) -> torch.Tensor:
        a = self.lora_A.view(self.parts, self.rank, -1)
        return (self.lora_B @ a).reshape(-1, self.base.in_features) * self.scaling

    def _touched(self) -> torch.Tensor:
        cols = torch.arange(self.base.in_features, device=self.rows.device)
        return (self.rows.view(-1, 1) * self.base.in_features + cols).reshape(-1)

    def _touched_delta(self) -> torch.Tensor:
        return self._row_delta().reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        y = F.linear(x, self.base.weight, self._bias())
        if self.rows.numel() == 0:
            return y
        low = F.linear(x, self.lora_A).unflatten(-1, (self.parts, self.rank))
        out = torch.einsum("...pr,pnr->...pn", low, self.lora_B.to(low.dtype)).flatten(-2)
        return y.index_add(-1, self.rows, (out * self.scaling).to(y.dtype))
