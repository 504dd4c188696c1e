"""Export: the merged encoder, as its consumer reads it, to ONNX, proven equal to PyTorch before it is kept.

What is exported is exactly `consumer.image_features`: for a VLM the hidden layer its projector consumes
(select strategy applied; `with_projector` adds the projector for LLM-ready embeddings), for a dual encoder
the image embedding, for a bare encoder its pooled output. The graph is traced once with the legacy
exporter (`dynamo=False`: fastest here, see ENVIRONMENT.md) with a dynamic batch axis, converted to the
requested precision, then proven: `onnx.checker`, and onnxruntime against the PyTorch model at batch 1
and batch 3 on real images when given (random pixels otherwise).

Tolerances (`TOLERANCES`):
- fp32: max |onnx - torch| <= 1e-4 x max |torch| (the output scale). Measured ~1e-6 relative on tiny
  models; 1e-4 leaves room for a 24-block ViT-L while still catching any wrong weight or op.
- fp16 and int8: the cosine between ONNX and PyTorch output vectors (one per image, or per token for VLM
  features) >= 0.99 for every vector. Elementwise error is not a useful bound there: rounding moves every
  value, while downstream consumers (projector, similarity search) care about direction.

Inputs and outputs stay float32 at every precision (casts inside the graph), so one preprocessing
recipe serves all three files. A failed proof raises `ExportMismatchError` and leaves no file at `out`
(or its sidecar): everything is built in memory or in hidden temp files, and renamed into place last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

import lorsu_edge
from lorsu_edge import consumer, merge
from lorsu_edge.atomic import TEMP_MARK, fsync_dir, storage_errors
from lorsu_edge.errors import BadInputError, ExportMismatchError, UnsupportedModelError
from lorsu_edge.families import EncoderSpec
from lorsu_edge.load import SessionRef, load_session_model, resolve_session

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_OPSET = 17
INPUT_NAME = "pixel_values"
SIDECAR_FORMAT = "lorsu-edge-onnx/1"
META_PREFIX = "lorsu_edge."
PARITY_BATCHES = (1, 3)
# Kept fp32 inside an fp16 graph. LayerNorm: its variance over hidden sizes of 768-1024 loses ~3 bits in
# fp16 and the error compounds through the residual stream (the casts cost little). Resize: position
# embedding interpolation (DINOv2), where fp16 buys nothing. See also `fold_constants`.
FP16_KEEP_FP32 = ("LayerNormalization", "Resize")
# Only MatMul is quantized: ConvInteger (patch embedding) and quantized Gather have no kernels on the
# GPU providers, and the patch embedding is < 1% of the compute.
INT8_OP_TYPES = ("MatMul",)
# Per-channel weight scales: on the real DINOv2-S (24 textile images) per-tensor QInt8 gave a minimum
# cosine of 0.987 (under the 0.99 bound), per-channel 0.997, for the same file size. Random weights
# (no outlier channels) hide this: both give >= 0.9999 there.
INT8_PER_CHANNEL = True
PROTOBUF_LIMIT = 2**31 - 1
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_RESERVED = {"format", "export_id", "lorsu_edge_version", "encoder_sha256", "projector_sha256", "precision",
             "opset", "input", "output", "parity", "family", "role", "created", "file", "onnx_sha256",
             "onnx_bytes"}


@dataclass(frozen=True)
class Tolerance:
    """Bounds an export must meet against PyTorch; a None bound is not checked."""

    max_rel_abs: float | None = None
    """max |onnx - torch| divided by max |torch| (the output scale)."""
    min_cosine: float | None = None
    """smallest cosine between matching ONNX and PyTorch output vectors."""


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel_abs=1e-4),
    "fp16": Tolerance(min_cosine=0.99),
    "int8": Tolerance(min_cosine=0.99),
}


@dataclass
class Parity:
    """ONNX vs PyTorch on one batch."""

    batch: int
    max_abs: float
    scale: float  # max |torch output|
    rel_max_abs: float
    min_cosine: float
    mean_cosine: float
    finite: bool


@dataclass
class ExportResult:
    """What was written and the proof that it matches PyTorch."""

    path: Path
    sidecar: Path
    precision: str
    opset: int
    parity: list[Parity]
    metadata: dict[str, Any]
    size_bytes: int
    seconds: float


# --- what gets traced ---------------------------------------------------------------------------------


class ConsumerModule(nn.Module):
    """`consumer.image_features` as a module, registering only the parts it runs.

    For a VLM only the tower (and projector) are submodules: a 4-bit LLM must never reach the tracer,
    which collects every registered parameter. Dual encoders and bare encoders are small; the whole
    model is registered and the tracer drops what the image path never touches (the text tower).
    """

    def __init__(self, model: nn.Module, spec: EncoderSpec, with_projector: bool = False) -> None:
        super().__init__()
        if with_projector and spec.role != "vlm":
            raise BadInputError("--with-projector only applies to a VLM (its projector feeds the LLM)",
                                hint=f"this model is a {spec.role} encoder: drop --with-projector")
        if spec.role == "vlm":
            self.tower = spec.tower
            self.projector = consumer.projector(model) if with_projector else None
        else:
            self.model = model
        self._model_ref = (model,)  # a tuple, so the full VLM is not registered as a submodule
        self._spec = spec
        self.with_projector = with_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return consumer.image_features(self._model_ref[0], self._spec, pixel_values, self.with_projector)


def output_name(spec: EncoderSpec, with_projector: bool) -> str:
    """Name of the graph output: says what the tensor is."""
    if spec.role == "vlm":
        return "projected_features" if with_projector else "vision_features"
    return "image_embeds" if spec.role == "dual" else "pooler_output"


def _output_description(spec: EncoderSpec, model: nn.Module, with_projector: bool) -> str:
    if spec.role == "vlm":
        strategy = getattr(model.config, "vision_feature_select_strategy", "default")
        what = (f"hidden state {spec.feature_layer} of the vision tower"
                f"{' without the CLS token' if strategy == 'default' else ''} (select strategy {strategy!r})")
        return f"{what}, through the multimodal projector: LLM-ready image embeddings" if with_projector \
            else f"{what}: what the multimodal projector consumes"
    if spec.role == "dual":
        return "image embedding (get_image_features: pooled output through the visual projection), not normalised"
    return "pooled output of the encoder (pooler_output, or the CLS token of the last hidden state)"


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """eval() for the export, then restore every submodule's own training flag."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _check_fp32(module: nn.Module) -> None:
    bad = sorted({str(p.dtype) for p in module.parameters() if p.dtype != torch.float32})
    if bad:
        raise BadInputError(f"the encoder to export has {', '.join(bad)} weights; export traces in fp32",
                            hint="load the model with its vision tower in fp32 (lorsu-edge's loader does); "
                                 "use --precision fp16 for a half-precision file")


