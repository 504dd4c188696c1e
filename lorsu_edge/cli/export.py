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
    if_changed: Annotated[bool, typer.Option("--if-changed", help="Exit 0 without work when the output's sidecar "
                                                                  "already records this session's encoder (nightly "
                                                                  "jobs: export only after an accepted session).")
                          ] = False,
    json_line: Annotated[bool, typer.Option("--json", help="Print the result as one JSON line.")] = False,
) -> None:
    """Export what the encoder's consumer reads; refuse (exit 7, nothing written) if ONNX and PyTorch disagree."""
    from lorsu_edge.export import ExportRequest, export_request

    if not onnx:
        raise BadInputError("ONNX is the only export format", hint="drop --no-onnx")
    req = ExportRequest(workdir=workdir, session=session, base=base, model=model, out=out, precision=precision,
                        opset=opset, with_projector=with_projector, images=images, quantize=quantize)
    if if_changed and _up_to_date(req, json_line):
        return
    result, res = export_request(req)
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


def _up_to_date(req, json_line: bool) -> bool:
    """True (and said so) when the output and its sidecar already hold this export: the same session, base
    model, precision, opset and projector choice, the session's recorded encoder hash, and an ONNX file whose
    bytes still match the sidecar's hash. Anything unreadable or different means: export again."""
    import hashlib

    from lorsu_edge.export import default_out, sidecar_path
    from lorsu_edge.load import resolve_session

    res = resolve_session(req.workdir, req.session, req.base, req.model)
    out = req.out or default_out(req, res)
    try:
        meta = json.loads(sidecar_path(out).read_text())
        onnx_sha = hashlib.sha256(out.read_bytes()).hexdigest()
    except (OSError, ValueError):
        return False
    wanted = {"session_id": res.session, "base_model": res.base_model, "precision": req.precision,
              "opset": req.opset, "encoder_sha256": res.report.get("encoder_sha256", meta.get("encoder_sha256")),
              "onnx_sha256": onnx_sha, "with_projector": req.with_projector}
    held = {**{k: meta.get(k) for k in wanted}, "with_projector": "projector_sha256" in meta}
    if held != wanted:
        return False
    what = f"session {res.session}" if res.session else "the base model"
    typer.echo(json.dumps({"status": "up-to-date", "session": res.session, "out": str(out)}) if json_line
               else f"{out} already holds {what}: nothing to export")
    return True
