"""The demo's pipeline (data -> sessions guarded by a control set -> export -> table and plot) on a tiny model."""

import importlib.util
import json

import pytest

from lorsu_edge.config import MethodConfig
from lorsu_edge.demo import PLOT_FILE, SUMMARY_FILE, DemoData, DemoOptions, run_demo, split_per_class
from lorsu_edge.errors import BadInputError
from lorsu_edge.tiny import save_tiny, write_toy_images
from lorsu_edge.train import TrainConfig


def toy_data(opts: DemoOptions, root) -> DemoData:
    sessions = [write_toy_images(root / f"s{i}", per_class=opts.shots, seed=i) for i in range(opts.sessions)]
    return DemoData(sessions, write_toy_images(root / "eval", per_class=opts.eval_per_class, seed=50),
                    write_toy_images(root / "control", labels=("green", "yellow"), per_class=2, seed=60))


def assert_guarded(rows: list[dict], max_forgetting: float, eval_sizes: tuple[int, int]) -> str | None:
    """Each row is accepted iff its control accuracy fell at most `max_forgetting` points below the current
    model's (the last accepted row's, or the base's); accuracies are counts over the eval sets. Returns the
    last accepted session (what is exported) or None."""
    current, last = rows[0]["control"], None
    for r in rows:
        for key, n in zip(("target", "control"), eval_sizes):
            assert r[key] * n == pytest.approx(round(r[key] * n)), f"{key} {r[key]} is not a count out of {n}"
    for r in rows[1:]:
        fell = 100 * (current - r["control"])
        assert r["status"] == ("accepted" if fell <= max_forgetting + 1e-9 else "rejected"), (r, current)
        if r["status"] == "accepted":
            current, last = r["control"], f"{r['session']:04d}"
    return last


def test_demo_pipeline_on_a_tiny_model(tmp_path):
    """Catches a guard that compares with the wrong model (base, or the last rejected session), a wrong
    accuracy denominator and an export of anything but the last accepted session."""
    model = save_tiny("clip", tmp_path / "clip")
    opts = DemoOptions(workdir=tmp_path / "demo", model=str(model), sessions=3, shots=2, eval_per_class=2,
                       method=MethodConfig(rank=4, alpha=4), train=TrainConfig(epochs=2, batch_size=4, lr=3e-2),
                       max_forgetting=0, show_progress=False)  # 4.57: accepted, accepted at +0 points, rejected
    summary = run_demo(opts, make_data=toy_data)
    rows = summary["rows"]
    assert [r["session"] for r in rows] == ["base", 1, 2, 3]
    exported = assert_guarded(rows, opts.max_forgetting, (2 * opts.eval_per_class, 2 * 2))
    assert summary["export"]["session"] == exported and summary["export"]["max_abs_diff"] < 1e-3
    assert (tmp_path / "demo" / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "demo" / SUMMARY_FILE).read_text())["rows"] == rows
    with pytest.raises(BadInputError, match="already holds"):
        run_demo(opts, make_data=toy_data)


def test_split_per_class_is_disjoint_and_sized():
    items = [(f"img{c}{i}", c) for c in "ab" for i in range(7)]
    chunks = split_per_class(items, [2, 2, 3])
    assert [len(c) for c in chunks] == [4, 4, 6]
    flat = [x for c in chunks for x in c]
    assert len(set(flat)) == len(flat) == 14
    with pytest.raises(BadInputError, match="per class"):
        split_per_class(items, [5, 5])


def test_for_kind_fills_the_protocol_and_keeps_overrides(tmp_path):
    from lorsu_edge.demo import PROTOCOLS

    vlm = DemoOptions.for_kind("vlm", workdir=tmp_path, sessions=None, shots=2, epochs=None, lr=None)
    p = PROTOCOLS["vlm"]
    assert (vlm.kind, vlm.sessions, vlm.shots, vlm.train.epochs, vlm.train.lr) == ("vlm", p.sessions, 2, p.epochs, p.lr)
    assert vlm.protocol.loss == "ppl" and DemoOptions.for_kind("dual").protocol.loss == "clip"
    with pytest.raises(BadInputError, match="unknown demo"):
        DemoOptions.for_kind("audio")


def test_cli_help_states_each_protocols_defaults():
    import typer

    from lorsu_edge.cli.main import app
    from lorsu_edge.demo import PROTOCOLS

    demo = typer.main.get_command(app).commands["demo"]
    helps = {p.name: p.help for p in demo.params}
    d, v = PROTOCOLS["dual"], PROTOCOLS["vlm"]
    for name in ("sessions", "shots", "epochs", "lr"):
        assert f"(default {getattr(d, name):g}; {getattr(v, name):g} with --vlm)" in helps[name]


HAVE_ANIMALS = importlib.util.find_spec("animal_mnist") is not None


