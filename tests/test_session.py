"""The workdir store: atomic writes, commit/current/rollback/history, inbox memory, recovery after
crashes, the run lock across real processes, full disks, SIGTERM, and the history/rollback verbs."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lorsu_edge import atomic
from lorsu_edge import session as session_mod
from lorsu_edge.atomic import atomic_write_bytes, atomic_write_json, fsync_tree, storage_errors
from lorsu_edge.cli import history as history_cli
from lorsu_edge.cli import rollback as rollback_cli
from lorsu_edge.errors import BadInputError, ExitCode, InterruptedRunError, LockedError, StorageError
from lorsu_edge.session import (
    CURRENT_FILE,
    PARTIAL_PREFIX,
    REPORT_FILE,
    STATUS_FILE,
    Workdir,
    graceful_sigterm,
    read_samples_file,
    write_samples_file,
)

REPO = Path(__file__).resolve().parents[1]


# --- helpers ----------------------------------------------------------------------------------


def _commit(wd: Workdir, hashes: list[str], *, accepted: bool = True, reason: str = "",
            report: dict | None = None) -> str:
    """Write a small session (encoder bytes, report, samples) and commit it."""
    with wd.staged_session() as partial:
        (partial / "encoder.safetensors").write_bytes(os.urandom(64))
        atomic_write_json(partial / REPORT_FILE, report if report is not None else {"method": "lorsu"})
        write_samples_file(partial, hashes)
        return wd.commit_session(partial, accepted=accepted, reason=reason)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, except the lock files (their content is transient)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (".lock", ".lock.owner", "runs.jsonl"):
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _partials(wd: Workdir) -> list[str]:
    return [p.name for p in wd.sessions_root.iterdir() if p.name.startswith(PARTIAL_PREFIX)]


def _child(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_line(proc: subprocess.Popen, expected: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line.strip() == expected:
                return
            if line == "":
                break
    proc.kill()
    raise AssertionError(f"child never printed {expected!r}; stderr: {proc.stderr.read()}")


@pytest.fixture
def wd(tmp_path: Path) -> Workdir:
    return Workdir.open(tmp_path / "runs", create=True, settings={"base_model": "tiny-clip"})


# --- atomic writes --------------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_crash_before_rename_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "current.json"
    atomic_write_bytes(target, b"old")

    def boom(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"new")
    assert not isinstance(info.value, StorageError)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["current.json"]


def test_disk_full_during_write_is_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "_write_all", full)
    with pytest.raises(StorageError) as info:
        atomic_write_bytes(target, b"new" * 1000)
    assert info.value.exit_code == ExitCode.IO
    assert "disk space" in info.value.hint
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_storage_errors_translates_only_storage_errnos() -> None:
    with pytest.raises(StorageError) as info, storage_errors("x"):
        raise OSError(errno.EROFS, "read-only")
    assert "read-only" in info.value.hint
    with pytest.raises(OSError) as other, storage_errors("x"):
        raise OSError(errno.EIO, "io")
    assert not isinstance(other.value, StorageError)


def test_fsync_tree_syncs_every_file_and_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x", "a/y", "a/b/z"):
        (tmp_path / name).write_text(name)
    synced: list[str] = []
    real_file, real_dir = atomic.fsync_file, atomic.fsync_dir
    monkeypatch.setattr(atomic, "fsync_file", lambda p: (synced.append(str(p)), real_file(p)))
    monkeypatch.setattr(atomic, "fsync_dir", lambda p: (synced.append(str(p)), real_dir(p)))
    fsync_tree(tmp_path)
    expected = {str(tmp_path / n) for n in ("x", "a/y", "a/b/z", "a", "a/b")} | {str(tmp_path)}
    assert set(synced) == expected and len(synced) == len(expected)
    assert synced.index(str(tmp_path / "a/b/z")) < synced.index(str(tmp_path / "a/b")) < synced.index(
        str(tmp_path / "a"))
    assert synced[-1] == str(tmp_path)  # the root last, after what it publishes


# --- opening --------------------------------------------------------------------------------------


def test_open_missing_and_foreign_dirs(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no lorsu-edge workdir"):
        Workdir.open(tmp_path / "nope")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(BadInputError, match="not empty"):
        Workdir.open(tmp_path / "data", create=True)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cat.jpg"]


def test_create_remembers_settings_and_rejects_newer_format(wd: Workdir) -> None:
    again = Workdir.open(wd.root, create=True, settings={"model": "other"})
    assert again.settings() == {"base_model": "tiny-clip"}
    assert again.current() is None and again.sessions() == []
    with again.lock():
        assert again.update_settings(control="/data/control", base_model=None) == {"control": "/data/control"}
    assert Workdir.open(wd.root).settings() == {"control": "/data/control"}
    doc = json.loads((wd.root / "workdir.json").read_text())
    atomic_write_json(wd.root / "workdir.json", {**doc, "format": 99})
    with pytest.raises(BadInputError, match="format 99"):
        Workdir.open(wd.root)


def test_mutations_need_the_lock(wd: Workdir) -> None:
    with pytest.raises(RuntimeError, match="lock"):
        wd.begin_session()
    with pytest.raises(RuntimeError, match="lock"):
        wd.rollback("base")


# --- commit, current, history, rollback, inbox ---------------------------------------------------


def test_commit_chain_history_and_seen_hashes(wd: Workdir) -> None:
    with wd.lock():
        s1 = _commit(wd, ["a", "b"], report={"method": "lorsu", "loss_first": 2.0, "loss_last": 0.5})
        s2 = _commit(wd, ["c"], accepted=False, reason="control accuracy fell 4.0 points")
        s3 = _commit(wd, ["d"])
    assert (s1, s2, s3) == ("0001", "0002", "0003")
    assert wd.current() == "0003"
    assert wd.current_encoder() == wd.root / "sessions" / "0003" / "encoder.safetensors"
    infos = wd.sessions()
    assert [i.status for i in infos] == ["accepted", "rejected", "accepted"]
    assert [i.parent for i in infos] == [None, "0001", "0001"]  # a rejected session never becomes a parent
    hist = wd.history()
    assert [h["id"] for h in hist] == ["0001", "0002", "0003"]
    assert hist[0]["loss_first"] == 2.0 and hist[0]["method"] == "lorsu"
    assert hist[1]["reason"] == "control accuracy fell 4.0 points"
    assert [h["current"] for h in hist] == [False, False, True]
    assert wd.seen_hashes() == {"a", "b", "c", "d"}
    assert wd.seen_hashes(include_rejected=False) == {"a", "b", "d"}
    assert not _partials(wd)


def test_samples_file_formats(tmp_path: Path) -> None:
    write_samples_file(tmp_path, ["b", "a", "a"], count=3)
    assert json.loads((tmp_path / "samples.json").read_text()) == {"count": 3, "sha256": ["a", "b"]}
    (tmp_path / "samples.json").write_text(json.dumps([{"sha256": "x", "label": "cat"}, "y"]))
    assert read_samples_file(tmp_path) == {"x", "y"}
    assert read_samples_file(tmp_path / "missing") == set()


def test_rollback_only_to_accepted_sessions(wd: Workdir) -> None:
    with wd.lock():
        _commit(wd, ["a"])
        _commit(wd, ["b"], accepted=False, reason="forgot")
        _commit(wd, ["c"])
        before = _tree(wd.root / "sessions")
        assert wd.rollback("1") == "0003"
        assert wd.current() == "0001"
        with pytest.raises(BadInputError, match="rejected"):
            wd.rollback("0002")
        with pytest.raises(BadInputError, match="no session 0007"):
            wd.rollback("7")
        with pytest.raises(BadInputError, match="not a session id"):
            wd.rollback("latest")
        assert wd.current() == "0001"
        assert wd.rollback("base") == "0001"
        assert wd.current() is None and wd.current_encoder() is None
        assert _tree(wd.root / "sessions") == before  # a rollback deletes nothing
        s4 = _commit(wd, ["d"])
    assert s4 == "0004"  # ids never reuse a rolled-back session's number
    assert wd.session(s4).parent is None


def test_uncommitted_renamed_session_is_ignored_then_removed(wd: Workdir) -> None:
    """A SIGKILL between the rename and the pointer write: the session does not count and goes away."""
    with wd.lock():
        _commit(wd, ["a"])
    before = (wd.root / CURRENT_FILE).read_bytes()
    orphan = wd.sessions_root / "0002"
    orphan.mkdir()
    atomic_write_json(orphan / STATUS_FILE, {"status": "accepted", "reason": "", "parent": "0001", "committed": "x"})
    write_samples_file(orphan, ["b"])
    assert wd.current() == "0001"
    assert [i.id for i in wd.sessions()] == ["0001"]
    assert wd.seen_hashes() == {"a"}
    with wd.lock() as recovery:
        assert recovery.removed_partials == ["0002"]
        assert not orphan.exists() and not _partials(wd)
        assert (wd.root / CURRENT_FILE).read_bytes() == before
        assert _commit(wd, ["b"]) == "0002"


def test_partials_and_temps_cleaned_when_the_lock_is_taken(wd: Workdir) -> None:
    with wd.lock():
        _commit(wd, ["a"])
        partial = wd.begin_session()
        (partial / "encoder.safetensors").write_bytes(b"half")
    (wd.root / ".current.json.tmp-1-abcd").write_text("{")
    committed = _tree(wd.sessions_root / "0001")
    with wd.lock() as recovery:
        assert recovery.removed_partials == [partial.name]
        assert recovery.removed_temps == [".current.json.tmp-1-abcd"]
        assert "unfinished session" in recovery.summary()
        assert wd.clean_partial() == []
    assert not partial.exists()
    assert _tree(wd.sessions_root / "0001") == committed


def test_exception_in_staged_session_discards_it(wd: Workdir) -> None:
    with wd.lock():
        with pytest.raises(ValueError), wd.staged_session() as partial:
            (partial / "x").write_text("x")
            raise ValueError("training blew up")
        assert not partial.exists() and wd.sessions() == [] and wd.current() is None


# --- full disk ------------------------------------------------------------------------------------


def test_full_disk_while_writing_a_session(wd: Workdir, monkeypatch: pytest.MonkeyPatch) -> None:
    with wd.lock():
        _commit(wd, ["a"])
    before = _tree(wd.root)

    def save_file(tensors: dict, path: str) -> None:  # stands in for safetensors' writer
        Path(path).write_bytes(b"partial bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    with wd.lock():
        with pytest.raises(StorageError) as info, wd.staged_session() as partial:
            save_file({}, str(partial / "encoder.safetensors"))
        assert info.value.exit_code == ExitCode.IO
        assert wd.current() == "0001" and not _partials(wd)
    assert _tree(wd.root) == before


def test_full_disk_at_the_pointer_write_unpublishes(wd: Workdir, monkeypatch: pytest.MonkeyPatch) -> None:
    with wd.lock():
        _commit(wd, ["a"])
    before = _tree(wd.root)
    real = atomic.atomic_write_bytes

    def full_for_pointer(path: Path, data: bytes) -> None:
        if Path(path).name == CURRENT_FILE:
            raise StorageError("cannot write current.json: No space left on device", hint="free space")
        real(path, data)

    monkeypatch.setattr(atomic, "atomic_write_bytes", full_for_pointer)
    with wd.lock():
        with pytest.raises(StorageError):
            _commit(wd, ["b"])
        assert wd.current() == "0001" and wd.seen_hashes() == {"a"}
        assert not _partials(wd) and [p.name for p in wd.sessions_root.iterdir()] == ["0001"]
    assert _tree(wd.root) == before


# --- signals --------------------------------------------------------------------------------------


def test_graceful_sigterm_raises_and_restores_handler() -> None:
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(InterruptedRunError) as info, graceful_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
    assert info.value.exit_code == ExitCode.INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) is old


def test_sigterm_during_commit_is_held_until_the_commit_is_done(wd: Workdir,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = session_mod.fsync_tree

    def fsync_then_term(root: Path) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        real(root)

    monkeypatch.setattr(session_mod, "fsync_tree", fsync_then_term)
    with wd.lock(), graceful_sigterm():
        with pytest.raises(InterruptedRunError):
            _commit(wd, ["a"])
    assert wd.current() == "0001"  # all of the commit happened, then the stop
    assert not _partials(wd)


_SIGTERM_CHILD = """
    import time
    import typer
    from lorsu_edge.cli.errors import handle_errors
    from lorsu_edge.session import Workdir, graceful_sigterm

    @handle_errors
    def run(root: str) -> None:
        wd = Workdir.open(root)
        with wd.lock(), graceful_sigterm(), wd.staged_session() as partial:
            (partial / "encoder.safetensors").write_bytes(b"half written")
            print("ready", flush=True)
            for _ in range(600):
                time.sleep(0.1)
            wd.commit_session(partial, accepted=True)

    typer.run(run)
