"""`export_onnx`: a merged model in memory -> a proven ONNX file on disk, in the order of the work.

inputs (proof/calibration batches) -> trace (fp32, dynamo) -> precision -> prove -> metadata -> prove the
exact file again -> publish (graph, external data, sidecar, preprocessor_config.json). A failed proof
raises `ExportMismatchError` and leaves nothing at `out`; SIGTERM exits with the interrupted code and
removes the scratch folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

import lorsu_edge
from lorsu_edge import consumer, merge
from lorsu_edge.atomic import storage_errors
from lorsu_edge.errors import BadInputError
from lorsu_edge.export import inputs, precision as prec, prove as proof, publish, trace
from lorsu_edge.families import EncoderSpec
from lorsu_edge.session import graceful_sigterm

DEFAULT_OPSET = 18
"""The dynamo exporter's own opset (lower ones go through a version converter)."""
OPSETS = range(17, 21)
INTERRUPTED_HINT = "nothing was written; an earlier export at the same path is unchanged"
CALIBRATION_IMAGES = 64
"""At most this many real images calibrate int8-qdq (more moved the cosine by < 0.001 on the default model)."""
_RESERVED = {"format", "export_id", "lorsu_edge_version", "encoder_sha256", "projector_sha256", "precision",
             "opset", "input", "output", "parity", "family", "role", "created", "file", "onnx_sha256",
             "onnx_bytes", "exporter", "exporter_fallback_reason", "external_data", "calibration", "preprocessor_config"}


@dataclass
class ExportResult:
    """What was written and the proof that it matches PyTorch."""

    path: Path
    sidecar: Path
    precision: str
    opset: int
    parity: list[proof.Parity]
    metadata: dict[str, Any]
    size_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def check_request(out: Path, precision: str, opset: int, fold: str | None) -> Path:
    """Validate the cheap arguments (before any model work) and create `out`'s folder."""
    if precision not in prec.PRECISIONS:
        raise BadInputError(f"--precision must be one of {', '.join(prec.PRECISIONS)}, got {precision!r}")
    if opset not in OPSETS:
        raise BadInputError(f"--opset {opset} is not supported",
                            hint=f"use {OPSETS.start}-{OPSETS.stop - 1} ({DEFAULT_OPSET} is the default and tested)")
    if fold is not None and fold not in inputs.FOLDS:
        raise BadInputError(f"--fold-normalize must be one of {', '.join(inputs.FOLDS)}, got {fold!r}")
    out = Path(out).expanduser()
    if out.is_dir():
        raise BadInputError(f"--out {out} is a directory", hint="pass a file path such as encoder.onnx")
    with storage_errors(str(out.parent)):
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _hashes(model: nn.Module, spec: EncoderSpec, with_projector: bool) -> dict[str, str]:
    try:
        out = {"encoder_sha256": merge.tensors_hash(merge.encoder_state_dict(model, spec))}
    except RuntimeError as e:  # adapters still injected: the export would not be the merged encoder
        raise BadInputError(f"cannot export: {e}", hint="merge.unload(model) before exporting") from None
    if with_projector:
        proj = consumer.projector(model)
        out["projector_sha256"] = merge.tensors_hash({k: v.detach() for k, v in proj.state_dict().items()})
    return out


def _base_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    extra = dict(meta or {})
    clash = sorted(_RESERVED & set(extra))
    if clash:
        raise ValueError(f"meta keys {clash} are set by export_onnx itself")
    return extra


def calibration_feeds(processor: Any, images: Sequence[Path | Image.Image], fold: str | None) -> list[np.ndarray]:
    """int8-qdq's calibration batches: up to `CALIBRATION_IMAGES` real images through the processor."""
    chosen = list(images)[:CALIBRATION_IMAGES]
    step = prec.CALIBRATION_BATCH
    return [inputs.image_batch(processor, chosen[i:i + step], fold).feed for i in range(0, len(chosen), step)]


