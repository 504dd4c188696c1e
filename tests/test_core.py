"""The LoRSU core on every wired family: score -> select -> inject -> train -> merge, and its invariants."""

from contextlib import nullcontext

import pytest
import torch

from lorsu_edge.adapter import load_adapter, save_adapter
from lorsu_edge.config import MethodConfig
from lorsu_edge.consumer import image_features
from lorsu_edge.errors import AdapterMismatchError, UnsupportedModelError
from lorsu_edge.families import find_encoder
from lorsu_edge.inject import adapter_modules, freeze, inject, select_targets
from lorsu_edge.merge import encoder_state_dict, merge_all, tensors_hash, unload, unmerge_all
from lorsu_edge.score import candidate_paths, compute_importance
from lorsu_edge.tiny import IMAGE_SIZE, tiny_model

FAMILY_KINDS = ["clip", "clip_vision", "siglip", "dinov2", "vit", "blip_vision", "llava", "dual_dinov2"]


def _pixels(n=4, seed=1):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _loss(model, spec, target_seed=2):
    def loss_fn(m, pixels):
        feats = image_features(m, spec, pixels)
        target = torch.randn(feats.shape, generator=torch.Generator().manual_seed(target_seed))
        return (feats - target).pow(2).mean()
    return loss_fn


def _adapt(kind, cfg, steps=4, seed=0):
    model = tiny_model(kind, seed=seed)
    spec = find_encoder(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = _loss(model, spec)
    batches = [(_pixels(2, s), 2) for s in range(3)]
    grads = None
    if cfg.needs_importance:
        paths = candidate_paths(spec, fc1=cfg.uses_fc1, attn=cfg.uses_lora)
        grads, _ = compute_importance(model, paths, batches, loss_fn, cfg.importance_samples)
    targets = select_targets(spec, cfg, grads)
    inject(model, targets, cfg)
    counts = freeze(model, spec, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(steps):
        loss = loss_fn(model, _pixels(4, 10 + step))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, spec, base, targets, counts, opt


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_only_selected_entries_change(kind):
    cfg = MethodConfig(method="lorsu", sparsity=0.1, top_k_heads=2, rank=4, alpha=8)
    model, spec, base, targets, counts, _ = _adapt(kind, cfg)
    unload(model)
    after = model.state_dict()
    touched = {t.path + ".weight": t for t in targets}
    biases = {t.path + ".bias" for t in targets} if cfg.train_biases else set()
    changed_any = False
    for name, before in base.items():
        now = after[name]
        if name in touched:
            t = touched[name]
            diff = (now != before).reshape(-1) if t.kind == "sparse" else (now != before).any(dim=1)
            allowed = torch.zeros_like(diff)
            allowed[t.index] = True
            assert not (diff & ~allowed).any(), f"{name}: entries outside the selection changed"
            changed_any |= bool(diff.any())
        elif name not in biases:
            assert torch.equal(now, before), f"{name} changed but was not selected"
    assert changed_any
    if kind == "llava":  # penultimate-layer consumer: the last block is never a candidate
        last = spec.blocks[-1].path
        assert spec.used_blocks == len(spec.blocks) - 1
        assert all(not t.path.startswith(last + ".") for t in targets)
        assert all(torch.equal(after[k], v) for k, v in base.items() if k.startswith(last + "."))


@pytest.mark.parametrize("kind", ["clip", "blip_vision", "llava", "dinov2"])
def test_selection_budgets_and_counts(kind):
    cfg = MethodConfig(method="lorsu", sparsity=0.25, top_k_heads=3, rank=2, alpha=2)
    model, spec, _, targets, counts, opt = _adapt(kind, cfg, steps=1)
    fused = spec.family.fused
    for t in targets:
        weight = model.get_submodule(t.path).base.weight
        if t.kind == "sparse":
            assert t.index.numel() == int(0.25 * weight.numel())
        else:
            assert len(t.heads) == 3
            assert t.index.numel() == (3 if fused else 1) * 3 * spec.head_dim
    n_blocks = spec.used_blocks
    assert len([t for t in targets if t.kind == "sparse"]) == n_blocks
    assert len([t for t in targets if t.kind == "lora"]) == n_blocks * (1 if fused else 3)
    # optimizer state is O(selected): Adam keeps two moments per trainable entry, nothing dense
    state_entries = sum(s["exp_avg"].numel() for s in opt.state.values())
    assert state_entries == counts["trainable_params"]
    fc1 = model.get_submodule(spec.blocks[0].fc1)
    assert counts["fc1_entries"] == n_blocks * int(0.25 * fc1.base.weight.numel())


@pytest.mark.parametrize("kind", ["clip", "blip_vision", "llava", "dual_dinov2"])
def test_merge_equals_unmerged_and_unmerge_is_exact(kind):
    cfg = MethodConfig(method="lorsu", sparsity=0.1, top_k_heads=2, rank=4, alpha=8)
    model, spec, base, targets, _, _ = _adapt(kind, cfg)
    pixels = _pixels(3, 99)
    with torch.no_grad():
        unmerged = image_features(model, spec, pixels)
        wrapped_base = {k: v.clone() for k, v in model.state_dict().items()}
        merge_all(model)
        merged_once = {k: v.clone() for k, v in model.state_dict().items()}
        merged = image_features(model, spec, pixels)
        merge_all(model)  # merging twice changes nothing
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged_once.items())
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-5)
    for path, m in adapter_modules(model).items():  # W_after == W_init + delta, exactly
        before = wrapped_base[f"{path}.base.weight"]
        assert torch.equal(m.base.weight, before + m.delta_weight())
    unmerge_all(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in wrapped_base.items())


