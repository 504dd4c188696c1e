"""The planner's answer and its two readings: `check_fits` (the refusal adapt raises) and `format_plan`
(the table the CLI prints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lorsu_edge.budget import budget_flag, format_size
from lorsu_edge.errors import OverBudgetError
from lorsu_edge.plan.phases import Component, Phase, Settings


@dataclass
class Plan:
    """The planner's answer: phases with per-component bytes, the chosen settings, and a verdict."""

    model: str
    role: str
    family: str
    loss: str
    method: dict[str, Any]
    dtype: str
    profile: str
    device: str
    unified: bool
    batch_size: int
    budget_bytes: int  # effective: min(--budget, profile total - reserve)
    requested_budget_bytes: int | None
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    quantize: str
    importance_block_groups: int
    phases: list[Phase]
    predicted_peak_bytes: int
    peak_phase: str
    fits: bool
    smallest_fitting_budget: int | None
    cheapest_change: str
    trainable_params: int
    notes: list[str] = field(default_factory=list)
    processes: int = 1  # data-parallel processes; batch_size and every byte figure are per process

    @property
    def components(self) -> list[Component]:
        """The breakdown of the phase with the highest peak."""
        return next(p.components for p in self.phases if p.name == self.peak_phase)

    @property
    def settings(self) -> Settings:
        return Settings(self.micro_batch, self.grad_accum, self.checkpointing, self.quantize,
                        self.importance_block_groups)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_fits(plan: Plan) -> None:
    """Raise OverBudgetError (exit 4) naming the smallest budget that fits and the cheapest change."""
    if plan.fits:
        return
    smallest = ("no setting fits this device" if plan.smallest_fitting_budget is None
                else f"the smallest budget that fits is --budget {budget_flag(plan.smallest_fitting_budget)}")
    change = "" if plan.cheapest_change.startswith("--budget") else f"; cheapest change: {plan.cheapest_change}"
    raise OverBudgetError(
        f"needs {format_size(plan.predicted_peak_bytes, 1)} in phase {plan.peak_phase} even at micro-batch "
        f"{plan.micro_batch}{' with checkpointing' if plan.checkpointing else ''}"
        f"{'' if plan.quantize == 'none' else ', LLM ' + plan.quantize}; the budget is "
        f"{format_size(plan.budget_bytes, 1)}",
        hint=smallest + change,
    )


def format_plan(plan: Plan) -> str:
    """The per-phase, per-component table and the chosen settings, as the CLI prints them."""
    names = list(dict.fromkeys(c.name for p in plan.phases for c in p.components if c.name != "safety margin"))
    names.append("safety margin")
    width = max(len(n) for n in names) + 2
    titles = [p.name if p.part_of_adapt else f"({p.name})" for p in plan.phases]
    head = "component".ljust(width) + "".join(t.rjust(12) for t in titles)
    lines = [f"model {plan.model}: {plan.role}, {plan.family} encoder; loss {plan.loss}, method "
             f"{plan.method['method']}, dtype {plan.dtype}, profile {plan.profile}", "", head, "-" * len(head)]
    for n in names:
        cells = []
        for p in plan.phases:
            c = next((c for c in p.components if c.name == n), None)
            cells.append("-" if c is None else format_size(c.bytes) + ("*" if c.host and not plan.unified else ""))
        lines.append(n.ljust(width) + "".join(cell.rjust(12) for cell in cells))
    lines += ["-" * len(head), "peak".ljust(width) + "".join(format_size(p.peak).rjust(12) for p in plan.phases)]
    if not plan.unified:
        lines.append("* host RAM: not counted against GPU memory")
    lines.append("(export) runs later in its own process: shown, not part of the verdict")
    per = f" per process, {plan.processes} processes" if plan.processes > 1 else ""
    lines += ["", f"settings: micro-batch {plan.micro_batch} x {plan.grad_accum} accumulation = batch "
              f"{plan.batch_size}{per}; checkpointing {'on' if plan.checkpointing else 'off'}; LLM quantization "
              f"{plan.quantize}; importance in {plan.importance_block_groups} block group(s)",
              f"predicted peak {format_size(plan.predicted_peak_bytes)} ({plan.peak_phase}) of budget "
              f"{format_size(plan.budget_bytes)}: {'fits' if plan.fits else 'does NOT fit'}"]
    if not plan.fits:
        smallest = plan.smallest_fitting_budget
        lines.append(f"smallest fitting budget: {'none on this device' if smallest is None else budget_flag(smallest)}"
                     f"; cheapest change: {plan.cheapest_change}")
    return "\n".join(lines + [f"note: {n}" for n in plan.notes])
