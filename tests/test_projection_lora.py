"""`adapt --projection-rank`: LoRA on a dual encoder's visual projection (the research code's visual.proj).

The projection lives outside the tower's parameter prefix, so every place that treats "the encoder" as the
tower's state dict (session file, hashes, rebuild from adapters, rollback's restore, export, scaling) must take
it in when the option is on, and must not change by one byte when it is off.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorsu_edge.adapter import load_adapter
from lorsu_edge.cli.main import app
from lorsu_edge.config import MethodConfig
from lorsu_edge.consumer import image_features
from lorsu_edge.export import onnx_session
from lorsu_edge.errors import UnsupportedModelError
from lorsu_edge.families import find_encoder, find_projection
from lorsu_edge.forgetting import UpdateScaler
from lorsu_edge.inject import adapter_modules, freeze, inject, projection_target, select_targets
from lorsu_edge.layers import HeadLoRALinear
from lorsu_edge.load import load_model, load_session_model, resolve_session
from lorsu_edge.merge import encoder_state_dict, merge_all, tensors_hash, unload
from lorsu_edge.tiny import IMAGE_SIZE, save_tiny, tiny_model, write_toy_images

pytestmark = pytest.mark.slow
runner = CliRunner()
PROJ = "visual_projection"
FAST = ["--rank", "4", "--alpha", "8", "--batch-size", "4", "--no-progress", "--epochs", "2", "--lr", "1e-2"]
# adapter.json "config" keys of every session written before the option existed
OLD_CONFIG_KEYS = {"method", "sparsity", "top_k_heads", "rank", "alpha", "importance_samples", "qkv_bias"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _adapt(*args: str):
    result = runner.invoke(app, ["adapt", *args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """A tiny CLIP and one accepted session with --projection-rank 4 (and --save-full)."""
    root = tmp_path_factory.mktemp("proj")
    model, data = save_tiny("clip", root / "model"), write_toy_images(root / "data")
    r = _adapt("--data", str(data), "--workdir", str(root / "runs"), "--model", str(model),
               "--projection-rank", "4", "--save-full", str(root / "full"), *FAST)
    assert r.exit_code == 0, r.output
    return {"root": root, "model": model, "data": data, "runs": root / "runs",
            "session": root / "runs" / "sessions" / "0001"}


def _pixels(n: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _features(loaded, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return image_features(loaded.model, loaded.spec, pixels)


def _allowed(rec: dict, adapter: dict[str, torch.Tensor], path: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Entries of `path`'s weight its adapter may change: the selected fc1 entries or the selected heads' rows."""
    mask = torch.zeros(shape, dtype=torch.bool)
    if rec["kind"] == "sparse":
        mask.view(-1)[adapter[f"{path}.indices"].long()] = True
    else:
        mask[adapter[f"{path}.rows"].long()] = True
    return mask


def test_projection_changes_low_rank_and_the_tower_only_at_its_selection(site):
    """Catches the projection left out of the session file (or not trained), a dense projection update, and a
    tower tensor changed outside the selected fc1 entries / heads' rows (or a bias the method does not train)."""
    base = load_file(str(site["model"] / "model.safetensors"))
    encoder = load_file(str(site["session"] / "encoder.safetensors"))
    adapter = load_file(str(site["session"] / "adapter.safetensors"))
    doc = json.loads((site["session"] / "adapter.json").read_text())
    assert doc["config"]["projection_rank"] == 4 and doc["modules"][PROJ]["projection"] is True
    delta = encoder[f"{PROJ}.weight"] - base[f"{PROJ}.weight"]
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= 4  # LoRA, every row reachable
    for key, value in encoder.items():
        if key.startswith(f"{PROJ}."):
            continue
        path, _, leaf = key.rpartition(".")
        rec = doc["modules"].get(path)
        if rec is None or (leaf == "bias" and not rec["bias"]):
            assert torch.equal(value, base[key]), key
        elif leaf == "weight":
            outside = ~_allowed(rec, adapter, path, tuple(value.shape))
            assert torch.equal(value[outside], base[key][outside]), key
    full = load_file(str(site["root"] / "full" / "model.safetensors"))  # --save-full carries the projection
    assert torch.equal(full[f"{PROJ}.weight"], encoder[f"{PROJ}.weight"])
    assert all(torch.equal(full[k], v) for k, v in base.items() if k not in encoder)  # text side untouched


