"""The one place where domain errors become `error: ...` + `hint: ...` and an exit code.

Set LORSU_EDGE_DEBUG=1 to get the traceback instead (for bug reports).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import typer

from lorsu_edge.atomic import storage_error
from lorsu_edge.errors import ExitCode, LorsuError

F = TypeVar("F", bound=Callable)


def debug() -> bool:
    return os.environ.get("LORSU_EDGE_DEBUG", "") not in ("", "0")


def fail(message: str, hint: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Decorate a CLI verb: map LorsuError / full disk / Ctrl-C / bugs to one line + hint + exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except LorsuError as e:
            if debug():
                raise
            raise fail(e.message, e.hint, int(e.exit_code)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", "nothing already saved was changed", int(ExitCode.INTERRUPTED)) from None
        except Exception as e:  # a full disk raised by a library (OSError, SafetensorError), else a bug
            if debug():
                raise
            if (err := storage_error(e, getattr(e, "filename", None) or "a file")) is not None:
                raise fail(err.message, err.hint, int(ExitCode.IO)) from None
            if isinstance(e, OSError):
                raise fail(f"{type(e).__name__}: {e}", "set LORSU_EDGE_DEBUG=1 for the traceback",
                           int(ExitCode.INTERNAL)) from None
            raise fail(f"internal error: {type(e).__name__}: {e}",
                       "set LORSU_EDGE_DEBUG=1 and report the traceback", int(ExitCode.INTERNAL)) from None

    return wrapper  # type: ignore[return-value]
