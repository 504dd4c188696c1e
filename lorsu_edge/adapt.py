"""The adapt recipe, readable top to bottom:
plan -> load -> samples -> score -> select -> inject -> train -> merge -> guard -> write session.

Crash safety: everything is written into a partial session directory that is committed (renamed) only at
the end, and the current pointer moves only for an accepted session, so a crash, SIGTERM or full disk at
any point leaves the previous current model in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lorsu_edge import __version__
from lorsu_edge.adapter import save_adapter
from lorsu_edge.anchor import anchored, read_anchor_images
from lorsu_edge.config import ContinualConfig, MethodConfig
from lorsu_edge.continual import known_classes, night_seed, remembered_anchor, replay_samples
from lorsu_edge.distributed import (is_main, main_computes, open_workdir, rank_slice, rank_starts, setup,
                                     world_size)
from lorsu_edge.errors import BadInputError, ExitCode, LorsuError
from lorsu_edge.forgetting import UpdateScaler, Verdict, bounded_merge, dense_start
from lorsu_edge.inject import freeze, inject, projection_target, select_targets
from lorsu_edge.integrity import fall_back_if_damaged
from lorsu_edge.load import (Loaded, apply_encoder, config_role, load_model, load_vlm_tower_in_dual, read_config,
                             resolve_source)
from lorsu_edge.losses import Batch, check_loss, default_loss, make_objective
from lorsu_edge.memory import cap_cuda_memory, cuda_peak_bytes, peak_rss_bytes
from lorsu_edge.merge import encoder_state_dict, tensors_hash, unload
from lorsu_edge.imagefile import ImageLimits
from lorsu_edge.samples import Sample, SampleSet, read_samples
from lorsu_edge.plan import apply_checkpointing
from lorsu_edge.retention import apply_retention, check_before_training
from lorsu_edge.save_full import save_full
from lorsu_edge.score import candidate_paths, compute_importance
from lorsu_edge.replay import write_buffer
from lorsu_edge.session import (ENCODER_FILE, REPORT_FILE, SAMPLES_FILE, Workdir, absolute_source, after_commit,
                                fault_point, graceful_sigterm)
from lorsu_edge.track import record_night
from lorsu_edge.train import TrainConfig, autocast_factory, resolve_precision, train

log = logging.getLogger(__name__)


@dataclass
class AdaptOptions:
    """Everything `lorsu-edge adapt` can be told (CLI flags map 1:1 onto these fields)."""

    data: Path
    workdir: Path = Path("lorsu-runs")
    model: str | None = None
    loss: str | None = None
    text_model: str | None = None
    templates: tuple[str, ...] = ()  # caption templates; default: DIR/templates.txt, else the built-in ones
    quantize: str = "auto"
    device: str = "auto"
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: int | None = None  # bytes; None = the profile's memory less its reserve
    profile: str | None = None  # name or path of a profiles/*.toml; None = detect this machine
    min_new_samples: int = 1
    control: Path | None = None
    eval_data: Path | None = None
    max_forgetting: float = 1.0
    # points below the base model's control accuracy a session may end at (None: the workdir's, else off)
    max_total_forgetting: float | None = None
    save_full: Path | None = None
    keep: int | None = None  # prune to the current + this many accepted encoders (None: the workdir's, else off)
    show_progress: bool = True
    anchor: Path | None = None  # unlabeled images whose features the session must keep (None: the workdir's)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    image_limits: ImageLimits = ImageLimits()  # per-image byte and pixel caps for every folder read
    allow_outside_data: bool = False  # accept manifest paths / links resolving outside their folder
    track: str | None = None  # MLflow tracking URI or "off" (None: the workdir's, see lorsu_edge/track.py)


@dataclass
class AdaptResult:
    status: str  # "accepted" (report["guard"] == "scaled": at a fraction of its update), "rejected" or "nothing-new"
    session: str | None  # the session written (accepted or rejected); the current one for "nothing-new"
    report: dict[str, Any]
    message: str = ""


def pick_device(device: str) -> torch.device:
    if device == "auto":  # under torchrun: this rank's device
        return setup() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_base_model(opts: AdaptOptions, remembered: str | None) -> str:
    """--model, else what the workdir remembers, else the embedded default (built once, offline)."""
    if opts.model and remembered and opts.model != remembered:
        raise BadInputError(f"workdir {opts.workdir} adapts {remembered}, not {opts.model}",
                            hint="use another --workdir for another base model, or drop --model")
    if opts.model or remembered:
        return opts.model or remembered
    from lorsu_edge.zoo.dual import build_default_dual

    log.info("no --model given: using the embedded default dual encoder (built once, offline)")
    return str(build_default_dual())


def _folder(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser().resolve()


def with_absolute_paths(opts: AdaptOptions) -> AdaptOptions:
    """Local paths made absolute before anything is remembered or recorded (workdir settings, reports), so
    a run from another directory finds the same folders and never mistakes `fx/model` for a hub id."""
    return replace(opts, model=absolute_source(opts.model), text_model=absolute_source(opts.text_model),
                   data=_folder(opts.data), control=_folder(opts.control), eval_data=_folder(opts.eval_data),
                   save_full=_folder(opts.save_full), anchor=_folder(opts.anchor))


def load_for_loss(base: str, opts: AdaptOptions, device: torch.device) -> Loaded:
    """The model the loss needs: the VLM itself, or for `--loss clip --text-model` only its tower inside
    the matching dual encoder (no language model in memory)."""
    if opts.text_model:
        return load_vlm_tower_in_dual(base, opts.text_model, device=str(device))
    return load_model(base, opts.quantize, device=str(device))


def plan_run(base: str, opts: AdaptOptions, loss: str, role: str, precision: str):
    """The memory plan, from config files only: refuse (OverBudgetError, exit 4) before any weight is read.

    `--quantize auto` means 4-bit where bitsandbytes works. Where it does not, the plan is made for an
    unquantized LLM, so a fallback at load time can never break the budget."""
    from lorsu_edge.load import bitsandbytes_status
    from lorsu_edge.plan import check_fits, make_plan, resolve_quantize

    problem = bitsandbytes_status() if role == "vlm" and loss == "ppl" and opts.quantize != "none" else None
    if problem:
        log.warning("bitsandbytes is unusable here (%s): planning for an unquantized language model", problem)
    quantize = resolve_quantize(opts.quantize, role, loss, bitsandbytes_works=problem is None)
    text_model = resolve_source(opts.text_model) if opts.text_model else None
    plan = make_plan(resolve_source(base), method_cfg=opts.method, loss=loss, batch_size=opts.train.batch_size,
                     budget_bytes=opts.budget, profile=opts.profile, dtype=precision, quantize=quantize,
                     text_model=text_model, processes=world_size(),  # data-parallel: per process
                     anchors=opts.continual.anchor_samples if anchor_used(opts) else 0)
    check_fits(plan)
    return plan


def anchor_used(opts: AdaptOptions) -> bool:
    return opts.anchor is not None and opts.continual.anchor_weight > 0


def apply_plan(opts: AdaptOptions, plan) -> AdaptOptions:
    """Options with the plan's settings: micro-batch (the effective batch stays) and LLM quantization."""
    return replace(opts, quantize=plan.quantize, train=replace(opts.train, micro_batch=plan.micro_batch))


