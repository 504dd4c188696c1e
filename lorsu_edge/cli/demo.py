"""`lorsu-edge demo`: the continual protocol on an embedded default model, offline, with a table and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorsu_edge.cli.choices import Loss, Method
from lorsu_edge.cli.errors import handle_errors


@handle_errors
def command(
    workdir: Annotated[Path, typer.Option(help="fresh folder for the demo's data, sessions, export and plot")] = Path(
        "lorsu-demo"),
    vlm: Annotated[bool, typer.Option("--vlm", help="the VLM demo: perplexity loss through the 4-bit language "
                                                    "model, VQA on negative images (needs the vlm and quant extras)")
                   ] = False,
    loss: Annotated[Loss | None, typer.Option(help="with --vlm: ppl (default; through the 4-bit language model) or "
                                                   "clip (the paper's cheap path: the VLM's tower trains inside the "
                                                   "default dual encoder, adapt --text-model, then is scored as the "
                                                   "VLM; the guard then judges the dual encoder)")] = None,
    sessions: Annotated[int | None, typer.Option(help="few-shot sessions (default 5; 4 with --vlm)")] = None,
    shots: Annotated[int | None, typer.Option(help="images per class in each session (default 5; 3 with --vlm)")] = None,
    method: Annotated[Method, typer.Option(help="lorsu | lora | spu | full")] = "lorsu",
    epochs: Annotated[int | None, typer.Option(help="epochs per session (default 10; 5 with --vlm)")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (default 3e-05; 5e-05 with --vlm)")] = None,
    max_forgetting: Annotated[float, typer.Option(help="reject a session that costs more control points")] = 1.0,
    seed: Annotated[int, typer.Option(help="seed for the data split and training")] = 0,
    export: Annotated[bool, typer.Option(help="export the final model to ONNX")] = True,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Adapt an embedded default model (real weights) in a few sessions, each guarded by an animal control set;
    print a before/after table, write demo.png, export to ONNX.

    Default: the dual encoder (DINOv2-S + MiniLM) learns textile defects with the CLIP loss (~2 min).
    --vlm: the VLM (DINOv2-S + Gemma-3-270M) learns to name animals in negative images (~10 min).
    --vlm --loss clip: the same nights through the dual encoder's CLIP loss, each night scored as the VLM."""
    from lorsu_edge.config import MethodConfig
    from lorsu_edge.demo import PLOT_FILE, DemoOptions, run_demo
    from lorsu_edge.errors import BadInputError

    try:
        opts = DemoOptions.for_kind(demo_kind(vlm, loss), workdir=workdir, sessions=sessions, shots=shots,
                                    method=MethodConfig(method=method), epochs=epochs, lr=lr, seed=seed,
                                    max_forgetting=max_forgetting, export=export, show_progress=progress)
    except ValueError as e:
        raise BadInputError(str(e), hint="see lorsu-edge demo --help") from None
    summary = run_demo(opts)
    print_table(summary)
    if "guard" in summary:
        typer.echo(f"guard: {summary['guard']} (columns 'guard:')")
    if "export" in summary:
        e = summary["export"]
        typer.echo(f"exported session {e['session']} to {e['path']} (max |diff| vs PyTorch {e['max_abs_diff']:.1e})")
    typer.echo(f"plot: {workdir / PLOT_FILE}   details: lorsu-edge history --workdir {workdir / 'runs'}")


def demo_kind(vlm: bool, loss: str | None) -> str:
    """The protocol for the flags: dual (CLIP loss), vlm (perplexity) or vlm-clip (the cheap path)."""
    from lorsu_edge.errors import BadInputError

    if not vlm and loss == "ppl":
        raise BadInputError("--loss ppl needs a VLM", hint="add --vlm, or drop --loss for the dual-encoder demo")
    return "vlm-clip" if vlm and loss == "clip" else "vlm" if vlm else "dual"


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"LoRSU demo ({summary['kind']}): accuracy after each session")
    guarded = "guard" in summary  # vlm-clip: target/control are the VLM's, the guard judged the dual
    cols = ("session", f"target ({summary['target']})", f"control ({summary['control']})",
            *(("guard: dual target", "guard: dual control") if guarded else ()), "status", "trainable", "seconds")
    for col in cols:
        table.add_column(col, justify="left" if col == "status" else "right")
    for r in summary["rows"]:
        status = f"scaled (alpha {r['alpha']:g})" if r["status"] == "scaled" else r["status"]
        dual = (f"{100 * r['guard_target']:.1f}%", f"{100 * r['guard_control']:.1f}%") if guarded else ()
        table.add_row(str(r["session"]), f"{100 * r['target']:.1f}%", f"{100 * r['control']:.1f}%", *dual, status,
                      f"{r['trainable_params']:,}", f"{r['seconds']:.0f}")
    Console().print(table)
