#!/usr/bin/env python3
"""Export benchmark: PyTorch eager vs onnxruntime fp32 / fp32 fused / fp16 / int8 / int8-qdq (CPU), batch 1
and 8: latency, file size, and the cosine to PyTorch on images the export never saw.

Models: `--real` is the default model (DINOv2-S/14 dual encoder from the lorsu-edge cache, real weights),
calibrated (int8-qdq) on 32 textile + 32 animal images and scored on 32 + 32 others, as the verb calibrates
on session + control images. Without `--real`: a CLIP vision encoder the size of ViT-B/16 (random weights;
latency and size do not depend on the weights' values, cosines do). "fp32 fused" is the fp32 file through
onnxruntime's transformer optimizer (`onnxruntime.transformers.optimizer`, attention/LayerNorm/GELU fusion:
what optimum's ORTOptimizer runs). Every ratio comes from one run on one machine (same threads for torch and
onnxruntime, engines interleaved). Each export goes through `export_onnx`, so it is also proven.

    python benchmarks/bench_export.py --real           # default model, writes benchmarks/results/bench_export_real.json
    python benchmarks/bench_export.py                  # ViT-B/16, writes benchmarks/results/bench_export.json
    python benchmarks/bench_export.py --smoke          # tiny model, seconds (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lorsu_edge.consumer import image_features
from lorsu_edge.export import export_onnx
from lorsu_edge.export.inputs import image_batch
from lorsu_edge.families import find_encoder

RESULTS = Path(__file__).resolve().parent / "results"
VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=16)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)


PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq")


def build(smoke: bool):
    """A CLIP vision encoder (random weights) and a matching image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = TINY if smoke else VIT_B16
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**cfg)).eval()
    size = cfg["image_size"]
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, proc, cfg


def build_real():
    """The default dual encoder from the lorsu-edge cache (built on first use, as the demo does)."""
    from lorsu_edge.load import load_model
    from lorsu_edge.zoo.dual import DEFAULT_NAME, build_default_dual

    loaded = load_model(str(build_default_dual()), "none")
    size = loaded.processor.image_processor.crop_size["height"]
    return loaded.model.eval(), loaded.processor, {"image_size": size, "model": DEFAULT_NAME}


def images(real: bool, seed: int = 0) -> tuple[list[Any], dict[str, list[Any]]]:
    """(calibration images, held-out images by domain): real textile + animal photos with `real`, else drawn ones."""
    if real:
        from lorsu_edge.zoo.datasets import load_animal_mnist, load_textile

        textile = [im for im, _ in load_textile(per_class=22, seed=seed)][:64]
        animals = [im for im, _ in load_animal_mnist(range(64))]
        return textile[:32] + animals[:32], {"textile": textile[32:64], "animals": animals[32:64]}
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    drawn = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(16)]
    return drawn[:8], {"drawn": drawn[8:]}


def cosines(model, spec, proc, session, heldout: dict[str, list[Any]]) -> dict[str, Any]:
    """min/mean cosine between PyTorch and `session` per held-out domain (images no export saw), and overall."""
    import numpy as np

    per: dict[str, list[float]] = {}
    for domain, imgs in heldout.items():
        b = image_batch(proc, imgs)
        with torch.inference_mode():
            ref = image_features(model, spec, b.pixels).numpy()
        got = session.run(None, {"pixel_values": b.feed})[0]
        per[domain] = list((ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1))
    every = [c for cs in per.values() for c in cs]
    return {"min_cosine_heldout": float(min(every)), "mean_cosine_heldout": float(np.mean(every)),
            "by_domain": {d: {"min": float(min(cs)), "mean": float(np.mean(cs)), "images": len(cs)}
                          for d, cs in per.items()}}


def fused(path: Path, model, dest: Path) -> Path:
    """The fp32 file through onnxruntime's transformer optimizer (what optimum's ORTOptimizer wraps)."""
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = getattr(model.config, "vision_config", model.config)
    opt = optimize_model(str(path), model_type="vit", num_heads=int(cfg.num_attention_heads),
                         hidden_size=int(cfg.hidden_size))
    opt.save_model_to_file(str(dest))
    return dest


