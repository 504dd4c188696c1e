"""Fault injection on the real CLI: `lorsu-edge adapt` SIGKILLed at each phase of the recipe
(LORSU_EDGE_FAULT=<phase>) must leave the current model byte-identical, and the next run must succeed.
Also: a run with nothing new changes nothing; a second run on a busy workdir exits LOCKED."""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorsu_edge.errors import ExitCode
from lorsu_edge.session import ENCODER_FILE, PARTIAL_PREFIX, Workdir

REPO = Path(__file__).resolve().parents[1]
# The recipe's phases, plus "commit": inside Workdir.commit_session after the rename, before the pointer.
PHASES = ("load", "importance", "train", "merge", "write", "commit")
# Small and fast: one epoch of two steps on a 3-block, hidden-32 CLIP.
FAST = ["--epochs", "1", "--batch-size", "4", "--rank", "4", "--alpha", "4", "--no-progress"]

pytestmark = pytest.mark.slow


def _images(folder: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label in ("cat", "dog"):
        for i in range(4):
            path = folder / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LORSU_EDGE_FAULT", "LORSU_EDGE_DEBUG")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _adapt(workdir: Path, model: Path, data: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lorsu_edge.cli.main", "adapt", "--data", str(data), "--workdir", str(workdir),
           "--model", str(model), *FAST]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=300)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state(wd: Workdir) -> tuple[str | None, str | None, list[str]]:
    """(current id, sha256 of the current encoder file, committed ids)."""
    cur = wd.current()
    enc = wd.current_encoder()
    return cur, (_sha(enc) if enc is not None else None), [s.id for s in wd.sessions()]


def _partials(wd: Workdir) -> list[str]:
    return sorted(p.name for p in wd.sessions_root.iterdir() if p.name.startswith(PARTIAL_PREFIX))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny CLIP, two disjoint data folders, and a workdir whose session 0001 is current."""
    from lorsu_edge.tiny import save_tiny

    root = tmp_path_factory.mktemp("faults")
    model = save_tiny("clip", root / "model")
    _images(root / "day1", seed=1)
    _images(root / "day2", seed=2)
    res = _adapt(root / "base-runs", model, root / "day1")
    assert res.returncode == 0, res.stderr
    return {"root": root, "model": model, "day1": root / "day1", "day2": root / "day2", "runs": root / "base-runs"}


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_each_phase_keeps_current_and_next_run_succeeds(setup: dict[str, Path], tmp_path: Path,
                                                                    phase: str) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"], runs)
    wd = Workdir.open(runs)
    before = _state(wd)
    assert before[0] == "0001" and before[2] == ["0001"]

    killed = _adapt(runs, setup["model"], setup["day2"], LORSU_EDGE_FAULT=phase)
    assert killed.returncode == -signal.SIGKILL, f"the {phase} fault hook did not fire: {killed.stderr}"
    assert _state(wd) == before  # same current id, byte-identical encoder, no new committed session
    assert len(_partials(wd)) <= 1  # at most the killed run's unfinished session, never published
    if phase == "commit":  # renamed to 0002 but never pointed at: invisible, and removed by the next run
        assert (runs / "sessions" / "0002").is_dir() and wd.seen_hashes() == Workdir.open(setup["runs"]).seen_hashes()

    again = _adapt(runs, setup["model"], setup["day2"])
    assert again.returncode == 0, again.stderr
    cur, _, ids = _state(wd)
    assert (cur, ids) == ("0002", ["0001", "0002"])
    assert wd.session("0002").parent == "0001"  # chained on the surviving current model
    assert not _partials(wd)
    assert _sha(wd.session_dir("0001") / ENCODER_FILE) == before[1]  # committed sessions are immutable


def test_nothing_new_changes_nothing(setup: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"], runs)
    tree = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file() and p.name not in (".lock", "runs.jsonl")}
    res = _adapt(runs, setup["model"], setup["day1"])
    assert res.returncode == ExitCode.OK, res.stderr
    after = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file() and p.name not in (".lock", "runs.jsonl")}
    assert after == tree


_HOLDER = """
    import sys, time
    from lorsu_edge.session import Workdir

    with Workdir.open(sys.argv[1]).lock():
        print("ready", flush=True)
        time.sleep(120)
"""


def test_second_run_on_a_busy_workdir_exits_locked(setup: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"], runs)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HOLDER), str(runs)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not select.select([holder.stdout], [], [], 0.2)[0]:
            pass
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        res = _adapt(runs, setup["model"], setup["day2"])
        assert res.returncode == ExitCode.LOCKED
        assert f"in use by pid {holder.pid}" in res.stderr and "Traceback" not in res.stderr
    finally:
        holder.kill()
        holder.wait(timeout=30)