def plan_fields(plan) -> dict[str, Any]:
    return {"predicted_peak_bytes": plan.predicted_peak_bytes, "budget_bytes": plan.budget_bytes,
            "plan": {"profile": plan.profile, "processes": plan.processes, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
                     "checkpointing": plan.checkpointing, "quantize": plan.quantize,
                     "importance_block_groups": plan.importance_block_groups, "peak_phase": plan.peak_phase}}


def new_samples(samples: SampleSet, seen: set[str]) -> list[Sample]:
    return [s for s in samples.samples if s.sha256 not in seen]


def micro_batches(objective, samples: list[Sample], size: int) -> Iterator[tuple[Batch, int]]:
    for i in rank_starts(len(samples), size):  # data-parallel: this rank's chunks only
        batch = objective.make_batch(samples[i:i + size])
        yield batch, batch.size


def total_steps(samples: list[Sample], cfg: TrainConfig) -> int:
    """Optimizer steps of the session: the last short batch of an epoch still counts as a step."""
    return math.ceil(len(samples) / cfg.batch_size) * cfg.epochs


def training_steps(objective, samples: list[Sample], cfg: TrainConfig) -> Iterator[list[Batch]]:
    """Per step: the micro-batches of one shuffled effective batch (seeded, so runs are repeatable)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    micro = cfg.micro_batch or cfg.batch_size
    for _ in range(cfg.epochs):
        order = torch.randperm(len(samples), generator=gen).tolist()
        for i in range(0, len(order), cfg.batch_size):
            chunk = rank_slice([samples[j] for j in order[i:i + cfg.batch_size]])
            yield [objective.make_batch(chunk[k:k + micro]) for k in range(0, len(chunk), micro)]


def importance(loaded: Loaded, objective, samples: list[Sample], opts: AdaptOptions, autocast,
               groups: int = 1) -> dict[str, torch.Tensor]:
    """Mean gradients of the candidates, one block group at a time when the planner says the accumulators
    of all blocks do not fit at once (each group is a full pass over the same samples)."""
    from lorsu_edge.plan import block_groups

    spec, mcfg = loaded.spec, opts.method
    scored = samples[: mcfg.importance_samples]
    grads: dict[str, torch.Tensor] = {}
    for group in block_groups(len(spec.candidate_blocks), groups):
        paths = candidate_paths(spec, fc1=mcfg.uses_fc1, attn=mcfg.method == "lorsu", block_ids=group)
        batches = micro_batches(objective, scored, opts.train.micro_batch or opts.train.batch_size)
        grads.update(compute_importance(loaded.model, paths, batches, objective, len(scored), autocast)[0])
    return grads


def score_and_inject(loaded: Loaded, objective, samples: list[Sample], opts: AdaptOptions,
                     autocast, importance_groups: int = 1) -> tuple[list, dict[str, int]]:
    """Importance on this session's data, selection, injection, freezing. Returns (targets, counts)."""
    model, spec, mcfg = loaded.model, loaded.spec, opts.method
    # found first: a dual encoder without one (SigLIP) is refused before the importance pass, not after it
    projection = projection_target(model, spec) if mcfg.projection_rank else None
    grads = None
    if mcfg.needs_importance:
        grads = importance(loaded, objective, samples, opts, autocast, importance_groups)
        fault_point("importance")
    torch.manual_seed(opts.train.seed)  # LoRA init is part of the seeded run
    targets = select_targets(spec, mcfg, grads)
    del grads
    if projection is not None:
        targets.append(projection)
        spec.projection = projection.path  # from now on the session's encoder files and hashes include it
    inject(model, targets, mcfg)
    return targets, freeze(model, spec, mcfg)


