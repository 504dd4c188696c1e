"""The `lorsu-edge export` recipe: workdir -> session -> load only what is exported -> `export_onnx`.

For a VLM, only the vision tower and the projector are read from the checkpoint: the language model is built
on the meta device (a skeleton with no memory and no weights read), never loaded. A nightly export of a
LLaVA-7B on an 8 GB Orin then costs the tower, not the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorsu_edge.config import help_meta
from lorsu_edge.errors import BadInputError, DataError
from lorsu_edge.export.inputs import FOLDS, PARITY_BATCHES
from lorsu_edge.export.pipeline import (CALIBRATION_IMAGES, DEFAULT_OPSET, INTERRUPTED_HINT, ExportResult, check_request,
                                        export_onnx)
from lorsu_edge.families import find_encoder, locate_tower
from lorsu_edge.session import graceful_sigterm
from lorsu_edge.load import (Loaded, SessionRef, vlm_tower_keys, apply_session, load_model, load_processor,
                             read_config, resolve_session, resolve_source, vlm_tower_tensors)


@dataclass
class ExportRequest:
    """What `lorsu-edge export` can be told (CLI flags map 1:1 onto these fields; help text from here)."""

    workdir: Path = Path("lorsu-runs")
    session: str | None = field(default=None, **help_meta("Session id to export (default: the current model)."))
    base: bool = field(default=False, **help_meta("Export the unadapted base encoder."))
    model: str | None = field(default=None, **help_meta("Base model folder or hub id (default: the workdir's). "
                                                     "With --base, works without a workdir."))
    out: Path | None = field(default=None, **help_meta(
        "Output .onnx path (default: <workdir>/exports/[fold-<dtype>/]encoder-<session|base>-<precision>.onnx); "
        "the sidecar goes to <out>.json, preprocessor_config.json beside it."))
    precision: str = field(default="fp32", **help_meta(
        "fp32 (exact) | fp16 (LayerNorm kept fp32) | int8 (dynamic, for CPU runtimes) | int8-qdq (static Q/DQ "
        "calibrated on real images: TensorRT int8, and CPU)."))
    opset: int = field(default=DEFAULT_OPSET, **help_meta(
        f"ONNX opset ({DEFAULT_OPSET}, the dynamo exporter's own, is tested)."))
    with_projector: bool = field(default=False, **help_meta(
        "VLMs: include the multimodal projector (LLM-ready image embeddings)."))
    images: Path | None = field(default=None, **help_meta(
        "Images for the parity proof and int8-qdq's calibration (default: the session's data folder if it still "
        "exists, else random pixels; calibration adds the workdir's control set)."))
    fold_normalize: str | None = field(default=None, **help_meta(
        "uint8 | float: the graph takes raw RGB NCHW pixels (0..255 uint8, or 0..1 float) and rescales and "
        "normalises inside (no resize), for DeepStream and camera pipelines."))


def _folder_images(folder: Path | None, limit: int, required: bool) -> list[Path]:
    from lorsu_edge.samples import read_samples

    if folder is None or (not required and not folder.is_dir()):
        return []
    try:
        return [s.path for s in read_samples(folder, max_samples=limit).samples]
    except DataError:
        if required:
            raise
        return []


def _data_folder(req: ExportRequest, res: SessionRef) -> Path | None:
    return req.images or (Path(res.report["data"]) if res.report.get("data") else None)


def proof_images(req: ExportRequest, res: SessionRef) -> list[Path]:
    """Up to 3 real images for the proof: --images, else the session's data folder if it still exists."""
    return _folder_images(_data_folder(req, res), max(PARITY_BATCHES), required=req.images is not None)


def calibration_images(req: ExportRequest, res: SessionRef) -> list[Path]:
    """int8-qdq's calibration set: the session's (or --images) samples, then the workdir's control set.

    Both are what the encoder meets in service: the new target and the old domain it must keep.
    """
    half = CALIBRATION_IMAGES // 2
    target = _folder_images(_data_folder(req, res), half, required=req.images is not None)
    control = res.workdir.settings().get("control") if res.workdir is not None else None
    rest = _folder_images(Path(control) if control else None, CALIBRATION_IMAGES - len(target), required=False)
    return target + rest


