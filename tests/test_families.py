"""Head layout per family: the rows the injection gives to head h are the rows attention reads as head h.

Tiny towers with 3 heads of 8 dims (hidden 24): head_dim != heads, so a heads/head_dim swap, a row/column
swap or a wrong part stride in a fused qkv puts the LoRA update on rows of other heads, and their slice of
the attention output (the input of the out projection) changes. The scoring side is checked the same way:
a gradient on one head's rows must select that head.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorsu_edge import tiny
from lorsu_edge.config import MethodConfig
from lorsu_edge.families import find_encoder
from lorsu_edge.inject import adapter_modules, inject, lora_targets, select_targets

HEADS, HEAD_DIM = 3, 8


@pytest.fixture
def non_square_tiny(monkeypatch):
    """tiny.tiny_model, with vision towers of 3 heads x 8 dims instead of the usual 4 x 8."""
    monkeypatch.setattr(tiny, "_V", dict(tiny._V, hidden_size=HEADS * HEAD_DIM, intermediate_size=40,
                                         num_hidden_layers=2, num_attention_heads=HEADS))
    return tiny.tiny_model


def _out_proj(model, spec) -> nn.Module:
    """Block 0's attention output projection: its one Linear under an attention module that is not q/k/v
    (out_proj, projection, output.dense, o_proj: named differently per family and transformers version)."""
    block = spec.blocks[0]
    qkv = {path.removeprefix(block.path + ".") for path in block.attn.values()}
    found = [m for name, m in model.get_submodule(block.path).named_modules()
             if isinstance(m, nn.Linear) and ("attn" in name or "attention" in name)
             and not any(name == p or name.startswith(p + ".") for p in qkv)]  # nor their injected wrappers
    assert len(found) == 1, f"expected one attention output projection in {block.path}, found {len(found)}"
    return found[0]


def _attention_output(model, spec, pixels: torch.Tensor) -> torch.Tensor:
    """Block 0's per-head attention output (B, T, hidden): what its out projection receives."""
    seen = []
    hook = _out_proj(model, spec).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            spec.tower(pixel_values=pixels)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2", "vit", "blip_vision", "llava"])
@pytest.mark.parametrize("head", [1, 2])  # head 0 would hide a heads/head_dim swap
def test_lora_on_one_head_changes_only_that_heads_attention_output(kind, head, non_square_tiny):
    model = non_square_tiny(kind)
    spec = find_encoder(model)
    assert (spec.num_heads, spec.head_dim) == (HEADS, HEAD_DIM)
    pixels = torch.randn(2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    before = _attention_output(model, spec, pixels)
    cfg = MethodConfig(rank=2, alpha=2)
    inject(model, lora_targets(spec, spec.blocks[0], [head]), cfg)
    with torch.no_grad():  # B = 0 at init: give the update a value, on q, k and v of this head alike
        for m in adapter_modules(model).values():
            m.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    after = _attention_output(model, spec, pixels)
    per_head = (after - before).abs().unflatten(-1, (HEADS, HEAD_DIM)).amax(dim=(0, 1, 3))
    others = [h for h in range(HEADS) if h != head]
    assert per_head[head] > 1e-3, f"{kind}: the chosen head's output did not change"
    assert per_head[others].max() < 1e-6, f"{kind}: LoRA on head {head} changed heads {others}: {per_head}"


@pytest.mark.parametrize("kind", ["clip", "dinov2", "blip_vision", "llava"])
@pytest.mark.parametrize("head", [1, 2])
def test_importance_on_one_heads_v_rows_selects_that_head(kind, head, non_square_tiny):
    """Scoring reads rows the way attention does: a gradient only on head h's v rows (the third part of a
    fused qkv, laid out (3, heads, head_dim)) must select head h, in every block."""
    model = non_square_tiny(kind)
    spec = find_encoder(model)
    grads = {}
    for block in spec.candidate_blocks:
        for path in [block.fc1, *block.attn.values()]:
            grads[path] = torch.zeros_like(model.get_submodule(path).weight)
        v_path, offset = (block.attn["qkv"], 2 * spec.hidden_size) if "qkv" in block.attn else (block.attn["v"], 0)
        grads[v_path][offset + head * HEAD_DIM: offset + (head + 1) * HEAD_DIM] = 1.0
    targets = select_targets(spec, MethodConfig(top_k_heads=1, rank=2, alpha=2), grads)
    lora = [t for t in targets if t.kind == "lora"]
    assert lora and all(t.heads == [head] for t in lora)