def target_meta(targets: list) -> dict[str, dict]:
    """Per-module JSON beside the tensors; the projection's record says what it is (load_adapter reads that)."""
    return {t.path: {"projection": True} if t.kind == "projection" else {"block": t.block, "heads": t.heads}
            for t in targets}


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak; CPU: the process's peak resident set."""
    return cuda_peak_bytes(device.index or 0) if device.type == "cuda" else peak_rss_bytes()


class _Progress:
    """A tqdm bar with loss and samples/s (stderr; silent when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="train", unit="step", disable=not enabled, leave=False)

    def __call__(self, step: int, loss: float, samples_per_s: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.1f}")

    def close(self) -> None:
        self.bar.close()


@dataclass
class NightInputs:
    """What a session trains on beyond its new samples: class-aware labels, anchors, the judge."""

    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    anchors: list[Sample] = field(default_factory=list)
    judge: Any = None  # (model, UpdateScaler) -> Verdict, called after training, before anything is saved


def run_session(opts: AdaptOptions, loaded: Loaded, samples: list[Sample], partial: Path,
                device: torch.device, loss: str, templates: tuple[str, ...] = (),
                importance_groups: int = 1, night: NightInputs | None = None) -> dict[str, Any]:
    """Score, select, inject, train, judge (and scale) and merge on `samples`; write adapter + encoder into
    `partial`. The importance pass scores the task loss only (anchor.py says why)."""
    model, spec, night = loaded.model, loaded.spec, night or NightInputs()
    precision = resolve_precision(opts.train.precision, device)
    autocast = autocast_factory(precision, device)
    objective = make_objective(loss, model, spec, loaded.processor, seed=opts.train.seed,
                               templates=tuple(opts.templates) or templates or None, classes=night.classes,
                               class_weight=opts.continual.class_weight)
    training = anchored(objective, spec, loaded.processor, model, night.anchors, opts.continual.anchor_weight,
                        autocast)
    base_hash = tensors_hash(session_encoder(loaded))
    targets, counts = score_and_inject(loaded, objective, samples, opts, autocast, importance_groups)
    start = dense_start(model, spec.tower) if opts.method.method == "full" else None
    n_steps = total_steps(samples, opts.train)
    bar = _Progress(n_steps, opts.show_progress)
    try:
        result = train(model, lambda: training_steps(training, samples, opts.train), n_steps, training,
                       opts.train, device, bar)
    finally:
        bar.close()
    fault_point("train")
    verdict = night.judge(model, UpdateScaler(model, start)) if night.judge else None
    alpha = verdict.alpha if verdict else 1.0
    meta = {"base_model": loaded.source, "base_encoder_sha256": base_hash, "lorsu_edge": __version__,
            "blocks_used": spec.used_blocks, "blocks_total": len(spec.blocks), "alpha": alpha}
    save_adapter(partial, model, spec, opts.method, meta, target_meta(targets))
    unload(model)
    fault_point("merge")
    encoder = session_encoder(loaded)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in encoder.items()}, str(partial / ENCODER_FILE))
    return {
        "method": opts.method.method, "loss": loss, "precision": result.precision,
        "base_encoder_sha256": base_hash, "encoder_sha256": tensors_hash(encoder),
        **counts, "steps": result.steps, "loss_first": result.loss_first, "loss_last": result.loss_last,
        "losses": result.losses, "train_seconds": result.seconds, "alpha": alpha, "verdict": verdict,
    }


def session_encoder(loaded: Loaded) -> dict[str, torch.Tensor]:
    """The encoder's tensors under the names the session files use (the VLM's, with --text-model)."""
    tensors = encoder_state_dict(loaded.model, loaded.spec)
    if loaded.encoder_names:
        tensors = {loaded.encoder_names[k]: v for k, v in tensors.items()}
    return tensors


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_folder(opts: AdaptOptions, folder: Path) -> SampleSet:
    """A data folder read under the run's inbox rules (caps, confinement)."""
    return read_samples(folder, limits=opts.image_limits, allow_outside=opts.allow_outside_data)


