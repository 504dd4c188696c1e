"""The forgetting-bounded merge: when a session forgets too much, keep a scaled-down version of it.

theta(alpha) = theta_current + alpha * (theta_trained - theta_current) (WiSE-FT's interpolation). With the
structured layers the difference is the sparse fc1 delta, the LoRA product and the bias deltas, so scaling
those three (LoRA: its B factor) is exactly this interpolation; `full` interpolates every tower tensor.
The scale is applied to the trainable tensors BEFORE the adapter is saved, so the saved adapter, the merged
encoder, its hash and the next session's starting point all are the scaled model.

`search_alpha` is pure: candidates in, an evaluate callback, the largest passing candidate out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
from torch import nn

from lorsu_edge.inject import adapter_modules
from lorsu_edge.merge import merge_all, unmerge_all

# k/16 for k = 1..16: a binary search over these needs 4 evaluations beyond alpha = 1 (5 in all).
DEFAULT_CANDIDATES = tuple(k / 16 for k in range(1, 17))
SCALED_NAMES = ("delta", "lora_B", "bias_delta")  # A stays: scaling B scales the product B A
T = TypeVar("T")


@dataclass
class Point:
    """One evaluated scale: accuracies (0-1) and whether the forgetting guard passed there."""

    alpha: float
    control: float | None
    target: float | None
    passed: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    alpha: float | None  # the largest passing candidate; None when even the smallest one fails
    tried: list[Point] = field(default_factory=list)


def search_alpha(candidates: Sequence[float], evaluate: Callable[[float], Point],
                 known: Sequence[Point] = ()) -> SearchResult:
    """The largest candidate whose evaluation passes, assuming forgetting grows with alpha.

    Binary search over the sorted candidates: ceil(log2(len + 1)) evaluations at most; points in `known`
    (e.g. alpha = 1, already scored by the guard) are reused, not re-evaluated.
    """
    alphas = sorted(set(candidates))
    cache = {p.alpha: p for p in known}
    tried = list(known)
    lo, hi, best = 0, len(alphas) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        point = cache.get(alphas[mid])
        if point is None:
            point = cache[alphas[mid]] = evaluate(alphas[mid])
            tried.append(point)
        if point.passed:
            best, lo = alphas[mid], mid + 1
        else:
            hi = mid - 1
    return SearchResult(best, tried)


class UpdateScaler:
    """Scales a trained session's update in place: `apply(alpha)` sets the model to theta(alpha).

    Built after training, before any merge; `apply(1.0)` restores the trained values bit for bit.
    For `full` pass the tower's tensors as they were before training (`start`).
    """

    def __init__(self, model: nn.Module, start: dict[str, torch.Tensor] | None = None) -> None:
        self.model = model
        self.params = {f"{path}.{name}": p for path, m in adapter_modules(model).items()
                       for name, p in m.named_parameters(recurse=False) if name in SCALED_NAMES}
        self.start = start or {}
        named = dict(model.named_parameters())
        self.params.update({name: named[name] for name in self.start})
        self.trained = {name: p.detach().clone() for name, p in self.params.items()}
        self.alpha = 1.0

    @torch.no_grad()
    def apply(self, alpha: float) -> None:
        """Set every scaled tensor to its value at `alpha` (computed from the trained copy, never compounded)."""
        for name, p in self.params.items():
            trained = self.trained[name]
            if name in self.start:
                start = self.start[name]
                p.copy_(trained if alpha == 1.0 else start + alpha * (trained - start))
            else:
                p.copy_(trained if alpha == 1.0 else alpha * trained)
        self.alpha = alpha


def dense_start(model: nn.Module, tower: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the tower's tensors by full-model name (what `full` interpolates from)."""
    ids = {id(p) for p in tower.parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ids}


def evaluate_merged(model: nn.Module, scaler: UpdateScaler, alpha: float, score: Callable[[], T]) -> T:
    """Score the model at `alpha` through the merged weights (the exact encoder that would be saved)."""
    scaler.apply(alpha)
    merge_all(model)
    try:
        return score()
    finally:
        unmerge_all(model)


@dataclass
class Verdict:
    """The guard's decision on a trained session, and the scale it is kept at."""

    status: str  # "accepted", "scaled" or "rejected"
    alpha: float
    reason: str
    fields: dict  # the guard's report fields (accuracies) at `alpha`
    tried: list[Point]

    @property
    def accepted(self) -> bool:
        return self.status != "rejected"


Check = Callable[[dict[str, float]], tuple[bool, str, dict]]


def bounded_merge(model: nn.Module, scaler: UpdateScaler, score: Callable[[], dict[str, float]], check: Check,
                  on_forgetting: str, target_before: float | None, own_accuracy: Callable[[], float],
                  candidates: Sequence[float] = DEFAULT_CANDIDATES) -> Verdict:
    """Judge the trained update at alpha = 1; on a guard failure with "scale", keep the largest passing alpha,
    provided the target improves over the current model there (`target_before`, the --eval accuracy before
    the session; without one, `own_accuracy` on the session's samples at alpha and at 0). Leaves the model's
    update scaled to the returned alpha (unmerged)."""
    fields: dict[float, dict] = {}

    def evaluate(alpha: float) -> Point:
        scores = evaluate_merged(model, scaler, alpha, score)
        passed, reason, fields[alpha] = check(scores)
        return Point(alpha, scores.get("control"), scores.get("target"), passed, reason)

    first = evaluate(1.0)
    if first.passed or on_forgetting == "reject":
        scaler.apply(1.0)
        return Verdict("accepted" if first.passed else "rejected", 1.0, first.reason, fields[1.0], [first])
    found = search_alpha(candidates, evaluate, known=[first])
    if found.alpha is None:
        scaler.apply(1.0)
        return Verdict("rejected", 1.0, f"{first.reason}; no scale down to alpha={min(candidates):g} passes",
                       fields[1.0], found.tried)
    point = next(p for p in found.tried if p.alpha == found.alpha)
    gain = _target_gain(model, scaler, point, target_before, own_accuracy)
    if gain <= 0:
        scaler.apply(1.0)
        return Verdict("rejected", 1.0, f"{first.reason}; at alpha={found.alpha:g}, which passes, the target "
                       f"does not improve ({100 * gain:+.2f} points)", fields[1.0], found.tried)
    scaler.apply(found.alpha)
    return Verdict("scaled", found.alpha, f"{first.reason}; kept {found.alpha:g} of the update: {point.reason}",
                   fields[found.alpha], found.tried)


def _target_gain(model: nn.Module, scaler: UpdateScaler, point: Point, target_before: float | None,
                 own_accuracy: Callable[[], float]) -> float:
    """Target accuracy gained at `point` over the current model (fraction, not points)."""
    if target_before is not None and point.target is not None:
        return point.target - target_before
    at_alpha = evaluate_merged(model, scaler, point.alpha, own_accuracy)
    return at_alpha - evaluate_merged(model, scaler, 0.0, own_accuracy)