@pytest.mark.skipif(not HAVE_ANIMALS, reason="needs animal-mnist: pip install --no-deps animal-mnist==0.4")
def test_vlm_data_negatives_are_unseen_and_control_starts_with_the_vlms_held_out_set(tmp_path):
    from _vlm_demo import digest, gray, vlm_demo_data

    from lorsu_edge.samples import read_samples
    from lorsu_edge.zoo.vlm import EVAL_QUESTION

    data, opts, images, align, heldout = vlm_demo_data(tmp_path, sessions=2, shots=1, eval_per_class=1,
                                                       extra_control=2)
    aligned, held = {digest(images[i]) for i in align}, {digest(images[i]) for i in heldout}
    shown = []
    for folder in [*data.sessions, data.target_eval]:
        samples = read_samples(folder).samples
        assert len(samples) == 10 and all(s.is_vqa and s.answer.split()[0] in ("a", "an") for s in samples)
        assert all(gray(s).mean() > 128 for s in samples)  # negatives: dark silhouette on a light ground
        shown += [digest(255 - gray(s)) for s in samples]
    assert not (aligned | held) & set(shown) and len(set(shown)) == len(shown) == 30  # unseen, disjoint
    assert {s.question for s in read_samples(data.target_eval).samples} == {EVAL_QUESTION}
    control_samples = read_samples(data.control).samples
    assert {s.question for s in control_samples} == {EVAL_QUESTION}
    control = [digest(gray(s)) for s in control_samples]
    assert len(set(control)) == len(control) == 10 * opts.control_per_class
    extra = set(control) - held  # the top-up: unseen, and none of the negatives' originals
    assert set(control) >= held and len(extra) == 20 and not extra & (aligned | set(shown))


def toy_vqa_data(opts: DemoOptions, root) -> DemoData:
    sessions = [write_toy_images(root / f"s{i}", per_class=opts.shots, seed=i, vqa=True) for i in range(opts.sessions)]
    return DemoData(sessions, write_toy_images(root / "eval", per_class=2, seed=50, vqa=True),
                    write_toy_images(root / "control", per_class=2, seed=60, vqa=True))


def test_vlm_demo_pipeline_trains_with_the_perplexity_loss(tmp_path):
    model = save_tiny("llava", tmp_path / "llava")
    opts = DemoOptions.for_kind("vlm", workdir=tmp_path / "demo", model=str(model), sessions=1, shots=2,
                                eval_per_class=2, epochs=1, lr=1e-3, max_forgetting=0, show_progress=False)
    summary = run_demo(opts, make_data=toy_vqa_data)
    assert summary["kind"] == "vlm" and [r["session"] for r in summary["rows"]] == ["base", 1]
    exported = assert_guarded(summary["rows"], opts.max_forgetting, (4, 4))
    assert summary["export"]["session"] == exported and summary["export"]["max_abs_diff"] < 1e-3
    report = json.loads((tmp_path / "demo" / "runs" / "sessions" / "0001" / "report.json").read_text())
    assert report["loss"] == "ppl" and report["steps"] == 1


def toy_clip_data(opts: DemoOptions, root) -> DemoData:
    """The cheap path's layout: labelled folders for the dual encoder's loss and guard, VQA sets for the VLM."""
    sessions = [write_toy_images(root / f"s{i}", per_class=opts.shots, seed=i) for i in range(opts.sessions)]
    return DemoData(sessions, write_toy_images(root / "eval", per_class=2, seed=50),
                    write_toy_images(root / "control", per_class=2, seed=60),
                    write_toy_images(root / "anchor", labels=("green",), per_class=3, seed=70),
                    vlm_sets=(write_toy_images(root / "vqa-eval", per_class=2, seed=50, vqa=True),
                              write_toy_images(root / "vqa-control", per_class=2, seed=60, vqa=True)))


def test_cheap_path_demo_trains_through_the_dual_and_scores_the_vlm_with_each_nights_tower(tmp_path):
    """Catches a VLM scored with the base tower (or the previous night's) instead of the night's own, and a
    guard column that silently reports the VLM's numbers as the dual encoder's."""
    from lorsu_edge.demo import GUARD_NOTE

    llava, clip = save_tiny("llava", tmp_path / "llava"), save_tiny("clip", tmp_path / "clip")
    opts = DemoOptions.for_kind("vlm-clip", workdir=tmp_path / "demo", model=str(llava), text_model=str(clip),
                                sessions=2, shots=2, eval_per_class=2, epochs=2, lr=3e-2, max_forgetting=100,
                                show_progress=False)
    summary = run_demo(opts, make_data=toy_clip_data)
    rows, sessions = summary["rows"], tmp_path / "demo" / "runs" / "sessions"
    assert summary["kind"] == "vlm-clip" and summary["guard"] == GUARD_NOTE and summary["text_model"] == str(clip)
    reports = [json.loads((sessions / f"{r['session']:04d}" / "report.json").read_text()) for r in rows[1:]]
    assert rows[0]["scored_encoder_sha256"] == reports[0]["base_encoder_sha256"]
    for row, report in zip(rows[1:], reports):
        assert report["loss"] == "clip" and report["anchors"] == 3 and "language model is not loaded" in str(
            report["notes"])
        assert row["scored_encoder_sha256"] == report["encoder_sha256"] != report["base_encoder_sha256"]
        assert (row["guard_target"], row["guard_control"]) == (report["target_accuracy"], report["control_accuracy"])
        assert 4 * row["target"] == round(4 * row["target"]) and row["score_seconds"] > 0
    assert reports[1]["replayed"] > 0 and summary["export"]["max_abs_diff"] < 1e-3


def test_demo_flags_pick_the_protocol():
    from lorsu_edge.cli.demo import demo_kind

    assert [demo_kind(False, None), demo_kind(False, "clip"), demo_kind(True, None), demo_kind(True, "ppl"),
            demo_kind(True, "clip")] == ["dual", "dual", "vlm", "vlm", "vlm-clip"]
    with pytest.raises(BadInputError, match="needs a VLM"):
        demo_kind(False, "ppl")