def load_eval_sets(opts: AdaptOptions, wd: Workdir) -> dict[str, SampleSet]:
    """The control set (given now or remembered by the workdir) and the optional target eval set."""
    control = opts.control or wd.remembered("control")
    if opts.control:
        wd.update_settings(control=str(opts.control))
    sets = {"control": read_folder(opts, Path(control))} if control else {}
    if opts.eval_data:
        sets["target"] = read_folder(opts, opts.eval_data)
    return sets


def remembered_total_limit(opts: AdaptOptions, wd: Workdir) -> float:
    """`--max-total-forgetting` given now (and remembered), else the workdir's, else the per-session limit:
    per-session drops just under the limit would otherwise add up night after night."""
    if opts.max_total_forgetting is not None:
        wd.update_settings(max_total_forgetting=opts.max_total_forgetting)
        return opts.max_total_forgetting
    limit = wd.settings().get("max_total_forgetting")
    return opts.max_forgetting if limit is None else float(limit)


def set_fingerprint(samples: SampleSet) -> str:
    """Identity of an evaluation set: its images, labels, questions, answers and caption templates."""
    rows = sorted((s.sha256, s.label or "", s.question or "", s.answer or "") for s in samples.samples)
    return hashlib.sha256(json.dumps([rows, list(samples.templates)]).encode()).hexdigest()


def known_scores(wd: Workdir, current: str | None) -> dict[str, tuple[str, float]]:
    """The current model's scores as its own session recorded them: {set name: (fingerprint, accuracy)}."""
    if current is None:
        return {}
    path = wd.session_dir(current) / REPORT_FILE
    report = json.loads(path.read_text()) if path.is_file() else {}
    return {name: (report[f"{name}_set_sha256"], report[f"{name}_accuracy"]) for name in ("control", "target")
            if f"{name}_set_sha256" in report and f"{name}_accuracy" in report}


