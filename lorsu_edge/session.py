"""The workdir: committed sessions on disk, the current-model pointer, history, rollback, one run at a time.

Layout of a workdir (default `./lorsu-runs`):

    workdir.json         format version, created time, remembered settings (base model, control dir, ...)
    current.json         {"session": "0003" | null, "through": "0004" | null, "updated": time}
    sessions/0001/       committed sessions: never modified after commit
        status.json      {"status": "accepted" | "rejected", "reason", "parent", "committed"}
        report.json, samples.json, encoder.safetensors, adapter.* (written by the recipe)
        pruned.json      only when `prune` removed encoder.safetensors (rebuilt from the adapters on demand)
    sessions/.partial-*  a session being written (or left by a killed run; removed by the next run)
    runs.jsonl           one JSON line per run, for monitoring
    .lock, .lock.owner   the run lock (flock) and who holds it (pid, host, since, command)

Commit protocol, which makes a SIGKILL at any moment harmless:
1. the recipe writes every file of the session into a partial directory;
2. `commit_session` writes `status.json`, fsyncs the tree, renames the directory to the next id
   and fsyncs `sessions/`;
3. it then replaces `current.json` atomically. That write is the commit point: `through` names the
   highest committed id, so a renamed directory above `through` is a session whose commit never
   finished. Readers ignore it and the next locked run deletes it, together with partial dirs and
   temp files, so a killed run changes nothing and its samples are not counted as seen.

Usage by the recipe:

    wd = Workdir.open(root, create=True)
    with wd.lock(), graceful_sigterm():          # LockedError if another run holds it
        seen = wd.seen_hashes()
        with wd.staged_session() as partial:     # discarded on any exception
            ... write encoder.safetensors, report.json, samples.json into partial ...
            sid = wd.commit_session(partial, accepted=True, reason="")
        wd.log_run({"verb": "adapt", "session": sid, "exit_code": 0})
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorsu_edge.atomic import (
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    is_temp_name,
    storage_error,
    storage_errors,
)
from lorsu_edge.errors import BadInputError, InterruptedRunError, LockedError, LorsuError

FORMAT_VERSION = 1
DEFAULT_WORKDIR = Path("lorsu-runs")

WORKDIR_FILE = "workdir.json"
CURRENT_FILE = "current.json"
SESSIONS_DIR = "sessions"
RUNS_FILE = "runs.jsonl"
LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"

STATUS_FILE = "status.json"
REPORT_FILE = "report.json"
SAMPLES_FILE = "samples.json"
ENCODER_FILE = "encoder.safetensors"

PARTIAL_PREFIX = ".partial-"
BASE = "base"
_ID_RE = re.compile(r"^\d{4,}$")
# What a workdir whose creation was interrupted may already contain (so `create=True` may go on).
_OWN_NAMES = frozenset({WORKDIR_FILE, CURRENT_FILE, SESSIONS_DIR, RUNS_FILE, LOCK_FILE, OWNER_FILE})

log = logging.getLogger(__name__)


def now_iso(timespec: str = "seconds") -> str:
    """The current UTC time as ISO 8601, with seconds by default (the time format of every workdir file)."""
    return datetime.now(timezone.utc).isoformat(timespec=timespec)


def absolute_source(source: str | None) -> str | None:
    """A model or folder argument as it is remembered: an existing local path made absolute (so another
    working directory cannot turn `fx/model` into a hub id), anything else (a hub id) as typed."""
    if not source:
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def format_id(n: int) -> str:
    """Session number -> directory name ("0007")."""
    return f"{n:04d}"


@dataclass(frozen=True)
class SessionInfo:
    """A committed session as recorded by its `status.json`."""

    id: str
    path: Path
    accepted: bool
    reason: str
    """Why it was rejected (or a note on acceptance); empty when there is nothing to say."""
    parent: str | None
    """The session whose encoder this one started from (None: the base model)."""
    committed: str
    """ISO time of the commit."""

    @property
    def status(self) -> str:
        """"accepted" or "rejected"."""
        return "accepted" if self.accepted else "rejected"


@dataclass
class Recovery:
    """What taking the lock cleaned up after an earlier run that did not finish."""

    removed_partials: list[str] = field(default_factory=list)
    """Partial session dirs (and uncommitted renamed ones) deleted."""
    removed_temps: list[str] = field(default_factory=list)
    """Leftover temp files of atomic writes deleted."""
    stale_owner: dict[str, Any] | None = None
    """The `.lock.owner` record of a holder that died without releasing (its flock died with it)."""

    def __bool__(self) -> bool:
        return bool(self.removed_partials or self.removed_temps or self.stale_owner)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the run's monitoring line)."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the user, empty when nothing was done."""
        parts = []
        if self.stale_owner:
            parts.append(f"took over the lock of pid {self.stale_owner.get('pid', '?')}, which is no longer running")
        if self.removed_partials:
            n = len(self.removed_partials)
            parts.append(f"removed {n} unfinished session{'s' if n > 1 else ''} left by an interrupted run")
        return "; ".join(parts)


