#!/usr/bin/env python3
"""Memory planner vs reality: predicted and measured peak memory of real adapt runs on this CPU, and the
plans for LLaVA-1.5-7B on a Jetson Orin Nano 8GB (both losses) from its config.json alone.

Part 1 (measured): for a tiny CLIP and a CLIP ViT-B/16 built from its config (random weights; memory does
not depend on the values), `lorsu_edge.plan.make_plan` predicts each phase, then `lorsu_edge.adapt.adapt`
runs with the plan's settings in a fresh child process. Per-phase peaks come from VmHWM, reset
(`memory.reset_peak`) when each phase starts (that also resets ru_maxrss, so the whole run is the max
of the phases and the child's `os.wait4` ru_maxrss):
load (`load_for_loss`), importance (`compute_importance`), train (`train`), merge (from `unload` to the
committed session). The child applies the plan's settings: micro-batch, `plan.apply_checkpointing`, and
importance in the planned block groups (adapt itself does not group yet; `grouped` below does).
Caveats of RSS: an fp32 checkpoint loaded as fp32 is used in place (mmap'd, paged in on first use, so
"load" reads low), and glibc keeps freed blocks, so a phase never reads below the one before it: the
whole-run peak is the figure to compare.

Part 2 (config only): `make_plan` for llava-hf/llava-1.5-7b-hf, whose config.json is written here by hand
from the published file (CLIP ViT-L/14-336 tower, Vicuna/Llama-2-7B LM, vision_feature_layer -2), on the
jetson-orin-nano-8gb profile: --loss ppl (refused: the 7B LLM does not fit) and --loss clip (fits).

RUN IT ALONE: on 2 cores another busy process slows the runs; memory figures are unaffected.

    python benchmarks/bench_memory.py             # writes benchmarks/results/bench_memory.json (~3 min)
    python benchmarks/bench_memory.py --smoke     # tiny CLIP only + the LLaVA plans (~30 s)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# llava-hf/llava-1.5-7b-hf config.json as published (fields whose values are transformers' defaults
# are omitted there too: Llama's hidden 4096 / intermediate 11008 / 32 layers / 32 heads).
LLAVA_15_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
PROFILE = "jetson-orin-nano-8gb"


def write_llava_config(folder: Path) -> Path:
    """Write LLaVA-1.5-7B's config.json (no weights) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAVA_15_7B_CONFIG, indent=2) + "\n")
    return folder


# --- part 2: LLaVA-1.5-7B plans from config.json -----------------------------------------------------


