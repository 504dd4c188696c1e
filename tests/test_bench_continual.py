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


def test_summary_gain_is_from_the_base_over_all_classes_and_shared_against_the_unguarded_recipe():
    """The smoke run's toy accuracies are all 0, so the arithmetic is checked here on written-out runs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _continual as C

    def run(variant, final, control_end, seed=0):
        rows = [{"night": 1, "status": "accepted", "target": 0.5, "control": 0.9, "target_before": 0.5,
                 "control_before": 0.95, "trainable_params": 7},
                {"night": 2, "status": "scaled", "target": final, "control": control_end, "target_before": 0.6,
                 "control_before": 0.9, "trainable_params": 7}]
        return {"target": "t", "method": "lorsu", "variant": variant, "seed": seed, "rows": rows,
                "night1_after": 0.25, "base_all": 0.2}

    summary = {s["variant"]: s for s in C.summarise([run("unguarded-old", 0.4, 0.9), run("scale", 0.3, 0.94),
                                                     run("scale", 0.5, 0.94, seed=1)])}
    assert summary["unguarded-old"]["target_gain"] == (20.0, 0.0)  # 40% - base 20%, not - night 1's 50% before
    assert summary["scale"]["target_gain"] == (20.0, 14.14) and summary["scale"]["final_target"] == (40.0, 14.14)
    assert summary["scale"]["control_change"] == (-1.0, 0.0)  # from night 1's before (the base), not night 2's
    assert summary["scale"]["gain_share"] == 1.0 and summary["unguarded-old"]["gain_share"] == 1.0
    assert (summary["scale"]["accepted"], summary["scale"]["scaled"]) == (2, 2)
