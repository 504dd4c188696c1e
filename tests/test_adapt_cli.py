"""`lorsu-edge adapt` end to end on tiny models, and every bad input's own error."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorsu_edge.cli.main import app
from lorsu_edge.load import bitsandbytes_status
from lorsu_edge.tiny import save_tiny, write_toy_images

runner = CliRunner()
SESSION_FILES = {"adapter.safetensors", "adapter.json", "encoder.safetensors", "report.json"}
FAST = ["--rank", "4", "--alpha", "8", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny("clip", tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny("llava", tmp_path_factory.mktemp("llava"))


def _adapt(*args):
    result = runner.invoke(app, ["adapt", *args])
    assert "Traceback" not in result.output
    return result


def _json_line(output: str) -> dict:
    """The --json result line (CliRunner mixes stderr, e.g. loading bars, into the output)."""
    return json.loads(output[output.rindex('{"'):].splitlines()[0])


def _session(workdir, sid="0001"):
    return workdir / "sessions" / sid


def _untouched_outside_encoder(base_dir, session_dir, prefix):
    """Base checkpoint tensors by in-memory name (4.57 saves LLaVA as `vision_tower.*`, loads as `model.vision_tower.*`)."""
    base = load_file(str(base_dir / "model.safetensors"))
    if prefix.startswith("model."):
        base = {("model." + k if not k.startswith(("model.", "lm_head")) else k): v for k, v in base.items()}
    encoder = load_file(str(session_dir / "encoder.safetensors"))
    assert encoder and all(k.startswith(prefix) for k in encoder)
    return base, encoder


def _check_report_matches_adapter(session_dir):
    report = json.loads((session_dir / "report.json").read_text())
    adapter = load_file(str(session_dir / "adapter.safetensors"))
    stored = sum(t.numel() for k, t in adapter.items() if not k.endswith((".indices", ".rows")))
    assert report["trainable_params"] == stored
    for key in ("method", "loss", "model", "samples_used", "samples_skipped", "encoder_params", "trainable_params",
                "steps", "loss_first", "loss_last", "seconds", "peak_memory_bytes"):
        assert key in report
    return report


def test_adapt_tiny_clip_overfits_and_touches_only_the_image_tower(tmp_path, clip_dir):
    data = write_toy_images(tmp_path / "data")
    wd = tmp_path / "runs"
    full = tmp_path / "full"
    r = _adapt("--data", str(data), "--workdir", str(wd), "--model", str(clip_dir), "--epochs", "10",
               "--lr", "3e-2", "--save-full", str(full), *FAST)
    assert r.exit_code == 0, r.output
    session = _session(wd)
    assert SESSION_FILES <= {p.name for p in session.iterdir()}
    report = _check_report_matches_adapter(session)
    assert report["loss"] == "clip" and report["samples_used"] == 8
    assert report["loss_last"] < report["loss_first"]
    base, encoder = _untouched_outside_encoder(clip_dir, session, "vision_model.")
    merged = load_file(str(full / "model.safetensors"))
    for k, v in base.items():  # text tower, projections, logit scale: bit-identical
        if not k.startswith("vision_model."):
            assert torch.equal(merged[k], v), k
    assert any(not torch.equal(encoder[k], base[k]) for k in encoder)
    assert all(torch.equal(encoder[k], merged[k]) for k in encoder)


@pytest.mark.skipif(bitsandbytes_status() is not None, reason="bitsandbytes unusable here")
def test_adapt_tiny_llava_ppl_through_4bit_llm(tmp_path, llava_dir):
    data = write_toy_images(tmp_path / "vqa", vqa=True)
    wd = tmp_path / "runs"
    r = _adapt("--data", str(data), "--workdir", str(wd), "--model", str(llava_dir), "--quantize", "4bit",
               "--epochs", "6", "--lr", "3e-2", *FAST)
    assert r.exit_code == 0, r.output
    session = _session(wd)
    report = _check_report_matches_adapter(session)
    assert report["loss"] == "ppl" and report["quantize"] == "4bit"
    assert report["loss_last"] < report["loss_first"]
    base, encoder = _untouched_outside_encoder(llava_dir, session, "model.vision_tower.")
    last_block = "model.vision_tower.vision_model.encoder.layers.2."  # unused: vision_feature_layer = -2
    assert all(torch.equal(encoder[k], base[k]) for k in encoder if k.startswith(last_block))
    assert any(not torch.equal(encoder[k], base[k]) for k in encoder)
    adapter = json.loads((session / "adapter.json").read_text())
    assert adapter["blocks_used"] == 2 and all(".layers.2." not in m for m in adapter["modules"])


def test_second_run_needs_no_model_and_chains(tmp_path, clip_dir):
    data1 = write_toy_images(tmp_path / "d1", seed=1)
    data2 = write_toy_images(tmp_path / "d2", seed=2)
    wd = tmp_path / "runs"
    assert _adapt("--data", str(data1), "--workdir", str(wd), "--model", str(clip_dir), "--epochs", "1",
                  "--lr", "1e-2", *FAST).exit_code == 0
    r = _adapt("--data", str(data2), "--workdir", str(wd), "--epochs", "1", "--lr", "1e-2", *FAST)
    assert r.exit_code == 0, r.output
    first = load_file(str(_session(wd, "0001") / "encoder.safetensors"))
    second = json.loads((_session(wd, "0002") / "adapter.json").read_text())
    from lorsu_edge.merge import tensors_hash
    assert second["base_encoder_sha256"] == tensors_hash(first)  # started from session 1's merged encoder
    again = _adapt("--data", str(data2), "--workdir", str(wd), *FAST)
    assert again.exit_code == 0 and "nothing to do" in again.output


def _bad(tmp_path, clip_dir, *extra, data=None):
    data = data or write_toy_images(tmp_path / "ok")
    return _adapt("--data", str(data), "--workdir", str(tmp_path / "runs"), "--model", str(clip_dir), *FAST, *extra)


def test_missing_data_dir(tmp_path, clip_dir):
    r = _bad(tmp_path, clip_dir, data=tmp_path / "nope")
    assert r.exit_code == 3 and "nope" in r.output and "hint:" in r.output


def test_malformed_manifest_names_file_and_line(tmp_path, clip_dir):
    data = write_toy_images(tmp_path / "vqa", vqa=True)
    lines = (data / "manifest.jsonl").read_text().splitlines()
    lines[2] = '{"image": "images/x.png", "question": '
    (data / "manifest.jsonl").write_text("\n".join(lines))
    r = _bad(tmp_path, clip_dir, data=data)
    assert r.exit_code == 3 and "manifest.jsonl" in r.output and "line 3" in r.output


def test_missing_field_names_the_field(tmp_path, clip_dir):
    data = tmp_path / "m"
    data.mkdir()
    (data / "manifest.jsonl").write_text('{"image": "a.png", "question": "q?"}\n')
    r = _bad(tmp_path, clip_dir, data=data)
    assert r.exit_code == 3 and "answer" in r.output and "line 1" in r.output


def test_no_usable_image(tmp_path, clip_dir):
    data = tmp_path / "corrupt"
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "a.png").write_bytes(b"not an image")
    r = _bad(tmp_path, clip_dir, data=data)
    assert r.exit_code == 3 and "usable" in r.output


def test_corrupt_image_is_skipped_and_counted(tmp_path, clip_dir):
    data = write_toy_images(tmp_path / "d")
    (data / "red" / "broken.png").write_bytes(b"\x89PNG broken")
    r = _bad(tmp_path, clip_dir, "--epochs", "1", data=data)
    assert r.exit_code == 0, r.output
    report = json.loads((_session(tmp_path / "runs") / "report.json").read_text())
    assert report["samples_skipped"] == 1 and "broken.png" in report["skipped"][0][0]


@pytest.mark.parametrize("flags, needle, code", [
    (["--method", "magic"], "--method", 2),  # not one of the choices: Typer refuses the flag (exit 2)
    (["--sparsity", "0"], "sparsity", 3),
    (["--loss", "ppl"], "needs a VLM", 3),
    (["--loss", "mse"], "--loss", 2),
    (["--quantize", "3bit"], "--quantize", 2),
    (["--precision", "fp16", "--device", "cpu"], "fp16", 3),
    (["--template", "a photo of {thing}"], "{label}", 3),
])
def test_bad_options(tmp_path, clip_dir, flags, needle, code):
    r = _bad(tmp_path, clip_dir, *flags)
    assert r.exit_code == code and needle in r.output, r.output


def test_wrong_model(tmp_path):
    import transformers as tf
    bert = tmp_path / "bert"
    tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                               vocab_size=50)).save_pretrained(bert)
    r = _adapt("--data", str(write_toy_images(tmp_path / "d")), "--workdir", str(tmp_path / "runs"),
               "--model", str(bert), *FAST)
    assert r.exit_code == 3 and "bert" in r.output


def test_workdir_remembers_its_model(tmp_path, clip_dir, llava_dir):
    data = write_toy_images(tmp_path / "d")
    assert _bad(tmp_path, clip_dir, "--epochs", "1", data=data).exit_code == 0
    r = _bad(tmp_path, llava_dir, data=write_toy_images(tmp_path / "d2", seed=3))
    assert r.exit_code == 3 and "another --workdir" in r.output


def test_vlm_with_clip_loss_through_text_model(tmp_path, llava_dir, clip_dir):
    """--loss clip on a VLM: its tower trains inside the matching dual encoder; the LLM is never loaded;
    the session's encoder uses the VLM's names and its unused last block stays untouched."""
    data = write_toy_images(tmp_path / "d")
    wd = tmp_path / "runs"
    r = _adapt("--data", str(data), "--workdir", str(wd), "--model", str(llava_dir), "--loss", "clip",
               "--text-model", str(clip_dir), "--epochs", "4", "--lr", "3e-2", *FAST)
    assert r.exit_code == 0, r.output
    base, encoder = _untouched_outside_encoder(llava_dir, _session(wd), "model.vision_tower.")
    assert set(encoder) == {k for k in base if k.startswith("model.vision_tower.")}
    changed = {k for k in encoder if not torch.equal(encoder[k], base[k])}
    assert changed and not any(".layers.2." in k for k in changed)
    # the next session chains from this one through the same mapping
    r2 = _adapt("--data", str(write_toy_images(tmp_path / "d2", seed=5)), "--workdir", str(wd), "--loss", "clip",
                "--text-model", str(clip_dir), "--epochs", "1", *FAST)
    assert r2.exit_code == 0, r2.output
    from lorsu_edge.merge import tensors_hash
    second = json.loads((_session(wd, "0002") / "adapter.json").read_text())
    assert second["base_encoder_sha256"] == tensors_hash(encoder)


def test_text_model_with_a_different_tower_is_refused(tmp_path, llava_dir):
    import transformers as tf
    other = tmp_path / "other"
    m = tf.CLIPModel(tf.CLIPConfig(vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                                      num_attention_heads=4, image_size=32, patch_size=8),
                                   text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, vocab_size=600)))
    m.save_pretrained(other)
    save_tiny("clip", tmp_path / "clipproc")  # borrow a processor
    import shutil
    for f in (tmp_path / "clipproc").glob("*.json"):
        if f.name not in ("config.json",):
            shutil.copy(f, other / f.name)
    shutil.copy(tmp_path / "clipproc" / "merges.txt", other / "merges.txt")
    r = _adapt("--data", str(write_toy_images(tmp_path / "d")), "--workdir", str(tmp_path / "runs"),
               "--model", str(llava_dir), "--loss", "clip", "--text-model", str(other), *FAST)
    assert r.exit_code == 3 and "differ" in r.output, r.output


def test_forgetting_guard_rejects_and_keeps_the_current_model(tmp_path, clip_dir):
    control = write_toy_images(tmp_path / "control", seed=11)
    wd = tmp_path / "runs"
    ok = _adapt("--data", str(write_toy_images(tmp_path / "d1", seed=1)), "--workdir", str(wd), "--model",
                str(clip_dir), "--control", str(control), "--epochs", "1", "--lr", "1e-6", *FAST, "--json")
    assert ok.exit_code == 0, ok.output
    first = _json_line(ok.output)
    assert first["status"] == "accepted" and "control_accuracy" in first
    # a threshold below zero rejects any session that does not improve the control set by > 1 point
    r = _adapt("--data", str(write_toy_images(tmp_path / "d2", seed=2)), "--workdir", str(wd), "--epochs", "1",
               "--lr", "1e-9", "--max-forgetting", "-1", *FAST, "--json")
    assert r.exit_code == 6, r.output
    line = _json_line(r.output)
    assert line["status"] == "rejected" and "control accuracy" in line["reason"]
    status = json.loads((_session(wd, "0002") / "status.json").read_text())
    assert status["status"] == "rejected"
    assert json.loads((wd / "current.json").read_text())["session"] == "0001"
    report = json.loads((_session(wd, "0002") / "report.json").read_text())
    assert report["control_accuracy_before"] == pytest.approx(first["control_accuracy"])


def test_eval_verb_scores_base_and_session(tmp_path, clip_dir):
    data = write_toy_images(tmp_path / "d")
    wd = tmp_path / "runs"
    assert _adapt("--data", str(data), "--workdir", str(wd), "--model", str(clip_dir), "--epochs", "1",
                  *FAST).exit_code == 0
    for extra in (["--base"], [], ["--session", "0001"]):
        r = runner.invoke(app, ["eval", "--data", str(data), "--workdir", str(wd), "--json", *extra])
        assert r.exit_code == 0, r.output
        line = _json_line(r.output)
        assert line["total"] == 8 and 0 <= line["accuracy"] <= 1 and line["metric"] == "zero-shot"
        assert line["session"] == (None if extra == ["--base"] else "0001")
    bad = runner.invoke(app, ["eval", "--data", str(data), "--workdir", str(wd), "--session", "0042"])
    assert bad.exit_code == 3 and "0042" in bad.output


def test_same_seed_same_encoder(tmp_path, clip_dir):
    data = write_toy_images(tmp_path / "d")
    hashes = []
    for run in ("a", "b"):
        r = _adapt("--data", str(data), "--workdir", str(tmp_path / run), "--model", str(clip_dir), "--epochs", "2",
                   "--lr", "1e-2", "--seed", "7", *FAST)
        assert r.exit_code == 0, r.output
        hashes.append(json.loads((_session(tmp_path / run) / "report.json").read_text())["encoder_sha256"])
    assert hashes[0] == hashes[1]


def test_non_finite_loss_stops_and_writes_no_session(tmp_path, clip_dir):
    wd = tmp_path / "runs"
    r = _adapt("--data", str(write_toy_images(tmp_path / "d")), "--workdir", str(wd), "--model", str(clip_dir),
               "--epochs", "3", "--lr", "1e20", "--max-grad-norm", "0", *FAST)
    assert r.exit_code == 9 and "non-finite" in r.output, r.output
    assert not [p for p in (wd / "sessions").iterdir()] if (wd / "sessions").exists() else True
    assert json.loads((wd / "current.json").read_text())["session"] is None


def test_broken_bitsandbytes_falls_back_with_a_note(tmp_path, llava_dir, monkeypatch):
    import lorsu_edge.load as load
    monkeypatch.setattr(load, "bitsandbytes_status", lambda: "RuntimeError: CUDA Setup failed")
    loaded = load.load_model(str(llava_dir), quantize="4bit")
    assert loaded.quantize == "none" and any("bitsandbytes is unusable" in n for n in loaded.notes)


def test_budget_too_small_is_refused_before_any_weight_is_read(tmp_path, clip_dir):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(clip_dir, model)
    (model / "model.safetensors").write_bytes(b"garbage: reading this would fail with exit 3")
    r = _adapt("--data", str(write_toy_images(tmp_path / "d")), "--workdir", str(tmp_path / "runs"),
               "--model", str(model), "--budget", "20MB", *FAST)
    assert r.exit_code == 4 and "budget" in r.output, r.output
    assert not (tmp_path / "runs" / "sessions").exists() or not any((tmp_path / "runs" / "sessions").iterdir())


def test_garbage_budget_and_unknown_profile(tmp_path, clip_dir):
    assert _bad(tmp_path, clip_dir, "--budget", "lots").exit_code == 3
    r = _bad(tmp_path, clip_dir, "--profile", "no-such-device")
    assert r.exit_code == 3 and "no-such-device" in r.output


def test_report_has_predicted_and_measured_peak(tmp_path, clip_dir):
    wd = tmp_path / "runs"
    r = _adapt("--data", str(write_toy_images(tmp_path / "d")), "--workdir", str(wd), "--model", str(clip_dir),
               "--budget", "8GB", "--epochs", "1", *FAST)
    assert r.exit_code == 0, r.output
    report = json.loads((_session(wd) / "report.json").read_text())
    assert report["predicted_peak_bytes"] > 0 and report["peak_memory_bytes"] > 0
    assert report["budget_bytes"] <= 8 * 10**9 and report["plan"]["micro_batch"] >= 1


def test_guard_allows_a_drop_of_exactly_the_limit():
    from lorsu_edge.adapt import guard

    # 400 control images: 1 point is 4 images; 0.62 - 0.61 is 0.010000000000000009 in floats
    ok, reason, fields = guard({"control": 0.62}, {"control": 0.61}, 1.0)
    assert ok and fields["forgetting_points"] == 1.0, reason
    ok, reason, _ = guard({"control": 0.62}, {"control": 0.6175}, 0.2)
    assert not ok and reason == "control accuracy fell 0.25 points (limit 0.2)"
    ok, reason, _ = guard({"control": 0.5}, {"control": 0.9}, 0.0)
    assert ok and reason == "control accuracy changed +40 points (limit -0)"
    assert guard({"control": 0.5}, {"control": 0.5}, 1.0)[1] == "control accuracy changed +0 points (limit -1)"


def test_guard_bounds_the_drift_from_the_base_model():
    from lorsu_edge.adapt import guard

    # each session within 1 point of the last, but 2.5 points below base in all
    ok, reason, fields = guard({"control": 0.615}, {"control": 0.605}, 1.0, base=0.63, max_total=2.0)
    assert not ok and reason == "control accuracy is 2.5 points below the base model's (limit 2)"
    assert fields["control_accuracy_base"] == 0.63 and fields["total_forgetting_points"] == 2.5
    ok, reason, _ = guard({"control": 0.615}, {"control": 0.605}, 1.0, base=0.63, max_total=3.0)
    assert ok and reason.endswith("; -2.5 vs base (limit -3)")
    assert guard({"control": 0.615}, {"control": 0.605}, 1.0)[0]  # no bound: the per-session check alone


def test_total_forgetting_bound_scores_the_base_once_and_is_remembered(tmp_path, clip_dir):
    control = write_toy_images(tmp_path / "control", seed=11)
    wd = tmp_path / "runs"

    def run(seed: int, *extra: str) -> dict:
        r = _adapt("--data", str(write_toy_images(tmp_path / f"d{seed}", seed=seed)), "--workdir", str(wd),
                   "--model", str(clip_dir), "--epochs", "1", "--lr", "1e-2", "--max-forgetting", "100", *FAST,
                   "--json", *extra)
        assert r.exit_code in (0, 6), r.output
        return _json_line(r.output)

    assert run(1)["status"] == "accepted"  # no control set yet: the encoder moves away from the base
    # the bound, first given with a control set: the base is scored with the base encoder, not session 1's
    line = run(2, "--control", str(control), "--max-total-forgetting", "-1000")
    assert line["status"] == "rejected" and "below the base model's (limit -1000)" in line["reason"]
    base = _json_line(runner.invoke(app, ["eval", "--data", str(control), "--workdir", str(wd), "--base",
                                          "--json"]).output)["accuracy"]
    report = json.loads((_session(wd, "0002") / "report.json").read_text())
    assert report["control_accuracy_base"] == pytest.approx(base)
    settings = json.loads((wd / "workdir.json").read_text())["settings"]
    assert settings["max_total_forgetting"] == -1000 and list(settings["base_scores"].values()) == [report[
        "control_accuracy_base"]]
    # remembered: the next run is bound without the flag; a new limit replaces it
    assert run(3)["status"] == "rejected"
    line = run(4, "--max-total-forgetting", "1000")
    assert line["status"] == "accepted" and "vs base (limit -1000)" in line["reason"]
