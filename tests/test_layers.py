"""The structured-update layers against a plain dense `F.linear(x, W + dW, b + db)`, in float64.

Both layers have hand-written math (a custom backward for the sparse fc1, a scatter of per-head LoRA rows),
so each is checked two ways: `torch.autograd.gradcheck` (backward agrees with forward) and a dense
reference (forward and every gradient agree with the textbook layer). Shapes are rectangular and rows
non-contiguous so that a transposed weight gradient or a misplaced row cannot cancel out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lorsu_edge.layers import HeadLoRALinear, SparseDeltaLinear
from lorsu_edge.select import head_rows

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# How backward forms the fc1 weight gradient, where the layer lets one choose (`grad_mode`, with the
# sampled-gradient work of issue 14); every path must give the same gradients. Until then: the one path.
GRAD_MODES = ("auto", "sampled", "gathered", "dense") if hasattr(SparseDeltaLinear, "grad_mode") else (None,)


def _sparse_layer(out_f: int, in_f: int, fraction: float, bias: bool, seed: int = 0,
                  grad_mode: str | None = None) -> SparseDeltaLinear:
    """A float64 SparseDeltaLinear with a random base, random (non-zero) deltas on a random index set."""
    torch.manual_seed(seed)
    count = max(1, int(fraction * out_f * in_f))
    indices = torch.randperm(out_f * in_f, generator=_gen(seed))[:count].sort().values
    layer = SparseDeltaLinear(nn.Linear(in_f, out_f, bias=bias), indices, train_bias=bias).to(DT)
    if grad_mode is not None:
        layer.grad_mode = grad_mode
    with torch.no_grad():
        layer.delta.copy_(torch.randn(count, generator=_gen(seed + 1), dtype=DT))
        if layer.bias_delta is not None:
            layer.bias_delta.copy_(torch.randn(out_f, generator=_gen(seed + 2), dtype=DT))
    return layer


def _sparse_reference(layer: SparseDeltaLinear, x, delta, bias_delta=None):
    """The textbook layer: scatter the deltas into a dense zero matrix and add it to W."""
    w = layer.base.weight
    dense = torch.zeros(w.numel(), dtype=DT).index_put((layer.indices,), delta).view_as(w)
    bias = None if layer.base.bias is None else layer.base.bias + (0 if bias_delta is None else bias_delta)
    return F.linear(x, w + dense, bias)


def _trainables(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters() if p.requires_grad}


def _check_against_reference(layer: nn.Module, reference, x: torch.Tensor) -> None:
    """Output and gradients (x and every trainable) of `layer` equal those of `reference(layer, x, **params)`."""
    params = _trainables(layer)
    names = list(params)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    y = functional_call(layer, params, (x1,))
    y_ref = reference(layer, x2, **ref_params)
    torch.testing.assert_close(y, y_ref)
    upstream = torch.randn(y.shape, generator=_gen(7), dtype=DT)
    got = torch.autograd.grad(y, [x1, *params.values()], upstream)
    want = torch.autograd.grad(y_ref, [x2, *ref_params.values()], upstream)
    for name, g, w in zip(["x", *names], got, want):
        torch.testing.assert_close(g, w, msg=lambda m, n=name: f"gradient wrt {n}: {m}")


def _gradcheck(layer: nn.Module, x: torch.Tensor) -> None:
    params = _trainables(layer)
    names = list(params)

    def f(x, *values):
        return functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), *params.values()))


# fc1 is rectangular (intermediate x hidden); square cases too, where a transposed gradient keeps its shape.
SPARSE_CASES = [(24, 10, 0.1, True), (24, 10, 0.5, False), (24, 10, 1.0, True), (12, 12, 0.3, True),
                (12, 12, 0.05, False)]


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("out_f,in_f,fraction,bias", SPARSE_CASES)
def test_sparse_delta_linear_matches_dense_reference(out_f, in_f, fraction, bias, grad_mode):
    """Catches a transposed / mis-indexed weight gradient, a dropped delta or bias delta, a wrong grad_x.

    Several densities are used so that a dense path and a sampled path (if the layer picks one by density)
    are both exercised."""
    layer = _sparse_layer(out_f, in_f, fraction, bias, grad_mode=grad_mode)
    x = torch.randn(3, 5, in_f, generator=_gen(3), dtype=DT)  # (batch, tokens, features), as in a block
    _check_against_reference(layer, _sparse_reference, x)


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("out_f,in_f,fraction,bias", SPARSE_CASES[:2] + SPARSE_CASES[3:4])
def test_sparse_delta_linear_gradcheck(out_f, in_f, fraction, bias, grad_mode):
    layer = _sparse_layer(out_f, in_f, fraction, bias, grad_mode=grad_mode)
    _gradcheck(layer, torch.randn(2, 3, in_f, generator=_gen(4), dtype=DT))


def test_sparse_delta_linear_without_bias_has_no_bias_delta():
    layer = SparseDeltaLinear(nn.Linear(10, 24, bias=False), torch.tensor([0, 5, 239]))
    assert layer.bias_delta is None
    assert [n for n, _ in layer.named_parameters() if _.requires_grad] == ["delta"]


def _lora_layer(in_f: int, heads: int, head_dim: int, chosen: list[int], parts: int, rank: int,
                bias: bool = True, seed: int = 0) -> HeadLoRALinear:
    """A float64 HeadLoRALinear on `parts` stacked (heads * head_dim) x in_f projections, B random (not 0)."""
    torch.manual_seed(seed)
    out_f = parts * heads * head_dim
    rows = head_rows(torch.tensor(chosen), head_dim, parts=parts, part_stride=heads * head_dim)
    layer = HeadLoRALinear(nn.Linear(in_f, out_f, bias=bias), rows, rank, alpha=3.0, parts=parts,
                           train_bias=bias).to(DT)
    with torch.no_grad():  # B = 0 at init would make every gradient wrt A zero: nothing to check
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=_gen(seed + 1), dtype=DT))
        if layer.bias_delta is not None:
            layer.bias_delta.copy_(torch.randn(out_f, generator=_gen(seed + 2), dtype=DT))
    return layer


def _lora_dense_delta(layer: HeadLoRALinear, lora_A, lora_B) -> torch.Tensor:
    """Dense dW: for part p, rows[p] of dW = (alpha / r) * B[p] @ A[p*r:(p+1)*r], written out per part."""
    r, parts = layer.rank, layer.parts
    rows = layer.rows.view(parts, -1)
    dense = torch.zeros_like(layer.base.weight)
    for p in range(parts):
        dense = dense.index_put((rows[p],), layer.scaling * lora_B[p] @ lora_A[p * r:(p + 1) * r])
    return dense


def _lora_reference(layer: HeadLoRALinear, x, lora_A, lora_B, bias_delta=None):
    bias = None if layer.base.bias is None else layer.base.bias + (0 if bias_delta is None else bias_delta)
    return F.linear(x, layer.base.weight + _lora_dense_delta(layer, lora_A, lora_B), bias)


# (in_f, heads, head_dim, chosen heads, parts): separate q/k/v (parts=1) and a fused qkv (parts=3); the
# chosen heads are not contiguous and in_f differs from heads * head_dim.
LORA_CASES = [(10, 3, 4, [0, 2], 1), (10, 4, 3, [1, 3], 3), (12, 3, 4, [2], 3), (7, 2, 5, [0, 1], 1)]


@pytest.mark.parametrize("in_f,heads,head_dim,chosen,parts", LORA_CASES)
def test_head_lora_linear_matches_dense_reference(in_f, heads, head_dim, chosen, parts):
    """Catches rows scattered to the wrong place, the q/k/v factors mixed up, a wrong scaling."""
    layer = _lora_layer(in_f, heads, head_dim, chosen, parts, rank=2)
    _check_against_reference(layer, _lora_reference, torch.randn(2, 5, in_f, generator=_gen(3), dtype=DT))
    # the dense delta the layer reports (and merges) is the same matrix
    with torch.no_grad():
        want = _lora_dense_delta(layer, layer.lora_A, layer.lora_B)
    torch.testing.assert_close(layer.delta_weight().to(DT), want, rtol=1e-6, atol=1e-6)  # delta_weight is fp32


@pytest.mark.parametrize("in_f,heads,head_dim,chosen,parts", LORA_CASES[:2])
def test_head_lora_linear_gradcheck(in_f, heads, head_dim, chosen, parts):
    layer = _lora_layer(in_f, heads, head_dim, chosen, parts, rank=2)
    _gradcheck(layer, torch.randn(2, 3, in_f, generator=_gen(4), dtype=DT))


def test_head_lora_linear_touches_only_the_chosen_rows():
    """Rows of unchosen heads (and of other parts of a fused weight) keep the base output exactly."""
    layer = _lora_layer(10, 4, 3, [1, 3], parts=3, rank=2, bias=False)
    x = torch.randn(4, 10, generator=_gen(5), dtype=DT)
    with torch.no_grad():
        changed = (layer(x) != layer.base(x)).any(dim=0)
    expected = torch.zeros(36, dtype=torch.bool)
    for part in range(3):  # rows of heads 1 and 3 (head_dim 3) in each 12-row part
        for start in (3, 9):
            expected[part * 12 + start: part * 12 + start + 3] = True
    assert changed.tolist() == expected.tolist()


def test_wrappers_keep_every_tensor_on_the_base_layers_device():
    """Injection happens after the model is on its device: a trainable created on the default device next to
    a CUDA base fails at the first forward on a GPU. Shown on CPU by making "meta" the default device."""
    fc1, q, indices, rows = nn.Linear(10, 24), nn.Linear(10, 12), torch.tensor([0, 7, 100]), torch.arange(4, 8)
    with torch.device("meta"):
        sparse = SparseDeltaLinear(fc1, indices)
        lora = HeadLoRALinear(q, rows, rank=2, alpha=2)
    for layer in (sparse, lora):
        tensors = dict(layer.named_parameters(recurse=False)) | dict(layer.named_buffers(recurse=False))
        assert {n: t.device.type for n, t in tensors.items()} == dict.fromkeys(tensors, "cpu")
