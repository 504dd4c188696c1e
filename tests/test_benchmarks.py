"""The benchmark scripts keep working: each `--smoke` run (tiny models) exits 0 and writes sane JSON.

No timing is asserted; what is asserted: the rows are the documented ones, trainable counts equal the
count written out from the configs (tests/_counts.py), and derived numbers (ratios, sums) agree with the
numbers they come from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _counts import expected_trainable

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _tiny_vision() -> dict:
    """The benchmarks' tiny CLIP vision config (benchmarks/_common.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return _common.TINY_VISION


def _smoke(name: str, tmp_path: Path, *extra: str) -> tuple[dict, str]:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke",
                          "--results-dir", str(tmp_path), *extra],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / f"{name}_smoke.json"
    assert f"wrote {out}" in run.stdout
    return json.loads(out.read_text()), run.stdout


def test_bench_flops_smoke(tmp_path):
    doc, _ = _smoke("bench_flops", tmp_path)
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"lorsu-clip", "dense-ref-clip", "lora-enc", "spu", "full-enc", "lorsu-ppl",
                         "llm-lora-qv-r8", "llm-lora-all-r64", "llava-ft", "full-vlm"}
    for r in rows.values():
        assert r["fwd_flops"] > 0 and r["bwd_flops"] > 0
        assert r["flops"] == r["fwd_flops"] + r["bwd_flops"] == sum(r["stages"].values())
        assert 0 < r["trainable_params"] <= r["total_params"]
        assert r["ideal_flops"] == r["flops"]  # the fc1 gradient is formed at the selected entries only
        assert r["session_flops_per_sample"] == r["importance_flops"] + doc["epochs"] * r["flops"]
    # Only the sparse fc1 layers have a dense fallback, and it forms (then drops) more gradient entries.
    for name in ("lorsu-clip", "spu", "lorsu-ppl"):
        assert rows[name]["dense_fallback_flops"] > rows[name]["flops"] and rows[name]["importance_flops"] > 0
    for name in ("lora-enc", "full-enc", "full-vlm", "llava-ft", "dense-ref-clip"):
        assert rows[name]["dense_fallback_flops"] == rows[name]["flops"]
    # The frozen text tower runs forward only; CLIP-loss configs never touch an LLM.
    for name in ("lorsu-clip", "lora-enc", "spu", "full-enc"):
        assert rows[name]["stages"]["text_fwd"] > 0 and "llm_fwd" not in rows[name]["stages"]
    assert rows["lorsu-clip"]["trainable_params"] < rows["full-enc"]["trainable_params"]
    assert rows["lorsu-ppl"]["trainable_params"] < rows["llava-ft"]["trainable_params"]
    assert rows["full-vlm"]["trainable_params"] == rows["full-vlm"]["total_params"]
    # More weight gradients never cost fewer FLOPs on the same forward.
    assert rows["full-vlm"]["bwd_flops"] > rows["llava-ft"]["bwd_flops"]
    assert rows["full-enc"]["bwd_flops"] > rows["spu"]["bwd_flops"]
    # The research code's dense masking does strictly more work than our layers for the same selection.
    assert rows["dense-ref-clip"]["flops"] > rows["lorsu-clip"]["flops"]
    assert rows["dense-ref-clip"]["trainable_params"] > rows["lorsu-clip"]["trainable_params"]
    ratio = rows["full-vlm"]["flops"] / rows["lorsu-clip"]["flops"]
    assert doc["ratios"]["full_vlm/lorsu_clip"] == pytest.approx(ratio)
    lorsu = dict(method="lorsu", sparsity=0.1, top_k_heads=2, rank=64)  # bench_flops' LORSU and its baselines
    for name, method in (("lorsu-clip", lorsu), ("lora-enc", {**lorsu, "method": "lora"}),
                         ("spu", {**lorsu, "method": "spu"})):
        assert rows[name]["trainable_params"] == expected_trainable(method, _tiny_vision()), name


def test_bench_block_cost_smoke(tmp_path):
    """The ledger times both parts of the row split: a selection that put every row on one kernel (all dense,
    or all sampled) would leave the other part's cost out of the table it explains."""
    doc, stdout = _smoke("bench_block_cost", tmp_path)
    (r,) = doc["results"]
    fc1 = r["fc1"]
    assert 0 < fc1["dense_rows"] < 64 and 0.05 < fc1["entries"] / (64 * 32) < 0.15
    assert all(v > 0 for k, v in {**fc1, **r["q"]}.items() if k.endswith("_s"))
    assert "per block: lorsu +" in stdout

