"""`lorsu-edge models`: build the offline default models from package-shipped weights, list the cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import typer

from lorsu_edge.cli.errors import handle_errors

app = typer.Typer(
    help="Build the default models from package-shipped weights (no hub needed) and list the cache.",
    no_args_is_help=True,
)


def _build_dual(force: bool, seed: int) -> Path:
    # Imported here: torch + transformers take seconds to import and `list` needs neither.
    from lorsu_edge.zoo.dual import build_default_dual

    return build_default_dual(force=force, seed=seed)


def _build_vlm(force: bool, seed: int) -> Path:
    from lorsu_edge.zoo.vlm import build_default_vlm

    return build_default_vlm(force=force, seed=seed)


def _build_gemma(force: bool, seed: int) -> Path:
    from lorsu_edge.zoo.gemma import convert_gemma

    return convert_gemma(force=force)  # a conversion: nothing random, the seed does not apply


# What `models build NAME` can build. Each builder takes (force, seed) and returns the model folder.
BUILDERS: dict[str, Callable[[bool, int], Path]] = {
    "dual": _build_dual,  # DINOv2-S + MiniLM dual encoder (the default --model)
    "vlm": _build_vlm,  # DINOv2-S + Gemma-3-270M LLaVA (needs lorsu-edge[vlm])
    "gemma": _build_gemma,  # Gemma-3-270M GGUF -> HF folder (part of `vlm`)
}
ModelName = Literal[tuple(BUILDERS)]  # type: ignore[valid-type]  # a typo exits 2 with the choices


@app.command("build")
@handle_errors
def build(
    name: Annotated[ModelName, typer.Argument(help=f"which model: {' | '.join(BUILDERS)}")],
    force: Annotated[bool, typer.Option("--force", help="rebuild even if the cached model is complete")] = False,
    seed: Annotated[int, typer.Option(help="seed of the data split, head init and training")] = 0,
) -> None:
    """Build a default model into the cache (reused if already built)."""
    path = BUILDERS[name](force, seed)
    typer.echo(str(path))


@app.command("list")
@handle_errors
def list_models() -> None:
    """List the cached models: name, size on disk and folder."""
    from lorsu_edge.zoo.cache import list_cached, models_home

    models = list_cached()
    if not models:
        typer.echo(f"no models cached in {models_home()}; build one with: lorsu-edge models build dual")
        return
    width = max(len(m.name) for m in models)
    for m in models:
        typer.echo(f"{m.name:<{width}}  {m.size_bytes / 2**20:8.1f} MiB  {m.path}")
