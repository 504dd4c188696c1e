"""`lorsu-edge export --onnx`: the current (or a chosen) session's merged encoder to ONNX, proven equal to PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lorsu_edge.cli.choices import ExportPrecision, Quantize
from lorsu_edge.cli.errors import handle_errors
from lorsu_edge.errors import BadInputError


@handle_errors
def command(
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX (the only format; the flag may be omitted).")
                    ] = True,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="The workdir (default ./lorsu-runs).")] = Path(
        "lorsu-runs"),
    session: Annotated[str | None, typer.Option(help="Session id to export (default: the current model).")] = None,
    base: Annotated[bool, typer.Option("--base", help="Export the unadapted base encoder.")] = False,
    model: Annotated[str | None, typer.Option(help="Base model folder or hub id (default: the workdir's). "
                                                   "With --base, works without a workdir.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output .onnx path (default: <workdir>/exports/"
                                                  "encoder-<session|base>-<precision>.onnx); "
                                                  "the sidecar goes to <out>.json.")] = None,
    precision: Annotated[ExportPrecision, typer.Option(help="fp32 (exact) | fp16 (LayerNorm kept fp32) | int8 "
                                                "(dynamic QInt8 MatMuls, for CPU runtimes).")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset (17 is tested).")] = 17,
    with_projector: Annotated[bool, typer.Option("--with-projector",
                                                 help="VLMs: include the multimodal projector "
                                                      "(LLM-ready image embeddings).")] = False,
    images: Annotated[Path | None, typer.Option(help="Images for the parity proof (default: the session's data "
                                                     "folder if it still exists, else random pixels).")] = None,
    quantize: Annotated[Quantize, typer.Option(help="How to load a VLM's language model, which is not exported: "
                                               "auto | 4bit | 8bit | none.")] = "auto",
    json_line: Annotated[bool, typer.Option("--json", help="Print the result as one JSON line.")] = False,
) -> None:
    """Export what the encoder's consumer reads; refuse (exit 7, nothing written) if ONNX and PyTorch disagree."""
    from lorsu_edge.export import ExportRequest, export_request

    if not onnx:
        raise BadInputError("ONNX is the only export format", hint="drop --no-onnx")
    result, res = export_request(ExportRequest(
        workdir=workdir, session=session, base=base, model=model, out=out, precision=precision, opset=opset,
        with_projector=with_projector, images=images, quantize=quantize))
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
