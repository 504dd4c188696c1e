"""The sparse fc1 layer's gradient paths (every row sampled on a CSR pattern, rows split between sampled and
dense by the crossover, gathered, dense then gathered) against a dense reference, the split rule, and the
int32 index storage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lorsu_edge import sparse_grad
from lorsu_edge.layers import SparseDeltaLinear, _effective_weight, _SparseDeltaLinearFn
from lorsu_edge.sparse_grad import RowSplit

PATHS = ("sampled", "auto", "gathered", "dense")
OUT, IN = 20, 12  # rectangular: a transposed weight gradient cannot pass


def _layer(indices: torch.Tensor, mode: str, dtype=torch.float32, seed: int = 0) -> SparseDeltaLinear:
    torch.manual_seed(seed)
    layer = SparseDeltaLinear(nn.Linear(IN, OUT), indices, grad_mode=mode).to(dtype)
    with torch.no_grad():
        layer.delta.normal_()
        layer.bias_delta.normal_()
    return layer


def _indices(count: int = 37, sort: bool = True, seed: int = 1) -> torch.Tensor:
    idx = torch.randperm(OUT * IN, generator=torch.Generator().manual_seed(seed))[:count]
    return idx.sort().values if sort else idx


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "unsorted"])
def test_gradcheck_float64(kind, sort):
    """Analytic gradients of x, delta and bias equal finite differences, for every backward path; unsorted
    indices exercise the CSR-order -> index-order permutation of the sampled path."""
    layer = _layer(_indices(sort=sort), kind, torch.float64)
    x = torch.randn(2, 5, IN, dtype=torch.float64, requires_grad=True)
    delta = layer.delta.detach().clone().requires_grad_()
    bias = layer._bias().detach().clone().requires_grad_()
    path = layer._grad_path(x)
    fn = lambda x, d, b: _SparseDeltaLinearFn.apply(x, layer.base.weight, layer.indices, d, b, path)
    assert torch.autograd.gradcheck(fn, (x, delta, bias))


@pytest.mark.parametrize("kind", PATHS)
def test_matches_dense_reference(kind):
    """Output and every gradient equal a plain F.linear on the dense effective weight (fp32): catches a
    transposed weight gradient, a gradient gathered at the wrong entries, a lost or doubled delta."""
    idx = _indices(sort=False)
    layer = _layer(idx, kind)
    x = torch.randn(3, 7, IN, requires_grad=True)
    y = layer(x)
    w_ref = (layer.base.weight.detach() + layer.delta_weight()).requires_grad_()
    b_ref = layer._bias().detach().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref, b_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    y_ref.backward(upstream)
    torch.testing.assert_close(layer.delta.grad, w_ref.grad.reshape(-1)[idx], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias_delta.grad, b_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.base.weight.grad is None


def test_bf16_paths_agree():
    """Under bf16 autocast (the CPU training path) every path gives the fp32 reference's delta gradient up to
    bf16 rounding of its operands, and the paths agree with each other as closely."""
    idx = _indices(count=80)
    x = torch.randn(4, 9, IN)
    grads = {}
    for kind in PATHS:
        layer = _layer(idx, kind)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x).float().pow(2).sum().backward()
        grads[kind] = layer.delta.grad
    exact = _layer(idx, "dense")
    exact(x).pow(2).sum().backward()
    scale = exact.delta.grad.abs().max()
    errors = {k: float((g - exact.delta.grad).abs().max() / scale) for k, g in grads.items()}
    assert max(errors.values()) < 0.02, errors
    torch.testing.assert_close(grads["sampled"], grads["dense"], rtol=0, atol=0.02 * float(scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_effective_weight_is_the_full_copy_rebuild(dtype):
    """The cheap rebuild (cast W, write the selected entries) is bit-identical to the old one (W + scatter(delta)
    on an fp32 copy, then cast), so merged == unmerged stays exact; untouched entries are W's own."""
    torch.manual_seed(0)
    w = torch.randn(OUT, IN)
    idx = _indices().to(torch.int32)
    delta = torch.randn(idx.numel())
    old = w.reshape(-1).index_add(0, idx, delta).view_as(w).to(dtype)
    new = _effective_weight(w, idx, delta, dtype)
    assert new.dtype == dtype and torch.equal(new, old)
    untouched = torch.ones(w.numel(), dtype=torch.bool)
    untouched[idx.long()] = False
    assert torch.equal(new.reshape(-1)[untouched], w.to(dtype).reshape(-1)[untouched])


