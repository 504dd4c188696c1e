"""The fp32 graph converted to the requested precision, file to file (external data follows the graph).

- fp16: every weight and op in half precision except `FP16_KEEP_FP32` (LayerNorm, its ReduceMean/Pow pieces
  when decomposed, Resize); float32 I/O. TensorRT's `--stronglyTyped` builds exactly these types.
- int8: onnxruntime's dynamic quantization (int8 MatMul weights, activations quantized at run time): for CPU
  runtimes. TensorRT cannot take it.
- int8-qdq: static quantization in the QDQ format (QuantizeLinear/DequantizeLinear pairs around each MatMul,
  per-channel symmetric int8 weights, symmetric int8 activations with percentile ranges calibrated on real
  images, after SmoothQuant folded into the LayerNorms (`smooth_layer_norms`); the attention products, the
  MLP's second layer and the last block stay float, see `weight_matmuls`): what TensorRT's
  explicit-quantization int8 takes, and what onnxruntime runs on CPU as well.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorsu_edge.errors import BadInputError, ExportMismatchError
from lorsu_edge.export.inputs import INPUT_NAME
from lorsu_edge.export.trace import external_data_name

PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq")
# Kept fp32 inside an fp16 graph. LayerNorm: its variance over hidden sizes of 768-1024 loses ~3 bits in
# fp16 and the error compounds through the residual stream (the casts cost little); exporters at opset < 17
# decompose it into ReduceMean/Sub/Pow/Sqrt/Div, kept fp32 too. Resize: position embedding interpolation
# (DINOv2), where fp16 buys nothing. See also `fold_constants`.
FP16_KEEP_FP32 = ("LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Resize")
# Only MatMul (and Gemm) are quantized: ConvInteger (patch embedding) and quantized Gather have no kernels on
# the GPU providers, and the patch embedding is < 1% of the compute.
INT8_OP_TYPES = ("MatMul", "Gemm")
# Per-channel weight scales: on the real DINOv2-S (24 textile images) per-tensor QInt8 gave a minimum
# cosine of 0.987 (under the 0.99 bound), per-channel 0.997, for the same file size. Random weights
# (no outlier channels) hide this: both give >= 0.9999 there.
INT8_PER_CHANNEL = True
MLP_OUT_INPUTS = ("Gelu", "FastGelu", "QuickGelu", "Mul")
"""Producers of the MLP's second layer's input: the GELU (fused, or decomposed: its last op is a Mul)."""
QDQ_CALIBRATION = "SmoothQuant (alpha 0.75, folded into LayerNorms) + percentile (99.999), symmetric int8"
SMOOTH_ALPHA = 0.75
"""SmoothQuant's migration strength (`smooth_layer_norms`). On the default model (benchmarks/bench_qdq.py,
animals min cosine): last block + head float, 0.75 -> 0.9902, 0.9 -> 0.9861; only the last attention
projection float, 0.5 -> 0.9858, 0.75 -> 0.9884. (onnxruntime's own SmoothQuant option needs Intel's
neural-compressor, not installed; this fold adds no op to the graph.)"""
CALIBRATION_BATCH = 8
"""Images per calibration batch (onnxruntime collects activation ranges batch by batch)."""


def to_precision(src: Path, precision: str, dst: Path, external: bool,
                 calibration: Sequence[np.ndarray] = ()) -> Path:
    """`src` (fp32) converted to `precision`, written at `dst` (fp32: `src` itself); `calibration` feeds
    int8-qdq's activation ranges. Returns the converted file's path."""
    if precision == "fp32":
        return src
    if precision == "fp16":
        _fp16(src, dst, external)
    elif precision == "int8":
        _int8_dynamic(src, dst, external)
    elif precision == "int8-qdq":
        _int8_qdq(src, dst, external, calibration)
    else:
        raise BadInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return dst


def _save(proto: Any, dst: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data_name(dst))
    else:
        onnx.save_model(proto, str(dst))


def _fp16(src: Path, dst: Path, external: bool) -> None:
    import onnx
    from onnxruntime.transformers import float16

    folded = src.with_name(f"folded-{src.name}")
    fold_constants(src, folded, external)
    proto = float16.convert_float_to_float16(
        onnx.load(str(folded)), keep_io_types=True,
        op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32))
    toposort(proto.graph)  # the converter appends its input casts last; onnx.checker wants order
    # The converter leaves value_info typed as before the conversion (fp32 where tensors are now fp16):
    # onnx shape inference then fails, and TensorRT's strongly typed parser must not read stale types.
    del proto.graph.value_info[:]
    _save(proto, dst, external)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizer logs advice at WARNING ("consider pre-processing") and prints its histogram
    settings to stdout (which would break `--json` output): not for users."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _int8_dynamic(src: Path, dst: Path, external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OP_TYPES),
                         per_channel=INT8_PER_CHANNEL, use_external_data_format=external)


class ImageBatches:
    """onnxruntime's CalibrationDataReader over real-image batches (the graph's own input name)."""

    def __init__(self, feeds: Sequence[np.ndarray]) -> None:
        self._feeds = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        return None if feed is None else {INPUT_NAME: feed}


def _int8_qdq(src: Path, dst: Path, external: bool, calibration: Sequence[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not len(calibration):
        raise BadInputError("--precision int8-qdq calibrates activation ranges on real images, and none were found",
                            hint="pass --images DIR (or keep the session's data folder / a control set)")
    # DINOv2's LayerNorm outputs carry a few outlier channels that one per-tensor activation scale cannot
    # span: clipping them (lower percentiles) or not (min/max) both cost accuracy. Smoothing moves them into
    # the per-channel weight scales first. Measured on the default model (benchmarks/bench_qdq.py, animals
    # min cosine): percentile 99.999 alone 0.926, + SmoothQuant 0.936, + last block float 0.990.
    smoothed = dst.with_name(f"smoothed-{dst.name}")
    smooth_layer_norms(src, smoothed, external, calibration, SMOOTH_ALPHA)
    with _quiet_quantizer():
        quantize_static(
            smoothed, dst, ImageBatches(calibration), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(INT8_OP_TYPES), per_channel=INT8_PER_CHANNEL,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            nodes_to_quantize=weight_matmuls(smoothed), use_external_data_format=external,
            # TensorRT takes only symmetric int8 (zero point 0); the same file then serves both runtimes.
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


def weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes int8-qdq quantizes: those that multiply by a weight (an initializer),
    except the MLP's second layer (its input is the GELU output, `MLP_OUT_INPUTS`) and everything from the
    last attention's q/k/v on (the last block and any head after it).

    On the real DINOv2-S (default model): every MatMul with min/max ranges 0.986 min cosine on 64 held-out
    textile + animal images (the attention's softmax in 127 levels); weight MatMuls only 0.989 (min/max) /
    0.990 (percentile); without the MLP's second layer, whose post-GELU input has the heaviest tail, 0.994.
    The animals alone (benchmarks/bench_qdq.py) were still at 0.926: quantized alone, the last block's
    attention output projection costs the most (0.941), its errors reach the output unattenuated. With
    SmoothQuant and the last block + head float the minimum is 0.9902 animals / 0.9978 textile, for a 49.5
    MiB file (46 with the last block quantized, 85 fp32).
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    producer = {o: n.op_type for n in graph.node for o in n.output}
    order = list(graph.node)  # exported graphs are in topological order
    nodes = [(i, n) for i, n in enumerate(order) if n.op_type in INT8_OP_TYPES and any(w in weights for w in n.input)]
    softmax = max((i for i, n in enumerate(order) if n.op_type == "Softmax"), default=len(order))
    before = [n for i, n in nodes if i < softmax]  # the last is the last attention's q or k
    cut = min((i for i, n in nodes if before and n.input[0] == before[-1].input[0]), default=len(order))
    return [n.name for i, n in nodes if i < cut and producer.get(n.input[0]) not in MLP_OUT_INPUTS]


def fold_constants(src: Path, dst: Path, external: bool) -> None:
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
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    if external:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      external_data_name(dst))
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


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


def smooth_layer_norms(src: Path, dst: Path, external: bool, feeds: Sequence[np.ndarray], alpha: float) -> int:
    """SmoothQuant folded into the graph's own weights: for each LayerNormalization whose output only feeds
    weight MatMuls, channel j of its scale and bias is divided by s_j and row j of those MatMuls' weights
    multiplied by it (the float graph computes the same), with s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)
    over `feeds`. Per-tensor activation ranges then no longer have to span a few outlier channels. Returns
    how many LayerNorms were smoothed."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    norms = [n for n in graph.node if n.op_type == "LayerNormalization" and len(n.input) == 3
             and all(i in inits for i in n.input[1:]) and users.get(n.output[0])
             and all(u.op_type == "MatMul" and u.input[1] in inits and u.input[0] == n.output[0]
                     and len(users[u.input[1]]) == 1 for u in users[n.output[0]])]
    if not norms:
        _save(proto, dst, external)
        return 0
    names = [n.output[0] for n in norms]
    amax = {k: np.zeros(0, np.float32) for k in names}
    for outputs in _probe(src, names, feeds):
        for k, v in zip(names, outputs):
            m = np.abs(v).reshape(-1, v.shape[-1]).max(0)
            amax[k] = m if not amax[k].size else np.maximum(amax[k], m)
    for n in norms:
        mats = [numpy_helper.to_array(inits[u.input[1]]) for u in users[n.output[0]]]
        wmax = np.max([np.abs(w).max(1) for w in mats], axis=0)
        s = (np.maximum(amax[n.output[0]], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
        s = np.clip(s, 1e-2, 1e2)  # no channel scaled by more than 100x either way
        for k in (1, 2):  # the exporter may share one all-ones scale between LayerNorms: give each its own
            name, n.input[k] = n.input[k], f"{n.input[k]}.smoothed.{n.name}"
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[name]) / s, n.input[k]))
        for u, w in zip(users[n.output[0]], mats):
            inits[u.input[1]].CopyFrom(numpy_helper.from_array(w * s[:, None], u.input[1]))
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _save(proto, dst, external)
    return len(norms)


def _probe(src: Path, names: list[str], feeds: Sequence[np.ndarray]) -> Iterator[list[np.ndarray]]:
    """The intermediate tensors `names` for each feed: `src` with them as extra outputs, written beside it
    (its external data, if any, is referenced, not loaded: a tower over 2 GiB is never one protobuf)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.load(str(src), load_external_data=False)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, None) for k in names)
    path = src.with_name(f"probe-{src.name}")
    onnx.save(probe, str(path))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for feed in feeds:
            yield sess.run(names, {INPUT_NAME: feed})
    finally:
        path.unlink(missing_ok=True)
