#!/usr/bin/env python3
"""The GPU check (run by scripts/gpu_check.sh): every path that has never run without a GPU, measured once.

Each check runs in its own child process (a clean CUDA context, so `max_memory_allocated` is that run's
alone) under a time limit; a failure is recorded and the next check runs. Results: <out>/gpu_check.json and
<out>/gpu_check.md (the table for benchmarks/README.md).

1. adapt on CUDA, bf16 autocast and fp16 + GradScaler, on a CLIP ViT-B/16-sized dual encoder (random weights)
2. bitsandbytes 4-bit on CUDA: a tiny LLaVA adapted with --loss ppl through its NF4 language model
3. the planner's predicted peak vs torch.cuda.max_memory_allocated, with the process capped to the 8 GB and
   16 GB Jetson profiles' budgets (torch.cuda.set_per_process_memory_fraction)
4. onnxruntime's CUDA provider vs PyTorch on the exported encoder (when that provider is installed)
5. a CLIP-L/14-336 vision tower built from its config at real size: forward + backward memory and speed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=16)
CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14)
JETSON_BUDGETS = {"jetson-orin-nano-8gb": "8GB", "jetson-orin-nx-16gb": "16GB"}


def build_dual(dest: Path) -> Path:
    """A CLIP dual encoder with a ViT-B/16 image tower (random weights) and a working processor."""
    import torch
    import transformers as tf

    from lorsu_edge.tiny import _clip_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    tok = _clip_tokenizer(dest)
    torch.manual_seed(0)
    cfg = tf.CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4),
                        vision_config=VIT_B16, projection_dim=256)
    tf.CLIPModel(cfg).save_pretrained(dest)
    proc = tf.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    tf.CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(dest)
    return dest


def child(code: str, timeout: int) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; it prints one JSON line last. Failures become {"error": ...}."""
    start = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]
    if run.returncode != 0 or not lines:
        return {"error": (run.stderr.strip().splitlines() or ["no output"])[-1][:300], "rc": run.returncode}
    return {**json.loads(lines[-1]), "wall_s": round(time.perf_counter() - start, 1)}


_ADAPT = """
import json, torch
from typer.testing import CliRunner
from lorsu_edge.cli.main import app
{setup}
torch.cuda.reset_peak_memory_stats()
r = CliRunner().invoke(app, {args})
assert r.exit_code in (0, 6), r.output[-2000:]
print(json.dumps({{"exit_code": r.exit_code, "max_allocated": torch.cuda.max_memory_allocated(),
                   "tail": r.output.strip().splitlines()[-1][:200]}}))
"""


def adapt_args(model: Path, data: Path, wd: Path, *extra: str) -> list[str]:
    return ["adapt", "--model", str(model), "--data", str(data), "--workdir", str(wd), "--device", "cuda",
            "--epochs", "1", "--batch-size", "8", "--no-progress", "--json", *extra]


def plan_peak(model: Path, profile: str, budget: str, extra: list[str]) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-m", "lorsu_edge.cli.main", "plan", "--model", str(model), "--profile",
                          profile, "--budget", budget, "--batch-size", "8", "--json", *extra],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or ["plan failed"])[-1][:300]}
    doc = json.loads(run.stdout)
    return {"predicted_peak": doc.get("predicted_peak_bytes"), "phase": doc.get("peak_phase")}


def budget_setup(total: str) -> str:
    """Cap this CUDA process to `total` bytes of the device, as a Jetson of that size would be."""
    return (f"from lorsu_edge.budget import parse_size\n"
            f"frac = min(1.0, parse_size({total!r}) / torch.cuda.get_device_properties(0).total_memory)\n"
            f"torch.cuda.set_per_process_memory_fraction(frac)\n")


