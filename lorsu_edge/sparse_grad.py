"""The sparse fc1 layer's weight gradient at its selected entries only, split by row between two kernels.

grad_delta[k] = sum_t g[t, r_k] x[t, c_k] for the selected entries (r_k, c_k) of an out x in weight. Two
kernels, both accumulating in fp32:

- sampled: `torch.sparse.sampled_addmm` on a CSR pattern, 2 * tokens * entries FLOPs. Its CPU kernel is
  one memory-bound dot product per entry and has no bf16 version: per entry it is ~1 / 0.085 times
  slower than the dense matmul's (bf16 on our CPU), so it is not 1 / density times faster;
- dense: the tokens x rows x in matmul (BLAS, compute dtype) for a set of rows, then a gather.

The cost of a row is additive: `in` dense-entry costs, or `count / crossover` sampled ones. So the split
is per row: a row whose own density is above the measured crossover density (`SAMPLED_MAX_DENSITY`, from
`benchmarks/bench_sparse_grad.py`) is formed densely, the others are sampled. Importance-chosen
selections are skewed by row (a third of fc1's rows hold most entries), which makes the split ~2.5x
cheaper than either kernel alone at sparsity 0.1. An unmeasured device gets the dense kernel only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

# Density at which the sampled kernel and the dense matmul take the same time, per (device type, compute
# dtype): the smaller of the crossovers on ViT-B/16's and DINOv2-S's fc1 with a batch of 8, from
# `python benchmarks/bench_sparse_grad.py --shapes vitb16 dual` (AMD EPYC with AVX512-BF16, one thread,
# CPU time; two runs, the first with 768-token chunks: bf16 0.082-0.093, fp32 0.198-0.2). The dense bf16
# matmul is twice as fast as the fp32 one and the sampled kernel runs in fp32 either way, hence two rows.
# `RowSplit` applies it per row: at the paper's sparsity 0.1 the denser ~third of fc1's rows goes dense.
SAMPLED_MAX_DENSITY: dict[tuple[str, torch.dtype], float] = {
    ("cpu", torch.bfloat16): 0.085,
    ("cpu", torch.float32): 0.19,
}
# Tokens per sampled_addmm call: 32 to 4096 measured on ViT-B/16's fc1 at density 0.1, 128 fastest
# (36 ms vs 43 ms at 768 and 51 ms at 4096, CPU time, one thread).
TOKEN_CHUNK = 128


def crossover(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """The measured crossover density (0: never sample). bf16 by default: autocast is the training path,
    and with a bf16 split an fp32 run stays correct, only less sampled than it could be."""
    return SAMPLED_MAX_DENSITY.get((device.type, dtype), 0.0)


def prefer_sampled(device: torch.device, dtype: torch.dtype, density: float) -> bool:
    """True when the sampled kernel is measured to be faster than the dense matmul at this density."""
    return density <= crossover(device, dtype)


def _increasing(flat: torch.Tensor) -> bool:
    return flat.numel() < 2 or bool((flat[1:] > flat[:-1]).all())


def _sorted_unique(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted indices, their positions); a repeated entry would get two deltas, so it is refused."""
    flat, order = flat.sort()
    if not _increasing(flat):
        raise ValueError("sparse fc1 indices repeat an entry")
    return flat, order


