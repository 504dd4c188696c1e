"""The quality benchmark's smoke mode runs the real protocol code on a tiny model and writes its outputs."""

import json
import subprocess
import sys
from pathlib import Path

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
    assert rows["spu"]["trainable_params"] < rows["lorsu"]["trainable_params"]  # spu: sparse fc1 only
    assert len(doc["runs"]["lorsu"][0]["rows"]) == 3  # base + 2 sessions
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
