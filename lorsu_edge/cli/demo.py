"""`lorsu-edge demo`: the continual protocol on the embedded default model, offline, with a table and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorsu_edge.cli.errors import handle_errors


@handle_errors
def command(
    workdir: Annotated[Path, typer.Option(help="fresh folder for the demo's data, sessions, export and plot")] = Path(
        "lorsu-demo"),
    sessions: Annotated[int, typer.Option(help="few-shot sessions in the protocol")] = 5,
    shots: Annotated[int, typer.Option(help="images per class in each session")] = 5,
    method: Annotated[str, typer.Option(help="lorsu | lora | spu | full")] = "lorsu",
    epochs: Annotated[int, typer.Option(help="epochs per session")] = 10,
    lr: Annotated[float, typer.Option(help="learning rate")] = 3e-5,
    max_forgetting: Annotated[float, typer.Option(help="reject a session that costs more control points")] = 1.0,
    seed: Annotated[int, typer.Option(help="seed for the data split and training")] = 0,
    export: Annotated[bool, typer.Option(help="export the final model to ONNX")] = True,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Adapt the default model (DINOv2-S + MiniLM, real weights) to textile images in a few sessions, guarded
    by an animal control set; print a before/after table, write demo.png, export to ONNX."""
    from lorsu_edge.config import MethodConfig
    from lorsu_edge.demo import PLOT_FILE, DemoOptions, run_demo
    from lorsu_edge.errors import BadInputError
    from lorsu_edge.train import TrainConfig

    try:
        opts = DemoOptions(workdir=workdir, sessions=sessions, shots=shots, method=MethodConfig(method=method),
                           train=TrainConfig(epochs=epochs, batch_size=16, lr=lr, seed=seed),
                           max_forgetting=max_forgetting, seed=seed, export=export, show_progress=progress)
    except ValueError as e:
        raise BadInputError(str(e), hint="see lorsu-edge demo --help") from None
    summary = run_demo(opts)
    print_table(summary["rows"])
    if "export" in summary:
        e = summary["export"]
        typer.echo(f"exported session {e['session']} to {e['path']} (max |diff| vs PyTorch {e['max_abs_diff']:.1e})")
    typer.echo(f"plot: {workdir / PLOT_FILE}   details: lorsu-edge history --workdir {workdir / 'runs'}")


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="LoRSU demo: accuracy after each session")
    for col in ("session", "target (textile)", "control (animals)", "status", "trainable", "seconds"):
        table.add_column(col, justify="right" if col not in ("status",) else "left")
    for r in rows:
        table.add_row(str(r["session"]), f"{100 * r['target']:.1f}%", f"{100 * r['control']:.1f}%", r["status"],
                      f"{r['trainable_params']:,}", f"{r['seconds']:.0f}")
    Console().print(table)
