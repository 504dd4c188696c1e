#!/usr/bin/env python3
"""Per-sample cost of a perplexity-loss LoRSU step on the embedded default VLM, and the share of it
spent in the language model.

One process, variants timed one after another (only ratios within one run are meaningful):
load the default VLM as `adapt` does (language model in 4-bit NF4 unless `--quantize none`; tower and
projector fp32), one batch of the VLM demo's data (negative animal-mnist images, "What animal is
this?" -> "a bear"), LoRSU importance + selection + injection through `adapt.score_and_inject`, then
`--steps` optimizer steps (bf16 autocast, AdamW, clipping; what `train.train` does) of:

- `step`: the perplexity objective as `adapt` runs it (`losses.answer_token_loss`: logits only at the
  answer positions);
- `full-logits`: the same step through transformers' own `.loss`, which projects every position
  (the 64 image tokens and the prompt too) onto Gemma's 262k-word vocabulary;
- `tower`: the vision tower + projector alone, backward from a fixed random projection of their
  output: everything in a step that is not the language model or the loss.

LM share = 1 - tower / step (wall and CPU time); forward-only times are reported beside them.
Needs the built default VLM (`lorsu-edge models build vlm`), skipped with a message otherwise.

    python benchmarks/bench_vlm_step.py                  # ~2 min; writes benchmarks/results/bench_vlm_step.json
    python benchmarks/bench_vlm_step.py --quantize none  # unquantized LM (fp32 weights, bf16 autocast)
    python benchmarks/bench_vlm_step.py --smoke          # tiny random LLaVA, seconds
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def default_vlm() -> Path | None:
    """The built default VLM's folder, or None (never builds it: that takes minutes)."""
    from lorsu_edge.zoo import cache, vlm

    path = cache.model_dir(vlm.DEFAULT_NAME)
    return path if vlm.is_built(path) else None