@pytest.mark.parametrize("method", ["lora", "spu", "full"])
def test_baselines_through_the_same_machinery(method):
    cfg = MethodConfig(method=method, sparsity=0.1, rank=2, alpha=2)
    model, spec, base, targets, counts, opt = _adapt("clip", cfg, steps=2)
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == counts["trainable_params"]
    unload(model)
    after = model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    if method == "lora":
        assert {t.kind for t in targets} == {"lora"} and all(len(t.heads) == spec.num_heads for t in targets)
        assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) for k in changed)
    elif method == "spu":
        assert {t.kind for t in targets} == {"sparse"}
        assert changed and all(k.endswith("fc1.weight") for k in changed)
    else:
        assert counts["trainable_params"] == counts["encoder_params"]
        assert changed and all(k.startswith("vision_model.") for k in changed)
        assert counts["encoder_params"] == sum(v.numel() for k, v in base.items() if k.startswith("vision_model."))


def test_importance_is_the_weighted_mean_gradient():
    model = tiny_model("clip")
    spec = find_encoder(model)
    loss_fn = _loss(model, spec)
    batches = [(_pixels(3, 0), 3), (_pixels(1, 1), 1)]
    paths = candidate_paths(spec)
    grads, seen = compute_importance(model, paths, batches, loss_fn, max_samples=100)
    assert seen == 4
    # reference: the plain autograd gradient, weighted by batch size
    ref = {p: torch.zeros_like(model.get_submodule(p).weight) for p in paths}
    for pixels, n in batches:
        model.zero_grad()
        for p in model.parameters():
            p.requires_grad_(True)
        loss_fn(model, pixels).backward()
        for p in paths:
            ref[p] += model.get_submodule(p).weight.grad * n
    for p in paths:
        assert torch.allclose(grads[p], ref[p] / 4, atol=1e-6)


def test_importance_materialises_no_other_gradient():
    model = tiny_model("clip")
    spec = find_encoder(model)
    seen_grads = []
    for name, p in model.named_parameters():
        p.register_hook(lambda g, n=name: seen_grads.append(n))
    paths = candidate_paths(spec, attn=False)
    compute_importance(model, paths, [(_pixels(2), 2)], _loss(model, spec), 10)
    assert seen_grads and all(n.endswith("fc1.weight") for n in seen_grads)
    assert all(p.grad is None for p in model.parameters())


def test_adapter_roundtrip_and_mismatch(tmp_path):
    cfg = MethodConfig(method="lorsu", sparsity=0.1, top_k_heads=2, rank=4, alpha=8)
    fresh = tiny_model("clip")
    spec0 = find_encoder(fresh)
    base_hash = tensors_hash(encoder_state_dict(fresh, spec0))
    model, spec, base, targets, _, _ = _adapt("clip", cfg)
    save_adapter(tmp_path, model, spec, cfg, {"base_encoder_sha256": base_hash})
    pixels = _pixels(2, 5)
    with torch.no_grad():
        expected = image_features(model, spec, pixels)
    load_adapter(tmp_path, fresh, spec0)
    with torch.no_grad():
        assert torch.allclose(image_features(fresh, spec0, pixels), expected, atol=1e-6)
    other = tiny_model("clip", seed=7)
    with pytest.raises(AdapterMismatchError, match="hash"):
        load_adapter(tmp_path, other, find_encoder(other))
    vit = tiny_model("vit")
    with pytest.raises(AdapterMismatchError, match="clip"):
        load_adapter(tmp_path, vit, find_encoder(vit))


def test_unsupported_model_names_what_it_found():
    import transformers as tf
    bert = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="model_type='bert'"):
        find_encoder(bert)


def test_bf16_autocast_gives_the_fp32_gradients_in_fp32():
    """Under bf16 autocast the trainables' gradients are fp32 and equal the fp32 run's to bf16 precision.
    Catches a backward that computes in the wrong dtype or loses a cast (wrong values), not only a wrong dtype."""
    cfg = MethodConfig(method="lorsu", sparsity=0.1, top_k_heads=1, rank=2, alpha=2)
    model = tiny_model("clip")
    spec = find_encoder(model)
    loss_fn = _loss(model, spec)
    grads, _ = compute_importance(model, candidate_paths(spec), [(_pixels(2), 2)], loss_fn, 10)
    inject(model, select_targets(spec, cfg, grads), cfg)
    freeze(model, spec, cfg)
    with torch.no_grad():  # B = 0 at init would leave every lora_A gradient at exactly 0
        for m in adapter_modules(model).values():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    runs = []
    for autocast in (nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model, _pixels(2))
        loss.backward()
        runs.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    fp32, bf16 = runs
    assert set(fp32) == set(bf16) and len(fp32) > 0
    # k's bias shifts every logit of a query row equally: softmax ignores it, its true gradient is 0
    checked = [n for n, ref in fp32.items() if ref.norm() > 1e-6]
    assert all(n.endswith("k_proj.bias_delta") for n in set(fp32) - set(checked))
    for name in checked:
        assert bf16[name].dtype == torch.float32, name
        rel = (bf16[name] - fp32[name]).norm() / fp32[name].norm()
        assert rel < 0.05, f"{name}: bf16 gradient off by {rel:.3f} of its norm"
