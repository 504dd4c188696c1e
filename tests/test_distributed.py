"""Data-parallel adapt (lorsu_edge/distributed.py): two gloo processes under torchrun against one process."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lorsu_edge.adapt as recipe
from lorsu_edge.cli.main import app
from lorsu_edge.distributed import rank_slice, rank_starts
from lorsu_edge.tiny import save_tiny, write_toy_images

ARGS = ["--rank", "4", "--alpha", "8", "--batch-size", "4", "--epochs", "3", "--lr", "1e-2", "--precision", "fp32",
        "--template", "a photo of {label}", "--no-progress", "--json"]
# The 2-process run must equal one process whose micro-batch is the per-rank slice (2 of 4): same selection
# exactly; encoder deltas within 1e-4 of their size (fp32; only the order of the gradient sums differs).
TOLERANCE = 1e-4


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_partition_every_batch_exactly_once(monkeypatch, world):
    """Bug caught: a sample trained on by two ranks, or by none (e.g. a short last batch)."""
    for n in range(0, 10):
        chunk, slices, starts = list(range(n)), [], []
        for r in range(world):
            monkeypatch.setenv("RANK", str(r))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            slices += rank_slice(chunk)
            starts += list(rank_starts(n, 2))
        assert slices == chunk
        assert sorted(starts) == list(range(0, n, 2))


def test_plan_is_per_process(tmp_path):
    """The planner sizes one process's share of the batch (what `adapt` under torchrun gives it)."""
    from lorsu_edge.plan import format_plan, make_plan

    clip = save_tiny("clip", tmp_path / "clip")
    two = make_plan(clip, batch_size=16, processes=2, profile="cpu")
    assert (two.processes, two.batch_size) == (2, 8)
    assert two.predicted_peak_bytes == make_plan(clip, batch_size=8, profile="cpu").predicted_peak_bytes
    assert two.predicted_peak_bytes < make_plan(clip, batch_size=16, profile="cpu").predicted_peak_bytes
    assert "batch 8 per process, 2 processes" in format_plan(two)
    assert make_plan(clip, batch_size=5, processes=2, profile="cpu").batch_size == 3  # the larger share


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    clip = save_tiny("clip", tmp_path / "clip")
    data = write_toy_images(tmp_path / "data", seed=1, per_class=6)
    control = write_toy_images(tmp_path / "control", seed=11)
    common = ["--data", str(data), "--model", str(clip), "--control", str(control), *ARGS]
    ddp = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "LORSU_EDGE_TRACK": "off"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "lorsu_edge.cli.main", "adapt", "--workdir", str(ddp), *common],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count('{"status"') == 1  # only rank 0 speaks

    single = tmp_path / "single"
    with pytest.MonkeyPatch.context() as mp:  # one process, micro-batch = what each rank held
        mp.setattr(recipe, "apply_plan", lambda opts, plan: replace(opts, train=replace(opts.train, micro_batch=2)))
        r = CliRunner().invoke(app, ["adapt", "--workdir", str(single), *common])
    assert r.exit_code == 0, r.output

    a, b = ddp / "sessions" / "0001", single / "sessions" / "0001"
    assert sorted(p.name for p in (ddp / "sessions").iterdir()) == ["0001"]  # rank 1 wrote nothing
    assert len((ddp / "runs.jsonl").read_text().splitlines()) == 1
    meta_a, meta_b = (json.loads((d / "adapter.json").read_text()) for d in (a, b))
    assert meta_a["modules"] == meta_b["modules"]  # same blocks and heads
    ad_a, ad_b = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    indices = [k for k in ad_b if k.endswith((".indices", ".rows"))]
    assert indices and all(torch.equal(ad_a[k], ad_b[k]) for k in indices)  # same fc1 entries and head rows
    base = {k: v for k, v in load_file(str(clip / "model.safetensors")).items()}
    enc_a, enc_b = load_file(str(a / "encoder.safetensors")), load_file(str(b / "encoder.safetensors"))
    # The key projection's bias cannot change attention (softmax is shift-invariant over keys: q.b_k is the
    # same for every key), so its true gradient is 0 and Adam turns the rounding noise of either run into
    # full-size steps of arbitrary sign: compare everything else.
    names = sorted(k for k in enc_b if not k.endswith("k_proj.bias"))
    delta_a = torch.cat([(enc_a[k] - base[k]).flatten() for k in names])
    delta_b = torch.cat([(enc_b[k] - base[k]).flatten() for k in names])
    assert delta_b.norm() > 0
    rel = ((delta_a - delta_b).norm() / delta_b.norm()).item()
    print(f"relative encoder delta difference: {rel:.2e}")
    assert rel <= TOLERANCE
    rep_a, rep_b = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert rep_a["losses"] == pytest.approx(rep_b["losses"], rel=1e-4)  # the whole batch's loss, not rank 0's
    assert rep_a["control_accuracy"] == pytest.approx(rep_b["control_accuracy"])
