"""Night after night through `lorsu-edge adapt`: a real forgetting case scaled (and reproduced bit for bit by the
saved adapter, eval and export), replay across nights, anchors, remembered labels, per-night seeds."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorsu_edge.adapter import load_adapter
from lorsu_edge.cli.main import app
from lorsu_edge.families import find_encoder
from lorsu_edge.merge import encoder_state_dict, unload
from lorsu_edge.replay import REPLAY_DIR, read_buffer
from lorsu_edge.tiny import save_knowing_clip, save_tiny, write_toy_images

runner = CliRunner()
FAST = ["--rank", "4", "--alpha", "8", "--batch-size", "4", "--no-progress", "--json"]
COLORS = ("red", "blue", "green", "yellow")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    return {
        "root": root, "model": save_knowing_clip(root / "model", COLORS),
        "control": write_toy_images(root / "control", labels=("red", "blue"), per_class=6, seed=9),
        # new names for the control's colours: learning them hard overwrites what red and blue look like
        "night": write_toy_images(root / "night", labels=("crimson", "navy"), per_class=4, seed=3),
        "night2": write_toy_images(root / "night2", labels=("crimson", "navy"), per_class=2, seed=4),
    }


def _adapt(world, wd, data, *args):
    r = runner.invoke(app, ["adapt", "--data", str(data), "--workdir", str(wd), "--model", str(world["model"]),
                            "--control", str(world["control"]), *args, *FAST])
    assert "Traceback" not in r.output, r.output
    return r, json.loads(r.output[r.output.rindex('{"'):].splitlines()[0])


def _report(wd, sid):
    return json.loads((wd / "sessions" / sid / "report.json").read_text())


@pytest.fixture(scope="module")
def scaled(world):
    """One session that forgets half the control at alpha = 1 and is kept scaled."""
    wd = world["root"] / "scaled"
    r, line = _adapt(world, wd, world["night"], "--lr", "3e-2", "--epochs", "10", "--replay", "4",
                     "--class-weight", "0.5")
    assert r.exit_code == 0, r.output
    return wd, line


def test_a_real_forgetting_case_is_caught_and_kept_scaled(scaled):
    wd, line = scaled
    report = _report(wd, "0001")
    tried = report["scale_search"]
    assert line["guard"] == "scaled" == report["guard"] and line["status"] == "accepted" and report["accepted"]
    assert tried[0]["alpha"] == 1.0 and not tried[0]["passed"] and tried[0]["control"] <= 0.9  # a real drop
    assert 0 < report["alpha"] < 1 and len(tried) <= 5
    best = max(p["alpha"] for p in tried if p["passed"])
    assert report["alpha"] == best and report["control_accuracy"] >= report["control_accuracy_before"] - 0.01
    assert json.loads((wd / "sessions" / "0001" / "adapter.json").read_text())["alpha"] == report["alpha"]
    assert json.loads((wd / "current.json").read_text())["session"] == "0001"
    shown = runner.invoke(app, ["history", "--workdir", str(wd)])
    assert f"scaled: alpha {report['alpha']:g}" in shown.output


def test_the_saved_adapter_eval_and_export_reproduce_the_scaled_encoder(world, scaled):
    """Catches scaling after the adapter was saved (or the encoder hashed): the files would disagree."""
    from transformers import CLIPModel

    wd, _ = scaled
    session = wd / "sessions" / "0001"
    model = CLIPModel.from_pretrained(world["model"]).eval()
    spec = find_encoder(model)
    load_adapter(session, model, spec)
    unload(model)
    saved = load_file(str(session / "encoder.safetensors"))
    rebuilt = encoder_state_dict(model, spec)
    assert saved.keys() == rebuilt.keys() and all(torch.equal(saved[k], rebuilt[k]) for k in saved)

    ev = runner.invoke(app, ["eval", "--data", str(world["control"]), "--workdir", str(wd), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output.strip().splitlines()[-1])["accuracy"] == _report(wd, "0001")["control_accuracy"]
    ex = runner.invoke(app, ["export", "--onnx", "--workdir", str(wd)])
    assert ex.exit_code == 0, ex.output
    assert "parity vs PyTorch" in ex.output


def test_replay_buffer_grows_with_accepted_nights_only(world, scaled, tmp_path):
    wd, _ = scaled
    first = read_buffer(wd / "sessions" / "0001")
    assert {e.label for e in first} == {"crimson", "navy"} and len(first) == 8
    inbox = tmp_path / "inbox"
    shutil.copytree(world["night2"], inbox)
    r, line = _adapt(world, wd, inbox, "--lr", "1e-3", "--epochs", "2", "--replay", "4", "--max-forgetting", "100",
                     "--class-weight", "0.5")
    assert r.exit_code == 0, r.output
    shutil.rmtree(inbox)  # the inbox may be emptied: the buffer holds its own copies
    report = _report(wd, "0002")
    assert report["replayed"] == 4 and report["samples_used"] == 4
    assert report["steps"] == 2 * 2  # (4 new + 4 replayed) / batch 4, 2 epochs
    assert len(read_buffer(wd / "sessions" / "0002")) == 12
    assert report["train_config"]["seed"] != _report(wd, "0001")["train_config"]["seed"]  # each night its own seed
    assert report["seed_given"] == 0

    night3 = write_toy_images(tmp_path / "n3", labels=("crimson", "navy"), per_class=3, seed=11)
    # The rejection is forced (a limit no session meets): this test is about what a rejected night stores; a real
    # forgetting case is test_a_real_forgetting_case_is_caught_and_kept_scaled. At lr 3e-2 alone it depended on
    # rounding: accepted at +0 points in a full-suite run, rejected when run alone.
    r, line = _adapt(world, wd, night3, "--lr", "3e-2", "--epochs", "10", "--replay", "4", "--on-forgetting",
                     "reject", "--class-weight", "0", "--max-forgetting", "-100")
    assert r.exit_code == 6 and line["status"] == "rejected", r.output
    assert not (wd / "sessions" / "0003" / REPLAY_DIR).exists()  # a rejected night never enters the buffer
    assert json.loads((wd / "workdir.json").read_text())["settings"]["labels"] == ["crimson", "navy"]
    assert report["known_classes"] == 4  # the nights' labels + the control's red and blue


def test_anchors_are_remembered_and_must_not_overlap_the_control(world, tmp_path):
    anchors = write_toy_images(tmp_path / "anchors", labels=COLORS, per_class=2, seed=21)
    wd = tmp_path / "runs"
    r, _ = _adapt(world, wd, world["night2"], "--anchor", str(anchors), "--anchor-samples", "6", "--lr", "1e-3",
                  "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert _report(wd, "0001")["anchors"] == 6
    r, _ = _adapt(world, wd, world["night"], "--lr", "1e-3", "--epochs", "1")  # no --anchor: remembered
    assert r.exit_code == 0 and _report(wd, "0002")["anchors"] == 8  # all 8 (default limit 100)
    r = runner.invoke(app, ["adapt", "--data", str(world["night"]), "--workdir", str(tmp_path / "other"), "--model",
                            str(world["model"]), "--control", str(world["control"]), "--anchor",
                            str(world["control"]), *FAST])
    assert r.exit_code == 3 and "shares images with the control set" in r.output


def test_perplexity_path_with_anchor_replay_and_the_scale_guard(tmp_path):
    """--loss ppl: anchors distil the features the projector reads, replay and the guard run, and only fc1's
    bias trains (the research code's perplexity variant), unless --qkv-bias says otherwise."""
    llava = save_tiny("llava", tmp_path / "llava")
    anchors = write_toy_images(tmp_path / "anchors", labels=("green",), per_class=3, seed=8)
    control = write_toy_images(tmp_path / "control", per_class=2, seed=9, vqa=True)
    wd = tmp_path / "runs"
    for i, extra in enumerate([["--anchor", str(anchors), "--max-forgetting", "100"], ["--qkv-bias"]]):
        data = write_toy_images(tmp_path / f"n{i}", per_class=2, seed=i, vqa=True)
        r = runner.invoke(app, ["adapt", "--data", str(data), "--workdir", str(wd), "--model", str(llava),
                                "--control", str(control), "--replay", "2", "--epochs", "2", "--lr", "1e-3",
                                "--quantize", "none", *extra, *FAST])
        assert r.exit_code in (0, 6), r.output
        assert "Traceback" not in r.output
    first, second = _report(wd, "0001"), _report(wd, "0002")
    assert first["anchors"] == 3 and first["guard"] == "accepted" and second["anchors"] == 3
    assert first["known_classes"] == 0  # the class-aware term is for the contrastive loss
    biases = [{m["kind"]: m["bias"] for m in json.loads((wd / "sessions" / s / "adapter.json").read_text())
               ["modules"].values() if m["kind"] == "lora"} for s in ("0001", "0002")]
    assert biases == [{"lora": False}, {"lora": True}]
    assert first["method_config"]["qkv_bias"] is False and second["method_config"]["qkv_bias"] is True
    assert second["replayed"] == 2 and second["guard"] in ("accepted", "scaled", "rejected")


def test_replayed_samples_enter_the_importance_pass_too(world, tmp_path, monkeypatch):
    """Catches replay mixed into training only: the parameters would be chosen for tonight's classes alone."""
    import lorsu_edge.adapt as adapt_module

    wd = tmp_path / "runs"
    r, _ = _adapt(world, wd, world["night2"], "--replay", "3", "--epochs", "1", "--lr", "1e-3",
                  "--max-forgetting", "100")
    assert r.exit_code == 0, r.output
    scored = []
    real = adapt_module.compute_importance

    def spy(model, paths, batches, objective, n, *args, **kwargs):
        scored.append(n)
        return real(model, paths, batches, objective, n, *args, **kwargs)

    monkeypatch.setattr(adapt_module, "compute_importance", spy)
    night = write_toy_images(tmp_path / "n", labels=("crimson",), per_class=2, seed=13)
    r, _ = _adapt(world, wd, night, "--replay", "3", "--epochs", "1", "--lr", "1e-3", "--max-forgetting", "100")
    assert r.exit_code == 0, r.output
    assert scored == [2 + 3] and _report(wd, "0002")["replayed"] == 3


def test_perplexity_night_is_scaled_through_the_vlms_merged_tower(tmp_path, monkeypatch):
    """The scale search on a --loss ppl night (LoRA + fc1 bias deltas inside a VLM): every judged point sees the
    VLM's tower merged at that alpha, the largest passing alpha is kept, and the saved encoder is exactly
    start + alpha * (trained - start). A synthetic control falls 10 points per unit of the tower's distance
    from the night-start tower (a random tiny VLM answers nothing right, so it has nothing real to forget)."""
    import lorsu_edge.adapt as adapt_module

    llava = save_tiny("llava", tmp_path / "llava")
    towers: list[dict[str, torch.Tensor]] = []

    def synthetic_scores(loaded, sets, device, precision, known=None):
        towers.append(_merged_tower(loaded))
        start = towers[0]
        moved = next((t for t in towers if any(not torch.equal(t[k], start[k]) for k in t)), None)
        ratio = 0.0 if moved is None else _distance(towers[-1], start) / _distance(moved, start)
        return {"control": 0.9 - 0.1 * ratio, **({"target": 0.2 + 0.1 * ratio} if "target" in sets else {})}

    monkeypatch.setattr(adapt_module, "score_sets", synthetic_scores)
    wd = tmp_path / "runs"
    r = runner.invoke(app, ["adapt", "--data", str(write_toy_images(tmp_path / "n", per_class=2, vqa=True)),
                            "--workdir", str(wd), "--model", str(llava), "--loss", "ppl", "--quantize", "none",
                            "--control", str(write_toy_images(tmp_path / "c", per_class=2, seed=9, vqa=True)),
                            "--eval", str(write_toy_images(tmp_path / "e", per_class=2, seed=10, vqa=True)),
                            "--max-forgetting", "6", "--epochs", "2", "--lr", "1e-2", *FAST])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    report = _report(wd, "0001")
    assert report["guard"] == "scaled" and report["alpha"] == 9 / 16  # drop 10 * alpha points <= 6
    assert [p["alpha"] for p in report["scale_search"]][0] == 1.0 and len(report["scale_search"]) <= 5
    start, trained = towers[0], next(t for t in towers if any(not torch.equal(t[k], towers[0][k]) for k in t))
    saved = load_file(str(wd / "sessions" / "0001" / "encoder.safetensors"))
    assert set(saved) == set(start)
    for k in start:
        torch.testing.assert_close(saved[k], start[k] + 9 / 16 * (trained[k] - start[k]), atol=1e-6, rtol=1e-5)


def _merged_tower(loaded) -> dict[str, torch.Tensor]:
    """The tower's weights as the judge sees them: while a point is scored the adapters are merged into their
    base layers (`x.base.weight`), so take those under the plain names and leave the adapter tensors out."""
    adapter = ("delta", "lora_A", "lora_B", "bias_delta")
    return {k.replace(".base.", "."): v.detach().clone() for k, v in loaded.model.state_dict().items()
            if k.startswith(loaded.spec.param_prefix) and k.rsplit(".", 1)[-1] not in adapter
            and v.is_floating_point()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