@main_computes  # data-parallel: rank 0 scores, the others receive its scores
def score_sets(loaded: Loaded, sets: dict[str, SampleSet], device: torch.device, precision: str,
               known: dict[str, tuple[str, float]] | None = None) -> dict[str, float]:
    """Accuracy per set; a set the current model was already scored on (same fingerprint) is not re-run."""
    from lorsu_edge.evaluate import evaluate

    autocast = autocast_factory(precision, device)
    scores = {}
    for name, samples in sets.items():
        fingerprint, accuracy = (known or {}).get(name, (None, None))
        if fingerprint != set_fingerprint(samples):
            accuracy = evaluate(loaded, samples, autocast=autocast).accuracy
        scores[name] = accuracy
    return scores


def guard(before: dict[str, float], after: dict[str, float], max_forgetting: float,
          base: float | None = None, max_total: float | None = None) -> tuple[bool, str, dict]:
    """Accept unless control accuracy fell by more than `max_forgetting` points in this session, or (with
    `max_total` and the base model's control accuracy `base`) ends more than `max_total` points below base.

    The per-session check alone lets drops just under the limit add up night after night; the base-relative
    one bounds the sum.
    """
    fields = {f"{k}_accuracy_before": v for k, v in before.items()}
    fields.update({f"{k}_accuracy": v for k, v in after.items()})
    if "control" not in before:
        return True, "no control set", fields
    drop = _points(before["control"] - after["control"])
    fields["forgetting_points"] = round(drop, 3)
    if drop > max_forgetting:
        return False, f"control accuracy fell {_shown(drop)} points (limit {max_forgetting:g})", fields
    reason = f"control accuracy changed {_shown(-drop, sign=True)} points (limit -{max_forgetting:g})"
    if base is None or max_total is None:
        return True, reason, fields
    total = _points(base - after["control"])
    fields.update(control_accuracy_base=base, total_forgetting_points=round(total, 3))
    if total > max_total:
        return False, (f"control accuracy is {_shown(total)} points below the base model's "
                       f"(limit {max_total:g})"), fields
    return True, f"{reason}; {_shown(-total, sign=True)} vs base (limit -{max_total:g})", fields


def _points(delta: float) -> float:
    # rounded: 0.62 - 0.61 is 0.010000000000000009 in floats, and a drop of exactly the limit is allowed
    return round(100 * delta, 9)


def _shown(points: float, sign: bool = False) -> str:
    value = round(points, 2) + 0.0  # two decimals, and "+0", never "-0"
    return f"{value:+g}" if sign else f"{value:g}"


def base_control_score(wd: Workdir, loaded: Loaded, eval_sets: dict[str, SampleSet], device: torch.device,
                       precision: str, limit: float | None) -> float | None:
    """The base model's control accuracy for the bound `limit` (None when off or without a control set).

    Call it while `loaded` still holds the base encoder. Remembered per control set (fingerprint) in the
    workdir, so the base is scored once per control set: by the first session's "before" when that one
    starts from the base, else here.
    """
    if limit is None or "control" not in eval_sets:
        return None
    fingerprint = set_fingerprint(eval_sets["control"])
    known = wd.settings().get("base_scores", {})
    if fingerprint not in known:
        score = score_sets(loaded, {"control": eval_sets["control"]}, device, precision)["control"]
        wd.update_settings(base_scores={**known, fingerprint: score})
        return score
    return float(known[fingerprint])


def night_inputs(opts: AdaptOptions, wd: Workdir, sample_set: SampleSet, replayed: list[Sample],
                 eval_sets: dict[str, SampleSet], loss: str) -> NightInputs:
    """The class-aware term's labels (contrastive loss only) and the anchor images (--anchor, resolved)."""
    control = eval_sets.get("control")
    classes = {}
    if loss == "clip" and opts.continual.class_weight > 0:
        templates = tuple(opts.templates) or sample_set.templates
        classes = known_classes(wd, sample_set, replayed, control, templates)
    anchors, anchor_dir = [], opts.anchor
    if anchor_used(opts):
        anchors = read_anchor_images(anchor_dir, opts.continual.anchor_samples)
        judged = {s.sha256 for s in control.samples} if control else set()
        if any(s.sha256 in judged for s in anchors):
            raise BadInputError(f"anchor set {anchor_dir} shares images with the control set",
                                hint="the control set must stay a held-out judge: use disjoint anchor images")
    return NightInputs(classes, anchors)


