"""Entry point: wires the verbs; each lives in its own file and calls one library function."""

from __future__ import annotations

from typing import Annotated

import typer

from lorsu_edge import __version__

app = typer.Typer(
    name="lorsu-edge",
    help="Adapt a VLM's image encoder on-device with LoRSU, within a memory budget, and export it to ONNX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorsu-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """lorsu-edge: few-shot continual adaptation of image encoders (LoRSU)."""


def _register() -> None:
    from lorsu_edge.cli import adapt, demo, eval, export, fleet, history, models, plan, profiles, prune, rollback

    app.command("demo")(demo.command)
    app.command("adapt")(adapt.command)
    app.command("eval")(eval.command)
    app.command("export")(export.command)
    app.command("plan")(plan.command)
    app.command("profiles")(profiles.command)
    app.command("history")(history.command)
    app.command("rollback")(rollback.command)
    app.command("prune")(prune.command)
    app.add_typer(models.app, name="models")
    app.add_typer(fleet.app, name="fleet")


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
