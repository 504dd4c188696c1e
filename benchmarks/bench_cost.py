#!/usr/bin/env python3
"""Wall time per training step and peak memory on this CPU: lorsu vs lora vs spu vs full, and the research
code's dense masked-gradient approach ("dense-ref") for the same LoRSU selection.

Each method runs in its own child process, one after another, so each peak RSS is that method's alone
(`os.wait4` ru_maxrss for the whole child; VmHWM reset just before training for the training phase).
A child builds the model, scores importance on one batch (lorsu, spu, dense-ref), injects the method
with the package's own pieces (`score`, `select`, `inject`, `train.make_optimizer`,
`losses.contrastive_loss`, `consumer.image_features`), then times `--warmup` + `--steps` optimizer
steps of the CLIP loss (bf16 autocast, trainables fp32, grad clipping, AdamW: what `train.train` does).
Text features come from the frozen text tower once, as our objective caches them.

Models: (a) a CLIP ViT-B/16 built from its config (random weights; latency and memory do not depend
on the values), batch 8, 224 px; (b) the default dual encoder (DINOv2-S/14 + MiniLM, 112 px), only if
it has been built (`lorsu-edge` zoo cache) -- skipped with a message otherwise.

THE MACHINE MUST BE OTHERWISE IDLE: with 2 cores, another busy process slows each step several-fold.
Only ratios within one run are meaningful; /proc/loadavg is recorded before and after.

    python benchmarks/bench_cost.py                 # writes benchmarks/results/bench_cost.json (~5 min)
    python benchmarks/bench_cost.py --smoke         # tiny CLIP, seconds
    python benchmarks/bench_cost.py --models vitb16 --methods lorsu dense-ref --steps 10
    python benchmarks/bench_cost.py --methods lorsu lorsu-sampled lora spu --threads 1   # fc1 gradient paths
    python benchmarks/bench_cost.py --device cuda --models vitb16 --methods lorsu lora lorsu-sampled  # on a GPU
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = ("lorsu", "lora", "spu", "full", "dense-ref")
# Not run by default: LoRSU with the fc1 weight-gradient path forced instead of chosen by the crossover.
FC1_GRAD_VARIANTS = {"lorsu-sampled": "sampled", "lorsu-dense": "dense"}
MODELS = ("vitb16", "dual")


# --- child: one method, one model ------------------------------------------------------------------


def build_model(name: str) -> tuple[torch.nn.Module, int, str]:
    """(model, image size, description). Raises FileNotFoundError when the dual encoder is not built."""
    from transformers import CLIPModel

    if name == "tiny":
        return CLIPModel(C.clip_config(C.TINY_VISION, C.TINY_TEXT)), C.TINY_VISION["image_size"], "tiny CLIP"
    if name == "vitb16":
        model = CLIPModel(C.clip_config(C.CLIP_B16_VISION, C.CLIP_B16_TEXT))
        return model, C.CLIP_B16_VISION["image_size"], "CLIP ViT-B/16 (random weights)"
    from transformers import VisionTextDualEncoderModel

    path = dual_path()
    if path is None:
        raise FileNotFoundError("the default dual encoder is not built")
    size = dual_image_size(path)
    return VisionTextDualEncoderModel.from_pretrained(str(path)), size, f"default dual encoder ({path.name})"


def dual_path() -> Path | None:
    """The built default dual encoder's folder, or None (never builds it: that takes minutes)."""
    from lorsu_edge.zoo import cache, dual

    path = cache.model_dir(dual.DEFAULT_NAME)
    return path if dual.is_built(path) else None


def dual_image_size(path: Path) -> int:
    from lorsu_edge.zoo import dual

    try:
        pre = json.loads((path / "preprocessor_config.json").read_text())
        return int(pre["crop_size"]["height"])
    except (OSError, KeyError, ValueError, TypeError):
        return dual.IMAGE_SIZE


