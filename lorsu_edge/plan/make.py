"""`make_plan`, the planner's entry point: check the flags, describe the model, choose settings, and
assemble the Plan with its notes and, when nothing fits, the cheapest change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorsu_edge.budget import format_size
from lorsu_edge.config import MethodConfig
from lorsu_edge.errors import BadInputError
from lorsu_edge.plan.adapter import adapter_size
from lorsu_edge.plan.arch import TEXT_TOKENS, Arch, describe
from lorsu_edge.plan.phases import Context, Phase
from lorsu_edge.plan.report import Plan
from lorsu_edge.plan.search import cheapest_change, choose_settings, peak_phase
from lorsu_edge.profiles import Profile

LOSSES = ("clip", "ppl")
QUANTIZE_CHOICES = ("auto", "none", "8bit", "4bit")
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


def make_plan(model_dir_or_config: Any, *, method_cfg: MethodConfig | None = None, loss: str = "clip",
              batch_size: int = 16, budget_bytes: int | None = None, profile: Profile | str | Path | None = None,
              dtype: str = "auto", quantize: str = "auto", text_model: Any = None,
              text_tokens: int = TEXT_TOKENS, image_size: int | None = None, processes: int = 1,
              anchors: int = 0) -> Plan:
    """Predict every phase's peak and choose micro-batch, accumulation, checkpointing, quantization and
    importance block groups so that all fit in min(budget_bytes, profile total - reserve).

    With `processes` > 1 (data-parallel adapt) the plan is per process: each holds ceil(batch_size /
    processes) samples of a step, and every figure (and the budget) is one process's.

    Reads config.json only: call it before loading any weight. Never raises for a budget that is too
    small: the Plan says `fits=False`; `check_fits(plan)` turns that into OverBudgetError.
    """
    method_cfg = method_cfg or MethodConfig()
    if loss not in LOSSES:
        raise BadInputError(f"--loss {loss!r} is not one of {', '.join(LOSSES)}", hint="use --loss clip or --loss ppl")
    if quantize not in QUANTIZE_CHOICES:
        raise BadInputError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}",
                            hint="use --quantize auto")
    if batch_size < 1 or processes < 1:
        raise BadInputError(f"--batch-size and --processes must be >= 1, got {batch_size} and {processes}",
                            hint="e.g. --batch-size 16")
    prof = resolve_profile(profile)
    dt = resolve_dtype(dtype, prof)
    arch = describe(model_dir_or_config, loss, text_model, text_tokens, image_size)
    plan = _plan_for(arch, method_cfg, loss, -(-batch_size // processes), budget_bytes, prof, dt, quantize,
                     anchors)
    plan.processes = processes
    return plan


def _plan_for(arch: Arch, method_cfg, loss, batch_size, budget_bytes, prof, dt, quantize, anchors: int = 0) -> Plan:
    budget = prof.available if budget_bytes is None else min(budget_bytes, prof.available)
    ctx = Context(arch, method_cfg, dt, prof, batch_size, budget, anchors)
    s, phases, smallest = choose_settings(ctx, quantize)
    peak = peak_phase(phases)
    fits = peak.peak <= budget
    trainable = adapter_size(arch, method_cfg).trainable
    plan = Plan(model=arch.name, role=arch.role, family=arch.family, loss=loss, method=method_cfg.to_dict(),
                dtype=dt, profile=prof.name, device=prof.device, unified=prof.unified, batch_size=batch_size,
                budget_bytes=budget, requested_budget_bytes=budget_bytes, micro_batch=s.micro_batch,
                grad_accum=s.grad_accum, checkpointing=s.checkpointing,
                quantize=s.quantize if arch.llm_layers else "none",
                importance_block_groups=s.importance_block_groups, phases=phases,
                predicted_peak_bytes=peak.peak, peak_phase=peak.name, fits=fits,
                smallest_fitting_budget=smallest if smallest <= prof.available else None,
                cheapest_change="", trainable_params=trainable,
                notes=arch.notes + _notes(arch, prof, dt, quantize, budget_bytes, budget, phases))
    if not fits:
        plan.cheapest_change = cheapest_change(arch, method_cfg, loss, batch_size, prof, dt, quantize, budget,
                                               smallest)
    return plan


def _notes(arch: Arch, prof: Profile, dt: str, quantize: str, budget_bytes: int | None, budget: int,
           phases: list[Phase]) -> list[str]:
    notes = []
    if budget_bytes is not None and budget_bytes > prof.available:
        notes.append(f"--budget {format_size(budget_bytes)} capped at {format_size(prof.available)} "
                     f"({prof.title}: total minus reserve)")
    if quantize != "auto" and not arch.llm_layers:
        notes.append(f"--quantize {quantize} ignored: no LLM is loaded")
    if quantize in ("8bit", "4bit") and arch.llm_layers and not prof.bnb_4bit:
        notes.append(f"profile {prof.name} expects bitsandbytes to fail here; "
                     "an unquantized LLM would not fit this plan")
    if prof.device == "cpu" and dt == "fp16":
        notes.append("fp16 on a CPU is very slow in backward; prefer bf16")
    export = next(p for p in phases if p.name == "export")
    if export.peak > budget:
        notes.append(f"export (its own process, later) needs {format_size(export.peak, 1)}, more than the budget: "
                     "export on a machine with more memory free")
    return notes


def resolve_profile(profile: Profile | str | Path | None) -> Profile:
    """A Profile from a name, a .toml path, or None / "auto" (this machine: `cpu`, or the GPU found)."""
    from lorsu_edge.profiles import resolve

    return resolve(profile)


def resolve_dtype(dtype: str, profile: Profile) -> str:
    if dtype not in DTYPE_CHOICES:
        raise BadInputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}", hint="use --dtype auto")
    if dtype == "auto":
        return profile.default_dtype
    if dtype not in profile.compute_dtypes:
        raise BadInputError(f"--dtype {dtype} is not supported on {profile.title}",
                            hint=f"use one of {', '.join(profile.compute_dtypes)} (or --dtype auto)")
    return dtype


def resolve_quantize(quantize: str, role: str, loss: str, bitsandbytes_works: bool) -> str:
    """What `adapt` and `plan` load the LLM as: `auto` is 4-bit NF4 where bitsandbytes works, else none.

    Only a VLM under --loss ppl loads its LLM. Where bitsandbytes does not work, an explicit 8bit/4bit
    also becomes none: `adapt` falls back to an unquantized LLM at load time, so the plan must budget for it.
    """
    if role != "vlm" or loss != "ppl" or quantize == "none":
        return quantize
    if not bitsandbytes_works:
        return "none"
    return "4bit" if quantize == "auto" else quantize
