"""Structured-update layers: a sparse delta on fc1 and head-masked LoRA on q/k/v.

Each wrapper owns its whole life: forward, `delta_weight()`, safe `merge()`, exact `unmerge()` and a
`merged` flag. Trainable state is O(selected): the sparse layer stores only the selected entries'
deltas (+ their flat indices) and the LoRA layer only the selected heads' rows, so the optimizer
never sees a dense fc1 or a full-size mask (the research code's memory sink).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from lorsu_edge.sparse_grad import RowSplit, SparsePattern, crossover, dense_grad, gathered_grad

GradMode = Literal["auto", "sampled", "gathered", "dense"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _effective_weight(weight: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """(W + scatter(delta)) in `dtype`: one cast of W (autocast's F.linear makes the same copy) and a write
    of the selected entries, summed in W's dtype first so the result is bit-identical to adding the delta
    to a full fp32 copy and casting that."""
    w = weight.to(dtype, copy=True)
    touched = weight.reshape(-1).index_select(0, indices) + delta.to(weight.dtype)
    w.view(-1).index_put_((indices,), touched.to(dtype))
    return w


@dataclass(frozen=True)
class _GradPath:
    """How backward forms the weight gradient: "split" (by row, `split`), "gathered" or "dense"."""

    kind: str
    split: RowSplit | None = None


class _SparseDeltaLinearFn(torch.autograd.Function):
    """y = x (W + scatter(delta))^T + b, saving only x: W + delta is rebuilt in backward.

    Saving the effective weight (what a plain F.linear would do) costs one fc1-sized copy per block
    for the whole backward; rebuilding it is one cast of W, the one autocast would make anyway.
    The delta's gradient is formed at the selected entries only: sampled for sparse rows, by a matmul
    over the dense rows only for the others (`sparse_grad.RowSplit`).
    """

    @staticmethod
    def forward(ctx, x, weight, indices, delta, bias, path):  # noqa: D102 (autograd protocol)
        w = _effective_weight(weight, indices, delta, x.dtype)
        ctx.save_for_backward(x, weight, indices, delta)
        ctx.bias_dtype, ctx.path = None if bias is None else bias.dtype, path
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight, indices, delta = ctx.saved_tensors
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _effective_weight(weight, indices, delta, grad_out.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[3]:
            grad_delta = _delta_grad(g2, x.reshape(-1, x.shape[-1]), indices, ctx.path).to(delta.dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_delta, grad_bias, None


def _delta_grad(g: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, path: _GradPath) -> torch.Tensor:
    if path.kind == "split":
        return path.split.grad(g, x)
    if path.kind == "gathered":
        return gathered_grad(g, x, indices, x.shape[-1])
    return dense_grad(g, x, indices)


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
    """fc1 with a trainable delta on a fixed set of entries (flat `indices`) and an optional bias delta.

    Indices are stored as int32 where the weight allows (half the bytes; the ops that read them accept
    int32). `grad_mode` chooses how backward forms the delta's gradient: "auto" (each row sampled or
    dense by the measured crossover), "sampled" (every row), "dense" (the full weight gradient, then a
    gather) or "gathered" (the sampled FLOPs without a CSR tensor: what fake tensors run).
    """

    def __init__(self, base: nn.Linear, indices: torch.Tensor, train_bias: bool = True,
                 grad_mode: GradMode = "auto") -> None:
        super().__init__(base, train_bias)
        index_dtype = torch.int32 if base.weight.numel() <= torch.iinfo(torch.int32).max else torch.long
        self.register_buffer("indices", indices.reshape(-1).to(base.weight.device, index_dtype).clone())
        self.delta = nn.Parameter(torch.zeros(self.indices.numel(), device=base.weight.device))
        self.grad_mode = grad_mode
        self.register_load_state_dict_post_hook(SparseDeltaLinear._after_load)

    @staticmethod
    def _after_load(module: SparseDeltaLinear, _incompatible) -> None:
        module._set_split()  # load_state_dict copied new indices in place: the split must follow

    @property
    def grad_mode(self) -> GradMode:
        return self._grad_mode

    @grad_mode.setter
    def grad_mode(self, mode: GradMode) -> None:
        self._grad_mode = mode
        self._set_split()

    def _set_split(self) -> None:
        """Build the row split once (non-persistent buffers: they follow .to() but are not saved; the
        planner counts them as adapter state, which they are: 8 bytes per selected entry + 5 per row)."""
        limit = {"auto": crossover(self.base.weight.device), "sampled": math.inf}.get(self.grad_mode)
        split = None if limit is None else RowSplit.build(self.indices, tuple(self.base.weight.shape), limit)
        for name in ("dense_row", "dense_pos", "dense_local", "sparse_pos"):
            self.register_buffer(f"split_{name}", None if split is None else getattr(split, name), persistent=False)
        self.register_buffer("split_crow", None if split is None else split.sparse.crow, persistent=False)
        self.register_buffer("split_col", None if split is None else split.sparse.col, persistent=False)

    def _touched(self) -> torch.Tensor:
        return self.indices.long()  # index_copy_ (merge, unmerge) takes int64 only

    def _touched_delta(self) -> torch.Tensor:
        return self.delta

    def row_split(self) -> RowSplit:
        shape = tuple(self.base.weight.shape)
        return RowSplit(self.split_dense_row, self.split_dense_pos, self.split_dense_local, self.split_sparse_pos,
                        SparsePattern(self.split_crow, self.split_col, None, shape))

    def _grad_path(self, x: torch.Tensor) -> _GradPath:
        if self.grad_mode in ("dense", "gathered"):
            return _GradPath(self.grad_mode)
        if is_fake(x):
            return _GradPath("gathered")  # fake tensors have no CSR layout; same FLOPs, bounded transients
        return _GradPath("split", self.row_split())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        x = x.to(_compute_dtype(x))
        path = self._grad_path(x) if self.delta.requires_grad else _GradPath("dense")
        with torch.autocast(x.device.type, enabled=False):
            return _SparseDeltaLinearFn.apply(x, self.base.weight, self.indices, self.delta, self._bias(), path)


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
        x = x.to(_compute_dtype(x))  # once: autocast would cast it again for each of the two matmuls
        y = F.linear(x, self.base.weight, self._bias())
        if self.rows.numel() == 0:
            return y
        low = F.linear(x, self.lora_A).unflatten(-1, (self.parts, self.rank))
        out = torch.einsum("...pr,pnr->...pn", low, self.lora_B.to(low.dtype)).flatten(-2)
        # in place: y is F.linear's fresh output, which its backward does not need (no copy of y)
        return y.index_add_(-1, self.rows, (out * self.scaling).to(y.dtype))
