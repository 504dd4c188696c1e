"""The demo's pipeline (data -> sessions guarded by a control set -> export -> table and plot) on a tiny model."""

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


def test_demo_pipeline_on_a_tiny_model(tmp_path):
    model = save_tiny("clip", tmp_path / "clip")
    opts = DemoOptions(workdir=tmp_path / "demo", model=str(model), sessions=2, shots=2, eval_per_class=2,
                       method=MethodConfig(rank=4, alpha=4), train=TrainConfig(epochs=2, batch_size=4, lr=1e-3),
                       max_forgetting=100, show_progress=False)
    summary = run_demo(opts, make_data=toy_data)
    rows = summary["rows"]
    assert [r["session"] for r in rows] == ["base", 1, 2]
    assert all(0.0 <= r["target"] <= 1.0 and 0.0 <= r["control"] <= 1.0 for r in rows)
    assert all(r["status"] == "accepted" for r in rows[1:])
    assert summary["export"]["session"] == "0002" and summary["export"]["max_abs_diff"] < 1e-3
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
