"""`lorsu-edge export --onnx`: the current (or a chosen) session's merged encoder to ONNX, proven equal to PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lorsu_edge.cli.choices import ExportPrecision, Fold
from lorsu_edge.cli.errors import handle_errors
from lorsu_edge.errors import BadInputError

# Help written out (the library's ExportRequest says the same): importing lorsu_edge.export pulls torch, and
# --help must stay fast. tests/test_export_deploy.py checks the defaults against the library.
_HELP = {
    "session": "Session id to export (default: the current model).",
    "base": "Export the unadapted base encoder.",
    "model": "Base model folder or hub id (default: the workdir's). With --base, works without a workdir.",
    "out": "Output .onnx path (default: <workdir>/exports/[fold-<dtype>/]encoder-<session|base>-<precision>.onnx); "
           "the sidecar goes to <out>.json, preprocessor_config.json beside it.",
    "precision": "fp32 (exact) | fp16 (LayerNorm kept fp32) | int8 (dynamic, for CPU runtimes) | int8-qdq (static "
                 "Q/DQ calibrated on real images: TensorRT int8, and CPU).",
    "opset": "ONNX opset (18, the dynamo exporter's own, is tested; 17-20 accepted).",
    "with_projector": "VLMs: include the multimodal projector (LLM-ready image embeddings).",
    "images": "Images for the parity proof and int8-qdq's calibration (default: the session's data folder if it "
              "still exists, else random pixels; calibration adds the workdir's control set).",
    "fold_normalize": "uint8 | float: the graph takes raw RGB NCHW pixels (0..255 uint8, or 0..1 float) and "
                      "rescales and normalises inside (no resize), for DeepStream and camera pipelines.",
}


def _doc(name: str) -> str:
    return _HELP[name]


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
    precision: Annotated[ExportPrecision, typer.Option(help=_doc("precision"))] = "fp32",
    opset: Annotated[int, typer.Option(help=_doc("opset"))] = 18,
    with_projector: Annotated[bool, typer.Option("--with-projector", help=_doc("with_projector"))] = False,
    images: Annotated[Path | None, typer.Option(help=_doc("images"))] = None,
    fold_normalize: Annotated[Fold | None, typer.Option("--fold-normalize", help=_doc("fold_normalize"))] = None,
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
                        opset=opset, with_projector=with_projector, images=images, fold_normalize=fold_normalize)
    if if_changed and _up_to_date(req, json_line):
        return
    result, res = export_request(req)
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