def default_out(req: ExportRequest, res: SessionRef) -> Path:
    """<workdir>/exports/[fold-<dtype>/]encoder-<session|base>-<precision>[-projector].onnx (cwd without a workdir).

    Folded exports get their own folder: their preprocessor_config.json differs (no normalisation).
    """
    root = res.workdir.root if res.workdir is not None else Path.cwd()
    folder = root / "exports" / (f"fold-{req.fold_normalize}" if req.fold_normalize else "")
    suffix = "-projector" if req.with_projector else ""
    return folder / f"encoder-{res.session or 'base'}-{req.precision}{suffix}.onnx"


def _swap(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _projector_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                for prefix in ("model.multi_modal_projector.", "multi_modal_projector."):  # 5.x and 4.57 layouts
                    if key.startswith(prefix):
                        out[key.removeprefix(prefix)] = handle.get_tensor(key)
    return out


def load_vlm_image_path(source: str) -> Loaded:
    """A LLaVA whose vision tower and projector hold the checkpoint's fp32 weights and whose language model
    is a meta-device skeleton (no memory, nothing read). Missing tower/projector tensors are refused."""
    import transformers as tf

    from lorsu_edge import consumer

    path = resolve_source(source)
    config = read_config(path)
    with torch.device("meta"):
        model = tf.LlavaForConditionalGeneration(config)
    _, tower_path, _ = locate_tower(model)
    tower = tf.AutoModel.from_config(config.vision_config).float()  # real, so non-persistent buffers are right
    short_to_full = vlm_tower_keys(config)
    tensors, _ = vlm_tower_tensors(path)
    projector_path = next(n for n, m in model.named_modules() if m is consumer.projector(model))
    projector = type(consumer.projector(model))(config).float()
    try:
        tower.load_state_dict({short_to_full[k]: v for k, v in tensors.items() if k in short_to_full}, strict=True)
        projector.load_state_dict(_projector_tensors(path), strict=True)
    except RuntimeError as e:
        raise BadInputError(f"the vision tower or projector of {source} is incomplete in its checkpoint: "
                            f"{str(e).splitlines()[0][:200]}", hint="re-save the VLM with save_pretrained") from None
    _swap(model, tower_path, tower)
    _swap(model, projector_path, projector)
    model.eval()
    return Loaded(model, load_processor(path), find_encoder(model), source, path, "none",
                  ["the language model was not loaded: export reads the tower and projector only"])


def load_for_export(res: SessionRef) -> Loaded:
    """The base model with the session's encoder, holding only what the export reads."""
    if read_config(resolve_source(res.base_model)).model_type == "llava":
        loaded = load_vlm_image_path(res.base_model)
    else:
        loaded = load_model(res.base_model, "none")
    apply_session(loaded, res)
    return loaded


def export_request(req: ExportRequest) -> tuple[ExportResult, SessionRef]:
    """The `lorsu-edge export` recipe: resolve -> load (completeness checked) -> session encoder -> export."""
    res = resolve_session(req.workdir, req.session, req.base, req.model)
    out = check_request(req.out or default_out(req, res), req.precision, req.opset, req.fold_normalize)  # before the load
    with graceful_sigterm(hint=INTERRUPTED_HINT):  # while loading too: exit 130 like the rest of the export
        loaded = load_for_export(res)
    meta = {"base_model": res.base_model, "session_id": res.session,
            "method": res.report.get("method", "none (base model)" if res.session is None else None),
            "parent_session": res.report.get("parent_session")}
    calibration = calibration_images(req, res) if req.precision == "int8-qdq" else None
    result = export_onnx(loaded.model, loaded.spec, loaded.processor, out,
                         precision=req.precision, opset=req.opset, with_projector=req.with_projector,
                         sample_images=proof_images(req, res), calibration_images=calibration,
                         fold_normalize=req.fold_normalize, meta=meta)
    if res.workdir is not None:
        res.workdir.log_run({"verb": "export", "session": res.session, "out": str(result.path),
                             "precision": req.precision, "exit_code": 0})
    return result, res


__all__ = ["FOLDS", "ExportRequest", "calibration_images", "default_out", "export_request", "load_for_export",
           "load_vlm_image_path", "proof_images"]
