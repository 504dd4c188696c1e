"""Fault injection on the real CLI: `lorsu-edge adapt` SIGKILLed at each phase of the recipe
(LORSU_EDGE_FAULT=<phase>) must leave the current model byte-identical, and the next run must succeed.
Also: a run with nothing new changes nothing; a second run on a busy workdir exits LOCKED."""

from __future__ import annotations

import hashlib
import json
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
    # tracking off here too: module fixtures run before conftest's per-test switch, and a tracking store
    # in the workdir would not fit the storage tests' 1 MiB filesystem
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORSU_EDGE_TRACK": "off", **extra}


def _adapt(workdir: Path, model: Path, data: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lorsu_edge.cli.main", "adapt", "--data", str(data), "--workdir", str(workdir),
           "--model", str(model), *FAST, *extra]
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


def make_site(root: Path) -> dict[str, Path]:
    """A tiny CLIP, two disjoint data folders, and a workdir whose session 0001 is current (shared with the
    storage and retention tests)."""
    from lorsu_edge.tiny import save_tiny

    model = save_tiny("clip", root / "model")
    _images(root / "day1", seed=1)
    _images(root / "day2", seed=2)
    res = _adapt(root / "base-runs", model, root / "day1")
    assert res.returncode == 0, res.stderr
    return {"root": root, "model": model, "day1": root / "day1", "day2": root / "day2", "runs": root / "base-runs"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_site(tmp_path_factory.mktemp("faults"))


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


# --- SIGTERM inside the commit --------------------------------------------------------------------


def test_sigterm_during_commit_reports_the_committed_session(setup: dict[str, Path], tmp_path: Path) -> None:
    """Bug: the stop held back during the commit was reported as "failed ... discarded" although the
    session was committed and current. The hook sends a real SIGTERM between rename and pointer move."""
    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"], runs)
    res = _adapt(runs, setup["model"], setup["day2"], LORSU_EDGE_FAULT="commit:SIGTERM")
    assert res.returncode == ExitCode.INTERRUPTED, res.stderr
    assert "after session 0002 was committed (accepted): it is the current model" in res.stderr
    assert "discarded" not in res.stderr
    wd = Workdir.open(runs)
    assert wd.current() == "0002" and [s.id for s in wd.sessions()] == ["0001", "0002"]
    last = wd.runs()[-1]
    assert (last["status"], last["session"], last["exit_code"]) == ("accepted", "0002", ExitCode.INTERRUPTED)


# --- a damaged current session ----------------------------------------------------------------------


def _flip_byte(path: Path, tensor: str = "") -> None:
    """Flip one bit in the data of the first tensor whose name contains `tensor`: the file still parses."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    name = next(k for k in sorted(header) if tensor in k and k != "__metadata__")
    data[8 + size + header[name]["data_offsets"][0] + 3] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "bit-flipped encoder": lambda d: _flip_byte(d / ENCODER_FILE),
    "truncated encoder": lambda d: (d / ENCODER_FILE).write_bytes((d / ENCODER_FILE).read_bytes()[:5000]),
    "missing encoder": lambda d: (d / ENCODER_FILE).unlink(),
    "truncated report": lambda d: (d / "report.json").write_bytes((d / "report.json").read_bytes()[:40]),
    "missing report": lambda d: (d / "report.json").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_detected_and_names_the_fallback(setup: dict[str, Path], tmp_path: Path, damage: str) -> None:
    from lorsu_edge.errors import BadInputError
    from lorsu_edge.integrity import require_intact, session_problem

    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"], runs)
    wd = Workdir.open(runs)
    assert session_problem(wd, "0001") is None
    DAMAGE[damage](wd.session_dir("0001"))
    assert session_problem(wd, "0001") is not None
    with pytest.raises(BadInputError) as info:
        require_intact(wd, "0001")
    assert "`lorsu-edge rollback base`" in info.value.hint


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorsu_edge.cli.main", *args], capture_output=True, text=True,
                          env=_env(), timeout=300)


def test_bit_flipped_current_encoder_eval_refuses_adapt_falls_back(setup: dict[str, Path], tmp_path: Path) -> None:
    """Bug: a bit-flipped encoder was silently chained onto (and exported). Now eval/export exit 3 with a
    rollback hint, and adapt falls back to the base model loudly (stderr, runs.jsonl, the new report)."""
    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"], runs)
    _flip_byte(runs / "sessions" / "0001" / ENCODER_FILE)
    ev = _run("eval", "--data", str(setup["day1"]), "--workdir", str(runs))
    assert ev.returncode == ExitCode.BAD_INPUT and "rollback base" in ev.stderr, ev.stderr
    res = _adapt(runs, setup["model"], setup["day2"])
    assert res.returncode == 0, res.stderr
    assert "warning: damaged current model (session 0001: encoder.safetensors does not match" in res.stderr
    wd = Workdir.open(runs)
    assert wd.current() == "0002" and wd.session("0002").parent is None  # chained on the base, not on 0001
    assert "fell back to the base model" in wd.history()[-1]["fallback"]
    assert any(r.get("status") == "fallback" and r.get("from") == "0001" for r in wd.runs())


def test_changed_base_model_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    """The base model's encoder hash is recorded at first use; a changed model folder is exit 3, not chained."""
    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"], runs)
    model = shutil.copytree(setup["model"], tmp_path / "model")
    doc = json.loads((runs / "workdir.json").read_text())
    assert set(doc["settings"]["base_encoder_sha256"]) == {"model"}
    doc["settings"]["base_model"] = str(model)
    (runs / "workdir.json").write_text(json.dumps(doc))
    _flip_byte(model / "model.safetensors", "vision_model.encoder.layers.0.self_attn.q_proj.weight")
    res = _adapt(runs, model, setup["day2"])
    assert res.returncode == ExitCode.BAD_INPUT and "base model's encoder changed" in res.stderr, res.stderr
    assert Workdir.open(runs).current() == "0001" and [s.id for s in Workdir.open(runs).sessions()] == ["0001"]


# --- remembered paths -------------------------------------------------------------------------------


def _eval_from(cwd: Path, runs: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorsu_edge.cli.main", "eval", "--data", str(data), "--workdir",
                           str(runs)], capture_output=True, text=True, env=_env(), timeout=300, cwd=cwd)


