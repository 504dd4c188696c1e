"""Domain errors: each carries a one-line message, a hint and the process exit code.

The CLI turns any `LorsuError` into `error: <message>` + `hint: <hint>` and exits with its code,
with no traceback unless LORSU_EDGE_DEBUG=1. Exit codes are part of the public interface (nightly
jobs and monitoring read them), so they are listed once here and documented in the README.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # adapted, exported, or nothing new to do
    INTERNAL = 1  # a bug: unexpected exception
    USAGE = 2  # bad flags (Typer/Click's own code)
    BAD_INPUT = 3  # data, manifest, model, adapter or profile that cannot be used
    OVER_BUDGET = 4  # the planner found no setting that fits the memory budget
    LOCKED = 5  # another run holds the workdir
    REJECTED = 6  # the forgetting guard rejected the session; current model unchanged
    EXPORT_MISMATCH = 7  # the exported model disagrees with PyTorch beyond tolerance
    IO = 8  # disk full or unwritable; nothing already saved was touched
    TRAINING = 9  # non-finite loss or similar training failure; no session written
    INTERRUPTED = 130  # SIGINT/SIGTERM: stopped gracefully; an unfinished session is discarded, a committed one
    # (the stop arrived during its commit) is kept and the message and runs.jsonl say so


class LorsuError(Exception):
    """Base class: `message` is one line, `hint` says what to do about it."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class BadInputError(LorsuError):
    exit_code = ExitCode.BAD_INPUT


class UnsupportedModelError(BadInputError):
    pass


class DataError(BadInputError):
    pass


class AdapterMismatchError(BadInputError):
    pass


class ProfileError(BadInputError):
    pass


class OverBudgetError(LorsuError):
    exit_code = ExitCode.OVER_BUDGET


class LockedError(LorsuError):
    exit_code = ExitCode.LOCKED


class RejectedError(LorsuError):
    exit_code = ExitCode.REJECTED


class ExportMismatchError(LorsuError):
    exit_code = ExitCode.EXPORT_MISMATCH


class StorageError(LorsuError):
    exit_code = ExitCode.IO


class TrainingError(LorsuError):
    exit_code = ExitCode.TRAINING


class InterruptedRunError(LorsuError):
    exit_code = ExitCode.INTERRUPTED

    outcome: dict = {}
    """What was done before the stop, for the run log: {"status", "session", "stopped_by"} after a commit."""


def decode_utf8(data: bytes, what: str, error: type[LorsuError], hint: str) -> str:
    """`data` as UTF-8 text (a leading BOM dropped), or `error` naming `what` and the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{what} line {line}: not UTF-8 text (byte {e.start}: {e.reason})", hint=hint) from None