def test_bench_cost_smoke(tmp_path):
    doc, _ = _smoke("bench_cost", tmp_path, "--threads", "1")
    rows = {r["method"]: r for r in doc["results"]["tiny"]}
    assert set(rows) == {"lorsu", "lora", "spu", "full", "dense-ref"}
    for r in rows.values():
        assert r["step_s_median"] > 0 and len(r["step_s_all"]) == r["warmup"] + r["steps"]
        assert r["step_cpu_s_median"] > 0 and len(r["step_cpu_s_all"]) == len(r["step_s_all"])
        assert r["peak_rss_bytes"] >= max(r["train_peak_rss_bytes"], r["setup_peak_rss_bytes"]) > 0
        assert r["train_peak_rss_bytes"] >= r["rss_before_train_bytes"] > 0
        # AdamW keeps two fp32 moments for every trainable element, and every one got a gradient.
        assert r["adam_state_bytes"] == 8 * r["trainable_params"] == 2 * r["grad_bytes"]
    assert rows["lorsu"]["trainable_params"] < rows["full"]["trainable_params"] == rows["full"]["encoder_params"]
    assert rows["dense-ref"]["trainable_params"] > rows["lorsu"]["trainable_params"]
    assert rows["dense-ref"]["mask_bytes"] > 0 and rows["lorsu"]["mask_bytes"] == 0
    assert rows["lorsu"]["index_bytes"] > 0
    for r in rows.values():
        if r["method"] in ("lorsu", "lora", "spu"):
            assert r["trainable_params"] == expected_trainable(r["config"], _tiny_vision()), r["method"]
        for ratio, key in (("step_vs_lorsu", "step_s_median"), ("cpu_vs_lorsu", "step_cpu_s_median"),
                           ("peak_vs_lorsu", "peak_rss_bytes")):
            assert r[ratio] == pytest.approx(r[key] / rows["lorsu"][key]), (r["method"], ratio)


def test_bench_clip_l_state_smoke(tmp_path):
    doc, _ = _smoke("bench_clip_l_state", tmp_path, "--threads", "1")
    lorsu, dense = doc["rows"]
    assert (lorsu["approach"], dense["approach"]) == ("lorsu", "dense-ref")
    # The real injected modules hold exactly what the shapes say they should.
    assert lorsu["matches_analytic"] and dense["matches_analytic"]
    assert lorsu["fc1_entries"] * 10 <= dense["fc1_entries"]  # sparsity 0.1, floor per block
    assert lorsu["adam_state_bytes"] < dense["adam_state_bytes"]
    assert lorsu["mask_bytes"] == 0 < dense["mask_bytes"]
    assert doc["dense_over_lorsu"]["adam_state_bytes"] > 1


def test_bench_vlm_step_smoke(tmp_path):
    doc, _ = _smoke("bench_vlm_step", tmp_path)
    assert set(doc["rows"]) == {"step", "full-logits", "tower"}
    info = doc["info"]
    assert 0 < info["answer_tokens"] < info["batch"] * info["sequence_tokens"]
    assert 0 < info["image_tokens"] < info["sequence_tokens"] and info["trainable_params"] > 0
    for r in doc["rows"].values():
        assert r["step_s"] > 0 and r["forward_s"] > 0 and r["loss"] == r["loss"]  # not NaN
    s = doc["summary"]
    assert s["per_sample_s"] == doc["rows"]["step"]["step_s"] / info["batch"]
    assert s["lm_share_wall"] == 1 - doc["rows"]["tower"]["step_s"] / doc["rows"]["step"]["step_s"]


def test_bench_fc1_layouts_smoke(tmp_path):
    """Every layout gives the gradient at the selected entries (a wrong staircase permutation or prefix would
    time a different gradient: errors of the order of the entries, ~6 here, not bf16 rounding), and the
    staircase exercises both of its parts."""
    doc, stdout = _smoke("bench_fc1_layouts", tmp_path, "--no-inductor")
    (row,) = doc["rows"]
    assert set(row["ms"]) == {"dense", "split", "stair"}
    assert all(d < 0.1 for d in row["max_abs_diff"].values()), row["max_abs_diff"]
    assert row["stair_blocks"] > 0 and 0 < row["stair_sampled"] < row["entries"]
    assert doc["total_ms"]["stair"] == sum(r["ms"]["stair"] for r in doc["rows"])
