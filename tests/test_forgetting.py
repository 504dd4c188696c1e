"""The forgetting-bounded merge: the scale search (pure) and the scaled update (exact interpolation)."""

import pytest
import torch

from lorsu_edge.config import MethodConfig
from lorsu_edge.families import find_encoder
from lorsu_edge.forgetting import (DEFAULT_CANDIDATES, Point, UpdateScaler, bounded_merge, dense_start,
                                   search_alpha)
from lorsu_edge.inject import adapter_modules, freeze, inject, select_targets
from lorsu_edge.merge import merge_all, unmerge_all
from lorsu_edge.tiny import tiny_model


def _control_drop(limit: float, curvature: float = 10.0):
    """A synthetic session whose control drop grows as curvature * alpha^2 points; counts evaluations."""
    calls = []

    def evaluate(alpha: float) -> Point:
        calls.append(alpha)
        drop = curvature * alpha ** 2
        return Point(alpha, 0.9 - drop / 100, None, drop <= limit)
    return evaluate, calls


@pytest.mark.parametrize("limit, expected", [(1.0, 5 / 16), (0.1, 1 / 16), (2.5, 8 / 16), (10.0, 1.0)])
def test_search_finds_the_largest_passing_alpha_in_five_evaluations(limit, expected):
    evaluate, calls = _control_drop(limit)
    first = evaluate(1.0)
    result = search_alpha(DEFAULT_CANDIDATES, evaluate, known=[first])
    assert result.alpha == expected
    assert len(calls) <= 5  # alpha = 1 (the guard's own) + a binary search over 16 candidates
    assert calls.count(1.0) == 1  # the known point is reused, not re-evaluated
    assert [p.alpha for p in result.tried] == calls


def test_search_returns_none_when_even_the_smallest_scale_forgets():
    evaluate, calls = _control_drop(0.01)
    result = search_alpha(DEFAULT_CANDIDATES, evaluate, known=[evaluate(1.0)])
    assert result.alpha is None and min(calls) == 1 / 16 and len(calls) <= 5


def _trained(method: str, seed: int = 0):
    """A tiny CLIP with `method`'s wrappers (or dense) and non-zero trained updates (random, not optimised)."""
    model = tiny_model("clip")
    spec = find_encoder(model)
    cfg = MethodConfig(method=method, sparsity=0.1, top_k_heads=2, rank=4, alpha=8)
    grads = {p: torch.randn_like(model.get_submodule(p).weight) for b in spec.candidate_blocks
             for p in [b.fc1, *b.attn.values()]} if cfg.needs_importance else None
    inject(model, select_targets(spec, cfg, grads), cfg)
    freeze(model, spec, cfg)
    start = dense_start(model, spec.tower) if method == "full" else None
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, spec, start


@pytest.mark.parametrize("method", ["lorsu", "spu", "lora"])
def test_scaled_merge_is_base_plus_alpha_times_delta_exactly(method):
    """Catches a scale applied to only some tensors (LoRA A and B both: alpha^2; bias deltas left at 1) or
    compounded when the search re-applies it."""
    alpha = 0.25  # a power of two: alpha * (B A) == (alpha B) A bit for bit
    model, _, _ = _trained(method)
    wrappers = adapter_modules(model)
    full_delta = {p: (m.base.weight.clone(), m.delta_weight(), m.base.bias.clone(),
                      None if m.bias_delta is None else m.bias_delta.detach().clone()) for p, m in wrappers.items()}
    scaler = UpdateScaler(model)
    scaler.apply(0.5)
    scaler.apply(alpha)  # 0.25 of the trained update, not 0.125
    merge_all(model)
    for path, (w0, d1, b0, bd1) in full_delta.items():
        m = wrappers[path]
        assert torch.equal(m.base.weight, w0 + alpha * d1), path
        assert d1.abs().sum() > 0
        if bd1 is not None:
            assert torch.equal(m.base.bias, b0 + alpha * bd1), path


def test_full_interpolates_every_tower_tensor_from_its_start():
    model, spec, start = _trained("full")
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n in start}
    scaler = UpdateScaler(model, start)
    scaler.apply(0.75)
    scaler.apply(0.5)
    params = dict(model.named_parameters())
    assert trained and all(torch.equal(params[n], start[n] + 0.5 * (trained[n] - start[n])) for n in trained)
    scaler.apply(0.0)
    assert all(torch.equal(params[n], start[n]) for n in start)


def test_scaler_restores_the_trained_update_bit_for_bit():
    model, spec, _ = _trained("lorsu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler = UpdateScaler(model)
    scaler.apply(0.3)
    merge_all(model)
    scaler_state = dict(model.state_dict())
    assert any(not torch.equal(scaler_state[k], before[k]) for k in before)
    unmerge_all(model)
    scaler.apply(1.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_bounded_merge_scales_only_when_the_target_still_gains():
    model, _, _ = _trained("lorsu")
    scaler = UpdateScaler(model)

    def score():  # control falls with the update's size; the target rises with it
        size = scaler.alpha
        return {"control": 0.9 - 0.1 * size, "target": 0.2 + 0.2 * size}

    def check(scores):
        drop = round(100 * (0.9 - scores["control"]), 9)
        return drop <= 3, f"drop {drop}", {"control_accuracy": scores["control"]}

    v = bounded_merge(model, scaler, score, check, "scale", 0.2, lambda: 0.0)
    assert v.status == "scaled" and v.alpha == 4 / 16 and scaler.alpha == v.alpha  # 10 * alpha <= 3
    assert v.fields["control_accuracy"] == pytest.approx(0.9 - 0.1 * 4 / 16)
    assert [p.alpha for p in v.tried][0] == 1.0 and len(v.tried) <= 5
    r = bounded_merge(model, scaler, score, check, "reject", 0.2, lambda: 0.0)
    assert r.status == "rejected" and r.alpha == 1.0 and scaler.alpha == 1.0
    no_gain = bounded_merge(model, scaler, score, check, "scale", 0.9, lambda: 0.0)
    assert no_gain.status == "rejected" and "does not improve" in no_gain.reason and scaler.alpha == 1.0


def test_the_base_relative_limit_defaults_to_the_per_session_one_and_is_remembered(tmp_path):
    """Off by default, per-session drops just under the limit added up night after night (README)."""
    from lorsu_edge.adapt import AdaptOptions, remembered_total_limit
    from lorsu_edge.session import Workdir

    wd = Workdir.open(tmp_path / "wd", create=True)
    with wd.lock():
        assert remembered_total_limit(AdaptOptions(data=tmp_path, max_forgetting=2.5), wd) == 2.5
        assert remembered_total_limit(AdaptOptions(data=tmp_path, max_total_forgetting=4.0), wd) == 4.0
        assert remembered_total_limit(AdaptOptions(data=tmp_path, max_forgetting=2.5), wd) == 4.0  # remembered