@dataclass(frozen=True)
class SparsePattern:
    """The selected entries of an out x in weight as a CSR pattern (int32), built once per index tensor.

    `order` maps CSR order (row-major) back to the order of the flat indices; None when they are sorted.
    """

    crow: torch.Tensor
    col: torch.Tensor
    order: torch.Tensor | None
    shape: tuple[int, int]

    @classmethod
    def from_flat(cls, indices: torch.Tensor, shape: tuple[int, int]) -> SparsePattern:
        out_f, in_f = shape
        flat = indices.to(torch.long)
        order = None
        if not _increasing(flat):
            flat, order = _sorted_unique(flat)
        counts = torch.bincount(flat // in_f, minlength=out_f)
        crow = torch.zeros(out_f + 1, dtype=torch.int32, device=flat.device)
        crow[1:] = counts.cumsum(0)
        return cls(crow, (flat % in_f).to(torch.int32), order, shape)

    def unsort(self, values: torch.Tensor) -> torch.Tensor:
        """Values in CSR order -> values in the order of the flat indices."""
        if self.order is None:
            return values
        return torch.empty_like(values).index_copy_(0, self.order, values)


@dataclass(frozen=True)
class RowSplit:
    """Selected entries split by row: rows denser than the crossover get a dense gradient, the rest the
    sampled one. Positions are into the layer's `indices`; every index tensor is int32 (4 bytes each), so
    the bytes depend only on the shapes (out + 4 (out + 1) + 8 per entry): the planner sizes them exactly."""

    dense_row: torch.Tensor  # bool per row: formed densely
    dense_pos: torch.Tensor  # positions of their entries
    dense_local: torch.Tensor  # those entries' flat index in the (dense rows) x in block
    sparse_pos: torch.Tensor  # positions of the other entries, in CSR order
    sparse: SparsePattern  # the other entries (sorted: no order)

    @classmethod
    def build(cls, indices: torch.Tensor, shape: tuple[int, int], max_density: float) -> RowSplit:
        out_f, in_f = shape
        i32 = torch.int32 if out_f * in_f <= torch.iinfo(torch.int32).max else torch.long
        if is_fake(indices):  # shapes only: sized as if every row were sampled (the same bytes in all)
            k = indices.numel()
            return cls(indices.new_empty(out_f, dtype=torch.bool), indices.new_empty(0, dtype=i32),
                       indices.new_empty(0, dtype=i32), indices.new_empty(k, dtype=i32),
                       SparsePattern(indices.new_empty(out_f + 1, dtype=torch.int32), indices.new_empty(k, dtype=i32),
                                     None, shape))
        flat, order = _sorted_unique(indices.to(torch.long))
        rows = flat // in_f
        dense_row = torch.bincount(rows, minlength=out_f) > max_density * in_f
        rank = dense_row.cumsum(0) - 1  # local row of each dense row in the dense block
        dense = dense_row[rows]
        local = rank[rows[dense]] * in_f + flat[dense] % in_f
        return cls(dense_row, order[dense].to(i32), local.to(i32),
                   order[~dense].to(i32), SparsePattern.from_flat(flat[~dense], shape))

    def grad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(tokens x out, tokens x in) -> the gradient at every selected entry, in the indices' order."""
        out = torch.empty(self.dense_pos.numel() + self.sparse_pos.numel(), dtype=_acc_dtype(g), device=g.device)
        if self.dense_pos.numel():
            block = g.index_select(1, self.dense_row.nonzero().reshape(-1)).t() @ x
            out.index_put_((self.dense_pos,), block.reshape(-1).index_select(0, self.dense_local).to(out.dtype))
        if self.sparse_pos.numel():
            out.index_put_((self.sparse_pos,), sampled_grad(g, x, self.sparse))
        return out


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32 for bf16/fp16, fp64 stays fp64 (gradcheck)


def dense_grad(g: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(tokens x out, tokens x in) -> the gradient at `indices` (fp32 or wider), via the full weight gradient."""
    return (g.t() @ x).reshape(-1).index_select(0, indices).to(_acc_dtype(g))


def sampled_grad(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """(tokens x out, tokens x in) -> the gradient at the pattern's entries (fp32 or wider), in the indices' order.

    Tokens are taken TOKEN_CHUNK at a time: the fp32 copies stay small (out x 128 at most) and one
    chunk of x^T stays in a core's L2 cache while every entry's dot product reads it.
    """
    acc_dtype = _acc_dtype(g)
    values = torch.zeros(pattern.col.numel(), dtype=acc_dtype, device=g.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": true, and not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        acc = torch.sparse_csr_tensor(pattern.crow, pattern.col, values, pattern.shape, check_invariants=False)
    for start in range(0, g.shape[0], TOKEN_CHUNK):
        stop = start + TOKEN_CHUNK
        g_chunk = g[start:stop].t().to(acc_dtype).contiguous()  # out x chunk, rows contiguous: the dot operand
        acc = torch.sparse.sampled_addmm(acc, g_chunk, x[start:stop].to(acc_dtype))
    return pattern.unsort(acc.values())


def gathered_grad(g: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """The sampled gradient without a CSR tensor (fake tensors have none): batched dot products of the
    gathered rows of g^T and x^T, chunked so each gathered operand is at most weight-sized. Same FLOPs
    (2 * tokens * selected), so the planner and the FLOP benchmark see what the sampled path costs."""
    rows, cols = indices // in_features, indices % in_features
    gt, xt = g.t().to(_acc_dtype(g)), x.t().to(_acc_dtype(g))
    chunk = max(1, g.shape[1] * in_features // max(g.shape[0], 1))
    parts = [torch.bmm(gt[rows[s:s + chunk]].unsqueeze(1), xt[cols[s:s + chunk]].unsqueeze(2)).reshape(-1)
             for s in range(0, indices.numel(), chunk)]
    return torch.cat(parts) if parts else g.new_zeros(0, dtype=_acc_dtype(g))