def llava_plans() -> list[dict[str, Any]]:
    from dataclasses import replace

    from lorsu_edge.plan import format_plan, make_plan
    from lorsu_edge.profiles import get_profile

    nano = get_profile(PROFILE)
    cases = [("ppl", nano, "as shipped (bitsandbytes not expected to work)"),
             ("ppl", replace(nano, bnb_4bit=True), "with a working bitsandbytes build"),
             ("clip", nano, "--loss clip (no LLM; CLIP-L text tower assumed)")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_llava_config(Path(tmp) / "llava-1.5-7b-hf")
        for loss, profile, what in cases:
            start = time.perf_counter()
            plan = make_plan(folder, loss=loss, profile=profile, batch_size=16)
            seconds = time.perf_counter() - start
            print(f"\n=== LLaVA-1.5-7B on {PROFILE}, --loss {loss}, {what} (planned in {seconds:.1f} s) ===")
            print(format_plan(plan).replace(str(folder), "llava-1.5-7b-hf (config.json only)"))
            rows.append({"loss": loss, "profile": PROFILE, "variant": what, "fits": plan.fits,
                         "predicted_peak_bytes": plan.predicted_peak_bytes, "peak_phase": plan.peak_phase,
                         "budget_bytes": plan.budget_bytes, "micro_batch": plan.micro_batch,
                         "grad_accum": plan.grad_accum, "checkpointing": plan.checkpointing,
                         "quantize": plan.quantize, "importance_block_groups": plan.importance_block_groups,
                         "smallest_fitting_budget": plan.smallest_fitting_budget,
                         "cheapest_change": plan.cheapest_change, "plan_seconds": round(seconds, 2),
                         "phases": {p.name: p.peak for p in plan.phases}})
    return rows


# --- part 1: predicted vs measured ----------------------------------------------------------------------


def build_model(name: str, dest: Path) -> tuple[Path, int]:
    """A CLIP with weights and a processor in `dest`; returns (folder, image size)."""
    from lorsu_edge.tiny import save_tiny

    if name == "tiny":
        return save_tiny("clip", dest), 32
    import transformers as tf

    from lorsu_edge.tiny import _clip_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    size = C.CLIP_B16_VISION["image_size"]
    model = tf.CLIPModel(C.clip_config(C.CLIP_B16_VISION, C.CLIP_B16_TEXT))
    processor = tf.CLIPProcessor(image_processor=tf.CLIPImageProcessor(size={"shortest_edge": size},
                                                                       crop_size={"height": size, "width": size}),
                                 tokenizer=_clip_tokenizer(dest))
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest, size


def child(payload: dict[str, Any]) -> None:
    """One adapt run with per-phase VmHWM; writes the result JSON to payload['out']."""
    import torch

    torch.set_num_threads(int(payload.get("threads", 2)))
    import lorsu_edge.adapt as A
    from lorsu_edge.config import MethodConfig
    from lorsu_edge.memory import reset_peak
    from lorsu_edge.plan import apply_checkpointing
    from lorsu_edge.train import TrainConfig

    peaks: dict[str, int] = {}
    current: list[str] = []
    specs: list = []

    def phase(name: str, fn):
        def run(*args, **kwargs):
            _close(current, peaks)
            reset_peak()
            current.append(name)
            result = fn(*args, **kwargs)
            if name == "load":
                specs.append(result.spec)
                if payload["checkpointing"]:
                    apply_checkpointing(result.model, result.spec)
            return result
        return run

    A.load_for_loss = phase("load", A.load_for_loss)
    A.compute_importance = phase("importance", grouped(A.compute_importance, payload["groups"], specs))
    A.train = phase("train", A.train)
    A.unload = phase("merge", A.unload)
    opts = A.AdaptOptions(
        data=Path(payload["data"]), workdir=Path(payload["workdir"]), model=payload["model"], loss="clip",
        device="cpu", show_progress=False, method=MethodConfig(**payload["method"]),
        train=TrainConfig(epochs=payload["epochs"], batch_size=payload["batch_size"],
                          micro_batch=payload["micro_batch"], precision=payload["dtype"]))
    start = time.perf_counter()
    result = A.adapt(opts)
    _close(current, peaks)
    Path(payload["out"]).write_text(json.dumps({"status": result.status, "phase_peaks": peaks,
                                                "seconds": time.perf_counter() - start,
                                                "trainable_params": result.report.get("trainable_params")}))


def grouped(compute_importance, groups: int, specs: list):
    """`score.compute_importance` one block group at a time, as the plan's importance_block_groups asks
    (adapt does not group yet). The few benchmark batches are kept in a list to replay per group."""
    from lorsu_edge.plan import block_groups

    def run(model, paths, batches, loss_fn, max_samples, autocast):
        if groups <= 1:
            return compute_importance(model, paths, batches, loss_fn, max_samples, autocast)
        batches, out, seen = list(batches), {}, 0
        blocks = specs[-1].candidate_blocks
        for ids in block_groups(len(blocks), groups):
            prefixes = tuple(blocks[i].path + "." for i in ids)
            part = [p for p in paths if p.startswith(prefixes)]
            grads, seen = compute_importance(model, part, iter(batches), loss_fn, max_samples, autocast)
            out.update(grads)
        return out, seen

    return run


def _close(current: list[str], peaks: dict[str, int]) -> None:
    from lorsu_edge.memory import peak_rss_bytes

    if current:
        peaks[current.pop()] = peak_rss_bytes()


def measure(name: str, tmp: Path, batch_size: int, budget: str | None) -> dict[str, Any]:
    from lorsu_edge.budget import parse_size
    from lorsu_edge.config import MethodConfig
    from lorsu_edge.plan import format_plan, make_plan
    from lorsu_edge.tiny import write_toy_images

    folder, _ = build_model(name, tmp / f"model-{name}")
    data = write_toy_images(tmp / f"data-{name}", labels=("red", "blue"), per_class=batch_size)
    method = MethodConfig()
    plan = make_plan(folder, method_cfg=method, loss="clip", batch_size=batch_size, profile="cpu", dtype="bf16",
                     budget_bytes=None if budget is None else parse_size(budget))
    print(f"\n=== {name}: plan (profile cpu{', budget ' + budget if budget else ''}) ===")
    print(format_plan(plan))
    payload = {"model": str(folder), "data": str(data), "workdir": str(tmp / f"runs-{name}-{budget}"),
               "method": method.to_dict(), "epochs": 1, "batch_size": batch_size, "micro_batch": plan.micro_batch,
               "checkpointing": plan.checkpointing, "groups": plan.importance_block_groups, "dtype": plan.dtype}
    got = C.run_child(Path(__file__).resolve(), payload)
    phases = {p.name: p for p in plan.phases if p.part_of_adapt}
    rows = []
    for pname, measured in got["phase_peaks"].items():
        p = phases[pname]
        margin = next(c.bytes for c in p.components if c.name == "safety margin")
        rows.append({"phase": pname, "predicted_bytes": p.peak, "predicted_without_margin_bytes": p.peak - margin,
                     "measured_bytes": measured})
    return {"model": name, "budget": budget, "batch_size": batch_size, "micro_batch": plan.micro_batch,
            "checkpointing": plan.checkpointing, "importance_block_groups": plan.importance_block_groups,
            "predicted_peak_bytes": plan.predicted_peak_bytes,
            # clear_refs resets ru_maxrss too: the child's wait4 figure covers only its last phase
            "measured_peak_bytes": max(got["child_peak_rss_bytes"], *got["phase_peaks"].values()),
            "phases": rows, "status": got["status"],
            "seconds": round(got["seconds"], 1), "planned_trainable": plan.trainable_params,
            "adapt_trainable": got["trainable_params"]}


def print_runs(runs: list[dict[str, Any]]) -> None:
    print("\n=== predicted vs measured peak (CPU, RSS) ===")
    print(f"{'model':<8} {'budget':<8} {'micro':>5} {'phase':<11} {'predicted':>11} {'w/o margin':>11} "
          f"{'measured':>11} {'meas/pred':>9}")
    for r in runs:
        for p in r["phases"]:
            print(f"{r['model']:<8} {str(r['budget']):<8} {r['micro_batch']:>5} {p['phase']:<11} "
                  f"{C.fmt_bytes(p['predicted_bytes']):>11} {C.fmt_bytes(p['predicted_without_margin_bytes']):>11} "
                  f"{C.fmt_bytes(p['measured_bytes']):>11} {p['measured_bytes'] / p['predicted_bytes']:>9.2f}")
        print(f"{r['model']:<8} {str(r['budget']):<8} {r['micro_batch']:>5} {'whole run':<11} "
              f"{C.fmt_bytes(r['predicted_peak_bytes']):>11} {'':>11} {C.fmt_bytes(r['measured_peak_bytes']):>11} "
              f"{r['measured_peak_bytes'] / r['predicted_peak_bytes']:>9.2f}")


def main(argv: list[str] | None = None) -> int:
    payload = C.child_payload(argv)
    if payload is not None:
        child(payload)
        return 0
    ap = C.base_parser(__doc__)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    cases = [("tiny", 8, None)] if args.smoke else [("tiny", 8, None), ("vitb16", 8, None), ("vitb16", 8, "1.5GiB")]
    doc: dict[str, Any] = {"env": C.env_info(), "runs": [], "llava_plans": llava_plans()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, batch, budget in cases:
            doc["runs"].append(measure(name, Path(tmp), batch, budget))
    print_runs(doc["runs"])
    out = C.write_results(doc, "bench_memory", args.smoke, args.results_dir)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