def write_data(dest: Path, n: int, smoke: bool) -> Path:
    """`n` VQA samples: the VLM demo's negative animals, or toy colour patches for --smoke."""
    if smoke:
        from lorsu_edge.tiny import write_toy_images

        return write_toy_images(dest, per_class=max(1, n // 2), vqa=True)
    from lorsu_edge.demo import negative_vqa, vlm_split
    from lorsu_edge.zoo.datasets import load_animal_mnist, write_vqa_manifest
    from lorsu_edge.zoo.vlm import ANIMAL_QUESTIONS

    items = load_animal_mnist(vlm_split(seed=0)[1][:n])
    return write_vqa_manifest(negative_vqa(items, ANIMAL_QUESTIONS, seed=0), dest)


def time_variant(params: list, loss_fn: Callable[[], torch.Tensor], autocast, warmup: int, steps: int
                 ) -> dict[str, Any]:
    """Median wall/CPU seconds of a training step (forward, backward, clip, AdamW) and of a forward alone."""
    from lorsu_edge.train import TrainConfig, make_optimizer

    opt = make_optimizer(params, TrainConfig(lr=1e-6))
    wall, cpu, fwd = [], [], []
    for i in range(warmup + steps):
        t, c = time.perf_counter(), time.process_time()
        with autocast():
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)  # all threads' CPU seconds: less skewed by other load
    for _ in range(max(1, steps // 2)):
        t = time.perf_counter()
        with torch.no_grad(), autocast():
            loss_fn()
        fwd.append(time.perf_counter() - t)
    return {"step_s": statistics.median(wall), "step_cpu_s": statistics.median(cpu),
            "forward_s": statistics.median(fwd), "step_s_all": wall, "loss": float(loss.detach())}


def run(args) -> dict[str, Any]:
    from lorsu_edge.adapt import AdaptOptions, score_and_inject
    from lorsu_edge.config import MethodConfig
    from lorsu_edge.consumer import projector, vlm_features
    from lorsu_edge.load import load_model
    from lorsu_edge.losses import IGNORE, PerplexityObjective
    from lorsu_edge.samples import read_samples
    from lorsu_edge.train import TrainConfig, autocast_factory

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from lorsu_edge.tiny import save_tiny

            source = save_tiny("llava", Path(tmp) / "llava")
        else:
            source = default_vlm()
        loaded = load_model(str(source), quantize="none" if args.smoke else args.quantize)
        samples = read_samples(write_data(Path(tmp) / "data", args.batch, args.smoke)).samples[:args.batch]
        model, spec = loaded.model, loaded.spec
        autocast = autocast_factory(args.precision, torch.device("cpu"))
        objective = PerplexityObjective(model, spec, loaded.processor)
        batch = objective.make_batch(samples)
        opts = AdaptOptions(data=Path(tmp), method=MethodConfig(), train=TrainConfig(batch_size=args.batch))
        t0 = time.perf_counter()
        score_and_inject(loaded, objective, samples, opts, autocast)
        importance_s = time.perf_counter() - t0
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        px = batch.inputs["pixel_values"]
        with torch.no_grad():
            out_shape = projector(model)(vlm_features(model, spec, px)).shape
        probe = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)) / out_shape[-1] ** 0.5
        variants = {
            "step": lambda: objective(model, batch),
            "full-logits": lambda: model(**batch.inputs).loss,
            "tower": lambda: (projector(model)(vlm_features(model, spec, px)).float() * probe).sum(),
        }
        rows = {}
        for name, fn in variants.items():
            print(f"{name} ...", flush=True)
            rows[name] = time_variant(params, fn, autocast, args.warmup, args.steps)
        labels = batch.inputs["labels"]
        info = {"model": str(source), "quantize": loaded.quantize, "batch": len(samples),
                "sequence_tokens": int(labels.shape[1]), "answer_tokens": int((labels != IGNORE).sum()),
                "image_tokens": int((batch.inputs["input_ids"] == model.config.image_token_index).sum()) // len(samples),
                "vocab": int(model.get_output_embeddings().weight.shape[0]),
                "trainable_params": sum(p.numel() for p in params), "importance_s": importance_s}
    step, tower = rows["step"], rows["tower"]
    summary = {"per_sample_s": step["step_s"] / info["batch"], "per_sample_cpu_s": step["step_cpu_s"] / info["batch"],
               "lm_share_wall": 1 - tower["step_s"] / step["step_s"],
               "lm_share_cpu": 1 - tower["step_cpu_s"] / step["step_cpu_s"],
               "full_logits_vs_step": rows["full-logits"]["step_s"] / step["step_s"]}
    return {"benchmark": "bench_vlm_step", "smoke": args.smoke, "info": info, "rows": rows, "summary": summary,
            "settings": {"steps": args.steps, "warmup": args.warmup, "precision": args.precision,
                         "threads": torch.get_num_threads()},
            "env": C.env_info(), "warning": "valid only on an otherwise idle machine; compare ratios within one run"}


def table(doc: dict[str, Any]) -> str:
    i, s = doc["info"], doc["summary"]
    lines = [f"{i['model']} (language model: {i['quantize']}), batch {i['batch']}, {i['image_tokens']} image + "
             f"{i['sequence_tokens'] - i['image_tokens']} text tokens per row, {i['answer_tokens']} answer tokens, "
             f"vocab {i['vocab']:,}, trainable {C.fmt_count(i['trainable_params'])}",
             f"{'variant':<13}{'step s':>9}{'cpu s':>9}{'forward s':>11}{'per sample s':>14}"]
    for name, r in doc["rows"].items():
        lines.append(f"{name:<13}{r['step_s']:>9.3f}{r['step_cpu_s']:>9.3f}{r['forward_s']:>11.3f}"
                     f"{r['step_s'] / i['batch']:>14.3f}")
    lines += [f"per-sample cost of a ppl LoRSU step: {s['per_sample_s']:.3f} s wall, {s['per_sample_cpu_s']:.3f} "
              f"CPU s; language model + loss share: {100 * s['lm_share_wall']:.0f}% wall, "
              f"{100 * s['lm_share_cpu']:.0f}% CPU",
              f"transformers' full-logits loss: {s['full_logits_vs_step']:.2f}x the answer-only step",
              f"importance pass (one batch, incl. selection and injection): {i['importance_s']:.2f} s"]
    return "\n".join(lines)


def result_name(args) -> str:
    """bench_vlm_step.json for the 4-bit language model; bench_vlm_step_<quantize>.json otherwise."""
    return "bench_vlm_step" if args.smoke or args.quantize == "4bit" else f"bench_vlm_step_{args.quantize}"


def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quantize", choices=("4bit", "8bit", "none"), default="4bit")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.smoke:
        args.batch, args.steps, args.warmup = 4, 2, 0
    elif default_vlm() is None:
        print("the default VLM is not built: run `lorsu-edge models build vlm` (minutes) first; nothing measured")
        return 1
    doc = run(args)
    return C.report(doc, table(doc), result_name(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
