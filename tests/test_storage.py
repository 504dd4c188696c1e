"""Full disks for real: a tiny tmpfs filled to the brim (root only) and RLIMIT_FSIZE in a child process.

No mocks: the point is to see what the real writers (safetensors, json, os.write) raise. safetensors
raises `SafetensorError`, not OSError, on a full disk; a mock that raises OSError cannot see that.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lorsu_edge.errors import BadInputError, ExitCode, StorageError
from lorsu_edge.session import ENCODER_FILE, Workdir

from test_faults import FAST, _env, make_site  # same tiny model and data recipe

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    """A real, tiny tmpfs at `where` (skipped, with the reason shown, where mounting is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the RLIMIT_FSIZE tests cover this case")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path, leave: int) -> None:
    """Fill the filesystem of `fs` until only about `leave` bytes are free."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def _limited(limit: int):
    def pre() -> None:  # in the child: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def _workdir(root: Path) -> Workdir:
    wd = Workdir.open(root, create=True)
    with wd.lock():  # creates .lock, which stays
        pass
    return wd


# --- the writer itself --------------------------------------------------------------------------


def _staged_save(wd: Workdir) -> None:
    from safetensors.torch import save_file

    with wd.lock(), wd.staged_session() as partial:
        save_file({"w": torch.zeros(2_000_000)}, str(partial / ENCODER_FILE))


def test_safetensors_on_a_full_tmpfs_is_a_storage_error(tmp_path: Path) -> None:
    """safetensors' SafetensorError('... (os error 28)') must become StorageError (exit 8), not a bug (exit 1)."""
    with tmpfs(tmp_path / "fs") as fs:
        wd = _workdir(fs / "runs")
        before = tree(wd.root)
        with pytest.raises(StorageError) as info:
            _staged_save(wd)
        assert info.value.exit_code == ExitCode.IO and "No space left" in info.value.message
        assert tree(wd.root) == before  # the partial session is gone, nothing else changed


_CHILD = """
    import sys, torch
    from lorsu_edge.errors import StorageError
    from lorsu_edge.session import Workdir
    from safetensors.torch import save_file

    wd = Workdir.open(sys.argv[1])
    try:
        with wd.lock(), wd.staged_session() as partial:
            save_file({"w": torch.zeros(2_000_000)}, str(partial / "encoder.safetensors"))
    except StorageError as e:
        print("StorageError", e.exit_code.value, e.message)
"""


def test_safetensors_past_the_file_size_limit_is_a_storage_error(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (EFBIG) is the fallback where no tmpfs can be mounted: same mapping, same cleanup."""
    wd = _workdir(tmp_path / "runs")
    before = tree(wd.root)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), str(wd.root)], capture_output=True,
                         text=True, env=_env(), preexec_fn=_limited(64 * 1024), timeout=120)
    assert res.stdout.startswith("StorageError 8 ") and "File too large" in res.stdout, res.stdout + res.stderr
    assert tree(wd.root) == before


# --- the CLI on a workdir that cannot take another session -------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_site(tmp_path_factory.mktemp("storage"))


def _adapt(workdir: Path, model: Path, data: Path, preexec=None, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lorsu_edge.cli.main", "adapt", "--data", str(data), "--workdir", str(workdir),
           "--model", str(model), *FAST, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, preexec_fn=preexec)


def _last_run(runs: Path) -> dict:
    return Workdir.open(runs).runs()[-1]


@pytest.mark.slow
def test_adapt_on_a_full_disk_exits_8_and_changes_nothing(made: dict[str, Path], tmp_path: Path) -> None:
    """Today: exit 1 ("internal error: SafetensorError"). The free-space check refuses before training."""
    with tmpfs(tmp_path / "fs") as fs:
        runs = fs / "runs"
        shutil.copytree(made["runs"], runs)
        fill(fs, leave=64 * 1024)  # less than one encoder (133 KiB)
        before = tree(runs, skip=("runs.jsonl",))
        res = _adapt(runs, made["model"], made["day2"])
        assert res.returncode == ExitCode.IO, res.stderr
        assert "a session needs about" in res.stderr and "prune" in res.stderr  # refused before training
        assert tree(runs, skip=("runs.jsonl",)) == before
        if (runs / "runs.jsonl").stat().st_size > (made["runs"] / "runs.jsonl").stat().st_size:
            assert _last_run(runs)["exit_code"] == ExitCode.IO


@pytest.mark.slow
def test_adapt_past_the_file_size_limit_exits_8_and_changes_nothing(made: dict[str, Path], tmp_path: Path) -> None:
    """The free-space check passes (the disk has room) but the encoder write fails inside safetensors."""
    runs = tmp_path / "runs"
    shutil.copytree(made["runs"], runs)
    before = tree(runs, skip=("runs.jsonl",))
    res = _adapt(runs, made["model"], made["day2"], _limited(64 * 1024))
    assert res.returncode == ExitCode.IO, res.stderr
    assert "File too large" in res.stderr and "Traceback" not in res.stderr
    assert tree(runs, skip=("runs.jsonl",)) == before
    assert _last_run(runs)["exit_code"] == ExitCode.IO and Workdir.open(runs).current() == "0001"


# --- --save-full ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_save_full_of_a_4bit_run_is_the_given_vlm_with_the_new_tower(tmp_path: Path) -> None:
    """Bug: --save-full wrote the in-memory model, i.e. a 4-bit LLM after a 4-bit run, and was not staged."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from lorsu_edge.load import bitsandbytes_status
    from lorsu_edge.tiny import save_tiny, write_toy_images

    if bitsandbytes_status() is not None:
        pytest.skip(f"bitsandbytes unusable here: {bitsandbytes_status()}")
    model = save_tiny("llava", tmp_path / "llava")
    data = write_toy_images(tmp_path / "vqa", vqa=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "stale.txt").write_text("yesterday's folder is replaced only once the new one is complete")
    res = _adapt(tmp_path / "runs", model, data, None, "--quantize", "4bit", "--save-full", str(full), "--lr", "3e-2")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".full")) == []  # no partial left
    assert not (full / "stale.txt").exists()
    base = {k: v for f in sorted(model.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    saved = {k: v for f in sorted(full.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    encoder = load_file(str(tmp_path / "runs" / "sessions" / "0001" / ENCODER_FILE))
    from lorsu_edge.save_full import checkpoint_names

    names = checkpoint_names(list(saved), encoder)  # checkpoint key -> in-memory (session file) name
    assert saved.keys() == base.keys() and sorted(names.values()) == sorted(encoder)
    assert all(torch.equal(saved[k], encoder[n]) for k, n in names.items())
    assert all(torch.equal(saved[k], v) and saved[k].dtype == v.dtype for k, v in base.items() if k not in names)
    assert any(not torch.equal(saved[k], base[k]) for k in names)
    loaded = AutoModelForImageTextToText.from_pretrained(full)  # a complete, loadable folder
    assert not any("4bit" in type(m).__name__ for m in loaded.modules())


@pytest.mark.slow
def test_full_disk_after_the_commit_reports_the_committed_session(made: dict[str, Path], tmp_path: Path) -> None:
    """--save-full fails (file-size limit) after the session was committed: exit 8, and the message and
    runs.jsonl say session 0002 was committed and is current instead of "failed"."""
    runs = tmp_path / "runs"
    shutil.copytree(made["runs"], runs)
    full = tmp_path / "full"
    res = _adapt(runs, made["model"], made["day2"], _limited(200 * 1024), "--save-full", str(full))
    assert res.returncode == ExitCode.IO, res.stderr
    assert "session 0002 was committed (accepted), then: cannot write" in res.stderr
    last = _last_run(runs)
    assert (last["status"], last["session"], last["exit_code"]) == ("accepted", "0002", ExitCode.IO)
    assert Workdir.open(runs).current() == "0002"
    assert not full.exists() and not list(tmp_path.glob(".full.*"))  # the partial folder is gone


def test_save_full_puts_back_a_folder_a_killed_run_moved_aside(tmp_path: Path) -> None:
    """A run killed between moving yesterday's DIR aside and renaming the new one in: the next run puts the
    old folder back before anything else, so DIR is never simply gone."""
    from safetensors.torch import load_file, save_file

    from lorsu_edge.save_full import save_full

    base = tmp_path / "base"
    base.mkdir()
    save_file({"vision_model.w": torch.zeros(4), "text.w": torch.ones(2)}, str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")
    aside = tmp_path / ".full.old-abc123"
    aside.mkdir()
    (aside / "yesterday.txt").write_text("x")
    with pytest.raises(BadInputError):  # a failing save keeps what DIR had
        save_full(base, {"vision_model.nope": torch.zeros(4)}, tmp_path / "full")
    assert (tmp_path / "full" / "yesterday.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "full"]
    save_full(base, {"vision_model.w": torch.full((4,), 2.0)}, tmp_path / "full")
    saved = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert torch.equal(saved["vision_model.w"], torch.full((4,), 2.0)) and torch.equal(saved["text.w"], torch.ones(2))
    assert not (tmp_path / "full" / "yesterday.txt").exists() and (tmp_path / "full" / "config.json").is_file()
