"""`lorsu-edge rollback ID|base`: make an earlier accepted session (or the base model) current."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorsu_edge.cli.errors import handle_errors
from lorsu_edge.track import record_rollback


def _name(sid: str | None) -> str:
    return "the base model" if sid is None else f"session {sid}"


@handle_errors
def command(
    target: Annotated[str, typer.Argument(help="An accepted session id from `lorsu-edge history` (e.g. 3 or 0003), "
                                               "or `base` for the original model.")],
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="The workdir (default ./lorsu-runs).")] = Path(
        "lorsu-runs"),
) -> None:
    """Move the current-model pointer; no session is deleted, so a rollback can itself be undone."""
    from lorsu_edge.retention import restore_encoder
    from lorsu_edge.session import Workdir

    wd = Workdir.open(workdir)
    with wd.lock() as recovery:
        if recovery.summary():
            typer.echo(f"note: {recovery.summary()}", err=True)
        sid = wd.normalize_id(target)
        if sid is not None and wd.session(sid).accepted:  # a pruned encoder is rebuilt before it is current
            restore_encoder(wd, sid, wd.remembered("base_model"))
        previous = wd.rollback(target)
        current = wd.current()
        wd.log_run({"verb": "rollback", "from": previous, "to": current, "exit_code": 0})
    if previous != current:
        record_rollback(wd, None, current)  # the device's `current` alias in the tracking store follows
    if previous == current:
        typer.echo(f"{_name(current)} is already the current model")
    else:
        typer.echo(f"current model: {_name(current)} (was {_name(previous)})")
