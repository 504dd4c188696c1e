"""`lorsu-edge plan`: predict each phase's peak memory from the model's config and the chosen settings.

Exit 0 when the run fits the budget, 4 (OVER_BUDGET) otherwise, with the smallest budget that would fit
and the cheapest change. No weight file is read.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lorsu_edge.budget import SIZE_HELP
from lorsu_edge.cli.choices import Loss, Method, Quantize, TrainPrecision
from lorsu_edge.cli.errors import handle_errors
from lorsu_edge.config import MethodConfig, field_help


def _m(name: str) -> str:
    return field_help(MethodConfig, name)


@handle_errors
def command(
    model: Annotated[str | None, typer.Option(help="model folder (only its config.json is read); default: the "
                                                  "embedded default dual encoder, once built")] = None,
    loss: Annotated[Loss | None, typer.Option(help="clip | ppl (default: clip for dual encoders, ppl for VLMs)")] = None,
    text_model: Annotated[str | None, typer.Option(help="for --loss clip on a VLM: the dual encoder whose text "
                                                       "tower is loaded instead of the LLM")] = None,
    method: Annotated[Method, typer.Option(help=_m("method"))] = "lorsu",
    sparsity: Annotated[float, typer.Option(help=_m("sparsity"))] = 0.1,
    top_k_heads: Annotated[int, typer.Option(help=_m("top_k_heads"))] = 2,
    rank: Annotated[int, typer.Option(help=_m("rank"))] = 64,
    batch_size: Annotated[int, typer.Option(help="effective batch size (micro-batches accumulate to it)")] = 16,
    budget: Annotated[str | None, typer.Option(help=f"memory the run may use; {SIZE_HELP}. Default and upper "
                                                    "limit: the profile's total minus its reserve")] = None,
    profile: Annotated[str, typer.Option(help="device profile name or .toml path (lorsu-edge profiles); auto: "
                                              "cpu, or the GPU found")] = "auto",
    quantize: Annotated[Quantize, typer.Option(help="LLM weights: auto (as adapt: 4bit where the profile says "
                                               "bitsandbytes works, else none) | none | 8bit | 4bit")] = "auto",
    dtype: Annotated[TrainPrecision, typer.Option("--dtype", "--precision", help="compute dtype: auto (the profile's first) "
                                                                      "| bf16 | fp16 | fp32")] = "auto",
    processes: Annotated[int, typer.Option(help="data-parallel processes (torchrun --nproc_per_node): plan one "
                                                "process's share of each batch")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON (bytes) instead of a table")] = False,
) -> None:
    """Plan a run: per-phase, per-component memory, and the micro-batch, checkpointing, quantization and
    importance grouping that fit the budget. Exits 4 if nothing fits."""
    from lorsu_edge.budget import parse_size
    from lorsu_edge.plan import check_fits, format_plan, make_plan, read_config, resolve_quantize, role_of
    from lorsu_edge.profiles import resolve

    try:
        method_cfg = MethodConfig(method=method, sparsity=sparsity, top_k_heads=top_k_heads, rank=rank,
                                  alpha=float(rank))
    except ValueError as e:
        from lorsu_edge.errors import BadInputError

        raise BadInputError(str(e), hint="see lorsu-edge plan --help") from None
    budget_bytes = None if budget is None else parse_size(budget)
    prof = resolve(profile)
    source = model or _default_model()
    model_config = read_config(source)[0]
    role = role_of(model_config)
    method_cfg.check_heads(model_config, str(source))
    loss = loss or ("ppl" if role == "vlm" else "clip")
    quantize = resolve_quantize(quantize, role, loss, bitsandbytes_works=prof.bnb_4bit)
    plan = make_plan(source, method_cfg=method_cfg, loss=loss, batch_size=batch_size,
                     budget_bytes=budget_bytes, profile=prof, dtype=dtype, quantize=quantize, text_model=text_model,
                     processes=processes)
    typer.echo(json.dumps(plan.to_dict(), default=str) if as_json else format_plan(plan))
    check_fits(plan)


def _default_model() -> str:
    from lorsu_edge.errors import BadInputError
    from lorsu_edge.zoo import cache
    from lorsu_edge.zoo.dual import DEFAULT_NAME

    path = cache.model_dir(DEFAULT_NAME)
    if not (path / "config.json").is_file():
        raise BadInputError("no --model given and the default model is not built yet",
                            hint="pass --model DIR (a folder with config.json), or run adapt once to build the default")
    return str(path)
