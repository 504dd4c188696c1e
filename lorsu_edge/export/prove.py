"""The proof an export must pass before it is kept: `onnx.checker`, then onnxruntime against PyTorch.

Tolerances (`TOLERANCES`):
- fp32: max |onnx - torch| <= 1e-4 x max |torch| (the output scale). Measured ~1e-6 relative on tiny
  models; 1e-4 leaves room for a 24-block ViT-L while still catching any wrong weight or op.
- fp16, int8 and int8-qdq: the cosine between ONNX and PyTorch output vectors (one per image, or per token for
  VLM features) >= 0.99 for every vector. Elementwise error is not a useful bound there: rounding moves every
  value, while downstream consumers (projector, similarity search) care about direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorsu_edge import consumer
from lorsu_edge.errors import ExportMismatchError
from lorsu_edge.export.inputs import INPUT_NAME
from lorsu_edge.families import EncoderSpec


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
    "int8-qdq": Tolerance(min_cosine=0.99),
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


def onnx_session(model: Path | bytes) -> Any:
    """A CPU onnxruntime session over a model file (its external data beside it) or serialized bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # kernel errors surface as exceptions with the same text (ExportMismatchError)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


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


def prove(model: Path, refs: dict[int, tuple[np.ndarray, np.ndarray]], precision: str,
          tol: Tolerance) -> list[Parity]:
    """onnx.checker, then onnxruntime on each batch's feed vs its PyTorch output; ExportMismatchError on failure."""
    import onnx

    hint = "the ONNX file was not written; set LORSU_EDGE_DEBUG=1 and report the model class and versions"
    try:
        onnx.checker.check_model(str(model))  # by path: external data and models over 2 GiB are checked too
        session = onnx_session(model)
    except Exception as e:  # checker and onnxruntime raise their own exception types
        raise ExportMismatchError(f"the {precision} ONNX graph is invalid: {str(e).splitlines()[0][:300]}",
                                  hint=hint) from e
    parities = []
    for batch, (feed, ref) in refs.items():
        try:
            got = session.run(None, {INPUT_NAME: feed})[0]
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