def test_merged_equals_unmerged_with_the_projection_wrapper(site):
    """Catches a projection wrapper that merge/unload skips or folds in differently from its forward."""
    loaded = load_model(str(site["model"]), "none")
    base_feats = _features(loaded, _pixels())
    load_adapter(site["session"], loaded.model, loaded.spec)
    proj = adapter_modules(loaded.model)[PROJ]
    assert isinstance(proj, HeadLoRALinear) and proj.rows.tolist() == list(range(proj.base.out_features))
    unmerged = _features(loaded, _pixels())
    unload(loaded.model)
    merged = _features(loaded, _pixels())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, base_feats, atol=1e-4)
    assert tensors_hash(encoder_state_dict(loaded.model, loaded.spec)) == _report(site["session"])["encoder_sha256"]


def _report(session: Path) -> dict:
    return json.loads((session / "report.json").read_text())


def test_rebuilt_session_equals_the_saved_one_and_onnx_matches(site, tmp_path):
    """Catches a rebuild (prune, then eval/rollback) or a reload that hashes the tower alone, a restored file
    without the projection, and an export that is not the adapted model's features through the projection."""
    runs = tmp_path / "runs"
    shutil.copytree(site["runs"], runs)
    saved = load_session_model(resolve_session(runs, "1"), "none")  # the stored encoder, hash-checked
    for verb in (["rollback", "base"], ["prune", "--keep", "0"]):
        res = runner.invoke(app, [*verb, "--workdir", str(runs)])
        assert res.exit_code == 0, res.output
    encoder_file = runs / "sessions" / "0001" / "encoder.safetensors"
    assert not encoder_file.exists()
    rebuilt = load_session_model(resolve_session(runs, "1"), "none")  # from the adapter, hash-checked
    assert torch.equal(_features(rebuilt, _pixels()), _features(saved, _pixels()))
    res = runner.invoke(app, ["rollback", "1", "--workdir", str(runs)])  # writes the encoder back
    assert res.exit_code == 0, res.output
    restored = load_file(str(encoder_file))
    assert restored.keys() == load_file(str(site["session"] / "encoder.safetensors")).keys()

    out = tmp_path / "enc.onnx"
    res = runner.invoke(app, ["export", "--workdir", str(runs), "--out", str(out)])
    assert res.exit_code == 0, res.output
    side = json.loads(Path(f"{out}.json").read_text())
    assert side["encoder_sha256"] == _report(site["session"])["encoder_sha256"]
    px = _pixels(4, seed=9)
    got = onnx_session(out.read_bytes()).run(None, {"pixel_values": px.numpy()})[0]
    want = _features(saved, px).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    base = load_model(str(site["model"]), "none")
    with torch.no_grad():
        saved.model.visual_projection.weight.copy_(base.model.visual_projection.weight)
    assert np.abs(got - _features(saved, px).numpy()).max() > 1e-3 * np.abs(want).max()  # the projection counts