def _read_json(path: Path) -> Any | None:
    """Parsed JSON of `path`, None when it does not exist; a damaged file is a BadInputError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path} is damaged ({e.msg} at line {e.lineno})",
                            hint="restore it from a backup or remove the session directory it belongs to") from None


def _remove_tree(path: Path) -> None:
    """Delete a session directory so that a crash midway never leaves a committed-looking half.

    A committed-looking dir is first renamed to a partial name (atomic), then deleted.
    """
    if not path.name.startswith(PARTIAL_PREFIX):
        doomed = path.with_name(f"{PARTIAL_PREFIX}gone-{path.name}-{secrets.token_hex(3)}")
        os.rename(path, doomed)
        path = doomed
    shutil.rmtree(path, ignore_errors=True)


class Workdir:
    """One workdir on disk. Create with `Workdir.open`; mutate only inside `with wd.lock():`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock: Any = None  # filelock.FileLock while held
        self._depth = 0
        self.recovery = Recovery()
        """What the most recent `lock()` cleaned up."""

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path | str | None = None, *, create: bool = False,
             settings: dict[str, Any] | None = None) -> Workdir:
        """Open the workdir at `root` (default `./lorsu-runs`).

        `create=True` makes a new one if needed, remembering `settings` (e.g. `model`, `control`);
        an existing one keeps its settings (use `update_settings`). Raises BadInputError when the
        workdir is missing (without `create`), when `root` is a non-empty foreign directory, or when
        it was written by a newer lorsu-edge.
        """
        wd = cls(Path(root) if root is not None else DEFAULT_WORKDIR)
        if not (wd.root / WORKDIR_FILE).exists():
            if not create:
                raise BadInputError(f"no lorsu-edge workdir at {wd.root}",
                                    hint="run `lorsu-edge adapt` first, or pass --workdir DIR")
            wd._create(settings or {})
        wd._check_format()
        return wd

    def _create(self, settings: dict[str, Any]) -> None:
        if self.root.is_dir():
            foreign = [p.name for p in self.root.iterdir() if p.name not in _OWN_NAMES and not is_temp_name(p.name)]
            if foreign:
                raise BadInputError(f"{self.root} is not empty and is not a lorsu-edge workdir",
                                    hint="pass a new or empty directory with --workdir")
        elif self.root.exists():
            raise BadInputError(f"{self.root} is a file, not a workdir", hint="pass a directory with --workdir")
        with storage_errors(str(self.root)):
            self.sessions_root.mkdir(parents=True, exist_ok=True)
        # current.json first: workdir.json is what marks the workdir as complete.
        if not (self.root / CURRENT_FILE).exists():
            self._write_pointer(None, None)
        atomic_write_json(self.root / WORKDIR_FILE,
                          {"format": FORMAT_VERSION, "created": now_iso(), "settings": dict(settings)})

    def _check_format(self) -> None:
        doc = self._workdir_doc()
        fmt = doc.get("format")
        if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
            raise BadInputError(f"{self.root} has workdir format {fmt!r}; this lorsu-edge reads up to {FORMAT_VERSION}",
                                hint="upgrade lorsu-edge, or use another --workdir")

    def _workdir_doc(self) -> dict[str, Any]:
        doc = _read_json(self.root / WORKDIR_FILE)
        if not isinstance(doc, dict):
            raise BadInputError(f"{self.root / WORKDIR_FILE} is missing or not a JSON object",
                                hint="pass the right --workdir")
        return doc

    @property
    def sessions_root(self) -> Path:
        return self.root / SESSIONS_DIR

    # --- settings ---------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The remembered settings (base `model`, `control` dir, ...), as stored in workdir.json."""
        return dict(self._workdir_doc().get("settings") or {})

    def remembered(self, key: str) -> Any:
        """A remembered setting; a path is returned absolute, so it never turns into a hub id.

        New workdirs store local paths absolute (`absolute_source`). Older ones stored them as typed:
        a relative value that exists next to the workdir (relative to its parent directory, where the
        nightly job that created `./lorsu-runs` ran) is taken from there; any other value is returned
        as stored (a hub id, or a folder that is gone: loading it then fails with exit 3).
        """
        value = self.settings().get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            beside = self.root.resolve().parent / value
            if beside.exists():
                return str(beside)
        return value

    def created(self) -> str | None:
        """ISO time the workdir was created."""
        return self._workdir_doc().get("created")

    def update_settings(self, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the settings (a None value removes the key); returns the new settings."""
        self._require_lock()
        doc = self._workdir_doc()
        settings = dict(doc.get("settings") or {})
        for key, value in changes.items():
            if value is None:
                settings.pop(key, None)
            else:
                settings[key] = value
        doc["settings"] = settings
        atomic_write_json(self.root / WORKDIR_FILE, doc)
        return settings

    # --- locking and recovery -------------------------------------------------------------------

    @property
    def locked(self) -> bool:
        """True while this object holds the lock."""
        return self._depth > 0

    def _require_lock(self) -> None:
        if not self.locked:
            raise RuntimeError("this workdir operation needs `with workdir.lock():`")

    @contextlib.contextmanager
    def lock(self) -> Iterator[Recovery]:
        """Hold the workdir for one run; yields what was cleaned up after an earlier interrupted run.

        Raises LockedError (exit code LOCKED) naming the holder's pid when another process holds
        it. The lock is an flock, which the kernel drops when its process dies, so the lock of a
        killed run is free and is simply taken over. Re-entrant within this object.
        """
        if self._depth:
            self._depth += 1
            try:
                yield self.recovery
            finally:
                self._depth -= 1
            return
        self._acquire()
        self._depth = 1
        try:
            self.recovery = self._after_acquire()
            yield self.recovery
        finally:
            self._depth = 0
            self._release()

    def _acquire(self) -> None:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.root / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise LockedError(self._holder_message(),
                              hint="wait for that run to finish or stop it; a lock left by a dead process "
                                   "is taken over automatically") from None
        except OSError as e:
            raise (storage_error(e, str(self.root / LOCK_FILE)) or e) from e
        self._lock = lock

    def _release(self) -> None:
        with contextlib.suppress(OSError):
            (self.root / OWNER_FILE).unlink()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def _holder_message(self) -> str:
        try:
            owner = json.loads((self.root / OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            owner = None
        if not isinstance(owner, dict) or "pid" not in owner:
            return f"workdir {self.root} is in use by another process"
        host = owner.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        return f"workdir {self.root} is in use by pid {owner['pid']}{where} since {owner.get('since', '?')}"

    def _after_acquire(self) -> Recovery:
        stale = _read_json_quiet(self.root / OWNER_FILE)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(),
                 "command": " ".join(sys.argv)[:500]}
        atomic_write_json(self.root / OWNER_FILE, owner)
        recovery = self._recover()
        if isinstance(stale, dict) and stale.get("pid") is not None:
            recovery.stale_owner = stale
        if recovery:
            log.info("workdir %s: %s", self.root, recovery.summary() or "removed leftover temp files")
        return recovery

    def _recover(self) -> Recovery:
        """Delete partial dirs, uncommitted renamed sessions and temp files (under the lock only)."""
        recovery = Recovery()
        recovery.removed_partials = [p.name for p in self._uncommitted_dirs()]
        for name in recovery.removed_partials:
            _remove_tree(self.sessions_root / name)
        for folder in (self.root, self.sessions_root):
            for p in folder.iterdir() if folder.is_dir() else ():
                if is_temp_name(p.name) and p.is_file():
                    p.unlink(missing_ok=True)
                    recovery.removed_temps.append(p.name)
        return recovery

    def _uncommitted_dirs(self) -> list[Path]:
        if not self.sessions_root.is_dir():
            return []
        found = [p for p in self.sessions_root.iterdir() if p.is_dir() and p.name.startswith(PARTIAL_PREFIX)]
        pointer = self._pointer()
        if pointer is not None:  # without a readable pointer nothing is provably uncommitted: keep it
            through = pointer.get("through")
            found += [self.sessions_root / i for i in self._all_ids() if through is None or int(i) > int(through)]
        return sorted(found)

    def clean_partial(self) -> list[str]:
        """Remove what interrupted runs left behind; returns the names removed. Needs the lock."""
        self._require_lock()
        recovery = self._recover()
        return recovery.removed_partials

    # --- the current pointer ------------------------------------------------------------------------

    def _pointer(self) -> dict[str, Any] | None:
        try:
            doc = _read_json(self.root / CURRENT_FILE)
        except BadInputError:
            return None
        if not isinstance(doc, dict) or not all(_is_id_or_none(doc.get(k, "")) for k in ("session", "through")):
            return None
        return doc

    def _write_pointer(self, session: str | None, through: str | None) -> None:
        atomic_write_json(self.root / CURRENT_FILE, {"session": session, "through": through, "updated": now_iso()})

    def current(self) -> str | None:
        """Id of the current (accepted) session, None for the base model."""
        pointer = self._pointer()
        if pointer is None:
            raise BadInputError(f"{self.root / CURRENT_FILE} is missing or damaged",
                                hint="choose the current model with `lorsu-edge rollback ID|base`")
        sid = pointer["session"]
        if sid is not None and not (self.sessions_root / sid / STATUS_FILE).is_file():
            raise BadInputError(f"the current model is session {sid}, which is missing from {self.sessions_root}",
                                hint="choose another with `lorsu-edge rollback ID|base`")
        return sid

    def current_encoder(self) -> Path | None:
        """The current session's `encoder.safetensors` (None: start from the base model's weights)."""
        sid = self.current()
        return None if sid is None else self.sessions_root / sid / ENCODER_FILE

    # --- sessions -------------------------------------------------------------------------------

    def _all_ids(self) -> list[str]:
        if not self.sessions_root.is_dir():
            return []
        return sorted((p.name for p in self.sessions_root.iterdir() if p.is_dir() and _ID_RE.match(p.name)), key=int)

    def _committed_ids(self) -> list[str]:
        pointer = self._pointer()
        through = None if pointer is None else pointer.get("through")
        if pointer is None:  # damaged pointer: show everything rather than hide the user's sessions
            return self._all_ids()
        return [i for i in self._all_ids() if through is not None and int(i) <= int(through)]

    def normalize_id(self, ref: str | int) -> str | None:
        """"base" -> None; "3", "0003" or 3 -> "0003". BadInputError for anything else."""
        text = str(ref).strip()
        if text.lower() == BASE:
            return None
        if not text.isdigit():
            raise BadInputError(f"{ref!r} is not a session id", hint="use an id from `lorsu-edge history`, or `base`")
        return format_id(int(text))

    def session(self, ref: str | int) -> SessionInfo:
        """The committed session `ref`; BadInputError if there is none."""
        sid = self.normalize_id(ref)
        if sid is None or sid not in self._committed_ids():
            raise BadInputError(f"no session {ref} in {self.root}", hint="list them with `lorsu-edge history`")
        info = self._info(sid)
        if info is None:
            raise BadInputError(f"session {sid} in {self.root} has no readable {STATUS_FILE}",
                                hint="the session directory is damaged; remove it or restore it")
        return info

    def session_dir(self, ref: str | int) -> Path:
        """Directory of the committed session `ref`."""
        return self.session(ref).path

    def _info(self, sid: str) -> SessionInfo | None:
        path = self.sessions_root / sid
        try:
            doc = _read_json(path / STATUS_FILE)
        except BadInputError:
            doc = None
        if not isinstance(doc, dict) or doc.get("status") not in ("accepted", "rejected"):
            return None
        return SessionInfo(id=sid, path=path, accepted=doc["status"] == "accepted", reason=str(doc.get("reason") or ""),
                           parent=doc.get("parent"), committed=str(doc.get("committed") or ""))

    def sessions(self) -> list[SessionInfo]:
        """Every committed session in id order (damaged ones are skipped with a warning)."""
        out = []
        for sid in self._committed_ids():
            info = self._info(sid)
            if info is None:
                log.warning("session %s in %s has no readable %s; ignored", sid, self.root, STATUS_FILE)
            else:
                out.append(info)
        return out

    def begin_session(self) -> Path:
        """A fresh, empty partial directory for the recipe to write a session into. Needs the lock."""
        self._require_lock()
        path = self.sessions_root / f"{PARTIAL_PREFIX}{now_iso().replace(':', '')}-{secrets.token_hex(3)}"
        with storage_errors(str(path)):
            path.mkdir(parents=True)
        return path

    def discard_session(self, partial: Path) -> None:
        """Delete a partial directory (no error if it is already gone)."""
        partial = Path(partial)
        if partial.name.startswith(PARTIAL_PREFIX) and self._is_own_partial(partial):
            shutil.rmtree(partial, ignore_errors=True)

    def _is_own_partial(self, partial: Path) -> bool:
        return partial.resolve().parent == self.sessions_root.resolve()

    @contextlib.contextmanager
    def staged_session(self) -> Iterator[Path]:
        """`begin_session` whose partial dir is discarded unless `commit_session` ran on it.

        A storage OSError from the body (e.g. a full disk inside `save_file`) becomes StorageError.
        """
        partial = self.begin_session()
        try:
            with storage_errors(f"session files in {partial}"):
                yield partial
        finally:
            self.discard_session(partial)  # a no-op after a commit: the dir was renamed away

    def commit_session(self, partial: Path, *, accepted: bool, reason: str = "") -> str:
        """Publish a partial session under the next id; if `accepted`, make it the current model.

        Writes `status.json`, fsyncs the tree, renames it to `sessions/NNNN`, then moves the
        pointer (the commit point). SIGTERM/SIGINT arriving meanwhile are held back until the
        commit is done. If the pointer write fails the session is unpublished again and the
        error raised; the current model never changes unless the whole commit succeeded.
        """
        self._require_lock()
        partial = Path(partial)
        if not (partial.name.startswith(PARTIAL_PREFIX) and partial.is_dir() and self._is_own_partial(partial)):
            raise ValueError(f"{partial} is not a partial session of {self.root}")
        done: list[str] = []
        try:
            with _signals_deferred():
                done.append(self._commit(partial, accepted, reason))
        except (InterruptedRunError, KeyboardInterrupt) as e:  # a stop held back until the commit was done
            if not done:
                raise
            raise _stopped_after_commit(e, done[0], accepted) from None
        return done[0]

    def _commit(self, partial: Path, accepted: bool, reason: str) -> str:
        parent = self.current()
        status = {"status": "accepted" if accepted else "rejected", "reason": reason, "parent": parent,
                  "committed": now_iso()}
        atomic_write_json(partial / STATUS_FILE, status)
        fsync_tree(partial)
        sid = self._next_id()
        target = self.sessions_root / sid
        with storage_errors(str(target)):
            os.rename(partial, target)
            fsync_dir(self.sessions_root)
        fault_point("commit")  # the narrowest window: renamed, pointer not yet moved
        try:
            self._write_pointer(sid if accepted else parent, sid)
        except BaseException:
            with contextlib.suppress(OSError):
                _remove_tree(target)
            raise
        return sid

    def _next_id(self) -> str:
        pointer = self._pointer() or {}
        known = [int(i) for i in self._all_ids()]
        if pointer.get("through") is not None:
            known.append(int(pointer["through"]))
        return format_id(max(known, default=0) + 1)

    def rollback(self, ref: str | int) -> str | None:
        """Make the accepted session `ref` (or "base") the current model; returns the previous current.

        BadInputError for an unknown or rejected session. Needs the lock.
        """
        self._require_lock()
        target = self.normalize_id(ref)
        if target is not None:
            info = self.session(target)
            if not info.accepted:
                why = f" ({info.reason})" if info.reason else ""
                raise BadInputError(f"session {target} was rejected{why}; only accepted sessions can be current",
                                    hint="pick an accepted id from `lorsu-edge history`, or `base`")
        pointer = self._pointer()
        previous = pointer["session"] if pointer is not None else None
        ids = self._committed_ids()
        self._write_pointer(target, ids[-1] if ids else None)
        return previous

    # --- history, inbox, run log ----------------------------------------------------------------

    def history(self) -> list[dict[str, Any]]:
        """One dict per committed session: its `report.json` keys plus id, status, reason, parent,
        committed and current (whether it is the current model). Nothing is stored twice: status
        comes from `status.json` only, everything else from the report.
        """
        pointer = self._pointer()
        current = pointer["session"] if pointer is not None else None
        rows = []
        for info in self.sessions():
            try:
                report = _read_json(info.path / REPORT_FILE)
            except BadInputError as e:
                log.warning("%s", e.message)
                report = None
            row = dict(report) if isinstance(report, dict) else {}
            row.update(id=info.id, status=info.status, reason=info.reason, parent=info.parent,
                       committed=info.committed, current=info.id == current)
            rows.append(row)
        return rows

    def seen_hashes(self, *, include_rejected: bool = True) -> set[str]:
        """sha256 of every sample a committed session trained on (the inbox's memory).

        Rejected sessions count by default: their samples were trained on, and retrying them every
        night would only be rejected again.
        """
        seen: set[str] = set()
        for info in self.sessions():
            if info.accepted or include_rejected:
                seen |= read_samples_file(info.path)
        return seen

    def log_run(self, record: dict[str, Any]) -> bool:
        """Append one JSON line (with `time` and `pid` added) to runs.jsonl and fsync it.

        Never raises for a storage problem (monitoring must not mask the run's own error): returns
        False and logs a warning instead. Safe without the lock (O_APPEND of one short line).
        """
        line = {"time": now_iso(), "pid": os.getpid(), **record}
        data = (json.dumps(line, sort_keys=True, default=str) + "\n").encode("utf-8")
        path = self.root / RUNS_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if _ends_without_newline(fd):  # a line torn by a crash: do not glue onto it
                    data = b"\n" + data
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("could not append to %s: %s", path, e)
            return False
        return True

    def runs(self) -> list[dict[str, Any]]:
        """The run records of runs.jsonl, oldest first (torn or foreign lines skipped)."""
        try:
            lines = (self.root / RUNS_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out


# --- samples.json ---------------------------------------------------------------------------------


def write_samples_file(session_dir: Path, hashes: Iterable[str], **extra: Any) -> None:
    """Write `samples.json` = {"sha256": [sorted unique hashes], **extra} into a (partial) session dir."""
    atomic_write_json(Path(session_dir) / SAMPLES_FILE, {**extra, "sha256": sorted(set(hashes))})


def read_samples_file(session_dir: Path) -> set[str]:
    """Hashes recorded in a session's `samples.json`: {"sha256": [...]}, a bare list of hashes, or a
    list of {"sha256": ...} objects. A missing file means no samples."""
    doc = _read_json(Path(session_dir) / SAMPLES_FILE)
    if isinstance(doc, dict):
        doc = doc.get("sha256", doc.get("samples", []))
    if not isinstance(doc, list):
        return set()
    out = set()
    for item in doc:
        value = item.get("sha256") if isinstance(item, dict) else item
        if isinstance(value, str):
            out.add(value)
    return out


# --- signals --------------------------------------------------------------------------------------


def _is_id_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and bool(_ID_RE.match(value)))


def _read_json_quiet(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _ends_without_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def fault_point(phase: str) -> None:
    """Test hook shared with adapt's phases: LORSU_EDGE_FAULT=<phase> SIGKILLs the process here,
    LORSU_EDGE_FAULT=<phase>:SIGTERM sends it a SIGTERM (a graceful stop) instead."""
    fault = os.environ.get("LORSU_EDGE_FAULT", "")
    if fault == phase:
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"{phase}:SIGTERM":
        os.kill(os.getpid(), signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def graceful_sigterm(hint: str = "an unfinished session is discarded, never half-kept; "
                                  "`lorsu-edge history` shows what is current") -> Iterator[None]:
    """Within the block, SIGTERM raises InterruptedRunError (exit code 130, `hint`) in the main thread.

    The exception unwinds through `staged_session`, which discards the partial session, so the
    current model is untouched. Only the first SIGTERM raises (a second one during cleanup is
    ignored). The previous handler is restored on exit. Off the main thread this does nothing.
    """
    if not _in_main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: object) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise InterruptedRunError("stopped by SIGTERM", hint=hint)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _stopped_after_commit(e: BaseException, sid: str, accepted: bool) -> InterruptedRunError:
    """The stop that arrived during a commit, reported as what it is: the session was committed."""
    how = "SIGTERM" if isinstance(e, InterruptedRunError) else "SIGINT"
    status = "accepted" if accepted else "rejected"
    now = "it is the current model" if accepted else "the current model is unchanged"
    err = InterruptedRunError(f"stopped by {how} after session {sid} was committed ({status}): {now}",
                              hint="nothing was lost; the rest of this run (--keep, --save-full) was skipped")
    err.outcome = {"status": status, "session": sid, "stopped_by": how}
    return err


@contextlib.contextmanager
def after_commit(sid: str, accepted: bool) -> Iterator[None]:
    """Wrap the steps that follow a commit (retention, --save-full): a stop or an error there is reported
    with the session that was committed, never as a discarded one; the error keeps its exit code."""
    try:
        yield
    except (KeyboardInterrupt, InterruptedRunError) as e:
        raise _stopped_after_commit(e, sid, accepted) from None
    except LorsuError as e:
        status = "accepted" if accepted else "rejected"
        e.message = f"session {sid} was committed ({status}), then: {e.message}"
        e.outcome = {"status": status, "session": sid}  # type: ignore[attr-defined]
        raise


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back during a commit, then re-deliver them to the handlers in force.

    A handler that raises mid-commit would leave a renamed-but-unpointed session; deferring keeps
    the commit all-or-nothing for graceful stops (SIGKILL is covered by the commit protocol).
    """
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGTERM, signal.SIGINT)
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


__all__ = [
    "BASE", "absolute_source", "after_commit", "DEFAULT_WORKDIR", "ENCODER_FILE", "REPORT_FILE", "SAMPLES_FILE", "STATUS_FILE", "Recovery",
    "SessionInfo", "Workdir", "graceful_sigterm", "now_iso", "read_samples_file", "write_samples_file",
]