# --- input side -----------------------------------------------------------------------------------------


def image_processor_of(processor: Any) -> Any:
    """The image processor inside a multimodal processor, or the processor itself."""
    return getattr(processor, "image_processor", processor)


def _pair(d: Mapping[str, int] | None) -> dict[str, int] | None:
    if not d:
        return None
    return {k: int(v) for k, v in dict(d).items() if v is not None}


def preprocess_spec(processor: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The processor's recipe as plain data for the sidecar (what `export/infer_onnx.py` replays).

    Returns (recipe, None), or (None, reason) when this processor does something the recipe cannot say.
    """
    ip = image_processor_of(processor)
    if ip is None:
        return None, "no processor was given"
    resize = _pair(getattr(ip, "size", None)) if getattr(ip, "do_resize", False) else None
    if resize is not None and set(resize) not in ({"shortest_edge"}, {"height", "width"}):
        return None, f"resize {resize} is not shortest_edge or height/width"
    crop = _pair(getattr(ip, "crop_size", None)) if getattr(ip, "do_center_crop", False) else None
    if crop is not None and set(crop) != {"height", "width"}:
        return None, f"center crop {crop} is not height/width"
    for flag in ("do_pad", "do_image_splitting"):
        if getattr(ip, flag, False):
            return None, f"{type(ip).__name__} uses {flag}"
    normalize = None
    if getattr(ip, "do_normalize", False):
        normalize = {"mean": [float(x) for x in ip.image_mean], "std": [float(x) for x in ip.image_std]}
    resample = getattr(ip, "resample", 3)
    return {
        "processor_class": type(ip).__name__,
        "convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
        "resize": resize,
        "resample": _RESAMPLE_NAMES.get(int(resample), str(resample)),
        "center_crop": crop,
        "rescale_factor": float(ip.rescale_factor) if getattr(ip, "do_rescale", False) else None,
        "normalize": normalize,
    }, None


def _input_hw(spec: EncoderSpec, recipe: dict[str, Any] | None) -> tuple[int, int]:
    if recipe is not None and recipe["center_crop"]:
        return recipe["center_crop"]["height"], recipe["center_crop"]["width"]
    if recipe is not None and recipe["resize"] and "height" in recipe["resize"]:
        return recipe["resize"]["height"], recipe["resize"]["width"]
    size = getattr(getattr(spec.tower, "config", None), "image_size", None)
    if size is None:
        raise UnsupportedModelError("cannot tell the encoder's input size", hint="pass the model's processor")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def input_spec(spec: EncoderSpec, processor: Any) -> dict[str, Any]:
    """Sidecar `input`: tensor name/shape/layout plus the preprocessing recipe (null if unknown)."""
    recipe, why = preprocess_spec(processor)
    h, w = _input_hw(spec, recipe)
    out = {
        "name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, h, w],
        "channel_order": "RGB",
        "value_range_after_rescale": [0.0, 1.0],
        "preprocess": recipe,
    }
    if why:
        out["preprocess_unavailable"] = why
    return out


def parity_inputs(spec: EncoderSpec, processor: Any, sample_images: Sequence[Path | Image.Image] | None,
                  seed: int = 0) -> tuple[dict[int, torch.Tensor], str]:
    """Pixel batches for the proof, keyed by batch size, and where they came from."""
    images = list(sample_images or [])
    if images:
        if processor is None:
            raise BadInputError("sample images need the model's processor to become pixel values",
                                hint="pass the processor, or no images (random pixels are used then)")
        from lorsu_edge.samples import load_image

        pil = [im if isinstance(im, Image.Image) else load_image(Path(im)) for im in images[: max(PARITY_BATCHES)]]
        pil = [pil[i % len(pil)] for i in range(max(PARITY_BATCHES))]  # cycle when fewer than 3
        px = image_processor_of(processor)(images=pil, return_tensors="pt")["pixel_values"].float()
        return {b: px[:b] for b in PARITY_BATCHES}, f"{min(len(images), max(PARITY_BATCHES))} session image(s)"
    h, w = _input_hw(spec, preprocess_spec(processor)[0])
    gen = torch.Generator().manual_seed(seed)
    px = torch.randn(max(PARITY_BATCHES), 3, h, w, generator=gen)
    return {b: px[:b] for b in PARITY_BATCHES}, "random normal pixels"


# --- build ----------------------------------------------------------------------------------------------


def trace_fp32(module: nn.Module, example: torch.Tensor, opset: int, out_name: str) -> bytes:
    """The fp32 ONNX graph of `module` (dynamic batch axis), as serialized bytes."""
    buf = io.BytesIO()
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(
            module, (example,), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[out_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, out_name: {0: "batch"}},
            do_constant_folding=True,
        )
    return buf.getvalue()


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The tracer warns about every shape-dependent Python branch in transformers: noise for users."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def to_precision(fp32: bytes, precision: str, scratch: Path) -> bytes:
    """Convert the fp32 graph: fp16 (LayerNorm, Resize kept fp32; float32 I/O) or int8 (dynamic QInt8 MatMuls)."""
    import onnx

    if precision == "fp32":
        return fp32
    if precision == "fp16":
        from onnxruntime.transformers import float16

        with _quiet_export():
            proto = float16.convert_float_to_float16(
                onnx.load_from_string(fold_constants(fp32, scratch)), keep_io_types=True,
                op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32))
        toposort(proto.graph)  # the converter appends its input casts last; onnx.checker wants order
        return proto.SerializeToString()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = scratch / "fp32.onnx", scratch / "int8.onnx"
    src.write_bytes(fp32)
    logging.disable(logging.WARNING)  # "consider pre-processing": advice for static quantization
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OP_TYPES),
                         per_channel=INT8_PER_CHANNEL)
    finally:
        logging.disable(logging.NOTSET)
    return dst.read_bytes()


def fold_constants(model_bytes: bytes, scratch: Path) -> bytes:
    """The graph with its input-independent subgraphs computed once (onnxruntime's basic level: standard ops only).

    Needed before fp16: DINOv2 interpolates its position embeddings (bicubic Resize) inside the graph.
    Converted unfolded, onnxruntime's full optimizer rewrites that fp16-fed Resize into a form its own
    kernel rejects at run time ("'Cubic' mode only supports ...", measured on the real DINOv2-S at 112 px
    and on tiny DINOv2s run below their config size). Folded first, the Resize reads a constant fp32
    table and runs. The proof runs at onnxruntime's default level, so any other such case fails loudly.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(scratch / "folded.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return (scratch / "folded.onnx").read_bytes()


def toposort(graph: Any) -> None:
    """Reorder `graph.node` in place so every node comes after the producers of its inputs (stable)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportMismatchError("the converted graph has a cycle or a dangling input",
                                      hint="export --precision fp32 instead, and report the model class")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            ordered.append(n)
            available.update(n.output)
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def onnx_session(model_bytes: bytes):
    """A CPU onnxruntime session over serialized model bytes (warnings silenced)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # kernel errors surface as exceptions with the same text (ExportMismatchError)
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def compare(ref: np.ndarray, got: np.ndarray) -> Parity:
    """Max abs diff (absolute and relative to the output scale) and cosines over the last axis."""
    batch = int(ref.shape[0])
    finite = bool(np.isfinite(got).all())
    if ref.shape != got.shape:
        raise ExportMismatchError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}",
                                  hint="the export was not written; report the model class and versions")
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = got.reshape(-1, got.shape[-1]).astype(np.float64)
    max_abs = float(np.abs(a - b).max()) if finite else math.inf
    scale = float(np.abs(a).max())
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-300)) if finite else np.array([-1.0])
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return Parity(batch=batch, max_abs=max_abs, scale=scale, rel_max_abs=rel,
                  min_cosine=float(cos.min()), mean_cosine=float(cos.mean()), finite=finite)


