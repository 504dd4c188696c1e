"""`lorsu-edge export --onnx`: the current (or a chosen) session's merged encoder to ONNX, proven equal to PyTorch."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from lorsu_edge.cli.errors import handle_errors
from lorsu_edge.config import field_help
from lorsu_edge.errors import BadInputError
from lorsu_edge.export.inputs import FOLDS
from lorsu_edge.export.pipeline import DEFAULT_OPSET
from lorsu_edge.export.precision import PRECISIONS
from lorsu_edge.export.request import ExportRequest

# Choices, so a typo is a usage error (exit 2) listed by --help, not a failure after loading the model.
Precision = Enum("Precision", {p.replace("-", "_"): p for p in PRECISIONS}, type=str)
Fold = Enum("Fold", {f: f for f in FOLDS}, type=str)


def _doc(name: str) -> str:
    return field_help(ExportRequest, name)


@handle_errors
def command(
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX (the only format; the flag may be omitted).")
                    ] = True,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="The workdir (default ./lorsu-runs).")] = Path(
        "lorsu-runs"),
    session: Annotated[str | None, typer.Option(help=_doc("session"))] = None,
    base: Annotated[bool, typer.Option("--base", help=_doc("base"))] = False,
    model: Annotated[str | None, typer.Option(help=_doc("model"))] = None,
    out: Annotated[Path | None, typer.Option(help=_doc("out"))] = None,
    precision: Annotated[Precision, typer.Option(help=_doc("precision"))] = Precision.fp32,
    opset: Annotated[int, typer.Option(help=_doc("opset"))] = DEFAULT_OPSET,
    with_projector: Annotated[bool, typer.Option("--with-projector", help=_doc("with_projector"))] = False,
    images: Annotated[Path | None, typer.Option(help=_doc("images"))] = None,
    fold_normalize: Annotated[Fold | None, typer.Option("--fold-normalize", help=_doc("fold_normalize"))] = None,
    json_line: Annotated[bool, typer.Option("--json", help="Print the result as one JSON line.")] = False,
) -> None:
    """Export what the encoder's consumer reads; refuse (exit 7, nothing written) if ONNX and PyTorch disagree."""
    from lorsu_edge.export.request import export_request

    if not onnx:
        raise BadInputError("ONNX is the only export format", hint="drop --no-onnx")
    result, res = export_request(ExportRequest(
        workdir=workdir, session=session, base=base, model=model, out=out, precision=precision.value,
        opset=opset, with_projector=with_projector, images=images,
        fold_normalize=fold_normalize.value if fold_normalize else None))
    for note in result.notes:
        typer.echo(f"warning: {note}", err=True)
    worst = max(result.parity, key=lambda p: p.rel_max_abs)
    if json_line:
        typer.echo(json.dumps({"status": "exported", "session": res.session, "out": str(result.path),
                               "sidecar": str(result.sidecar), "precision": result.precision,
                               "bytes": result.size_bytes, "parity": [vars(p) for p in result.parity]}))
        return
    what = f"session {res.session}" if res.session else "the base model"
    typer.echo(f"exported {what} ({result.precision}, opset {result.opset}) to {result.path} "
               f"({result.size_bytes / 2**20:.1f} MiB) in {result.seconds:.1f} s")
    typer.echo(f"  output {result.metadata['output']['name']} {result.metadata['output']['shape']}; "
               f"sidecar {result.sidecar}")
    typer.echo(f"  parity vs PyTorch on {result.metadata['parity']['inputs']}, batches "
               f"{', '.join(str(p.batch) for p in result.parity)}: max |diff| {worst.max_abs:.2e} "
               f"({worst.rel_max_abs:.1e} of scale), min cosine {min(p.min_cosine for p in result.parity):.6f}")
