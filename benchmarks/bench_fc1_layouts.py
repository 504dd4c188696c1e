#!/usr/bin/env python3
"""The fc1 delta gradient on real selections: the layer's row split against two alternatives tried for
issue 14's step-time goal, and against the plain dense gradient.

Per fc1 of an adapter (`--adapter DIR`: a session folder holding adapter.safetensors + adapter.json, e.g.
`<workdir>/sessions/0001` after any `lorsu-edge adapt`), or of a synthetic row-skewed selection (a third
of the rows at density 0.22, the rest 0.04, as bench_block_cost), with random bf16 g and x of `--tokens`
rows, CPU time of one thread, best of `--repeats`:

- dense: the full tokens x out x in matmul (bf16), then a gather (`sparse_grad.dense_grad`);
- split: what the layer runs (`sparse_grad.RowSplit`: dense rows by one matmul, the rest sampled);
- stair: rows and columns sorted by their entry counts, then per group of 64 rows the column prefix that
  minimises the same cost model is formed densely, the rest sampled. Importance selections are skewed by
  column as well as by row, so the model predicts fewer cost units than the row split (printed);
- split+inductor: the row split with its sampled part replaced by a `torch.compile`d (inductor, C++)
  gather-dot over g^T and x^T in bf16, fp32 accumulation, the transposes included.

Both alternatives live here only; the layer keeps the row split (see benchmarks/README.md for why).

    python benchmarks/bench_fc1_layouts.py --adapter /tmp/wd/sessions/0001 --tokens 520
    python benchmarks/bench_fc1_layouts.py --shape vitb16
    python benchmarks/bench_fc1_layouts.py --smoke --no-inductor
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_block_cost import SHAPES, skewed_indices  # noqa: E402
from bench_sparse_grad import best_of  # noqa: E402

from lorsu_edge.sparse_grad import RowSplit, SparsePattern, crossover, dense_grad, sampled_grad  # noqa: E402

GROUP = 64  # rows per staircase group


class Stair:
    """Rows and columns in descending order of their entry counts; per group of GROUP rows, a prefix of
    the sorted columns is formed by one matmul (chosen by the row split's cost model), the rest sampled."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int], max_density: float) -> None:
        out_f, in_f = shape
        flat = indices.to(torch.long)
        r, c = flat // in_f, flat % in_f
        self.row_order = torch.bincount(r, minlength=out_f).argsort(descending=True)
        self.col_order = torch.bincount(c, minlength=in_f).argsort(descending=True)
        r_pos, c_pos = _rank(self.row_order)[r], _rank(self.col_order)[c]
        self.blocks: list[tuple[int, int, int, torch.Tensor, torch.Tensor]] = []
        sparse = []
        for start in range(0, out_f, GROUP):
            members = ((r_pos >= start) & (r_pos < start + GROUP)).nonzero().reshape(-1)
            width = self._prefix(c_pos[members], min(GROUP, out_f - start), in_f, max_density)
            dense = c_pos[members] < width
            if width:
                local = (r_pos[members[dense]] - start) * width + c_pos[members[dense]]
                self.blocks.append((start, min(start + GROUP, out_f), width, members[dense], local))
            sparse.append(members[~dense])
        pos = torch.cat(sparse)
        self.sparse_pos = pos[flat[pos].argsort()]
        self.pattern = SparsePattern.from_flat(flat[self.sparse_pos], shape)
        self.entries = flat.numel()

    @staticmethod
    def _prefix(cols: torch.Tensor, rows: int, in_f: int, max_density: float) -> int:
        """The column prefix minimising rows x width dense slots + sampled entries / crossover (0: none)."""
        if cols.numel() == 0:
            return 0
        inside = torch.bincount(cols, minlength=in_f).cumsum(0)
        cost = torch.arange(1, in_f + 1) * rows + (cols.numel() - inside) / max_density
        return int(cost.argmin()) + 1 if cost.min() < cols.numel() / max_density else 0

    def units(self, max_density: float) -> float:
        """The cost model's units (a dense slot = 1, a sampled entry = 1 / crossover)."""
        return sum((stop - start) * w for start, stop, w, _, _ in self.blocks) + self.sparse_pos.numel() / max_density

    def grad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.entries, dtype=torch.float32)
        g_t = g.index_select(1, self.row_order).t()
        x_sorted = x.index_select(1, self.col_order)
        for start, stop, width, pos, local in self.blocks:
            out[pos] = (g_t[start:stop] @ x_sorted[:, :width]).reshape(-1)[local].float()
        if self.sparse_pos.numel():
            out[self.sparse_pos] = sampled_grad(g, x, self.pattern)
        return out


def split_units(split: RowSplit, in_f: int, max_density: float) -> float:
    return int(split.dense_row.sum()) * in_f + split.sparse_pos.numel() / max_density


