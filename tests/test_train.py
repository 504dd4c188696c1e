"""`train.train` itself: decay groups, the lr schedule per optimizer step, micro-batch accumulation,
clipping, the fp16 gradient scaler and the non-finite-loss guard, on a two-layer toy of the real wrappers.

What the optimizer sees is observed with a global optimizer step pre-hook (lr and gradients at the
moment of each step), so the loop is tested as it runs, not re-implemented.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lorsu_edge import train as train_mod
from lorsu_edge.errors import TrainingError
from lorsu_edge.layers import HeadLoRALinear, SparseDeltaLinear
from lorsu_edge.select import head_rows
from lorsu_edge.train import TrainConfig, make_optimizer, train

CPU = torch.device("cpu")


class Toy(nn.Module):
    """A sparse fc1 and a head-LoRA projection (2 heads of 2 rows, head 1 chosen), both with bias deltas."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = SparseDeltaLinear(nn.Linear(6, 8), torch.tensor([1, 5, 17, 40]))
        self.q = HeadLoRALinear(nn.Linear(8, 4), head_rows(torch.tensor([1]), 2), rank=2, alpha=2)
        with torch.no_grad():  # non-zero starting values, so decay has something to pull on
            for p in self.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(torch.tanh(self.fc1(x)))


@dataclass
class Micro:
    x: torch.Tensor
    y: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.x)


def _data(n: int, seed: int = 0) -> Micro:
    g = torch.Generator().manual_seed(seed)
    return Micro(torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g))


def _mse(model: nn.Module, b: Micro) -> torch.Tensor:
    return F.mse_loss(model(b.x), b.y)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 0.1, "weight_decay": 0.0, "warmup_ratio": 0.0, "max_grad_norm": 0.0,
                          "precision": "fp32", **kw})


class StepSpy:
    """Records, at every optimizer step, the first group's lr and a copy of every gradient."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.grads: list[list[torch.Tensor]] = []

    def __call__(self, opt, _args, _kwargs) -> None:
        self.lrs.append(opt.param_groups[0]["lr"])
        self.grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])

    def __enter__(self) -> StepSpy:
        self._handle = register_optimizer_step_pre_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _run(model: nn.Module, steps: list[list[Micro]], cfg: TrainConfig, loss_fn=_mse, progress=None) -> StepSpy:
    with StepSpy() as spy:
        train(model, lambda: iter(steps), len(steps), loss_fn, cfg, CPU, progress)
    return spy


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_decay_groups_decay_updates_not_bias_deltas():
    model = Toy()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], _cfg(weight_decay=0.3))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert groups == {0.3: ["fc1.delta", "q.lora_A", "q.lora_B"], 0.0: ["fc1.bias_delta", "q.bias_delta"]}


def test_train_decays_exactly_the_decay_group():
    """With zero gradients AdamW's step is the decay alone: updates shrink by (1 - lr * wd), biases stay."""
    model = Toy()
    before = _trainable(model)

    def zero_grad_loss(m, b):
        return (m(b.x) * 0).sum()

    _run(model, [[_data(2)]], _cfg(lr=0.1, weight_decay=0.5), loss_fn=zero_grad_loss)
    after = _trainable(model)
    for name in ("fc1.delta", "q.lora_A", "q.lora_B"):
        torch.testing.assert_close(after[name], before[name] * (1 - 0.1 * 0.5))
    for name in ("fc1.bias_delta", "q.bias_delta"):
        assert torch.equal(after[name], before[name]), f"{name} was decayed"


