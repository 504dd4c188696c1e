"""`lorsu-edge profiles`: the device profiles the planner knows (built-in and the user's)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lorsu_edge.cli.errors import handle_errors


@handle_errors
def command(
    as_json: Annotated[bool, typer.Option("--json", help="print the profiles as JSON (sizes in bytes)")] = False,
) -> None:
    """List device profiles: memory, reserve for the OS and inference service, dtypes, 4-bit support."""
    from lorsu_edge.budget import format_size
    from lorsu_edge.errors import ProfileError
    from lorsu_edge.profiles import detect, list_profiles, user_dir

    profiles = list_profiles()
    if as_json:
        typer.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    rows = [("name", "total", "reserve", "available", "memory", "dtypes", "4-bit", "title")]
    for p in profiles:
        rows.append((p.name, format_size(p.total_memory, 1), format_size(p.reserve, 1), format_size(p.available, 1),
                     "unified" if p.unified else "discrete", ",".join(p.compute_dtypes),
                     "yes" if p.bnb_4bit else "no", p.title))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    typer.echo("")
    for p in profiles:
        typer.echo(f"{p.name}: {p.note}")
    try:
        found = detect()
        typer.echo(f"\nthis machine: {found.profile.name} ({found.reason}); --profile auto uses it")
    except ProfileError as e:  # a Jetson without a CUDA torch: the listing still helps, auto would refuse
        typer.echo(f"\nthis machine: no profile for --profile auto: {e.message} (hint: {e.hint})")
    typer.echo(f"use with --profile NAME or --profile path/to.toml; add or override profiles in {user_dir()}")
