"""`lorsu-edge adapt`: one few-shot session on a folder of new samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lorsu_edge.cli.choices import Loss, Method, OnForgetting, Quantize, TrainPrecision, check_device
from lorsu_edge.cli.errors import handle_errors
from lorsu_edge.cli.inbox import (DEFAULT_MAX_MEGAPIXELS, DEFAULT_MAX_SIZE, AllowOutsideData, MaxImageMegapixels,
                                  MaxImageSize, image_limits)
from lorsu_edge.cli.prune import KEEP_HELP
from lorsu_edge.config import ContinualConfig, MethodConfig, field_help
from lorsu_edge.budget import SIZE_HELP, parse_size
from lorsu_edge.distributed import is_main, shutdown
from lorsu_edge.errors import BadInputError, ExitCode
from lorsu_edge.samples import check_templates
from lorsu_edge.track import check_track
from lorsu_edge.train import TrainConfig


def _m(name: str) -> str:
    return field_help(MethodConfig, name)


def _t(name: str) -> str:
    return field_help(TrainConfig, name)


def _c(name: str) -> str:
    return field_help(ContinualConfig, name)


_C = ContinualConfig()
_T = TrainConfig()


JSON_FIELDS = ("reason", "guard", "alpha", "trainable_params", "loss_first", "loss_last", "target_accuracy_before", "target_accuracy",
               "control_accuracy_before", "control_accuracy", "seconds", "peak_memory_bytes")


@handle_errors
def command(
    data: Annotated[Path, typer.Option("--data", help="folder with manifest.jsonl or <label>/ image subfolders")],
    workdir: Annotated[Path, typer.Option(help="where sessions, history and the current model live")] = Path("lorsu-runs"),
    model: Annotated[str | None, typer.Option(help="base model folder or hub id (default: the workdir's, "
                                                  "else the embedded default)")] = None,
    loss: Annotated[Loss | None, typer.Option(help="clip | ppl (default: clip for dual encoders, ppl for VLMs)")] = None,
    text_model: Annotated[str | None, typer.Option(help="for --loss clip on a VLM: the dual encoder its tower came "
                                                       "from (its text tower scores captions; the LLM is not loaded)")] = None,
    template: Annotated[list[str] | None, typer.Option(help="caption template with {label} (repeatable; default: "
                                                          "DIR/templates.txt, else built-in ones)")] = None,
    quantize: Annotated[Quantize, typer.Option(help="LLM quantization: auto | 4bit | 8bit | none")] = "auto",
    budget: Annotated[str | None, typer.Option(help=SIZE_HELP + "; default: the profile's memory less its reserve")] = None,
    profile: Annotated[str | None, typer.Option(help="device profile name or path (see lorsu-edge profiles); "
                                                     "default: detect this machine")] = None,
    method: Annotated[Method, typer.Option(help=_m("method"))] = "lorsu",
    sparsity: Annotated[float, typer.Option(help=_m("sparsity"))] = 0.1,
    top_k_heads: Annotated[int, typer.Option(help=_m("top_k_heads"))] = 2,
    rank: Annotated[int, typer.Option(help=_m("rank"))] = 64,
    alpha: Annotated[float, typer.Option(help=_m("alpha"))] = 64.0,
    importance_samples: Annotated[int, typer.Option(help=_m("importance_samples"))] = 1000,
    qkv_bias: Annotated[bool | None, typer.Option("--qkv-bias/--no-qkv-bias", help=_m("qkv_bias"))] = None,
    projection_rank: Annotated[int, typer.Option(help=_m("projection_rank"))] = 0,
    epochs: Annotated[int, typer.Option(help=_t("epochs"))] = _T.epochs,
    batch_size: Annotated[int, typer.Option(help=_t("batch_size"))] = _T.batch_size,
    lr: Annotated[float, typer.Option(help=_t("lr"))] = _T.lr,
    weight_decay: Annotated[float, typer.Option(help=_t("weight_decay"))] = _T.weight_decay,
    warmup_ratio: Annotated[float, typer.Option(help=_t("warmup_ratio"))] = _T.warmup_ratio,
    max_grad_norm: Annotated[float, typer.Option(help=_t("max_grad_norm"))] = _T.max_grad_norm,
    precision: Annotated[TrainPrecision, typer.Option(help=_t("precision"))] = "auto",
    seed: Annotated[int, typer.Option(help=_t("seed"))] = _T.seed,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N", callback=check_device)] = "auto",
    control: Annotated[Path | None, typer.Option(help="labelled control set scored before and after; the workdir "
                                                       "remembers it")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help="target eval set, scored before and after")] = None,
    max_forgetting: Annotated[float, typer.Option(help="reject the session if control accuracy drops by more "
                                                       "than this many points")] = 1.0,
    max_total_forgetting: Annotated[float | None, typer.Option(
        help="also reject it if control accuracy ends more than this many points below the base model's "
             "(bounds drift over many sessions; the workdir remembers it; default: the --max-forgetting limit)")
    ] = None,
    on_forgetting: Annotated[OnForgetting, typer.Option(help=_c("on_forgetting"))] = _C.on_forgetting,
    anchor: Annotated[Path | None, typer.Option(help="folder of unlabeled images of what the model must keep "
                                                     "(not the control set); the workdir remembers it")] = None,
    anchor_weight: Annotated[float, typer.Option(help=_c("anchor_weight"))] = _C.anchor_weight,
    anchor_samples: Annotated[int, typer.Option(help=_c("anchor_samples"))] = _C.anchor_samples,
    class_weight: Annotated[float, typer.Option(help=_c("class_weight"))] = _C.class_weight,
    replay: Annotated[int, typer.Option(help=_c("replay"))] = _C.replay,
    replay_capacity: Annotated[int, typer.Option(help=_c("replay_capacity"))] = _C.replay_capacity,
    min_new_samples: Annotated[int, typer.Option(help="do nothing (exit 0) with fewer new samples than this")] = 1,
    save_full: Annotated[Path | None, typer.Option(help="also write a complete model folder here "
                                                        "(loads with the family's from_pretrained)")] = None,
    max_image_size: MaxImageSize = DEFAULT_MAX_SIZE,
    max_image_megapixels: MaxImageMegapixels = DEFAULT_MAX_MEGAPIXELS,
    allow_outside_data: AllowOutsideData = False,
    keep: Annotated[int | None, typer.Option(min=0, help=KEEP_HELP + "; pruned after each session; the workdir "
                                                "remembers it (default: keep everything)")] = None,
    json_line: Annotated[bool, typer.Option("--json", help="print the result as one JSON line")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    track: Annotated[str | None, typer.Option(help="MLflow tracking URI for this box's nights, or `off` (remembered; "
                                                   "default: $LORSU_EDGE_TRACK, $MLFLOW_TRACKING_URI, else a local "
                                                   "store in the workdir when lorsu-edge[fleet] is installed)")] = None,
) -> None:
    """Adapt the image encoder to the new samples in --data (LoRSU by default) and record a session."""
    from lorsu_edge.adapt import AdaptOptions, adapt

    try:
        opts = AdaptOptions(
            data=data, workdir=workdir, model=model, loss=loss, text_model=text_model,
            templates=check_templates(tuple(template or ()), "--template"), quantize=quantize, device=device,
            budget=parse_size(budget) if budget else None, profile=profile,
            method=MethodConfig(method, sparsity, top_k_heads, rank, alpha, importance_samples, qkv_bias,
                                projection_rank),
            train=TrainConfig(epochs, batch_size, None, lr, weight_decay, warmup_ratio, max_grad_norm,
                              precision, seed),
            min_new_samples=min_new_samples, control=control, eval_data=eval_data, max_forgetting=max_forgetting,
            max_total_forgetting=max_total_forgetting, save_full=save_full, keep=keep, show_progress=progress,
            anchor=anchor, continual=ContinualConfig(class_weight, anchor_weight, anchor_samples, replay,
                                                     replay_capacity, on_forgetting),
            image_limits=image_limits(max_image_size, max_image_megapixels), allow_outside_data=allow_outside_data,
            track=check_track(track),
        )
    except ValueError as e:
        raise BadInputError(str(e), hint="see lorsu-edge adapt --help") from None
    try:
        result = adapt(opts)
    finally:
        shutdown()  # data-parallel: leave the process group, or the process aborts at exit
    if is_main():
        _print(result, json_line)
    if result.status == "rejected":
        raise typer.Exit(int(ExitCode.REJECTED))


def _print(result, json_line: bool) -> None:
    if json_line:
        typer.echo(json.dumps({"status": result.status, "session": result.session,
                               **{k: result.report.get(k) for k in JSON_FIELDS}}))
    else:
        typer.echo(result.message)
        if result.status != "nothing-new":
            r = result.report
            typer.echo(f"  method {r['method']} / loss {r['loss']}: {r['trainable_params']:,} trainable of "
                       f"{r['encoder_params']:,} encoder params; loss {r['loss_first']:.4f} -> {r['loss_last']:.4f} "
                       f"in {r['steps']} steps; {r['seconds']:.1f} s; peak {r['peak_memory_bytes'] / 2**20:.0f} MiB")
            for name in ("target", "control"):
                if f"{name}_accuracy" in r:
                    typer.echo(f"  {name} accuracy {r[f'{name}_accuracy_before']:.3f} -> {r[f'{name}_accuracy']:.3f}")