def test_remembered_model_is_absolute_and_a_gone_folder_is_no_hub_id(setup: dict[str, Path], tmp_path: Path) -> None:
    """Bug: workdir.json kept `--model fx/model` as typed, so from another directory it became a hub id."""
    settings = Workdir.open(setup["runs"]).settings()
    assert settings["base_model"] == str(setup["model"].resolve())  # made absolute by adapt
    runs = shutil.copytree(setup["runs"], tmp_path / "runs")
    doc = json.loads((runs / "workdir.json").read_text())
    doc["settings"]["base_model"] = str(tmp_path / "gone" / "model")
    (runs / "workdir.json").write_text(json.dumps(doc))
    res = _eval_from(Path("/"), runs, setup["day1"])
    assert res.returncode == ExitCode.BAD_INPUT and "model folder not found" in res.stderr, res.stderr
    assert "hub" not in res.stderr.split("hint:")[0]


def test_old_workdir_with_a_relative_model_resolves_beside_the_workdir(setup: dict[str, Path], tmp_path: Path) -> None:
    """Workdirs written before paths were made absolute: `fx/model` is looked up next to the workdir."""
    runs = shutil.copytree(setup["runs"], tmp_path / "site" / "runs")
    shutil.copytree(setup["model"], tmp_path / "site" / "fx" / "model")
    doc = json.loads((runs / "workdir.json").read_text())
    doc["settings"]["base_model"] = "fx/model"
    (runs / "workdir.json").write_text(json.dumps(doc))
    res = _eval_from(Path("/"), runs, setup["day1"])  # from elsewhere: today a hub fetch of "fx/model"
    assert res.returncode == 0, res.stderr
    assert "session 0001: " in res.stdout
