"""`lorsu-edge eval`: accuracy of the current model, a session, or the base model on a data folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lorsu_edge.cli.choices import Quantize
from lorsu_edge.cli.errors import handle_errors
from lorsu_edge.cli.inbox import (DEFAULT_MAX_MEGAPIXELS, DEFAULT_MAX_SIZE, AllowOutsideData, MaxImageMegapixels,
                                  MaxImageSize, image_limits)


@handle_errors
def command(
    data: Annotated[Path, typer.Option("--data", help="labelled folder or VQA manifest to score")],
    workdir: Annotated[Path, typer.Option(help="the workdir")] = Path("lorsu-runs"),
    session: Annotated[str | None, typer.Option(help="session id (default: the current model)")] = None,
    base: Annotated[bool, typer.Option("--base", help="score the unadapted base model")] = False,
    model: Annotated[str | None, typer.Option(help="base model (default: the workdir's); with --base, works "
                                                   "without a workdir")] = None,
    quantize: Annotated[Quantize, typer.Option(help="VLM language model: auto | 4bit | 8bit | none")] = "auto",
    batch_size: Annotated[int, typer.Option(help="images per forward")] = 32,
    max_image_size: MaxImageSize = DEFAULT_MAX_SIZE,
    max_image_megapixels: MaxImageMegapixels = DEFAULT_MAX_MEGAPIXELS,
    allow_outside_data: AllowOutsideData = False,
    json_line: Annotated[bool, typer.Option("--json", help="print one JSON line")] = False,
) -> None:
    """Zero-shot accuracy over the label set (dual encoders) or answer accuracy (VLMs, exact/contains)."""
    from lorsu_edge.adapt import pick_device
    from lorsu_edge.evaluate import evaluate
    from lorsu_edge.load import load_session_model, resolve_session
    from lorsu_edge.samples import read_samples
    from lorsu_edge.train import autocast_factory, resolve_precision

    samples = read_samples(data, limits=image_limits(max_image_size, max_image_megapixels),
                           allow_outside=allow_outside_data)
    ref = resolve_session(workdir, session, base, model)
    device = pick_device("auto")
    loaded = load_session_model(ref, quantize, device=str(device))
    result = evaluate(loaded, samples, batch_size=batch_size,
                      autocast=autocast_factory(resolve_precision("auto", device), device))
    what = f"session {ref.session}" if ref.session else "base model"
    if json_line:
        typer.echo(json.dumps({"session": ref.session, "data": str(data), **result.to_dict()}))
    else:
        typer.echo(f"{what}: {result.metric} accuracy {result.accuracy:.4f} ({result.correct}/{result.total}) on {data}")
