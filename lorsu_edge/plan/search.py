"""Choosing settings: the first rung of the ladder where every phase fits, and when none does, the
cheapest change of flags.

The ladder goes least intrusive first: smaller micro-batches (divisors of the batch size: micro-batch x
accumulation == batch size), then activation checkpointing (for --loss clip the other way round: a
contrastive loss only sees the negatives of its micro-batch), then 8-bit and 4-bit LLM weights (only with
an LLM, only where the profile says bitsandbytes works, only for --quantize auto). Importance runs in as
few block groups as fit (each group is one more pass over the importance samples).
"""

from __future__ import annotations

import math
from dataclasses import replace

from lorsu_edge.budget import budget_flag, format_size
from lorsu_edge.config import MethodConfig
from lorsu_edge.plan.arch import TEXT_TOKENS, Arch, describe_config
from lorsu_edge.plan.build import quiet
from lorsu_edge.plan.phases import Context, Phase, Settings, all_phases
from lorsu_edge.profiles import Profile


def choose_settings(ctx: Context, quantize: str) -> tuple[Settings, list[Phase], int]:
    """First rung whose every phase fits; else the rung with the lowest peak. Also the lowest peak."""
    best: tuple[Settings, list[Phase]] | None = None
    for q, ckpt, mb in ladder(ctx.batch_size, _quant_options(ctx, quantize), ctx.arch.loss):
        s, phases = _evaluate(ctx, q, ckpt, mb)
        if peak_phase(phases).peak <= ctx.budget:
            return s, phases, _smallest(ctx, quantize)
        if best is None or peak_phase(phases).peak <= peak_phase(best[1]).peak:  # ties: the more frugal rung
            best = (s, phases)
    return best[0], best[1], peak_phase(best[1]).peak


def ladder(batch_size: int, quant_options: list[str], loss: str = "ppl") -> list[tuple[str, bool, int]]:
    """(quantize, checkpointing, micro_batch), least intrusive first.

    Per-sample losses (ppl) accumulate exactly, so smaller micro-batches come first and checkpointing
    (a third more compute) after. A contrastive loss (clip) sees only its micro-batch's negatives, so
    splitting the batch changes the objective: checkpointing comes first there.
    """
    sizes = _divisors_desc(batch_size)
    if loss == "clip":
        rungs = [(ckpt, mb) for mb in sizes for ckpt in (False, True)]
    else:
        rungs = [(ckpt, mb) for ckpt in (False, True) for mb in sizes]
    return [(q, ckpt, mb) for q in quant_options for ckpt, mb in rungs]


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _quant_options(ctx: Context, quantize: str) -> list[str]:
    if not ctx.arch.llm_layers:
        return ["none"]
    if quantize != "auto":
        return [quantize]
    return ["none", "8bit", "4bit"] if ctx.profile.bnb_4bit else ["none"]


def _evaluate(ctx: Context, q: str, ckpt: bool, mb: int) -> tuple[Settings, list[Phase]]:
    """Phases for one rung, with the fewest importance block groups that fit (the most if none does)."""
    n = max(1, len(ctx.arch.candidate_numels))
    options = sorted({math.ceil(n / math.ceil(n / g)) for g in range(1, n + 1)})
    for groups in options:
        s = Settings(mb, ctx.batch_size // mb, ckpt, q, groups)
        phases = all_phases(ctx, s)
        imp = next((p for p in phases if p.name == "importance"), None)
        if imp is None or imp.peak <= ctx.budget or groups == options[-1]:
            return s, phases
    raise AssertionError("unreachable")


def peak_phase(phases: list[Phase]) -> Phase:
    """The adapt phase with the highest peak (export is planned separately)."""
    return max((p for p in phases if p.part_of_adapt), key=lambda p: p.peak)


def _smallest(ctx: Context, quantize: str) -> int:
    """Lowest peak over the whole ladder (with as many importance groups as blocks)."""
    tight = replace(ctx, budget=0)
    return min(peak_phase(_evaluate(tight, q, ckpt, mb)[1]).peak
               for q, ckpt, mb in ladder(ctx.batch_size, _quant_options(ctx, quantize), ctx.arch.loss) if mb == 1)


def cheapest_change(arch, method_cfg, loss, batch_size, prof, dt, quantize, budget, smallest) -> str:
    options = []
    for flag, why, change in _alternatives(arch, method_cfg, loss, prof, dt, quantize):
        a = arch
        if "loss" in change:
            with quiet():
                a = describe_config(arch.config, arch.name, arch.folder, change["loss"], arch.text_model,
                                    TEXT_TOKENS, arch.image_size)
        m = change.get("method_cfg", method_cfg)
        ctx = Context(a, m, change.get("dtype", dt), prof, batch_size, budget)
        need = _smallest(ctx, change.get("quantize", quantize))
        options.append((need <= budget, need, f"{flag} ({why}): {format_size(need, 1)}"))
    if not options:
        return "none: only more memory helps" if smallest > prof.available else f"--budget {budget_flag(smallest)}"
    fitting = [o for o in options if o[0]]
    return (fitting[0] if fitting else min(options, key=lambda o: o[1]))[2]


def _alternatives(arch: Arch, method_cfg: MethodConfig, loss: str, prof: Profile, dt: str, quantize: str):
    """(flag, why, kwargs for make_plan) in order of how little each changes the run."""
    if dt == "fp32" and len(prof.compute_dtypes) > 1:
        low = next(d for d in prof.compute_dtypes if d != "fp32")
        yield f"--dtype {low}", "frozen weights and activations in 16-bit", dict(dtype=low)
    if arch.llm_layers and quantize in ("none", "8bit"):
        yield "--quantize 4bit", "LLM decoder weights in NF4", dict(quantize="4bit")
    if arch.llm_layers and quantize == "auto" and not prof.bnb_4bit:
        yield ("--quantize 4bit", "needs a bitsandbytes build that works here (profile bnb_4bit = false)",
               dict(quantize="4bit"))
    if method_cfg.method == "full":
        yield "--method lorsu", "updates a few percent of the encoder", dict(method_cfg=MethodConfig())
    if loss == "ppl":
        yield "--loss clip --text-model DIR", "the LLM is not loaded", dict(loss="clip")