def _trained_with_projection(rank: int = 4):
    """A tiny CLIP with lorsu's wrappers and the projection LoRA, all updates random and non-zero."""
    model = tiny_model("clip")
    spec = find_encoder(model)
    cfg = MethodConfig(method="lorsu", top_k_heads=2, rank=4, alpha=8, projection_rank=rank)
    grads = {p: torch.randn_like(model.get_submodule(p).weight) for b in spec.candidate_blocks
             for p in [b.fc1, *b.attn.values()]}
    inject(model, [*select_targets(spec, cfg, grads), projection_target(model, spec)], cfg)
    freeze(model, spec, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_scaled_session_scales_the_projection_product_exactly():
    """As test_forgetting's scaled merge, for the projection: forgetting alpha on its B (a session kept at
    alpha < 1 with the projection at full strength) or scaling A and B both (alpha^2)."""
    alpha = 0.25  # a power of two: alpha * (B A) == (alpha B) A bit for bit
    model = _trained_with_projection()
    proj = adapter_modules(model)[PROJ]
    w0, d1 = proj.base.weight.clone(), proj.delta_weight()
    assert proj.scaling == 8 / 4 and d1.abs().sum() > 0
    scaler = UpdateScaler(model)
    scaler.apply(0.5)
    scaler.apply(alpha)
    merge_all(model)
    assert torch.equal(proj.base.weight, w0 + alpha * d1)


def test_option_off_writes_the_files_it_always_wrote(site, tmp_path):
    """Catches a `projection_rank` key (or a projection tensor) leaking into sessions that do not use it:
    adapter.json, report.json and the session encoder are exactly the tower's, as before the option."""
    wd = tmp_path / "runs"
    r = _adapt("--data", str(site["data"]), "--workdir", str(wd), "--model", str(site["model"]), *FAST)
    assert r.exit_code == 0, r.output
    session = wd / "sessions" / "0001"
    doc = json.loads((session / "adapter.json").read_text())
    assert set(doc["config"]) == OLD_CONFIG_KEYS and set(_report(session)["method_config"]) == OLD_CONFIG_KEYS
    assert all(set(rec) <= {"shape", "block", "heads", "kind", "entries", "parts", "rank", "scaling", "rows", "bias"}
               and path.startswith("vision_model.") for path, rec in doc["modules"].items())
    assert all(k.startswith("vision_model.") for k in load_file(str(session / "adapter.safetensors")))
    encoder = load_file(str(session / "encoder.safetensors"))
    base = load_model(str(site["model"]), "none")
    assert set(encoder) == {k for k in base.model.state_dict() if k.startswith("vision_model.")}
    assert _report(session)["encoder_sha256"] == tensors_hash(encoder)
    assert base.spec.projection is None


@pytest.mark.parametrize("kind, flags, needle", [
    ("llava", [], "is a VLM"),
    ("llava", ["--loss", "clip", "--text-model", "{clip}"], "is a VLM"),
    ("clip_vision", [], "is a bare image encoder"),
    ("clip", ["--method", "spu"], "lorsu, lora"),
    ("clip", ["--method", "full"], "lorsu, lora"),
    ("clip", ["--projection-rank", "-1"], "projection_rank must be >= 0"),
])
def test_projection_rank_where_it_does_not_apply_is_one_line_exit_3(site, tmp_path, kind, flags, needle):
    """Catches the option silently ignored (or crashing later) on a model or method it does not fit."""
    model = site["model"] if kind == "clip" else save_tiny(kind, tmp_path / kind)
    flags = [f.replace("{clip}", str(site["model"])) for f in flags]
    r = _adapt("--data", str(site["data"]), "--workdir", str(tmp_path / "runs"), "--model", str(model),
               "--projection-rank", "4", *flags, *FAST)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 3 and len(errors) == 1 and needle in errors[0], r.output
    assert any(line.startswith("hint:") for line in r.output.splitlines())
    assert not (tmp_path / "runs" / "sessions").exists() or not any((tmp_path / "runs" / "sessions").iterdir())


def test_the_projection_is_found_by_structure_and_siglip_has_none():
    """SigLIP is a dual encoder whose image embedding is its tower's own head: refused, not half-adapted."""
    for kind in ("clip", "dual_dinov2"):
        model = tiny_model(kind)
        assert find_projection(model, find_encoder(model)) == PROJ
    siglip = tiny_model("siglip")
    with pytest.raises(UnsupportedModelError, match="no visual projection") as err:
        find_projection(siglip, find_encoder(siglip))
    assert "--projection-rank" in err.value.hint


def test_a_later_session_without_the_option_keeps_the_projection_in_its_lineage(site, tmp_path):
    """Catches a chained session that drops the adapted projection from its encoder (or its hashes): its
    base hash must be the parent's encoder hash, and its rebuild replays both adapters from the base model."""
    runs = tmp_path / "runs"
    shutil.copytree(site["runs"], runs)
    data = write_toy_images(tmp_path / "d2", seed=2)
    r = _adapt("--data", str(data), "--workdir", str(runs), *FAST)  # no --projection-rank this night
    assert r.exit_code == 0, r.output
    s1, s2 = _report(runs / "sessions" / "0001"), _report(runs / "sessions" / "0002")
    assert s2["base_encoder_sha256"] == s1["encoder_sha256"] and "projection_rank" not in s2["method_config"]
    parent = load_file(str(runs / "sessions" / "0001" / "encoder.safetensors"))
    child = load_file(str(runs / "sessions" / "0002" / "encoder.safetensors"))
    assert torch.equal(child[f"{PROJ}.weight"], parent[f"{PROJ}.weight"])
    for verb in (["rollback", "base"], ["prune", "--keep", "0"]):
        assert runner.invoke(app, [*verb, "--workdir", str(runs)]).exit_code == 0
    rebuilt = load_session_model(resolve_session(runs, "2"), "none")  # hash-checked inside
    assert tensors_hash(encoder_state_dict(rebuilt.model, rebuilt.spec)) == s2["encoder_sha256"]
