"""The quality benchmark's smoke mode runs the real protocol code on a tiny model; its summary follows from its
runs and its trainable counts from the method configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _counts import expected_trainable

from lorsu_edge.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quality_smoke(tmp_path):
    out = tmp_path / "quality.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--smoke", "--methods",
                           "lorsu", "spu", "--seeds", "0", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["summary"]}
    assert set(rows) == {"lorsu", "spu"} and all(r["seeds"] == 2 for r in rows.values())
    vision = tiny_model("clip").config.vision_config.to_dict()
    for method, row in rows.items():
        runs = doc["runs"][method]
        assert all(len(run["rows"]) == 3 for run in runs)  # base + 2 sessions
        # the smoke protocol: rank 4 (alpha 4), the other knobs at their defaults
        config = runs[0]["options"]["method"]
        assert (config["method"], config["rank"]) == (method, 4)
        assert row["trainable_params"] == expected_trainable(config, vision)
        # the summary is the runs' numbers: gain and change from base to the last session, in points
        gains = [100 * (run["rows"][-1]["target"] - run["rows"][0]["target"]) for run in runs]
        changes = [100 * (run["rows"][-1]["control"] - run["rows"][0]["control"]) for run in runs]
        assert row["target_gain_points"] == pytest.approx(sum(gains) / 2)
        assert row["control_change_points"] == pytest.approx(sum(changes) / 2)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