def violations(p: Parity, tol: Tolerance) -> list[str]:
    """Why `p` fails `tol` (empty when it passes)."""
    out = []
    if not p.finite:
        out.append("non-finite values in the ONNX output")
    if tol.max_rel_abs is not None and not p.rel_max_abs <= tol.max_rel_abs:
        out.append(f"max |diff| {p.max_abs:.3g} is {p.rel_max_abs:.3g} of the output scale {p.scale:.3g} "
                   f"(tolerance {tol.max_rel_abs:g})")
    if tol.min_cosine is not None and not p.min_cosine >= tol.min_cosine:
        out.append(f"cosine {p.min_cosine:.6f} (tolerance >= {tol.min_cosine:g})")
    return out


def torch_reference(model: nn.Module, spec: EncoderSpec, pixel_values: torch.Tensor,
                    with_projector: bool) -> np.ndarray:
    """The PyTorch output the export must reproduce (the consumer's own code path, not the traced wrapper)."""
    device = next(spec.tower.parameters()).device
    with torch.no_grad():
        out = consumer.image_features(model, spec, pixel_values.to(device), with_projector)
    return out.float().cpu().numpy()


def prove(model_bytes: bytes, refs: dict[int, tuple[torch.Tensor, np.ndarray]], precision: str,
          tol: Tolerance) -> list[Parity]:
    """onnx.checker, then onnxruntime vs PyTorch on every batch; ExportMismatchError on any failure."""
    import onnx

    hint = "the ONNX file was not written; set LORSU_EDGE_DEBUG=1 and report the model class and versions"
    try:
        onnx.checker.check_model(onnx.load_from_string(model_bytes))
        session = onnx_session(model_bytes)
    except Exception as e:  # checker and onnxruntime raise their own exception types
        raise ExportMismatchError(f"the {precision} ONNX graph is invalid: {str(e).splitlines()[0][:300]}",
                                  hint=hint) from e
    parities = []
    for batch, (px, ref) in refs.items():
        try:
            got = session.run(None, {INPUT_NAME: px.numpy()})[0]
        except Exception as e:  # a kernel that rejects the converted graph at run time
            raise ExportMismatchError(f"onnxruntime cannot run the {precision} export: "
                                      f"{str(e).splitlines()[0][:300]}", hint=hint) from e
        p = compare(ref, got)
        bad = violations(p, tol)
        if bad:
            raise ExportMismatchError(f"{precision} export differs from PyTorch at batch {batch}: {'; '.join(bad)}",
                                      hint=hint if precision == "fp32" else
                                      f"{hint}; or export --precision fp32, which is exact")
        parities.append(p)
    return parities