def make_judge(opts: AdaptOptions, loaded: Loaded, eval_sets: dict[str, SampleSet], before: dict[str, float],
               fresh: list[Sample], device: torch.device, precision: str, base_score: float | None,
               total_limit: float | None):
    """The forgetting guard as run_session calls it: scores after training, scale search on a failure."""
    from lorsu_edge.evaluate import evaluate

    def own_accuracy() -> float:
        return evaluate(loaded, fresh, autocast=autocast_factory(precision, device)).accuracy

    def judge(model, scaler: UpdateScaler) -> Verdict:
        return bounded_merge(model, scaler, lambda: score_sets(loaded, eval_sets, device, precision),
                             lambda scores: guard(before, scores, opts.max_forgetting, base_score, total_limit),
                             opts.continual.on_forgetting, before.get("target"), own_accuracy)
    return judge


def adapt(opts: AdaptOptions) -> AdaptResult:
    """Run one adaptation session on `opts.data` in `opts.workdir` (see module docstring).

    Every run, failed ones included, leaves one JSON line in the workdir's runs.jsonl for monitoring.
    """
    setup()
    wd = open_workdir(opts.workdir)  # data-parallel: ranks > 0 get a view that never writes
    opts = with_absolute_paths(opts)
    if not is_main():
        opts = replace(opts, save_full=None, show_progress=False)
    start = time.perf_counter()
    if not opts.show_progress:  # nightly logs: no loading bars from transformers either
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        result = _adapt_locked(opts, wd, start)
    except LorsuError as e:  # `outcome`: a stop during the commit reports the committed session, not "failed"
        failed = {"verb": "adapt", "status": "failed", "data": str(opts.data), "error": e.message,
                  "exit_code": int(e.exit_code), "seconds": round(time.perf_counter() - start, 3),
                  **getattr(e, "outcome", {})}
        wd.log_run(failed)
        record_night(wd, opts.track, failed)
        raise
    except Exception as e:
        failed = {"verb": "adapt", "status": "failed", "data": str(opts.data), "error": f"{type(e).__name__}: {e}",
                  "exit_code": int(ExitCode.INTERNAL), "seconds": round(time.perf_counter() - start, 3)}
        wd.log_run(failed)
        record_night(wd, opts.track, failed)
        raise
    code = ExitCode.REJECTED if result.status == "rejected" else ExitCode.OK
    night = {"verb": "adapt", "status": result.status, "session": result.session, "data": str(opts.data),
             "new_samples": result.report.get("samples_used", result.report.get("new_samples")),
             "reason": result.report.get("reason"), "exit_code": int(code),
             "seconds": round(time.perf_counter() - start, 3)}
    wd.log_run(night)
    record_night(wd, opts.track, night)  # after the commit: queued, sent when the store answers
    return result


