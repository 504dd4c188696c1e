#!/usr/bin/env python3
"""Trainable parameters and optimizer state of LoRSU on a CLIP-L/14-336 image encoder (LLaVA-1.5's),
next to the research code's dense masked-gradient approach for the same selection.

The encoder is built from its config (random weights, CPU, fp32). In its own child process, each
approach scores importance on one random 336 px image, selects (sparsity 0.1, top-2 heads, rank 64),
injects, and takes one AdamW step; then the real modules are measured: trainable elements, gradient
bytes after backward, Adam state (exp_avg + exp_avg_sq), masks (dense-ref) and index buffers (lorsu),
and the training-phase peak RSS. The analytic numbers are printed beside them and must agree.

    lorsu      fc1: selected entries only (values + int32 indices); q/k/v: LoRA factors for the 2
               selected heads' rows only; biases dense. Optimizer state is O(selected).
    dense-ref  fc1 weight fully trainable with a gradient-mask hook (Adam keeps dense moments);
               q/k/v LoRA with full-size factors times a full-size fp32 row mask.

    python benchmarks/bench_clip_l_state.py           # ~2-4 min on 2 cores, ~4 GB RAM peak
    python benchmarks/bench_clip_l_state.py --smoke   # tiny encoder, seconds
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

APPROACHES = ("lorsu", "dense-ref")
SPARSITY, TOP_K, RANK, ALPHA = 0.1, 2, 64, 64.0


def vision_config(smoke: bool) -> dict[str, Any]:
    cfg = C.TINY_VISION if smoke else C.CLIP_L336_VISION
    return {k: v for k, v in cfg.items() if k != "projection_dim"}


def analytic(vc: dict[str, Any], approach: str) -> dict[str, int]:
    """Expected counts from the shapes alone (L blocks, hidden H, fc1 width I, head_dim d)."""
    from lorsu_edge.select import budget_count

    L, H, I = vc["num_hidden_layers"], vc["hidden_size"], vc["intermediate_size"]
    d = H // vc["num_attention_heads"]
    rows = TOP_K * d
    biases = L * (I + 3 * H)
    if approach == "lorsu":
        fc1 = L * budget_count(I * H, SPARSITY)
        lora = L * 3 * (RANK * H + rows * RANK)
        masks, index = 0, 4 * fc1 + 8 * L * 3 * rows  # int32 fc1 entries, int64 LoRA rows
    else:
        fc1 = L * I * H
        lora = L * 3 * (RANK * H + H * RANK)
        masks, index = 4 * (L * I * H + L * 3 * H * H), 0
    trainable = fc1 + lora + biases
    return {"fc1_entries": fc1, "lora_params": lora, "bias_params": biases, "trainable_params": trainable,
            "grad_bytes": 4 * trainable, "adam_state_bytes": 8 * trainable, "mask_bytes": masks, "index_bytes": index,
            "fc1_grad_adam_bytes": 12 * fc1, "fc1_grad_adam_mask_bytes": 12 * fc1 + (4 * L * I * H if masks else 0)}


def child(p: dict[str, Any]) -> dict[str, Any]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from lorsu_edge.config import MethodConfig
    from lorsu_edge.consumer import image_features
    from lorsu_edge.families import find_encoder
    from lorsu_edge.inject import freeze, inject, select_targets
    from lorsu_edge.memory import current_rss_bytes, peak_rss_bytes, reset_peak
    from lorsu_edge.score import candidate_paths, compute_importance
    from lorsu_edge.train import TrainConfig, autocast_factory, make_optimizer

    torch.set_num_threads(p["threads"])
    torch.manual_seed(0)
    vc = p["vision_config"]
    model = CLIPVisionModel(CLIPVisionConfig(**vc))
    spec = find_encoder(model)
    px = torch.randn(1, 3, vc["image_size"], vc["image_size"], generator=torch.Generator().manual_seed(0))
    autocast = autocast_factory(p["precision"], torch.device("cpu"))

    def loss_fn(m, batch):  # a bare encoder has no text side: any scalar of its output drives the gradient
        return image_features(m, spec, batch).float().pow(2).mean()

    t0 = time.perf_counter()
    cfg = MethodConfig(method="lorsu", sparsity=SPARSITY, top_k_heads=TOP_K, rank=RANK, alpha=ALPHA)
    grads, _ = compute_importance(model, candidate_paths(spec), [(px, 1)], loss_fn, max_samples=1, autocast=autocast)
    targets = select_targets(spec, cfg, grads)
    del grads
    if p["approach"] == "dense-ref":
        C.inject_dense_reference(model, targets, RANK, ALPHA)
    else:
        inject(model, targets, cfg)
        freeze(model, spec, cfg)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = make_optimizer(params, TrainConfig(lr=1e-5))
    model.train()
    setup_peak = peak_rss_bytes()  # read before the reset: clearing VmHWM also resets ru_maxrss (wait4 included)
    rss_before = current_rss_bytes()
    reset_peak()
    with autocast():
        loss = loss_fn(model, px)
    loss.backward()
    grad_b = C.grad_bytes(model)
    opt.step()
    counts = {"fc1_entries": 0, "lora_params": 0, "bias_params": 0}
    for name, q in model.named_parameters():
        if q.requires_grad:
            key = "lora_params" if "lora_" in name else "bias_params" if name.endswith("bias") or name.endswith(
                "bias_delta") else "fc1_entries"
            counts[key] += q.numel()
    return {**p, **counts, "trainable_params": sum(q.numel() for q in params), "grad_bytes": grad_b,
            "adam_state_bytes": C.adam_state_bytes(opt), "mask_bytes": C.buffer_bytes(model, ("mask", "grad_mask")),
            "index_bytes": C.buffer_bytes(model, ("indices", "rows")),
            "encoder_params": sum(q.numel() for n, q in model.named_parameters() if "lora_" not in n
                                  and not n.endswith(("delta", "bias_delta"))),
            "setup_peak_rss_bytes": setup_peak, "rss_before_step_bytes": rss_before,
            "step_peak_rss_bytes": peak_rss_bytes(),
            "seconds": time.perf_counter() - t0}


KEYS = ("trainable_params", "fc1_entries", "lora_params", "bias_params", "grad_bytes", "adam_state_bytes",
        "mask_bytes", "index_bytes")


def run(args) -> dict[str, Any]:
    vc = vision_config(args.smoke)
    rows = []
    for approach in APPROACHES:
        print(f"{approach} ...", flush=True)
        r = C.run_child(Path(__file__), {"approach": approach, "vision_config": vc, "threads": args.threads,
                                         "precision": args.precision})
        r["analytic"] = analytic(vc, approach)
        r["matches_analytic"] = all(r[k] == r["analytic"][k] for k in KEYS)
        r["peak_rss_bytes"] = C.peak_rss(r)
        r["step_extra_rss_bytes"] = r["step_peak_rss_bytes"] - r["rss_before_step_bytes"]
        rows.append(r)
    lorsu, dense = rows
    ratios = {k: dense[k] / lorsu[k] for k in ("trainable_params", "adam_state_bytes", "grad_bytes") if lorsu[k]}
    return {"benchmark": "bench_clip_l_state", "smoke": args.smoke,
            "model": "tiny CLIP vision (smoke)" if args.smoke else "CLIP ViT-L/14-336 vision (random weights)",
            "vision_config": vc, "method": {"sparsity": SPARSITY, "top_k_heads": TOP_K, "rank": RANK, "alpha": ALPHA},
            "rows": rows, "dense_over_lorsu": ratios, "env": C.env_info()}


def table(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    lines = [f"{doc['model']}: {C.fmt_count(rows[0]['encoder_params'])} encoder params; LoRSU sparsity "
             f"{SPARSITY}, top-{TOP_K} heads, rank {RANK}; after one AdamW step on one image",
             f"{'':<22}" + "".join(f"{r['approach'] + ' (measured)':>22}{'(analytic)':>13}" for r in rows)]
    fmt = {k: (C.fmt_bytes if k.endswith("bytes") else C.fmt_count) for k in KEYS}
    for k in KEYS:
        lines.append(f"{k:<22}" + "".join(f"{fmt[k](r[k]):>22}{fmt[k](r['analytic'][k]):>13}" for r in rows))
    lines.append(f"{'step peak RSS (+)':<22}"
                 + "".join(f"{C.fmt_bytes(r['step_extra_rss_bytes']):>22}{'':>13}" for r in rows))
    lines.append(f"{'child peak RSS':<22}" + "".join(f"{C.fmt_bytes(r['peak_rss_bytes']):>22}{'':>13}" for r in rows))
    dense = rows[1]["analytic"]
    lines += [f"dense-ref fc1 alone: grads + Adam {C.fmt_bytes(dense['fc1_grad_adam_bytes'])}, "
              f"+ its fp32 mask {C.fmt_bytes(dense['fc1_grad_adam_mask_bytes'])}",
              "dense-ref / lorsu: " + ", ".join(f"{k} {v:.1f}x" for k, v in doc["dense_over_lorsu"].items()),
              "measured == analytic: " + ", ".join(f"{r['approach']} {r['matches_analytic']}" for r in rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    payload = C.child_payload(argv)
    if payload is not None:
        warnings.simplefilter("ignore")
        Path(payload["out"]).write_text(json.dumps(child(payload)))
        return 0
    ap = C.base_parser(__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args(argv)
    doc = run(args)
    return C.report(doc, table(doc), "bench_clip_l_state", args)


if __name__ == "__main__":
    raise SystemExit(main())