def test_schedule_warms_up_linearly_then_cosine_per_optimizer_step():
    """10 effective batches of 3 micro-batches each: 10 optimizer steps, lr rising over the first 2
    (ceil(0.2 * 10)) then a half cosine toward 0 over the remaining 8. Catches a dropped warmup and a
    schedule stepped per micro-batch."""
    calls = []

    def counting_loss(m, b):
        calls.append(b.size)
        return _mse(m, b)

    steps = [[_data(1, 3 * i + j) for j in range(3)] for i in range(10)]
    spy = _run(Toy(), steps, _cfg(lr=2.0, warmup_ratio=0.2), loss_fn=counting_loss)
    warmup = [2.0 * (i + 1) / 2 for i in range(2)]
    cosine = [2.0 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert len(calls) == 30
    assert spy.lrs == pytest.approx(warmup + cosine)


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    """Micro-batches of 1 and 3 samples give the gradient of one batch of 4 (weights by size, not 1/2 each)."""
    full = _data(4)
    parts = [Micro(full.x[:1], full.y[:1]), Micro(full.x[1:], full.y[1:])]
    one = _run(Toy(), [[full]], _cfg())
    split = _run(Toy(), [parts], _cfg())
    for g_one, g_split in zip(one.grads[0], split.grads[0]):
        torch.testing.assert_close(g_split, g_one)


def test_clipping_scales_the_gradient_to_max_norm():
    batch = [[Micro(_data(4).x * 10, _data(4).y * 10)]]
    raw = _run(Toy(), batch, _cfg()).grads[0]
    clipped = _run(Toy(), batch, _cfg(max_grad_norm=0.05)).grads[0]
    raw_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw]))
    assert raw_norm > 0.05  # the clip had work to do
    for g_raw, g_clip in zip(raw, clipped):  # same direction, total norm max_grad_norm
        torch.testing.assert_close(g_clip, g_raw * (0.05 / raw_norm), rtol=1e-5, atol=1e-7)


def test_fp16_scaler_skips_overflowing_steps_and_backs_off(monkeypatch):
    """The fp16 path, faked on CPU: a step whose scaled gradients overflow changes nothing and halves the
    scale; the next, finite step updates the parameters at the reduced scale, with unscaled gradients."""
    scalers = []

    class SpyScaler(torch.amp.GradScaler):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            scalers.append(self)

    monkeypatch.setattr(train_mod, "resolve_precision", lambda precision, device: "fp16")
    monkeypatch.setattr(train_mod, "autocast_factory", lambda precision, device: nullcontext)
    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    model = Toy()
    snapshots = []
    first = [True]

    def overflow_once(m, b):  # finite loss; times the initial scale 2**16 it overflows fp32
        loss = _mse(m, b) * (1e36 if first[0] else 1.0)
        first[0] = False
        return loss

    def progress(step, loss, rate):
        snapshots.append((_trainable(model), scalers[0].get_scale()))

    before = _trainable(model)
    spy = _run(model, [[_data(2, 0)], [_data(2, 1)]], _cfg(max_grad_norm=1.0), overflow_once, progress)
    assert scalers[0].is_enabled()
    (after_1, scale_1), (after_2, scale_2) = snapshots
    assert all(torch.equal(after_1[n], before[n]) for n in before), "the overflowing step changed parameters"
    assert scale_1 == 2.0 ** 15 and scale_2 == 2.0 ** 15
    assert len(spy.grads) == 1  # only the finite step reached the optimizer ...
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in spy.grads[0]]))
    assert 0 < norm <= 1.0 + 1e-6  # ... with unscaled, clipped gradients
    assert any(not torch.equal(after_2[n], before[n]) for n in before)


def test_non_finite_loss_raises_training_error():
    calls = []

    def nan_on_second_step(m, b):
        calls.append(b)
        return _mse(m, b) * (float("nan") if len(calls) == 2 else 1.0)

    with pytest.raises(TrainingError, match="non-finite .* at step 2"):
        _run(Toy(), [[_data(1, 0)], [_data(1, 1)]], _cfg(), loss_fn=nan_on_second_step)


def test_refuses_nothing_to_train_and_non_fp32_trainables():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(TrainingError, match="nothing to train"):
        train(frozen, lambda: iter([]), 1, _mse, _cfg(), CPU)
    with pytest.raises(TrainingError, match="fp32"):
        train(nn.Linear(2, 2).half(), lambda: iter([]), 1, _mse, _cfg(), CPU)
