"""Deployment features of the export: int8-qdq (static Q/DQ, calibrated), preprocessor_config.json that
transformers loads, --fold-normalize, external data, the legacy fallback that says so, SIGTERM cleanup and
orphan removal, and a VLM export that never loads its language model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import lorsu_edge.export.request as request_mod
import lorsu_edge.export.trace as trace_mod
from lorsu_edge.consumer import image_features
from lorsu_edge.errors import BadInputError
from lorsu_edge.export import PREPROCESSOR_FILE, TOLERANCES, export_onnx, onnx_session
from lorsu_edge.export.inputs import image_batch
from lorsu_edge.families import find_encoder
from lorsu_edge.tiny import _image_processor, save_tiny, tiny_model, write_toy_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _images(folder: Path, n: int = 6) -> list[Path]:
    """Real PNG files with varied content (drawn gradients, seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        y, x = np.mgrid[0:40, 0:48]
        arr = np.stack([(x * (i + 3)) % 256, (y * (7 - i % 5)) % 256, rng.integers(0, 256, (40, 48))], -1)
        out.append(folder / f"{i}.png")
        Image.fromarray(arr.astype(np.uint8)).save(out[-1])
    return out


def _cos(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --- int8-qdq -------------------------------------------------------------------------------------------------


def test_int8_qdq_is_qdq_on_weight_matmuls_and_meets_its_bound(tmp_path):
    model = tiny_model("clip")
    spec, proc = find_encoder(model), _image_processor("clip")
    imgs = _images(tmp_path / "img")
    res = export_onnx(model, spec, proc, tmp_path / "q.onnx", precision="int8-qdq", sample_images=imgs[:3],
                      calibration_images=imgs)
    graph = onnx.load(str(res.path)).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "MatMulInteger" not in ops  # QDQ, not dynamic
    # symmetric int8 everywhere (TensorRT takes no other): every zero point is an int8 zero
    zps = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_zero_point")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    # per-channel weights: some weight scale is a vector
    assert any(onnx.numpy_helper.to_array(t).ndim == 1 for t in graph.initializer if t.name.endswith("_scale"))
    # q/k/v and fc1 take two dequantized inputs; the attention's products (softmax x V) stay float
    producer = {o: n.op_type for n in graph.node for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    dq_inputs = [sum(producer.get(i) == "DequantizeLinear" for i in n.input) for n in matmuls]
    attention = [n for n in matmuls if producer.get(n.input[0]) == "Softmax"]
    assert 2 in dq_inputs and attention
    assert not any(producer.get(i) == "DequantizeLinear" for n in attention for i in n.input)
    assert res.metadata["calibration"]["images"] == len(imgs)
    b = image_batch(proc, imgs)
    with torch.no_grad():
        ref = image_features(model, spec, b.pixels).numpy()
    assert _cos(ref, onnx_session(res.path).run(None, {"pixel_values": b.feed})[0]).min() >= \
        TOLERANCES["int8-qdq"].min_cosine


def test_smoothquant_fold_keeps_the_float_graph_and_int8_qdq_leaves_the_last_block_float(tmp_path):
    from lorsu_edge.export.precision import MLP_OUT_INPUTS, smooth_layer_norms, weight_matmuls

    model = tiny_model("clip")
    with torch.no_grad():  # non-zero LayerNorm biases (init: zeros), so a fold that forgets them shows
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.bias.normal_(0, 0.5)
    spec, proc = find_encoder(model), _image_processor("clip")
    imgs = _images(tmp_path / "img")
    src = export_onnx(model, spec, proc, tmp_path / "f.onnx", precision="fp32", sample_images=imgs[:3]).path
    feed = image_batch(proc, imgs).feed
    dst = tmp_path / "smoothed.onnx"
    assert smooth_layer_norms(src, dst, False, [feed[:3], feed[3:]], 0.75) > 0
    # the fold moves scale between LayerNorms and the next weights: weights change, outputs do not
    before = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    assert any(k in before and not np.array_equal(before[k], v) for k, v in after.items())
    out_src = onnx_session(src).run(None, {"pixel_values": feed})[0]
    out_dst = onnx_session(dst).run(None, {"pixel_values": feed})[0]
    np.testing.assert_allclose(out_dst, out_src, rtol=1e-4, atol=1e-5 * np.abs(out_src).max())
    # int8-qdq quantizes a prefix of the weight MatMuls (fc2 excepted): the last block and the head stay float
    graph = onnx.load(str(dst)).graph
    weights = {t.name for t in graph.initializer}
    producer = {o: n.op_type for n in graph.node for o in n.output}
    candidates = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)
                  and producer.get(n.input[0]) not in MLP_OUT_INPUTS]
    chosen = weight_matmuls(dst)
    assert 0 < len(chosen) < len(candidates) and chosen == candidates[:len(chosen)]


def test_int8_qdq_without_images_is_refused_before_writing(tmp_path):
    model = tiny_model("clip_vision")
    with pytest.raises(BadInputError, match="calibrates"):
        export_onnx(model, find_encoder(model), _image_processor("clip_vision"), tmp_path / "q.onnx",
                    precision="int8-qdq")
    assert list(tmp_path.iterdir()) == []


def test_fp16_keeps_layernorm_and_its_reductions_fp32(tmp_path):
    """TensorRT --stronglyTyped builds the types the graph has: LayerNorm (or its decomposed ReduceMean/Pow) in
    fp16 would overflow on large activations. Shape inference must also succeed: the converter used to leave
    stale fp32 value_info on tensors it made fp16."""
    model = tiny_model("clip_vision")
    res = export_onnx(model, find_encoder(model), _image_processor("clip_vision"), tmp_path / "h.onnx",
                      precision="fp16", opset=17)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(res.path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    guarded = [n for n in graph.node if n.op_type in ("LayerNormalization", "ReduceMean", "Pow")]
    assert guarded
    for n in guarded:
        known = [types[i] for i in n.input if i in types]
        assert known and all(t == onnx.TensorProto.FLOAT for t in known), n.name


# --- preprocessor_config.json and --fold-normalize ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "dual_dinov2", "llava"])
def test_preprocessor_config_round_trips_through_transformers(kind, tmp_path):
    from transformers import AutoImageProcessor

    model = tiny_model(kind)
    proc = _image_processor(kind)
    res = export_onnx(model, find_encoder(model), proc, tmp_path / "e.onnx")
    assert res.metadata["preprocessor_config"] == PREPROCESSOR_FILE
    loaded = AutoImageProcessor.from_pretrained(tmp_path, use_fast=False)
    assert type(loaded) is type(getattr(proc, "image_processor", proc))
    imgs = [Image.open(p).convert("RGB") for p in _images(tmp_path / "img", 3)]
    ours = loaded(images=imgs, return_tensors="pt")["pixel_values"]
    theirs = getattr(proc, "image_processor", proc)(images=imgs, return_tensors="pt")["pixel_values"]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("fold", ["uint8", "float"])
def test_fold_normalize_takes_raw_pixels_with_parity(fold, tmp_path):
    from transformers import AutoImageProcessor

    model = tiny_model("clip")
    spec, proc = find_encoder(model), _image_processor("clip")
    imgs = _images(tmp_path / "img", 4)
    res = export_onnx(model, spec, proc, tmp_path / "f" / "e.onnx", fold_normalize=fold, sample_images=imgs[:3])
    inp = onnx.load(str(res.path)).graph.input[0].type.tensor_type.elem_type
    assert inp == (onnx.TensorProto.UINT8 if fold == "uint8" else onnx.TensorProto.FLOAT)
    assert res.metadata["input"]["dtype"] == ("uint8" if fold == "uint8" else "float32")
    # the folder's processor yields the raw input; the model's own processor what PyTorch is fed
    raw_proc = AutoImageProcessor.from_pretrained(tmp_path / "f", use_fast=False)
    pil = [Image.open(p).convert("RGB") for p in imgs]
    raw = raw_proc(images=pil, return_tensors="np")["pixel_values"]
    raw = raw.round().astype(np.uint8) if fold == "uint8" else raw.astype(np.float32)
    if fold == "uint8":
        assert raw.max() > 1  # really 0..255, not rescaled
    else:
        assert 0 <= raw.min() and raw.max() <= 1
    got = onnx_session(res.path).run(None, {"pixel_values": raw})[0]
    with torch.no_grad():
        ref = image_features(model, spec, proc(images=pil, return_tensors="pt")["pixel_values"]).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_infer_script_runs_a_folded_uint8_export(tmp_path):
    """export/infer_onnx.py follows the sidecar: raw uint8 pixels into a folded graph, same result as PyTorch."""
    model = tiny_model("clip")
    spec, proc = find_encoder(model), _image_processor("clip")
    png = _images(tmp_path / "img", 1)[0]
    res = export_onnx(model, spec, proc, tmp_path / "f" / "e.onnx", fold_normalize="uint8")
    run = subprocess.run([sys.executable, str(ROOT / "export" / "infer_onnx.py"), str(res.path), str(png)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = np.array(json.loads(run.stdout)["results"][0]["embedding"], dtype=np.float32)
    with torch.no_grad():
        ref = image_features(model, spec, proc(images=[Image.open(png).convert("RGB")],
                                               return_tensors="pt")["pixel_values"]).numpy()[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_other_preprocessing_in_the_folder_is_refused(tmp_path):
    """A folded and a plain export in one folder would share one preprocessor_config.json: one of them wrong."""
    model = tiny_model("clip_vision")
    spec, proc = find_encoder(model), _image_processor("clip_vision")
    export_onnx(model, spec, proc, tmp_path / "a.onnx")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(BadInputError, match="other preprocessing"):
        export_onnx(model, spec, proc, tmp_path / "b.onnx", fold_normalize="uint8")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- dynamo, external data, the legacy fallback ----------------------------------------------------------


def test_external_data_path_on_a_tiny_model(tmp_path):
    """The > 2 GiB path, exercised by lowering the threshold: one `.data` file, referenced by the graph, proven,
    and replaced (never shared) by the next export to the same path."""
    model = tiny_model("dinov2")
    spec, proc = find_encoder(model), _image_processor("dinov2")
    out = tmp_path / "big.onnx"
    first = export_onnx(model, spec, proc, out, external_data_over=0)
    data = first.metadata["external_data"]
    assert data and (tmp_path / data).is_file() and data.endswith(".data")
    graph = onnx.load(str(out), load_external_data=False).graph
    assert max(len(t.raw_data) for t in graph.initializer) < 1024  # every sizeable weight is in the .data file
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {data}
    second = export_onnx(model, spec, proc, out, external_data_over=0, precision="fp16")
    assert second.metadata["external_data"] != data and not (tmp_path / data).exists()  # the old one removed
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = image_features(model, spec, px).numpy()
    assert _cos(ref, onnx_session(out).run(None, {"pixel_values": px.numpy()})[0]).min() >= 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, f"{out.name}.json", second.metadata["external_data"], PREPROCESSOR_FILE])


def test_int8_qdq_with_external_data(tmp_path):
    """SmoothQuant's activation probe reads a graph whose weights live in a .data file (a > 2 GiB tower)."""
    model = tiny_model("clip")
    spec, proc = find_encoder(model), _image_processor("clip")
    imgs = _images(tmp_path / "img")
    res = export_onnx(model, spec, proc, tmp_path / "out" / "q.onnx", precision="int8-qdq", sample_images=imgs[:3],
                      calibration_images=imgs, external_data_over=0)
    assert res.metadata["external_data"] and "DequantizeLinear" in {n.op_type for n in onnx.load(str(res.path)).graph.node}


def test_dynamo_failure_falls_back_to_legacy_and_says_so(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("torch.export cannot trace this")

    monkeypatch.setattr(trace_mod, "_dynamo", broken)
    model = tiny_model("vit")
    res = export_onnx(model, find_encoder(model), _image_processor("vit"), tmp_path / "l.onnx")
    assert res.metadata["exporter"] == "torchscript (legacy fallback)"
    assert "cannot trace this" in res.metadata["exporter_fallback_reason"]
    assert res.notes and "legacy" in res.notes[0]
    assert any("legacy TorchScript exporter" in r.getMessage() for r in caplog.records)
    assert all(p.rel_max_abs <= TOLERANCES["fp32"].max_rel_abs for p in res.parity)


def test_sigterm_while_tracing_is_not_taken_for_a_dynamo_failure(tmp_path, monkeypatch):
    """The fallback catches the exporter's exceptions; the SIGTERM handler's InterruptedRunError must pass."""
    from lorsu_edge.errors import InterruptedRunError

    def interrupted(*args, **kwargs):
        raise InterruptedRunError("stopped by SIGTERM")

    monkeypatch.setattr(trace_mod, "_dynamo", interrupted)
    monkeypatch.setattr(trace_mod, "_legacy", lambda *a, **k: pytest.fail("fell back to the legacy exporter"))
    model = tiny_model("clip_vision")
    with pytest.raises(InterruptedRunError):
        export_onnx(model, find_encoder(model), _image_processor("clip_vision"), tmp_path / "e.onnx")
    assert list(tmp_path.iterdir()) == []


# --- SIGTERM, orphans, and loading only what is exported ---------------------------------------------------


_CHILD = """
import sys, time
import lorsu_edge.export.precision as p
from lorsu_edge.cli.main import app
real = p.to_precision
def slow(*a, **k):
    out = real(*a, **k)
    print("CONVERTED", flush=True)
    time.sleep(120)
    return out
p.to_precision = slow
app(["export", "--base", "--model", sys.argv[1], "--workdir", sys.argv[2], "--out", sys.argv[3]])
"""


def test_sigterm_during_export_removes_temp_files_and_exits_130(tmp_path):
    out = tmp_path / "exp" / "enc.onnx"
    out.parent.mkdir()
    orphan = out.parent / ".enc.onnx.tmp-999999999-dead"  # an earlier run's scratch (pid gone)
    orphan.mkdir()
    (orphan / "fp32.onnx").write_bytes(b"x" * 100)
    model_dir = save_tiny("clip_vision", tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(model_dir), str(tmp_path / "none"), str(out)],
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while "CONVERTED" not in line and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line or child.poll() is None, child.stderr.read()
        assert any(p.name.startswith(".enc.onnx.tmp-") and p != orphan for p in out.parent.iterdir())  # mid-export
        assert not orphan.exists()  # removed when the export started
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err  # the verb's interrupted code, through the real CLI
    assert "stopped by SIGTERM" in err and "nothing was written" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []


def test_vlm_export_never_loads_the_language_model(tmp_path, monkeypatch):
    """Exporting a LLaVA used to load the whole VLM (a bf16 7B LLM on an 8 GB Orin without bitsandbytes)."""
    from lorsu_edge import load

    model_dir = save_tiny("llava", tmp_path / "llava")
    loaded = request_mod.load_vlm_image_path(str(model_dir))
    lm = loaded.model.get_submodule("model.language_model") if hasattr(loaded.model, "model") else None
    lm_params = list((lm or loaded.model.language_model).parameters())
    assert lm_params and all(p.is_meta for p in lm_params)  # a skeleton: no memory, no weights read
    assert not any(p.is_meta for p in loaded.spec.tower.parameters())
    full = load.load_model(str(model_dir), "none")
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for proj in (False, True):
            assert torch.equal(image_features(loaded.model, loaded.spec, px, proj),
                               image_features(full.model, full.spec, px, proj))

    def no_full_load(*a, **k):
        raise AssertionError("export loaded the whole VLM")

    monkeypatch.setattr(request_mod, "load_model", no_full_load)
    res, _ = request_mod.export_request(request_mod.ExportRequest(
        workdir=tmp_path / "none", base=True, model=str(model_dir), with_projector=True, out=tmp_path / "v.onnx"))
    assert res.metadata["output"]["name"] == "projected_features"


def test_cli_choices_and_defaults_match_the_library():
    """The verb writes its choices and defaults out (fast --help, no torch import): they must not drift."""
    import inspect
    from typing import get_args

    from lorsu_edge.cli import choices
    from lorsu_edge.cli import export as verb
    from lorsu_edge.export import DEFAULT_OPSET, PRECISIONS
    from lorsu_edge.export.inputs import FOLDS

    assert get_args(choices.ExportPrecision) == PRECISIONS and get_args(choices.Fold) == FOLDS
    assert inspect.signature(verb.command).parameters["opset"].default == DEFAULT_OPSET


def test_cli_int8_qdq_calibrates_on_session_and_control_images(tmp_path):
    from typer.testing import CliRunner

    from lorsu_edge.cli.main import app

    runner = CliRunner()
    model_dir = save_tiny("clip", tmp_path / "model")
    data, control = write_toy_images(tmp_path / "data"), write_toy_images(tmp_path / "control")
    wd = tmp_path / "runs"
    r = runner.invoke(app, ["adapt", "--data", str(data), "--control", str(control), "--workdir", str(wd),
                            "--model", str(model_dir), "--rank", "4", "--alpha", "8", "--batch-size", "4",
                            "--epochs", "1", "--lr", "1e-3", "--no-progress", "--max-forgetting", "100"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", "--workdir", str(wd), "--precision", "int8-qdq", "--json"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) == 1  # one JSON line: the quantizer's own prints are kept out
    side = json.loads(Path(json.loads(r.output.strip().splitlines()[-1])["sidecar"]).read_text())
    n_data = sum(1 for p in data.rglob("*.png"))
    n_control = sum(1 for p in control.rglob("*.png"))
    assert side["calibration"]["images"] == min(64, n_data + n_control) and side["precision"] == "int8-qdq"