def release_free_memory() -> None:
    """Hand freed heap back to the OS so the training-phase RSS baseline is not inflated by the importance pass."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def text_features(model: torch.nn.Module, batch: int, tokens: int = 16) -> torch.Tensor:
    """Frozen text tower, once (the objective caches caption features per session)."""
    gen = torch.Generator().manual_seed(1)
    vocab = int(getattr(model.config.text_config, "vocab_size", 1000))
    ids = torch.randint(5, min(vocab, 1000), (batch, tokens), generator=gen)
    with torch.no_grad():
        return model.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids)).float()


def prepare(model, spec, method: str, loss_fn, px: torch.Tensor, autocast) -> dict[str, Any]:
    """Score (if the method needs it), select and inject; returns timings and what was selected."""
    from lorsu_edge.config import MethodConfig
    from lorsu_edge.inject import freeze, inject, select_targets
    from lorsu_edge.score import candidate_paths, compute_importance

    cfg = MethodConfig(method="lorsu" if method == "dense-ref" or method in FC1_GRAD_VARIANTS else method)
    grads, t0 = None, time.perf_counter()
    if cfg.needs_importance:
        paths = candidate_paths(spec, fc1=cfg.uses_fc1, attn=cfg.method == "lorsu")
        grads, _ = compute_importance(model, paths, [(px, len(px))], loss_fn, max_samples=len(px), autocast=autocast)
    importance_s = time.perf_counter() - t0
    targets = select_targets(spec, cfg, grads)
    del grads
    if method == "dense-ref":
        C.inject_dense_reference(model, targets, cfg.rank, cfg.alpha)
    else:
        inject(model, targets, cfg)
        freeze(model, spec, cfg)
        force_fc1_grad(model, FC1_GRAD_VARIANTS.get(method))
    return {"importance_s": importance_s, "targets": len(targets), "config": cfg.to_dict()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def force_fc1_grad(model: torch.nn.Module, mode: str | None) -> None:
    from lorsu_edge.layers import SparseDeltaLinear

    for m in model.modules():
        if mode is not None and isinstance(m, SparseDeltaLinear):
            m.grad_mode = mode


def child(p: dict[str, Any]) -> dict[str, Any]:
    from lorsu_edge.consumer import image_features
    from lorsu_edge.families import find_encoder
    from lorsu_edge.losses import contrastive_loss
    from lorsu_edge.memory import current_rss_bytes, peak_rss_bytes, reset_peak
    from lorsu_edge.train import TrainConfig, autocast_factory, make_optimizer

    torch.set_num_threads(p["threads"])
    torch.manual_seed(p["seed"])
    device = torch.device(p.get("device", "cpu"))
    t0 = time.perf_counter()
    model, size, desc = build_model(p["model"])
    spec = find_encoder(model)
    px = torch.randn(p["batch"], 3, size, size, generator=torch.Generator().manual_seed(0))
    txt = text_features(model, p["batch"]).to(device)
    scale = model.logit_scale.exp().detach().to(device)
    model, px = model.to(device), px.to(device)
    build_s = time.perf_counter() - t0
    autocast = autocast_factory(p["precision"], device)

    def loss_fn(m, batch):
        return contrastive_loss(image_features(m, spec, batch), txt, scale)

    info = prepare(model, spec, p["method"], loss_fn, px, autocast)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = make_optimizer(params, TrainConfig(lr=1e-5))
    model.train()
    release_free_memory()
    setup_peak = peak_rss_bytes()  # read before the reset: clearing VmHWM also resets ru_maxrss (wait4 included)
    rss_before = current_rss_bytes()
    reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu, grads_b = [], [], 0
    for _ in range(p["warmup"] + p["steps"]):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        with autocast():
            loss = loss_fn(model, px)
        loss.backward()
        grads_b = C.grad_bytes(model)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)  # CUDA runs asynchronously: time the work, not its launch
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)  # CPU seconds of all threads: less skewed by other processes
    timed = times[p["warmup"]:]
    return {**p, **info, "model_desc": desc, "image_size": size, "spec_blocks": len(spec.blocks),
            "encoder_params": sum(q.numel() for q in spec.tower.parameters()),
            "trainable_params": sum(q.numel() for q in params), "adam_state_bytes": C.adam_state_bytes(opt),
            "grad_bytes": grads_b, "mask_bytes": C.buffer_bytes(model, ("mask", "grad_mask")),
            "index_bytes": C.buffer_bytes(model, ("indices", "rows")),
            "step_s_median": statistics.median(timed), "step_s_min": min(timed), "step_s_all": times,
            "step_cpu_s_median": statistics.median(cpu[p["warmup"]:]), "step_cpu_s_all": cpu,
            "build_s": build_s, "setup_peak_rss_bytes": setup_peak, "rss_before_train_bytes": rss_before,
            "train_peak_rss_bytes": peak_rss_bytes(),
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            "loss_last": float(loss.detach())}


# --- parent ---------------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def run(args) -> dict[str, Any]:
    models = ["tiny"] if args.smoke else args.models
    base = {"batch": 4 if args.smoke else args.batch, "steps": 2 if args.smoke else args.steps,
            "warmup": 1 if args.smoke else args.warmup, "threads": args.threads, "precision": args.precision,
            "seed": 0, "device": args.device}
    load_before, results, skipped = loadavg(), {}, {}
    for model in models:
        if model == "dual" and dual_path() is None:
            skipped[model] = "default dual encoder not built (lorsu_edge.zoo.dual.build_default_dual); skipped"
            print(f"[{model}] {skipped[model]}", flush=True)
            continue
        rows = []
        for method in args.methods:
            print(f"[{model}] {method} ...", flush=True)
            rows.append(C.run_child(Path(__file__), {**base, "model": model, "method": method}))
        ref = next((r for r in rows if r["method"] == "lorsu"), rows[0])
        for r in rows:
            r["peak_rss_bytes"] = C.peak_rss(r)
            r["train_extra_rss_bytes"] = r["train_peak_rss_bytes"] - r["rss_before_train_bytes"]
            r["step_vs_lorsu"] = r["step_s_median"] / ref["step_s_median"]
            r["cpu_vs_lorsu"] = r["step_cpu_s_median"] / ref["step_cpu_s_median"]
            r["peak_vs_lorsu"] = r["peak_rss_bytes"] / ref["peak_rss_bytes"]
        results[model] = rows
    return {"benchmark": "bench_cost", "smoke": args.smoke, "settings": base, "results": results,
            "skipped": skipped, "loadavg_before": load_before, "loadavg_after": loadavg(), "env": C.env_info(),
            "warning": "timings are valid only if the machine was otherwise idle; compare ratios within this run"}


def table(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [f"batch {s['batch']}, {s['precision']} autocast, {s['threads']} threads, median of {s['steps']} steps "
             f"after {s['warmup']} warm-up; loadavg before {doc['loadavg_before']} after {doc['loadavg_after']}"]
    for model, rows in doc["results"].items():
        first = rows[0]
        size, params = first["image_size"], C.fmt_count(first["encoder_params"])
        lines += [f"\n{first['model_desc']}, {size} px, encoder {params} params",
                  f"{'method':<14}{'step s':>8}{'vs lorsu':>9}{'cpu s':>8}{'vs lorsu':>9}{'trainable':>11}"
                  f"{'Adam state':>12}{'grads':>11}{'masks':>11}{'peak RSS':>11}{'train +RSS':>12}"]
        for r in rows:
            lines.append(f"{r['method']:<14}{r['step_s_median']:>8.3f}{r['step_vs_lorsu']:>8.2f}x"
                         f"{r['step_cpu_s_median']:>8.3f}{r['cpu_vs_lorsu']:>8.2f}x"
                         f"{C.fmt_count(r['trainable_params']):>11}{C.fmt_bytes(r['adam_state_bytes']):>12}"
                         f"{C.fmt_bytes(r['grad_bytes']):>11}{C.fmt_bytes(r['mask_bytes']):>11}"
                         f"{C.fmt_bytes(r['peak_rss_bytes']):>11}{C.fmt_bytes(r['train_extra_rss_bytes']):>12}")
    for model, why in doc["skipped"].items():
        lines.append(f"\n[{model}] {why}")
    lines.append("\nstep s: wall time; cpu s: CPU time of all the child's threads (less skewed by other load).\n"
                 "peak RSS: whole child (max of wait4 ru_maxrss and the pre-training VmHWM);\n"
                 "train +RSS: training-phase peak above the RSS at its start.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    payload = C.child_payload(argv)
    if payload is not None:
        warnings.simplefilter("ignore")
        result = child(payload)
        Path(payload["out"]).write_text(json.dumps(result))
        return 0
    ap = C.base_parser(__doc__)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--methods", nargs="+", choices=[*METHODS, *FC1_GRAD_VARIANTS], default=list(METHODS),
                    help="lorsu-sampled / lorsu-dense: LoRSU with the fc1 gradient path forced (default: by the "
                         "measured crossover, lorsu_edge/sparse_grad.py)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU check (scripts/gpu_check.sh): "
                    "steps are then timed with a synchronize, and the CUDA peak is in the JSON")
    args = ap.parse_args(argv)
    print("warning: this machine must be otherwise idle while this runs (2 cores: another busy process "
          "slows each step several-fold); only ratios within one run are meaningful.", flush=True)
    doc = run(args)
    return C.report(doc, table(doc), "bench_cost", args)


if __name__ == "__main__":
    raise SystemExit(main())