_ORT = """
import json, numpy as np, torch, onnxruntime as ort
from pathlib import Path
from lorsu_edge.export import export_onnx
from lorsu_edge.families import find_encoder
from lorsu_edge.load import load_model
if "CUDAExecutionProvider" not in ort.get_available_providers():
    print(json.dumps({{"skipped": "onnxruntime has no CUDAExecutionProvider here: " + ",".join(ort.get_available_providers())}}))
    raise SystemExit(0)
L = load_model({model!r}, "none")
rows = {{}}
for prec in ("fp32", "fp16"):
    res = export_onnx(L.model, L.spec, L.processor, Path({tmp!r}) / f"e-{{prec}}.onnx", precision=prec)
    s = ort.InferenceSession(str(res.path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    px = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        ref = L.model.get_image_features(pixel_values=px).numpy()
    got = s.run(None, {{"pixel_values": px.numpy()}})[0]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    rows[prec] = {{"min_cosine": float(cos.min()), "rel_max_abs": float(abs(ref - got).max() / abs(ref).max()),
                   "provider": s.get_providers()[0]}}
print(json.dumps(rows))
"""

_CLIP_L = """
import json, time, torch, transformers as tf
cfg = tf.CLIPVisionConfig(**{cfg!r})
m = tf.CLIPVisionModel(cfg).cuda()
x = torch.randn(8, 3, 336, 336, device="cuda")
out = {{"params": sum(p.numel() for p in m.parameters())}}
for dtype in (torch.bfloat16, torch.float16):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(6):
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            m(pixel_values=x).pooler_output.float().pow(2).mean().backward()
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    m.zero_grad(set_to_none=True)
    out[str(dtype).split(".")[-1]] = {{"fwd_bwd_ms_batch8": round(sorted(times[1:])[2] * 1e3, 1),
                                       "max_allocated": torch.cuda.max_memory_allocated()}}
print(json.dumps(out))
"""


def run_checks(out: Path, tmp: Path) -> dict[str, Any]:
    from lorsu_edge.tiny import save_tiny, write_toy_images

    doc: dict[str, Any] = {"checks": {}}
    checks = doc["checks"]
    dual = build_dual(tmp / "clip-b16")
    data = write_toy_images(tmp / "data", labels=("red", "blue", "green"), per_class=8, size=224)
    for precision in ("bf16", "fp16"):  # fp16 runs through the GradScaler (the Volta/Xavier path)
        args = adapt_args(dual, data, tmp / f"wd-{precision}", "--precision", precision)
        checks[f"adapt {precision}"] = child(_ADAPT.format(setup="", args=args), 240)
    llava = save_tiny("llava", tmp / "llava")
    vqa = write_toy_images(tmp / "vqa", vqa=True)
    args = adapt_args(llava, vqa, tmp / "wd-4bit", "--loss", "ppl", "--quantize", "4bit")
    checks["adapt 4-bit LLM (bitsandbytes)"] = child(_ADAPT.format(setup="", args=args), 240)
    for profile, total in JETSON_BUDGETS.items():
        args = adapt_args(dual, data, tmp / f"wd-{profile}", "--profile", profile, "--precision", "bf16")
        measured = child(_ADAPT.format(setup=budget_setup(total), args=args), 240)
        checks[f"planner vs measured, {profile}"] = {**measured, **plan_peak(dual, profile, total, [])}
    checks["onnxruntime CUDA provider parity"] = child(_ORT.format(model=str(dual), tmp=str(tmp)), 240)
    checks["CLIP-L/14-336 tower fwd+bwd"] = child(_CLIP_L.format(cfg=CLIP_L336), 240)
    return doc


def table(doc: dict[str, Any]) -> str:
    lines = ["| check | result |", "|---|---|"]
    for name, r in doc["checks"].items():
        lines.append(f"| {name} | {json.dumps(r, sort_keys=True)[:400]} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        doc = run_checks(args.out, Path(tmp))
    doc["env"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                  "date": time.strftime("%Y-%m-%d")}
    (args.out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(table(doc) + "\n")
    print(table(doc))
    return 0 if not any("error" in r for r in doc["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
