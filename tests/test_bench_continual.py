"""`bench_quality.py --continual --smoke`: the class-incremental protocol runs end to end through adapt."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_continual_smoke(tmp_path):
    out = tmp_path / "continual.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--continual", "--smoke",
                           "--methods", "lorsu", "--variants", "unguarded-old", "scale+anchor+replay",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["summary"]}
    assert set(rows) == {"unguarded-old", "scale+anchor+replay"}
    assert all(r["accepted"] + r["scaled"] + r["rejected"] == 2 for r in rows.values())  # 2 toy nights
    runs = {r["variant"]: r for r in doc["runs"]}
    assert [x["night"] for x in runs["unguarded-old"]["rows"]] == [1, 2]
    assert 0.0 <= runs["scale+anchor+replay"]["night1_after"] <= 1.0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # the gain is measured from the base model's accuracy over every class, not from night 1's "before"
    for r in doc["summary"]:
        run = runs[r["variant"]]
        assert r["target_gain"][0] == round(100 * (run["rows"][-1]["target"] - run["base_all"]), 2)
    # each run was kept as it ended; --from summarises those lines to the same table
    again = tmp_path / "again.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--continual",
                           "--from", str(out.with_suffix(".runs.jsonl")), "--out", str(again)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(again.read_text())["summary"] == doc["summary"]
