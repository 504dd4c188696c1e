"""`lorsu-edge prune`: remove old sessions' encoders, keeping the current one and the last N accepted ones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorsu_edge.cli.errors import handle_errors

KEEP_HELP = ("accepted sessions (besides the current one) whose encoder stays for instant rollback; the others "
             "keep adapter, report and samples and are rebuilt when rolled back to")


@handle_errors
def command(
    keep: Annotated[int | None, typer.Option(min=0, help=KEEP_HELP + " (default: the workdir's `adapt --keep`)")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="The workdir (default ./lorsu-runs).")] = Path(
        "lorsu-runs"),
) -> None:
    """Free disk space: history, seen samples and every session's adapter stay."""
    from lorsu_edge.errors import BadInputError
    from lorsu_edge.retention import prune
    from lorsu_edge.session import Workdir

    wd = Workdir.open(workdir)
    with wd.lock():
        keep = keep if keep is not None else wd.settings().get("keep")
        if keep is None:
            raise BadInputError("no --keep given and the workdir remembers none",
                                hint="pass --keep N (e.g. --keep 3)")
        removed = prune(wd, int(keep))
        wd.log_run({"verb": "prune", "keep": keep, "removed": sorted(removed), "freed_bytes": sum(removed.values()),
                    "exit_code": 0})
    if removed:
        typer.echo(f"removed the encoder of session(s) {', '.join(sorted(removed))}: "
                   f"{sum(removed.values()) / 2**20:.1f} MiB freed")
    else:
        typer.echo("nothing to prune")
