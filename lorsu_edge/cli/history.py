"""`lorsu-edge history`: the sessions of a workdir, as a table or as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lorsu_edge.cli.errors import handle_errors

MISSING = "-"


@handle_errors
def command(
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="The workdir (default ./lorsu-runs).")] = Path(
        "lorsu-runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: workdir, current, settings, sessions.")] = False,
) -> None:
    """Show every session: data, samples, method, loss, accuracies, accepted or rejected and why."""
    from lorsu_edge.session import Workdir

    wd = Workdir.open(workdir)
    # No lock: every write is atomic and readers ignore uncommitted sessions, so monitoring can read
    # the history while a nightly run is active.
    rows = wd.history()
    current = wd.current()
    settings = wd.settings()
    if as_json:
        doc = {"workdir": str(wd.root), "current": current, "settings": settings, "sessions": rows}
        typer.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
        return
    _print_table(wd.root, rows, current, settings)


def _print_table(root: Path, rows: list[dict[str, Any]], current: str | None, settings: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    base = settings.get("base_model") or settings.get("model") or "the base model"
    # Piped into a file or a log, keep one line per session instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 200)
    if not rows:
        console.print(f"{root}: no sessions yet; the current model is {base}")
        return
    console.print(f"{root}  (* = current model; base: {base})")
    table = Table()
    for name, justify in _COLUMNS:
        table.add_column(name, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(*format_row(row))
    console.print(table)
    if current is None:
        console.print(f"current model: {base}")


_COLUMNS = [
    ("id", "left"), ("time", "left"), ("data", "left"), ("new", "right"), ("method", "left"),
    ("trainable", "right"), ("loss", "right"), ("target acc", "right"), ("control acc", "right"),
    ("status", "left"), ("seconds", "right"), ("peak mem", "right"),
]


def format_row(row: dict[str, Any]) -> list[str]:
    """The table cells of one `Workdir.history()` row; a missing key prints as '-'."""
    status = row.get("status", MISSING)
    if status == "rejected" and row.get("reason"):
        status = f"rejected: {row['reason']}"
    elif status == "accepted" and row.get("guard") == "scaled":  # kept at a fraction of its update
        status = f"scaled: alpha {_number(row.get('alpha'), '{:g}')}"
    return [
        f"{row.get('id', MISSING)}{'*' if row.get('current') else ''}",
        _time(row.get("created") or row.get("committed")),
        _text(row.get("data")),
        _text(row.get("samples_used")),
        _text(row.get("method")),
        _count(row.get("trainable_params")),
        _loss(row.get("loss_first"), row.get("loss_last")),
        _accuracy(row.get("target_accuracy")),
        _accuracy(row.get("control_accuracy")),
        status,
        _number(row.get("seconds"), "{:.1f}"),
        _bytes(row.get("peak_memory_bytes")),
    ]


def _text(value: Any) -> str:
    return MISSING if value is None or value == "" else str(value)


def _time(value: Any) -> str:
    # ISO 8601 -> "2026-11-27 05:49": the seconds and zone add width, not information.
    if not isinstance(value, str) or len(value) < 16:
        return _text(value)
    return value[:10] + " " + value[11:16]


def _number(value: Any, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _text(value)
    return fmt.format(value)


def _count(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _text(value)
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return str(int(value))


def _bytes(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _text(value)
    for size, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= size:
            return f"{value / size:.1f} {suffix}"
    return f"{int(value)} B"


def _loss(first: Any, last: Any) -> str:
    if first is None and last is None:
        return MISSING
    return f"{_number(first, '{:.4g}')} -> {_number(last, '{:.4g}')}"


def _accuracy(value: Any) -> str:
    # A report may hold one number or a before/after pair; show the pair as a change.
    if isinstance(value, dict):
        before, after = value.get("before"), value.get("after")
        if before is not None or after is not None:
            return f"{_number(before, '{:.3f}')} -> {_number(after, '{:.3f}')}"
        return _text(value.get("value"))
    return _number(value, "{:.3f}")