def _adapt_locked(opts: AdaptOptions, wd: Workdir, start: float) -> AdaptResult:
    with wd.lock(), graceful_sigterm():
        current, fallback = fall_back_if_damaged(wd, write=is_main())  # never chain onto a corrupt encoder
        base = resolve_base_model(opts, wd.remembered("base_model"))
        sample_set = read_folder(opts, opts.data)
        fresh = new_samples(sample_set, wd.seen_hashes())
        if len(fresh) < opts.min_new_samples:
            msg = f"{len(fresh)} new samples in {opts.data} (need {opts.min_new_samples}): nothing to do"
            return AdaptResult("nothing-new", wd.current(), {"new_samples": len(fresh)}, msg)
        eval_sets = load_eval_sets(opts, wd)
        opts = replace(opts, anchor=remembered_anchor(wd, opts.anchor))
        device = pick_device(opts.device)
        precision = resolve_precision(opts.train.precision, device)  # refuse bad combinations before loading
        model_config = read_config(resolve_source(base))
        role = config_role(model_config)
        opts.method.check_heads(model_config, base)
        opts.method.check_projection(role, base)  # a VLM (also under --text-model) or a bare encoder: refused
        loss = opts.loss or default_loss(role)
        check_loss(loss, role, has_text_model=bool(opts.text_model))
        opts = replace(opts, method=opts.method.for_loss(loss))
        plan = plan_run(base, opts, loss, role, precision)
        opts = apply_plan(opts, plan)
        if device.type == "cuda":
            cap_cuda_memory(plan.budget_bytes, device.index or 0)
        loaded = load_for_loss(base, opts, device)
        if plan.checkpointing:
            apply_checkpointing(loaded.model, loaded.spec)
        fault_point("load")
        check_before_training(wd, loaded)  # base model unchanged, room for the session
        total_limit = remembered_total_limit(opts, wd)
        base_score = base_control_score(wd, loaded, eval_sets, device, precision, total_limit)
        if current:  # chaining: start from the accepted encoder (base + all accepted sessions, merged)
            apply_encoder(loaded, wd.session_dir(current) / ENCODER_FILE)
        if not wd.settings().get("base_model"):
            wd.update_settings(base_model=base)
        known = known_scores(wd, current)
        if current is None and base_score is not None:  # the base was just scored: no second pass
            known["control"] = (set_fingerprint(eval_sets["control"]), base_score)
        before = score_sets(loaded, eval_sets, device, precision, known)
        sid, seed_given = wd._next_id(), opts.train.seed
        opts = replace(opts, train=replace(opts.train, seed=night_seed(seed_given, sid)))
        buffer, replayed = replay_samples(wd.session_dir(current) if current else None, opts.continual.replay,
                                          opts.train.seed)
        night = night_inputs(opts, wd, sample_set, replayed, eval_sets, loss)
        night.judge = make_judge(opts, loaded, eval_sets, before, fresh, device, precision, base_score, total_limit)
        with wd.staged_session() as partial:
            body = run_session(opts, loaded, fresh + replayed, partial, device, loss, sample_set.templates,
                               plan.importance_block_groups, night)
            verdict: Verdict = body.pop("verdict")
            accepted, reason, scores = verdict.accepted, verdict.reason, verdict.fields
            if accepted and opts.continual.replay:
                write_buffer(partial, sid, buffer, wd.session_dir(current) if current else None, fresh,
                             opts.continual.replay_capacity, loaded.processor)
            report = {
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": base,
                "data": str(opts.data), "parent_session": current, "samples_used": len(fresh),
                "samples_skipped": len(sample_set.skipped),
                "skipped": [[str(p), r] for p, r in sample_set.skipped],
                "encoder_params": body.pop("encoder_params"), "method_config": opts.method.to_dict(),
                "train_config": vars(opts.train), "quantize": loaded.quantize, "notes": loaded.notes,
                "device": str(device), "lorsu_edge": __version__, **body, **scores, **plan_fields(plan),
                **{f"{n}_set_sha256": set_fingerprint(ss) for n, ss in eval_sets.items()},
                "accepted": accepted, "reason": reason, "guard": verdict.status,
                "scale_search": [p.to_dict() for p in verdict.tried], "seed_given": seed_given,
                "replayed": len(replayed), "anchors": len(night.anchors), "known_classes": len(night.classes),
                "seconds": round(time.perf_counter() - start, 3), "peak_memory_bytes": peak_memory_bytes(device),
            }
            report.update({"fallback": fallback} if fallback else {})
            write_json(partial / REPORT_FILE, report)
            write_json(partial / SAMPLES_FILE, sorted(s.sha256 for s in fresh))
            fault_point("write")
            session = wd.commit_session(partial, accepted=accepted, reason=reason)
        # a scaled session is an accepted one (tracking, fleet and exit codes see "accepted"); report.json's
        # `guard` and `alpha` say how much of it was kept
        status = "accepted" if accepted else "rejected"
        with after_commit(session, accepted):  # a stop or full disk from here on reports the session
            if is_main():  # ranks > 0 only read the workdir
                apply_retention(wd, opts.keep)
            if opts.save_full and accepted:  # the model as given (no 4-bit LLM, the VLM under --text-model)
                save_full(resolve_source(base), session_encoder(loaded), opts.save_full)
        kept = "" if accepted else f"; the current model stays {current or 'the base model'}"
        return AdaptResult(status, session, report, f"session {session} {status}: {reason}{kept}")
