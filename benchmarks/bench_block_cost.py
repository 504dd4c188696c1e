#!/usr/bin/env python3
"""Where a LoRSU step's extra CPU time goes, per transformer block: the adapted layers against the frozen ones.

bench_cost times whole steps, which on a shared machine move by more than LoRSU and LoRA differ. This
script times each adapted layer alone (forward + backward under bf16 autocast, one thread, CPU time, best
of `--repeats`) against the frozen `nn.Linear` it wraps, so the difference is that layer's own cost:

- fc1: `SparseDeltaLinear` (sparsity 0.1, row split as in training) vs frozen; and its parts: the delta's
  gradient (`RowSplit.grad`: sampled part + dense-rows part) and one rebuild of the effective weight;
- q (k and v cost the same): `HeadLoRALinear` on 2 heads (LoRSU) and on every head (LoRA, no bias) vs frozen.

A block's ledger is then lorsu extra = fc1 extra + 3 x (2-head extra) and lora extra = 3 x (all-head extra).
The selection is synthetic but skewed by row like importance-chosen ones: a third of the rows at density
0.22, the rest at 0.04 (0.1 overall).

    python benchmarks/bench_block_cost.py            # ~1 min, writes benchmarks/results/bench_block_cost.json
    python benchmarks/bench_block_cost.py --smoke
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_sparse_grad import best_of  # noqa: E402

from lorsu_edge.layers import HeadLoRALinear, SparseDeltaLinear, _effective_weight  # noqa: E402
from lorsu_edge.sparse_grad import sampled_grad  # noqa: E402

# (name, width, fc1 out, head dim, tokens of a batch of 8)
SHAPES = [("vitb16", 768, 3072, 64, 8 * 197), ("dual", 384, 1536, 32, 8 * 65)]
RANK = 64


def skewed_indices(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    density = torch.full((out_f, 1), 0.04)
    density[: out_f // 3] = 0.22
    return (torch.rand(out_f, in_f, generator=gen) < density).reshape(-1).nonzero().reshape(-1)


def fwd_bwd(layer: nn.Module, x0: torch.Tensor, g: torch.Tensor):
    def step() -> None:
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(g)
        for p in layer.parameters():
            p.grad = None
    return step


def frozen(in_f: int, out_f: int) -> nn.Linear:
    return nn.Linear(in_f, out_f).requires_grad_(False)


def fc1_costs(width: int, out_f: int, tokens: int, repeats: int, gen: torch.Generator) -> dict[str, float]:
    base, x0 = frozen(width, out_f), torch.randn(tokens, width, generator=gen)
    g = torch.randn(tokens, out_f, generator=gen).to(torch.bfloat16)
    layer = SparseDeltaLinear(base, skewed_indices(out_f, width, gen))
    split, xb = layer.row_split(), x0.to(torch.bfloat16)
    return {"entries": layer.indices.numel(), "dense_rows": int(split.dense_row.sum()),
            "frozen_s": best_of(fwd_bwd(base, x0, g), repeats),
            "sparse_s": best_of(fwd_bwd(layer, x0, g), repeats),
            "delta_grad_s": best_of(lambda: split.grad(g, xb), repeats),
            "sampled_part_s": best_of(lambda: sampled_grad(g, xb, split.sparse), repeats),
            "rebuild_s": best_of(lambda: _effective_weight(base.weight, layer.indices, layer.delta,
                                                           torch.bfloat16), repeats)}


def qkv_costs(width: int, head_dim: int, tokens: int, repeats: int, gen: torch.Generator) -> dict[str, float]:
    base, x0 = frozen(width, width), torch.randn(tokens, width, generator=gen)
    g = torch.randn(tokens, width, generator=gen).to(torch.bfloat16)
    two = HeadLoRALinear(base, torch.arange(2 * head_dim), RANK, float(RANK), train_bias=True)
    every = HeadLoRALinear(base, torch.arange(width), RANK, float(RANK), train_bias=False)
    return {"frozen_s": best_of(fwd_bwd(base, x0, g), repeats),
            "lorsu_2heads_s": best_of(fwd_bwd(two, x0, g), repeats),
            "lora_all_s": best_of(fwd_bwd(every, x0, g), repeats)}


def run(args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    shapes = [("tiny", 32, 64, 8, 40)] if args.smoke else [s for s in SHAPES if s[0] in args.shapes]
    repeats = 1 if args.smoke else args.repeats
    results = []
    for name, width, out_f, head_dim, tokens in shapes:
        gen = torch.Generator().manual_seed(0)
        fc1, q = fc1_costs(width, out_f, tokens, repeats, gen), qkv_costs(width, head_dim, tokens, repeats, gen)
        lorsu = fc1["sparse_s"] - fc1["frozen_s"] + 3 * (q["lorsu_2heads_s"] - q["frozen_s"])
        results.append({"shape": name, "tokens": tokens, "fc1": fc1, "q": q, "block_lorsu_extra_s": lorsu,
                        "block_lora_extra_s": 3 * (q["lora_all_s"] - q["frozen_s"])})
    return {"benchmark": "bench_block_cost", "smoke": args.smoke, "threads": args.threads, "results": results,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else [],
            "env": C.env_info()}


def table(doc: dict[str, Any]) -> str:
    lines = [f"{doc['threads']} threads; CPU ms, best of several calls, forward + backward; loadavg {doc['loadavg']}"]
    for r in doc["results"]:
        f = {k: 1e3 * v for k, v in r["fc1"].items() if k.endswith("_s")}
        q = {k: 1e3 * v for k, v in r["q"].items()}
        lines += [f"{r['shape']} ({r['tokens']} tokens)",
                  f"  fc1 frozen {f['frozen_s']:.2f}, sparse delta {f['sparse_s']:.2f} (+{f['sparse_s'] - f['frozen_s']:.2f}):"
                  f" delta grad {f['delta_grad_s']:.2f} (sampled part {f['sampled_part_s']:.2f}),"
                  f" one weight rebuild {f['rebuild_s']:.2f}",
                  f"  q frozen {q['frozen_s']:.2f}, 2-head LoRA {q['lorsu_2heads_s']:.2f},"
                  f" all-head LoRA {q['lora_all_s']:.2f}",
                  f"  per block: lorsu +{1e3 * r['block_lorsu_extra_s']:.2f}, lora +{1e3 * r['block_lora_extra_s']:.2f}"
                  " over frozen layers"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = C.kernel_parser(__doc__, [s[0] for s in SHAPES], repeats=10).parse_args(argv)
    warnings.simplefilter("ignore")
    doc = run(args)
    return C.report(doc, table(doc), "bench_block_cost", args)


if __name__ == "__main__":
    raise SystemExit(main())