"""


def test_sigterm_stops_gracefully_with_exit_130(wd: Workdir) -> None:
    with wd.lock():
        _commit(wd, ["a"])
    before = _tree(wd.root)
    proc = _child(_SIGTERM_CHILD, str(wd.root))
    _wait_for_line(proc, "ready")
    assert _partials(wd)  # the child really is mid-session
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "error: stopped by SIGTERM" in err and "Traceback" not in err
    assert not _partials(wd) and wd.current() == "0001"
    assert _tree(wd.root) == before
    with wd.lock() as recovery:  # released, and nothing left to clean
        assert not recovery.removed_partials and recovery.stale_owner is None


# --- locking across processes ---------------------------------------------------------------------

_HOLDER_CHILD = """
    import sys, time
    from lorsu_edge.session import Workdir

    wd = Workdir.open(sys.argv[1])
    with wd.lock():
        partial = wd.begin_session()
        print("ready", flush=True)
        time.sleep(120)
"""


def test_second_process_gets_locked_error_naming_the_pid(wd: Workdir) -> None:
    proc = _child(_HOLDER_CHILD, str(wd.root))
    try:
        _wait_for_line(proc, "ready")
        with pytest.raises(LockedError) as info, wd.lock():
            pass
        assert info.value.exit_code == ExitCode.LOCKED
        assert f"in use by pid {proc.pid} since" in info.value.message
        assert _partials(wd)  # the holder's partial session was not cleaned from under it
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_stale_lock_of_a_killed_process_is_taken_over(wd: Workdir) -> None:
    proc = _child(_HOLDER_CHILD, str(wd.root))
    _wait_for_line(proc, "ready")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (wd.root / ".lock.owner").exists()  # the dead holder never cleaned up
    with wd.lock() as recovery:
        assert recovery.stale_owner is not None and recovery.stale_owner["pid"] == proc.pid
        assert len(recovery.removed_partials) == 1 and not _partials(wd)
        assert _commit(wd, ["a"]) == "0001"
    assert not (wd.root / ".lock.owner").exists()


# --- run log --------------------------------------------------------------------------------------


def test_run_log_appends_and_survives_a_torn_line(wd: Workdir) -> None:
    assert wd.log_run({"verb": "adapt", "exit_code": 0})
    with open(wd.root / "runs.jsonl", "a") as f:
        f.write('{"verb": "adapt", "exit_co')  # a crash mid-line
    assert wd.log_run({"verb": "adapt", "exit_code": 6})
    runs = wd.runs()
    assert [r["exit_code"] for r in runs] == [0, 6]
    assert all(r["pid"] == os.getpid() and "time" in r for r in runs)


def test_run_log_failure_is_reported_not_raised(wd: Workdir) -> None:
    (wd.root / "runs.jsonl").mkdir()  # unwritable as a file
    assert wd.log_run({"verb": "adapt"}) is False


# --- CLI ------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("history")(history_cli.command)
    app.command("rollback")(rollback_cli.command)
    return app


def _populated(wd: Workdir) -> None:
    with wd.lock():
        _commit(wd, ["a"], report={"created": "2026-11-27T10:00:00+00:00", "data": "/inbox/day1", "samples_used": 15,
                                   "method": "lorsu", "trainable_params": 1_234_567, "loss_first": 2.5,
                                   "loss_last": 0.75, "target_accuracy": 0.652, "control_accuracy": 0.881,
                                   "seconds": 42.25, "peak_memory_bytes": 3 << 30})
        _commit(wd, ["b"], accepted=False, reason="control -4.0 points", report={"method": "lorsu"})


def test_history_table_and_json(wd: Workdir) -> None:
    _populated(wd)
    runner = CliRunner()
    res = runner.invoke(_app(), ["history", "--workdir", str(wd.root)])
    assert res.exit_code == 0, res.output
    assert "0001*" in res.output and "rejected: control -4.0 points" in res.output
    assert "1.23M" in res.output and "2.5 -> 0.75" in res.output and "3.0 GiB" in res.output
    res = runner.invoke(_app(), ["history", "--workdir", str(wd.root), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["current"] == "0001" and doc["settings"] == {"base_model": "tiny-clip"}
    assert [(s["id"], s["status"]) for s in doc["sessions"]] == [("0001", "accepted"), ("0002", "rejected")]


def test_history_row_prints_missing_keys_as_dash() -> None:
    cells = history_cli.format_row({"id": "0002", "status": "accepted"})
    assert cells[0] == "0002" and cells[9] == "accepted"
    assert cells[1:9] == ["-"] * 8 and cells[10:] == ["-", "-"]
    pair = history_cli.format_row({"target_accuracy": {"before": 0.35, "after": 0.65}})
    assert pair[7] == "0.350 -> 0.650"


def test_rollback_verb(wd: Workdir) -> None:
    _populated(wd)
    runner = CliRunner()
    res = runner.invoke(_app(), ["rollback", "base", "--workdir", str(wd.root)])
    assert res.exit_code == 0 and "the base model (was session 0001)" in res.output
    res = runner.invoke(_app(), ["rollback", "1", "--workdir", str(wd.root)])
    assert res.exit_code == 0 and wd.current() == "0001"
    res = runner.invoke(_app(), ["rollback", "2", "--workdir", str(wd.root)])
    assert res.exit_code == ExitCode.BAD_INPUT and "rejected" in res.output and "hint:" in res.output
    assert wd.current() == "0001"
    assert [r["to"] for r in wd.runs() if r.get("verb") == "rollback"] == [None, "0001"]


def test_verbs_on_missing_or_locked_workdir(wd: Workdir, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(_app(), ["history", "--workdir", str(tmp_path / "none")])
    assert res.exit_code == ExitCode.BAD_INPUT and "error: no lorsu-edge workdir" in res.output
    other = Workdir.open(wd.root)
    with other.lock():
        res = runner.invoke(_app(), ["rollback", "base", "--workdir", str(wd.root)])
    assert res.exit_code == ExitCode.LOCKED and f"pid {os.getpid()}" in res.output


def test_damaged_pointer_hides_nothing_and_rollback_repairs_it(wd: Workdir) -> None:
    with wd.lock():
        _commit(wd, ["a"])
        _commit(wd, ["b"])
    (wd.root / CURRENT_FILE).write_text('{"session": "../etc", "through": 2}')
    with pytest.raises(BadInputError, match="missing or damaged"):
        wd.current()
    with wd.lock() as recovery:
        assert not recovery.removed_partials  # nothing is provably uncommitted: nothing is deleted
        assert [s.id for s in wd.sessions()] == ["0001", "0002"]
        assert wd.rollback("1") is None
    assert wd.current() == "0001" and [s.id for s in wd.sessions()] == ["0001", "0002"]


# --- remembered paths -----------------------------------------------------------------------------


def test_adapt_makes_local_paths_absolute_and_keeps_hub_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: `--model fx/model` was remembered as typed and became a hub id from another directory."""
    from lorsu_edge.adapt import AdaptOptions, with_absolute_paths

    (tmp_path / "fx" / "model").mkdir(parents=True)
    (tmp_path / "day").mkdir()
    monkeypatch.chdir(tmp_path)
    opts = with_absolute_paths(AdaptOptions(data=Path("day"), model="fx/model", control=Path("day")))
    assert opts.model == str(tmp_path.resolve() / "fx" / "model")
    assert opts.data == opts.control == tmp_path.resolve() / "day"
    assert with_absolute_paths(AdaptOptions(data=Path("day"), model="org/name")).model == "org/name"
