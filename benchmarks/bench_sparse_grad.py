#!/usr/bin/env python3
"""The sparse fc1 weight gradient: sampled at the selected entries vs dense then gathered, per density.

Times `lorsu_edge.sparse_grad.sampled_grad` and `dense_grad` (what the layer's backward calls) on fc1
shapes of the benchmark models with a batch's token count, for each compute dtype and density, and
reports the crossover: the density at which both take the same time (interpolated). Those crossovers
are what `sparse_grad.SAMPLED_MAX_DENSITY` holds for this device. Selections are uniform at random, which
measures the kernels; importance-chosen ones touch 85% of fc1's rows and ~99% of its columns (no dense
tiles) but are skewed by row, which the layer's per-row split (`sparse_grad.RowSplit`) exploits.

Each timing is the minimum over `--repeats` calls of the process's CPU time (`time.process_time`), one
thread by default: on a shared machine wall time mostly measures the other processes, CPU time much
less so (not immune: caches are shared). The crossover can still move by one density step: run it twice.

    python benchmarks/bench_sparse_grad.py              # ~2 min, writes benchmarks/results/bench_sparse_grad.json
    python benchmarks/bench_sparse_grad.py --smoke
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from lorsu_edge.sparse_grad import SAMPLED_MAX_DENSITY, SparsePattern, dense_grad, sampled_grad  # noqa: E402

# (name, fc1 out, fc1 in, tokens of a batch of 8)
SHAPES = [("vitb16", 3072, 768, 8 * 197), ("dual", 1536, 384, 8 * 65), ("clip-l", 4096, 1024, 4 * 577)]
DENSITIES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel dispatch
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def measure(out_f: int, in_f: int, tokens: int, dtype: torch.dtype, density: float, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(tokens, out_f, generator=gen).to(dtype)
    x = torch.randn(tokens, in_f, generator=gen).to(dtype)
    count = max(1, int(density * out_f * in_f))
    idx = torch.randperm(out_f * in_f, generator=gen)[:count].sort().values.to(torch.int32)
    pattern = SparsePattern.from_flat(idx, (out_f, in_f))
    diff = (sampled_grad(g, x, pattern) - dense_grad(g.float(), x.float(), idx)).abs().max().item()
    return {"density": density, "entries": count, "max_abs_diff_vs_fp32": diff,
            "sampled_s": best_of(lambda: sampled_grad(g, x, pattern), repeats),
            "dense_s": best_of(lambda: dense_grad(g, x, idx), repeats)}


def crossover(rows: list[dict]) -> float:
    """The density where sampled and dense take the same time: linear in the time ratio between the last
    density where sampled won and the next one (0 if it never won, the largest density if it always did)."""
    ratios = [(r["density"], r["sampled_s"] / r["dense_s"]) for r in rows]
    wins = [i for i, (_, q) in enumerate(ratios) if q < 1]
    if not wins:
        return 0.0
    last = wins[-1]
    if last + 1 == len(ratios):
        return ratios[last][0]
    (d0, q0), (d1, q1) = ratios[last], ratios[last + 1]
    return d0 + (1 - q0) * (d1 - d0) / (q1 - q0)


def run(args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    shapes = [("tiny", 64, 32, 40)] if args.smoke else [s for s in SHAPES if s[0] in args.shapes]
    densities = (0.05, 0.2) if args.smoke else DENSITIES
    results = []
    for name, out_f, in_f, tokens in shapes:
        for dname, dtype in DTYPES.items():
            rows = [measure(out_f, in_f, tokens, dtype, d, 1 if args.smoke else args.repeats) for d in densities]
            results.append({"shape": name, "out": out_f, "in": in_f, "tokens": tokens, "dtype": dname,
                            "rows": rows, "crossover": crossover(rows),
                            "table_value": SAMPLED_MAX_DENSITY.get(("cpu", dtype), 0.0)})
    return {"benchmark": "bench_sparse_grad", "smoke": args.smoke, "threads": args.threads, "results": results,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else [],
            "env": C.env_info()}


def table(doc: dict[str, Any]) -> str:
    lines = [f"{doc['threads']} threads; CPU time, best of several calls; loadavg after {doc['loadavg']}",
             f"{'shape':<8}{'dtype':>6}{'tokens':>8}{'density':>9}{'sampled ms':>12}{'dense ms':>10}{'ratio':>8}"]
    for res in doc["results"]:
        for r in res["rows"]:
            lines.append(f"{res['shape']:<8}{res['dtype']:>6}{res['tokens']:>8}{r['density']:>9.3f}"
                         f"{1e3 * r['sampled_s']:>12.2f}{1e3 * r['dense_s']:>10.2f}"
                         f"{r['sampled_s'] / r['dense_s']:>7.2f}x")
        lines.append(f"  -> crossover {res['crossover']:.3f} (table in sparse_grad.py: {res['table_value']:.3f})")
    lines.append("ratio = sampled / dense time: below 1 the sampled gradient is faster.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = C.kernel_parser(__doc__, [s[0] for s in SHAPES], repeats=5).parse_args(argv)
    warnings.simplefilter("ignore")
    doc = run(args)
    return C.report(doc, table(doc), "bench_sparse_grad", args)


if __name__ == "__main__":
    raise SystemExit(main())
