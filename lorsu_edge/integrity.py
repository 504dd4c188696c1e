"""Is a session's encoder the one its report recorded? Checked before chaining, exporting and evaluating.

A session is intact when its `report.json` parses and its `encoder.safetensors` hashes (tensor by
tensor, the same `tensors_hash` the recipe recorded as `encoder_sha256`) to the recorded value. A
bit flip, a truncation or a missing file is damage; an encoder removed by `prune` (recorded in the
session's `pruned.json`) is not: it is rebuilt from the parent's encoder and the session's adapter.

Policy per verb (README, "Continual operation"):
- adapt falls back to the newest intact accepted ancestor (or the base model): the pointer is moved
  there, and a warning goes to the output, runs.jsonl and the new session's report (`fallback`);
- export and eval refuse with exit 3 and a `rollback` hint: what they would publish or score is not
  what the session recorded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lorsu_edge.errors import BadInputError
from lorsu_edge.merge import tensors_hash
from lorsu_edge.session import ENCODER_FILE, REPORT_FILE, Workdir

log = logging.getLogger(__name__)

PRUNED_FILE = "pruned.json"
"""Written by `prune` into a session whose encoder it removed: {"removed": [...], "encoder_sha256": ...}."""


class _FileTensors(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-on-demand mapping: hashing it holds one tensor in memory at a time."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._handle.keys())

    def __len__(self) -> int:
        return len(self._handle.keys())


def file_tensors_hash(path: Path) -> str:
    """`tensors_hash` of a safetensors file without loading it whole (raises on a truncated/garbled file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return tensors_hash(_FileTensors(handle))  # type: ignore[arg-type]


def read_report(session_dir: Path) -> dict[str, Any] | None:
    """The session's report, None when missing, truncated or not a JSON object."""
    try:
        doc = json.loads((session_dir / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def is_pruned(session_dir: Path) -> bool:
    """True when `prune` removed this session's encoder on purpose (it can be rebuilt)."""
    return (session_dir / PRUNED_FILE).is_file() and not (session_dir / ENCODER_FILE).exists()


def session_problem(wd: Workdir, sid: str) -> str | None:
    """Why session `sid`'s encoder cannot be trusted (one phrase), None when it is intact or pruned."""
    path = wd.sessions_root / sid
    report = read_report(path)
    if report is None:
        return f"{REPORT_FILE} is missing or damaged"
    expected = report.get("encoder_sha256")
    if not isinstance(expected, str):
        return f"{REPORT_FILE} records no encoder_sha256"
    if is_pruned(path):
        return None
    if not (path / ENCODER_FILE).is_file():
        return f"{ENCODER_FILE} is missing"
    try:
        actual = file_tensors_hash(path / ENCODER_FILE)
    except Exception as e:  # SafetensorError on a truncated header or data, OSError on unreadable
        return f"{ENCODER_FILE} is unreadable ({str(e).splitlines()[0][:80]})"
    if actual != expected:
        return f"{ENCODER_FILE} does not match its recorded sha256 ({actual[:12]} != {expected[:12]})"
    return None


def ancestors(wd: Workdir, sid: str | None) -> Iterator[str]:
    """`sid`, its parent, its parent's parent, ... (stops at the base model or an unreadable status)."""
    seen: set[str] = set()
    while sid is not None and sid not in seen:
        seen.add(sid)
        yield sid
        try:
            sid = wd.session(sid).parent
        except BadInputError:
            return


def newest_intact(wd: Workdir, sid: str | None) -> tuple[str | None, dict[str, str]]:
    """The first intact session of `sid`'s ancestry (None: the base model) and the problems met on the way."""
    problems: dict[str, str] = {}
    for candidate in ancestors(wd, sid):
        problem = session_problem(wd, candidate)
        if problem is None:
            return candidate, problems
        problems[candidate] = problem
    return None, problems


def _name(sid: str | None) -> str:
    return "the base model" if sid is None else f"session {sid}"


def require_intact(wd: Workdir, sid: str) -> None:
    """BadInputError (exit 3) with a `rollback` hint when session `sid` is damaged (export, eval)."""
    problem = session_problem(wd, sid)
    if problem is None:
        return
    good, _ = newest_intact(wd, sid)
    raise BadInputError(f"session {sid} is damaged: {problem}",
                        hint=f"`lorsu-edge rollback {good or 'base'}` makes {_name(good)}, its newest intact "
                             "ancestor, current; or restore the session's files from a backup")


def fall_back_if_damaged(wd: Workdir, write: bool = True) -> tuple[str | None, str | None]:
    """Before chaining (adapt, under the lock): (the session to start from, a warning or None).

    When the current session is damaged, its newest intact ancestor (None: the base model) is returned
    and, with `write` (rank 0 of a data-parallel run; the others only read), made current and announced
    loudly: stderr and runs.jsonl. Callers start from the returned id, not from a re-read pointer.
    """
    current = wd.current()
    good, problems = newest_intact(wd, current)
    if not problems:
        return current, None
    damage = "; ".join(f"session {s}: {p}" for s, p in problems.items())
    warning = f"damaged current model ({damage}): fell back to {_name(good)}, never chaining onto a corrupt encoder"
    if write:
        wd.rollback(good or "base")
        log.warning("warning: %s", warning)
        wd.log_run({"verb": "adapt", "status": "fallback", "from": current, "to": good, "warning": warning})
    return good, warning


def check_base_encoder(wd: Workdir, base_hash: str, route: str) -> None:
    """The base model's encoder must hash as it did at first use (recorded in the workdir settings, per
    load `route`: the tower loaded inside the VLM or, under --text-model, inside the dual encoder, whose
    dtypes may differ). A replaced or damaged base model folder would silently change what every session
    rebuilds on."""
    recorded = dict(wd.settings().get("base_encoder_sha256") or {})
    if route not in recorded:
        if wd.locked:
            wd.update_settings(base_encoder_sha256={**recorded, route: base_hash})
        return
    if recorded[route] != base_hash:
        raise BadInputError(f"the base model's encoder changed since this workdir first used it "
                            f"({base_hash[:12]} != {recorded[route][:12]})",
                            hint="restore the original base model folder, or start a new --workdir for this one")