def test_pattern_follows_reloaded_indices():
    """The CSR pattern is cached per layer; loading other indices must rebuild it (a stale pattern would put
    the new entries' gradients at the old positions)."""
    layer = _layer(_indices(seed=1), "sampled")
    x = torch.randn(2, 6, IN)
    layer(x).sum().backward()  # builds and caches the pattern of the first indices
    other = _indices(seed=2)
    layer.load_state_dict({**layer.state_dict(), "indices": other})
    layer.delta.grad = None
    layer(x).pow(2).sum().backward()
    ref = _layer(other, "dense")
    ref.load_state_dict(layer.state_dict())
    ref(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.delta.grad, ref.delta.grad, rtol=1e-5, atol=1e-5)


def test_repeated_indices_are_refused():
    with pytest.raises(ValueError, match="repeat"):
        RowSplit.build(torch.tensor([5, 3, 5]), (OUT, IN), 0.1)


def test_auto_split_sends_rows_denser_than_the_crossover_to_the_dense_kernel(monkeypatch):
    """auto: a row goes dense exactly when its own density is above the device's crossover; the test layers
    above use the real table, where the tiny selection mixes both kinds of row."""
    monkeypatch.setitem(sparse_grad.SAMPLED_MAX_DENSITY, ("cpu", torch.bfloat16), 0.25)
    idx = _indices(count=60, sort=False)
    layer = SparseDeltaLinear(nn.Linear(IN, OUT), idx)
    counts = torch.bincount(idx // IN, minlength=OUT)
    split = layer.row_split()
    assert torch.equal(split.dense_row, counts > 0.25 * IN)
    assert 0 < split.dense_pos.numel() < idx.numel()
    assert sorted([*split.dense_pos.tolist(), *split.sparse_pos.tolist()]) == list(range(idx.numel()))
    assert layer._grad_path(torch.randn(2, IN)).kind == "split"
    mixed = _layer(_indices(), "auto").row_split()
    assert mixed.dense_pos.numel() and mixed.sparse_pos.numel()  # the PATHS tests exercise both kernels
    assert not sparse_grad.prefer_sampled(torch.device("meta"), torch.float32, 1e-6)


def test_fake_tensors_count_the_sampled_flops():
    """The planner and bench_flops run the layer on fake tensors (no CSR there): the sampled path then
    gathers, and its backward costs 2 * tokens * (out * in - selected) FLOPs less than the dense path."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    tokens, count = 14, 37
    flops = {}
    for kind in ("sampled", "dense"):
        with FakeTensorMode():
            layer = SparseDeltaLinear(nn.Linear(IN, OUT), torch.arange(count), grad_mode=kind)
            y = layer(torch.randn(tokens, IN))
            with FlopCounterMode(display=False) as counter:
                y.sum().backward()
        flops[kind] = counter.get_total_flops()
    assert flops["dense"] - flops["sampled"] == 2 * tokens * (OUT * IN - count)


def test_indices_are_int32_and_old_int64_adapters_load(tmp_path):
    """New layers store int32 indices and save no derived pattern; a state saved with int64 indices (adapters
    written before) loads into the same entries."""
    idx = _indices()
    layer = _layer(idx, "auto")
    assert layer.indices.dtype == torch.int32 and torch.equal(layer.indices.long(), idx)
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("base.")}
    assert set(state) == {"indices", "delta", "bias_delta"}
    save_file({**state, "indices": idx.to(torch.int64)}, str(tmp_path / "old.safetensors"))
    old = load_file(str(tmp_path / "old.safetensors"))
    assert old["indices"].dtype == torch.int64
    again = SparseDeltaLinear(layer.base, old["indices"])
    again.load_state_dict({**{f"base.{k}": v for k, v in layer.base.state_dict().items()}, **old})
    x = torch.randn(3, IN)
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)