def column_skew(indices: torch.Tensor, in_f: int) -> float:
    """The share of the entries held by the quarter of the columns with the most."""
    counts = torch.bincount(indices.long() % in_f, minlength=in_f).sort(descending=True).values
    return counts[: in_f // 4].sum().item() / indices.numel()


def _rank(order: torch.Tensor) -> torch.Tensor:
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank


def _gather_dot(g_t: torch.Tensor, x_t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return (g_t[rows].float() * x_t[cols].float()).sum(-1)


def inductor_split(split: RowSplit):
    """The row split with its sampled part as an inductor-compiled gather-dot (transposes included)."""
    dot = torch.compile(_gather_dot, dynamic=True)
    pat = split.sparse
    rows = torch.repeat_interleave(torch.arange(pat.shape[0]), (pat.crow[1:] - pat.crow[:-1]).long())
    cols = pat.col.long()

    def grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(split.dense_pos.numel() + split.sparse_pos.numel(), dtype=torch.float32)
        if split.dense_pos.numel():
            block = g.index_select(1, split.dense_row.nonzero().reshape(-1)).t() @ x
            out[split.dense_pos.long()] = block.reshape(-1)[split.dense_local.long()].float()
        if split.sparse_pos.numel():
            out[split.sparse_pos.long()] = dot(g.t().contiguous(), x.t().contiguous(), rows, cols)
        return out
    return grad


def selections(args) -> list[tuple[str, torch.Tensor, tuple[int, int]]]:
    """(name, flat indices, (out, in)) per fc1: from the adapter, or synthetic."""
    if args.adapter is None:
        out_f, in_f = (64, 32) if args.smoke else next((o, w) for n, w, o, _, _ in SHAPES if n == args.shape)
        return [("synthetic", skewed_indices(out_f, in_f, torch.Generator().manual_seed(0)), (out_f, in_f))]
    tensors = load_file(args.adapter / "adapter.safetensors")
    modules = json.loads((args.adapter / "adapter.json").read_text())["modules"]
    return [(path, tensors[f"{path}.indices"], tuple(rec["shape"])) for path, rec in sorted(modules.items())
            if rec["kind"] == "sparse"]


def measure(name: str, indices: torch.Tensor, shape: tuple[int, int], args) -> dict[str, Any]:
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(args.tokens, out_f, generator=gen).bfloat16()
    x = torch.randn(args.tokens, in_f, generator=gen).bfloat16()
    max_density = crossover(torch.device("cpu"))
    split = RowSplit.build(indices, shape, max_density)
    stair = Stair(indices, shape, max_density)
    kernels = {"dense": lambda: dense_grad(g, x, indices.long()), "split": lambda: split.grad(g, x),
               "stair": lambda: stair.grad(g, x)}
    if not args.no_inductor:
        compiled = inductor_split(split)
        kernels["split+inductor"] = lambda: compiled(g, x)
    reference = dense_grad(g.float(), x.float(), indices.long())
    repeats = 1 if args.smoke else args.repeats
    return {"module": name, "shape": list(shape), "entries": int(indices.numel()),
            "stair_blocks": len(stair.blocks), "stair_sampled": int(stair.sparse_pos.numel()),
            "top_quarter_columns_share": column_skew(indices, in_f),
            "model_units": {"split": split_units(split, in_f, max_density), "stair": stair.units(max_density)},
            "max_abs_diff": {k: (f() - reference).abs().max().item() for k, f in kernels.items()},
            "ms": {k: 1e3 * best_of(f, repeats) for k, f in kernels.items()}}


def table(doc: dict[str, Any]) -> str:
    names = list(doc["rows"][0]["ms"])
    lines = [f"{doc['threads']} thread(s), {doc['tokens']} tokens, CPU ms (best of several); loadavg {doc['loadavg']}",
             f"{'module':<44}" + "".join(f"{n:>16}" for n in names)]
    for r in doc["rows"]:
        lines.append(f"{r['module'][-44:]:<44}" + "".join(f"{r['ms'][n]:>16.2f}" for n in names))
    lines.append(f"{'total':<44}" + "".join(f"{doc['total_ms'][n]:>16.2f}" for n in names))
    units = {k: sum(r["model_units"][k] for r in doc["rows"]) for k in ("split", "stair")}
    skew = [r["top_quarter_columns_share"] for r in doc["rows"]]
    lines.append(f"cost model (kernel costs only): stair / split = {units['stair'] / units['split']:.2f}; "
                 f"top quarter of columns holds {min(skew):.2f}-{max(skew):.2f} of the entries")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__)
    ap.add_argument("--adapter", type=Path, help="a session folder with adapter.safetensors + adapter.json")
    ap.add_argument("--shape", choices=[s[0] for s in SHAPES], default="dual",
                    help="the fc1 shape of the synthetic selection (without --adapter)")
    ap.add_argument("--tokens", type=int, help="tokens of a batch (default: the shape's batch of 8)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-inductor", action="store_true", help="skip the compiled variant (needs a C++ compiler)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens = 40
    elif args.tokens is None:
        args.tokens = next(t for n, _, _, _, t in SHAPES if n == args.shape)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    rows = [measure(*sel, args) for sel in selections(args)]
    doc = {"benchmark": "bench_fc1_layouts", "smoke": args.smoke, "threads": args.threads, "tokens": args.tokens,
           "adapter": str(args.adapter) if args.adapter else None, "rows": rows,
           "total_ms": {k: sum(r["ms"][k] for r in rows) for k in rows[0]["ms"]},
           "loadavg": Path("/proc/loadavg").read_text().split()[:3], "env": C.env_info()}
    return C.report(doc, table(doc), "bench_fc1_layouts", args)


if __name__ == "__main__":
    raise SystemExit(main())