# --- metadata and writing -------------------------------------------------------------------------------


def _hashes(model: nn.Module, spec: EncoderSpec, with_projector: bool) -> dict[str, str]:
    try:
        out = {"encoder_sha256": merge.tensors_hash(merge.encoder_state_dict(model, spec))}
    except RuntimeError as e:  # adapters still injected: the export would not be the merged encoder
        raise BadInputError(f"cannot export: {e}", hint="merge.unload(model) before exporting") from None
    if with_projector:
        proj = consumer.projector(model)
        out["projector_sha256"] = merge.tensors_hash({k: v.detach() for k, v in proj.state_dict().items()})
    return out


def sidecar_path(out: Path) -> Path:
    """`<out>.json`: where the sidecar of an export at `out` lives."""
    return Path(f"{out}.json")


def metadata_props(meta: Mapping[str, Any]) -> dict[str, str]:
    """Sidecar fields as ONNX `metadata_props` (strings; structured values as JSON)."""
    return {f"{META_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            for k, v in meta.items() if k not in ("onnx_sha256", "onnx_bytes") and v is not None}


def with_metadata(model_bytes: bytes, meta: Mapping[str, Any]) -> bytes:
    """The same graph with `meta` written into `metadata_props` (replacing earlier lorsu_edge keys)."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    keep = [p for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in metadata_props(meta).items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = f"lorsu-edge {lorsu_edge.__version__} export ({meta.get('precision')}); see {META_PREFIX}* metadata"
    return proto.SerializeToString()


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish(out: Path, model_bytes: bytes, sidecar: dict[str, Any]) -> None:
    """Write both files under hidden temp names, fsync, then rename the sidecar and the model into place.

    The sidecar goes first: a runtime that sees the model also finds its preprocessing. On any failure
    the temp files are removed and whatever was at `out` before is untouched.
    """
    side = sidecar_path(out)
    tmp_model, tmp_side = _temp_name(out), _temp_name(side)
    try:
        with storage_errors(str(out)):
            _write_durable(tmp_model, model_bytes)
            _write_durable(tmp_side, (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
            os.replace(tmp_side, side)
            os.replace(tmp_model, out)
            fsync_dir(out.parent)
    finally:
        for tmp in (tmp_model, tmp_side):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _check_out(out: Path, precision: str, opset: int) -> Path:
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 14 <= opset <= 20:
        raise BadInputError(f"--opset {opset} is not supported", hint="use 14-20 (17 is the default and tested)")
    out = Path(out).expanduser()
    if out.is_dir():
        raise BadInputError(f"--out {out} is a directory", hint="pass a file path such as encoder.onnx")
    with storage_errors(str(out.parent)):
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _base_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    extra = dict(meta or {})
    clash = sorted(_RESERVED & set(extra))
    if clash:
        raise ValueError(f"meta keys {clash} are set by export_onnx itself")
    return extra


def export_onnx(model: nn.Module, spec: EncoderSpec, processor: Any, out: Path, *, precision: str = "fp32",
                opset: int = DEFAULT_OPSET, with_projector: bool = False,
                sample_images: Sequence[Path | Image.Image] | None = None,
                meta: Mapping[str, Any] | None = None, tolerance: Tolerance | None = None) -> ExportResult:
    """Export what `spec`'s consumer reads to `out` (+ `<out>.json`), after proving it equals PyTorch.

    `model` must be the merged model (adapters unloaded) with the encoder in fp32. `meta` adds provenance
    to the metadata (base_model, session_id, method, ...). `tolerance` overrides `TOLERANCES[precision]`.
    Raises ExportMismatchError (nothing written) when the proof fails, BadInputError on bad arguments.
    """
    start = time.perf_counter()
    out = _check_out(out, precision, opset)
    tol = tolerance or TOLERANCES[precision]
    extra = _base_meta(meta)
    module = ConsumerModule(model, spec, with_projector)
    _check_fp32(module)
    hashes = _hashes(model, spec, with_projector)  # also refuses a model whose adapters are not unloaded
    batches, source = parity_inputs(spec, processor, sample_images)
    with _eval_mode(module):
        refs = {b: (px, torch_reference(model, spec, px, with_projector)) for b, px in batches.items()}
        name = output_name(spec, with_projector)
        example = batches[max(batches)].to(next(spec.tower.parameters()).device)  # trace where the model lives
        fp32 = trace_fp32(module, example, opset, name)
    if len(fp32) > PROTOBUF_LIMIT:
        raise UnsupportedModelError(f"the encoder graph is {len(fp32) / 2**30:.1f} GiB, over ONNX's 2 GiB limit",
                                    hint="models this large need external-data export, which lorsu-edge lacks")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}{TEMP_MARK}", dir=out.parent) as scratch:
        model_bytes = to_precision(fp32, precision, Path(scratch))
    parity = prove(model_bytes, refs, precision, tol)
    ref_shape = refs[max(refs)][1].shape
    sidecar = {
        "format": SIDECAR_FORMAT,
        "export_id": uuid.uuid4().hex,
        "lorsu_edge_version": lorsu_edge.__version__,
        **extra,
        **hashes,
        "family": spec.family.name,
        "role": spec.role,
        "precision": precision,
        "opset": opset,
        "input": input_spec(spec, processor),
        "output": {"name": name, "dtype": "float32", "shape": ["batch", *[int(d) for d in ref_shape[1:]]],
                   "description": _output_description(spec, model, with_projector)},
        "parity": {"inputs": source, "tolerance": asdict(tol), "batches": [asdict(p) for p in parity]},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "file": out.name,
    }
    final = with_metadata(model_bytes, sidecar)
    # The metadata rewrite must not change the graph: prove the exact bytes that are written, once more.
    prove(final, {1: refs[1]}, precision, tol)
    sidecar["onnx_sha256"] = _sha256(final)
    sidecar["onnx_bytes"] = len(final)
    publish(out, final, sidecar)
    return ExportResult(path=out, sidecar=sidecar_path(out), precision=precision, opset=opset, parity=parity,
                        metadata=sidecar, size_bytes=len(final), seconds=time.perf_counter() - start)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_sidecar(out: Path) -> dict[str, Any]:
    """The sidecar JSON of the export at `out` (BadInputError if absent or unreadable)."""
    path = sidecar_path(Path(out))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read {path}: {e}", hint="re-run lorsu-edge export") from None


# --- the verb's recipe: workdir -> session -> load -> export ---------------------------------------------


@dataclass
class ExportRequest:
    """What `lorsu-edge export` can be told (CLI flags map 1:1 onto these fields)."""

    workdir: Path = Path("lorsu-runs")
    session: str | None = None
    """Session id to export; None: the workdir's current model (which may be the base model)."""
    base: bool = False
    """Export the unadapted base encoder."""
    model: str | None = None
    """Base model folder or hub id; default: the one the workdir remembers."""
    out: Path | None = None
    """Default: <workdir>/exports/encoder-<session|base>-<precision>[-projector].onnx."""
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    with_projector: bool = False
    images: Path | None = None
    """Folder of images for the parity proof; default: the session's own data folder when it still exists."""
    quantize: str = "auto"
    """How to load the VLM's language model (never exported; 4-bit keeps loading cheap)."""


def _proof_images(req: ExportRequest, res: SessionRef) -> list[Path]:
    """Up to 3 real images for the proof: --images, else the session's data folder if it still exists."""
    from lorsu_edge.errors import DataError
    from lorsu_edge.samples import read_samples

    folder = req.images or (Path(res.report["data"]) if res.report.get("data") else None)
    if folder is None or (req.images is None and not folder.is_dir()):
        return []
    try:
        return [s.path for s in read_samples(folder, max_samples=max(PARITY_BATCHES)).samples]
    except DataError:
        if req.images is not None:
            raise
        return []


def default_out(req: ExportRequest, res: SessionRef) -> Path:
    """<workdir>/exports/encoder-<session|base>-<precision>[-projector].onnx (cwd when there is no workdir)."""
    root = res.workdir.root if res.workdir is not None else Path.cwd()
    suffix = "-projector" if req.with_projector else ""
    return root / "exports" / f"encoder-{res.session or 'base'}-{req.precision}{suffix}.onnx"


def export_request(req: ExportRequest) -> tuple[ExportResult, SessionRef]:
    """The `lorsu-edge export` recipe: resolve -> load (completeness checked) -> session encoder -> export."""
    if req.precision not in PRECISIONS:  # before the (slow) load
        raise BadInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {req.precision!r}")
    res = resolve_session(req.workdir, req.session, req.base, req.model)
    loaded = load_session_model(res, req.quantize)
    meta = {"base_model": res.base_model, "session_id": res.session,
            "method": res.report.get("method", "none (base model)" if res.session is None else None),
            "parent_session": res.report.get("parent_session")}
    result = export_onnx(loaded.model, loaded.spec, loaded.processor, req.out or default_out(req, res),
                         precision=req.precision, opset=req.opset, with_projector=req.with_projector,
                         sample_images=_proof_images(req, res), meta=meta)
    if res.workdir is not None:
        res.workdir.log_run({"verb": "export", "session": res.session, "out": str(result.path),
                             "precision": req.precision, "exit_code": 0})
    return result, res