def export_onnx(model: nn.Module, spec: EncoderSpec, processor: Any, out: Path, *, precision: str = "fp32",
                opset: int = DEFAULT_OPSET, with_projector: bool = False,
                sample_images: Sequence[Path | Image.Image] | None = None,
                calibration_images: Sequence[Path | Image.Image] | None = None, fold_normalize: str | None = None,
                meta: Mapping[str, Any] | None = None, tolerance: proof.Tolerance | None = None,
                external_data_over: int = trace.EXTERNAL_DATA_OVER) -> ExportResult:
    """Export what `spec`'s consumer reads to `out` (+ `<out>.json`, `preprocessor_config.json`), proven first.

    `model` must be the merged model (adapters unloaded) with the encoder in fp32. `sample_images` feed
    the proof (random pixels without), `calibration_images` int8-qdq's ranges (default: `sample_images`).
    `fold_normalize` ("uint8" | "float") moves rescale + normalisation into the graph. `meta` adds provenance
    (base_model, session_id, ...). `tolerance` overrides `TOLERANCES[precision]`. Raises ExportMismatchError
    (nothing written) when the proof fails, BadInputError on bad arguments, InterruptedRunError on SIGTERM.
    """
    start = time.perf_counter()
    out = check_request(out, precision, opset, fold_normalize)
    extra = _base_meta(meta)
    module = trace.ConsumerModule(model, spec, with_projector)
    trace.check_fp32(module)
    hashes = _hashes(model, spec, with_projector)  # also refuses a model whose adapters are not unloaded
    pre_config = inputs.preprocessor_config(processor, fold_normalize)
    publish.check_preprocessor_slot(out.parent, pre_config)
    if fold_normalize:
        module = trace.FoldedInput(module, inputs.normalization(processor, fold_normalize))
    batches, source = inputs.parity_batches(spec, processor, sample_images, fold_normalize)
    calibration = calibration_feeds(processor, calibration_images or sample_images or [], fold_normalize) \
        if precision == "int8-qdq" else []
    tol = tolerance or proof.TOLERANCES[precision]
    stem = f"{out.stem}-{secrets.token_hex(4)}"  # external data names unique per export (see publish)
    with graceful_sigterm(hint=INTERRUPTED_HINT), _scratch(out) as scratch:
        with trace.eval_mode(module):
            refs = {b: (x.feed, proof.torch_reference(model, spec, x.pixels, with_projector))
                    for b, x in batches.items()}
            example = torch.from_numpy(batches[max(batches)].feed).to(next(spec.tower.parameters()).device)
            traced = trace.trace(module, example, opset, trace.output_name(spec, with_projector),
                                 scratch / f"{stem}-fp32.onnx", external_data_over)
        staged = prec.to_precision(traced.path, precision, scratch / f"{stem}-{precision}.onnx", traced.external_data,
                                   calibration)
        parity = proof.prove(staged, refs, precision, tol)
        sidecar = {
            "format": publish.SIDECAR_FORMAT, "export_id": uuid.uuid4().hex,
            "lorsu_edge_version": lorsu_edge.__version__, **extra, **hashes,
            "family": spec.family.name, "role": spec.role, "precision": precision, "opset": opset,
            "exporter": traced.exporter, "exporter_fallback_reason": traced.fallback_reason,
            "external_data": trace.external_data_name(staged) if traced.external_data else None,
            "input": inputs.input_spec(spec, processor, fold_normalize),
            "output": _output_meta(model, spec, with_projector, refs),
            "parity": {"inputs": source, "tolerance": asdict(tol), "batches": [asdict(p) for p in parity]},
            "calibration": {"images": sum(len(c) for c in calibration), "method": prec.QDQ_CALIBRATION}
            if calibration else None,
            "preprocessor_config": publish.PREPROCESSOR_FILE if pre_config is not None else None,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "file": out.name,
        }
        publish.write_metadata(staged, sidecar)
        # The metadata rewrite must not change the graph: prove the exact file that is published, once more.
        proof.prove(staged, {1: refs[1]}, precision, tol)
        sidecar["onnx_sha256"] = publish.sha256_file(staged)
        sidecar["onnx_bytes"] = staged.stat().st_size
        publish.publish(out, staged, sidecar["external_data"], sidecar, pre_config)
    notes = [f"legacy TorchScript exporter used: {traced.fallback_reason}"] if traced.fallback_reason else []
    return ExportResult(path=out, sidecar=publish.sidecar_path(out), precision=precision, opset=opset,
                        parity=parity, metadata=sidecar, size_bytes=sidecar["onnx_bytes"],
                        seconds=time.perf_counter() - start, notes=notes)


def _output_meta(model: nn.Module, spec: EncoderSpec, with_projector: bool,
                 refs: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    shape = refs[max(refs)][1].shape
    return {"name": trace.output_name(spec, with_projector), "dtype": "float32",
            "shape": ["batch", *[int(d) for d in shape[1:]]],
            "description": trace.output_description(spec, model, with_projector)}


@contextlib.contextmanager
def _scratch(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out` for the build (same filesystem: the publish is a rename), always removed.

    Orphans of killed exports to `out` are removed first.
    """
    publish.remove_orphans(out)
    path = out.parent / f"{publish.scratch_prefix(out)}{os.getpid()}-{secrets.token_hex(4)}"
    with storage_errors(str(out.parent)):
        path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