def time_interleaved(calls: dict[str, Any], repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median and min wall time (ms) of each call, measured round-robin.

    Interleaving makes the ratios fair on a shared machine: a burst of load from another process slows
    every engine in that round, instead of whichever engine happened to be measured at the time.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            runs[name].append((time.perf_counter() - t) * 1e3)
    return {name: {"median_ms": statistics.median(r), "min_ms": min(r), "repeats": repeats} for name, r in runs.items()}


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _eager(model, spec, px):
    def call():
        with torch.inference_mode():
            image_features(model, spec, px)
    return call


def _ort(session, px):
    feed = {"pixel_values": px.numpy()}
    return lambda: session.run(None, feed)


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]  # other processes' load makes absolute times unreliable: record it
    torch.set_num_threads(args.threads)
    model, proc, cfg = build_real() if args.real else build(args.smoke)
    spec = find_encoder(model)
    precisions = list(PRECISIONS)
    calibration, heldout = images(args.real)
    exports: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 3, cfg["image_size"], cfg["image_size"], generator=gen) for b in args.batches}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for prec in precisions:
            res = export_onnx(model, spec, proc, Path(tmp) / prec / "enc.onnx", precision=prec,
                              sample_images=next(iter(heldout.values()))[:3],
                              calibration_images=calibration)
            sessions[f"onnxruntime {prec}"] = ort_session(res.path, args.threads)
            exports[prec] = {"bytes": res.size_bytes, "export_seconds": round(res.seconds, 2),
                             "min_cosine": min(p.min_cosine for p in res.parity),
                             "max_rel_abs": max(p.rel_max_abs for p in res.parity),
                             **cosines(model, spec, proc, sessions[f"onnxruntime {prec}"], heldout)}
            if prec == "fp32":
                path = fused(res.path, model, Path(tmp) / "fused.onnx")
                sessions["onnxruntime fp32 fused"] = ort_session(path, args.threads)
                exports["fp32 fused"] = {"bytes": path.stat().st_size, "export_seconds": 0.0, "min_cosine": None,
                                         "max_rel_abs": None,
                                         **cosines(model, spec, proc, sessions["onnxruntime fp32 fused"], heldout)}
        for b, px in inputs.items():
            calls = {"pytorch eager fp32": _eager(model, spec, px)}
            calls.update({name: _ort(sess, px) for name, sess in sessions.items()})
            for name, timing in time_interleaved(calls, args.repeats).items():
                rows.append({"engine": name, "batch": b, **timing})
    torch_ms = {r["batch"]: r["median_ms"] for r in rows if r["engine"].startswith("pytorch")}
    for r in rows:
        r["per_image_ms"] = r["median_ms"] / r["batch"]
        r["speedup_vs_pytorch"] = torch_ms[r["batch"]] / r["median_ms"]
    return {
        "benchmark": "bench_export", "smoke": args.smoke, "real": args.real,
        "model": "default dual encoder (DINOv2-S/14, real weights)" if args.real else
        "tiny CLIP vision" if args.smoke else "CLIP ViT-B/16 vision (random weights)", "config": cfg,
        "params": sum(p.numel() for p in model.parameters()), "threads": args.threads,
        "pytorch_bytes_fp32": sum(p.numel() * 4 for p in model.parameters()),
        "exports": exports, "rows": rows, "env": env_info(),
        "loadavg_1min": {"start": load_before, "end": os.getloadavg()[0]},
    }


def env_info() -> dict[str, Any]:
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "processor": platform.processor(),
            "date": time.strftime("%Y-%m-%d")}


def table(doc: dict[str, Any]) -> str:
    load = doc["loadavg_1min"]
    lines = [f"{doc['model']}: {doc['params']:,} params, {doc['threads']} thread(s), "
             f"{doc['env']['cpu_count']} CPUs, load average {load['start']:.1f} -> {load['end']:.1f}",
             f"{'engine':<24}{'batch':>6}{'median ms':>12}{'ms/image':>10}{'vs torch':>10}"]
    for r in doc["rows"]:
        lines.append(f"{r['engine']:<24}{r['batch']:>6}{r['median_ms']:>12.2f}{r['per_image_ms']:>10.2f}"
                     f"{r['speedup_vs_pytorch']:>9.2f}x")
    domains = list(doc["exports"]["fp32"]["by_domain"])
    lines.append(f"{'file':<12}{'MiB':>9}{'vs fp32':>9}{'export s':>10}"
                 + "".join(f"{d + ' min/mean cos':>28}" for d in domains))
    fp32 = doc["exports"]["fp32"]["bytes"]
    for prec, e in doc["exports"].items():
        cos = "".join(f"{e['by_domain'][d]['min']:>19.6f}/{e['by_domain'][d]['mean']:.6f}" for d in domains)
        lines.append(f"{prec:<12}{e['bytes'] / 2**20:>9.2f}{e['bytes'] / fp32:>9.2f}{e['export_seconds']:>10.1f}{cos}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 repeats: checks the script runs")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch and onnxruntime alike (1: stable numbers on a shared machine)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 7; 2 with --smoke)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--real", action="store_true", help="the default model (real weights) on real images")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.smoke else 7)
    doc = run(args)
    print(table(doc))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"bench_export{'_smoke' if args.smoke else '_real' if args.real else ''}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
