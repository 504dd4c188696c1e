"""`lorsu-edge fleet status`: every box's nights, from the fleet's MLflow tracking server."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from lorsu_edge.cli.errors import handle_errors
from lorsu_edge.errors import BadInputError

app = typer.Typer(help="The fleet's devices, as recorded in an MLflow tracking store.", no_args_is_help=True)


def _uri(track: str | None, workdir: Path) -> str:
    """--track, else $MLFLOW_TRACKING_URI, else the store this workdir records to."""
    from lorsu_edge.session import Workdir
    from lorsu_edge.track import check_track, resolve_uri

    if track or os.environ.get("MLFLOW_TRACKING_URI"):
        return check_track(track or os.environ["MLFLOW_TRACKING_URI"])
    uri = resolve_uri(Workdir.open(workdir))
    if uri is None:
        raise BadInputError(f"workdir {workdir} records no tracking", hint="pass --track URI (the fleet's server)")
    return uri


@app.command("status")
@handle_errors
def status(
    track: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the "
                                                   "store of --workdir)")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="The workdir whose store to read when no URI "
                                                                  "is given.")] = Path("lorsu-runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of rows.")] = False,
) -> None:
    """One row per device: current session, last night's status and why, accuracies now, drift from base."""
    from lorsu_edge.fleet import fleet_status

    uri = _uri(track, workdir)
    try:
        rows = fleet_status(uri)
    except Exception as e:  # an unreachable server is the operator's input problem, not a bug
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise BadInputError(f"cannot read the tracking store {uri}: {type(e).__name__}: {first}",
                            hint="check that the MLflow server runs and the URI is right") from None
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    _print(uri, rows)


def _print(uri: str, rows: list) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    if not rows:
        console.print(f"{uri}: no device has recorded a night yet")
        return
    table = Table(title=uri)
    for name in ("device", "current", "last night", "status", "target", "control", "drift", "since accepted"):
        table.add_column(name)
    for r in rows:
        status = f"{r.last_status}: {r.last_reason}" if r.last_reason else r.last_status
        table.add_row(r.device, r.current_session or "base", r.last_night[:16].replace("T", " "), status,
                      _acc(r.target_accuracy), _acc(r.control_accuracy),
                      "-" if r.drift_from_base_points is None else f"{r.drift_from_base_points:+.2f}",
                      str(r.nights_since_accepted))
    console.print(table)


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
