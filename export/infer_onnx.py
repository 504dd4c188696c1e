#!/usr/bin/env python3
"""Run a lorsu-edge ONNX export on images: image in, embedding out, printed as JSON.

Standalone on purpose: it needs only Pillow, numpy and onnxruntime (no torch, no transformers), so it
can be copied to a Jetson or any deployment box next to the .onnx file, together with
`lorsu_edge/imagefile.py` (copy it beside this script as `imagefile.py`): images are read and decoded
by that same module in training and here (16-bit, transparent, EXIF-rotated images give the same pixels;
FIFOs, devices, non-raster formats and files over the caps are refused).
Preprocessing is replayed from the sidecar `<model>.onnx.json` written by `lorsu-edge export`, and
reproduces the model's transformers image processor (PIL resize, center crop, rescale, normalize).

    python infer_onnx.py encoder.onnx cat.jpg dog.png            # full embeddings
    python infer_onnx.py encoder.onnx cat.jpg --summary          # shape + norm only
    python infer_onnx.py encoder.onnx cat.jpg --provider CUDAExecutionProvider

Output: {"model": ..., "export_id": ..., "output": {"name", "shape"}, "results": [{"image", "shape",
"norm", "embedding"}]}. Exit code 0 on success, 3 for a bad model/sidecar/image (one-line message).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

try:  # shipped beside this script on a deployment box
    import imagefile
except ImportError:  # run from a lorsu-edge checkout or install
    from lorsu_edge import imagefile

FORMAT = "lorsu-edge-onnx/1"
META_PREFIX = "lorsu_edge."
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


class InferError(Exception):
    """A bad model, sidecar or image: printed as one line, exit code 3."""


def read_sidecar(model_path: Path, sidecar: Path | None = None) -> dict[str, Any]:
    """The export's sidecar JSON (default `<model>.json`), checked for format and preprocessing."""
    path = sidecar or Path(f"{model_path}.json")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InferError(f"cannot read the sidecar {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise InferError(f"{path} is not a lorsu-edge export sidecar (format {meta.get('format')!r})")
    if not meta.get("input", {}).get("preprocess"):
        why = meta.get("input", {}).get("preprocess_unavailable", "unknown")
        raise InferError(f"the export records no preprocessing recipe ({why}); feed pixel_values yourself")
    return meta


def load_rgb(path: Path, limits: imagefile.ImageLimits = imagefile.ImageLimits()) -> Image.Image:
    """An image decoded exactly as lorsu-edge decodes it for training (`imagefile.decode_image`)."""
    try:
        return imagefile.decode_image(imagefile.read_image_bytes(path, limits), limits)
    except imagefile.ImageRefused as e:
        raise InferError(f"refused image {path}: {e}") from None
    except Exception as e:  # Pillow's plugins raise many exception types on corrupt input
        raise InferError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _resize_hw(h: int, w: int, size: dict[str, int]) -> tuple[int, int]:
    """Target (height, width) exactly as transformers computes it (shortest edge keeps the aspect ratio)."""
    if "shortest_edge" not in size:
        return size["height"], size["width"]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop on an HWC array (zero padding when the image is smaller than the crop)."""
    h, w = arr.shape[:2]
    if h < height or w < width:
        nh, nw = max(h, height), max(w, width)
        padded = np.zeros((nh, nw, arr.shape[2]), dtype=arr.dtype)
        top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        padded[top:top + h, left:left + w] = arr
        arr, h, w = padded, nh, nw
    top, left = (h - height) // 2, (w - width) // 2
    return arr[top:top + height, left:left + width]


def preprocess(image: Image.Image, recipe: dict[str, Any]) -> np.ndarray:
    """One PIL image -> float32 CHW array, following the sidecar's `input.preprocess` recipe."""
    if recipe.get("convert_rgb", True) and image.mode != "RGB":
        image = image.convert("RGB")
    if recipe.get("resize"):
        h, w = _resize_hw(image.height, image.width, recipe["resize"])
        resample = _RESAMPLE[recipe.get("resample", "bicubic")]
        image = image.resize((w, h), resample=resample, reducing_gap=None)
    arr = np.asarray(image)
    if recipe.get("center_crop"):
        arr = _center_crop(arr, recipe["center_crop"]["height"], recipe["center_crop"]["width"])
    if recipe.get("rescale_factor") is not None:
        arr = (arr.astype(np.float64) * recipe["rescale_factor"]).astype(np.float32)  # as transformers does
    arr = arr.astype(np.float32)
    if recipe.get("normalize"):
        mean = np.array(recipe["normalize"]["mean"], dtype=np.float32)
        std = np.array(recipe["normalize"]["std"], dtype=np.float32)
        arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def open_session(model_path: Path, meta: dict[str, Any], providers: list[str] | None = None):
    """An onnxruntime session, after checking that the model is the one the sidecar describes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise InferError(f"onnxruntime cannot load {model_path}: {str(e).splitlines()[0]}") from None
    embedded = session.get_modelmeta().custom_metadata_map.get(f"{META_PREFIX}export_id")
    if embedded != meta.get("export_id"):
        raise InferError(f"{model_path} (export {embedded}) does not belong to its sidecar (export "
                         f"{meta.get('export_id')}): re-copy both files")
    return session


def embed(session: Any, meta: dict[str, Any], images: list[Image.Image], batch_size: int = 8) -> np.ndarray:
    """Embeddings of `images` (the export's output), batched."""
    recipe = meta["input"]["preprocess"]
    expected = tuple(meta["input"]["shape"][2:])
    outs = []
    for start in range(0, len(images), batch_size):
        px = np.stack([preprocess(im, recipe) for im in images[start:start + batch_size]])
        if px.shape[2:] != expected:
            raise InferError(f"preprocessing gave {px.shape[2:]}, the model expects {expected}")
        if meta["input"].get("dtype") == "uint8":  # --fold-normalize uint8: raw 0..255 pixels, normalised in-graph
            px = np.clip(np.rint(px), 0, 255).astype(np.uint8)
        outs.append(session.run(None, {meta["input"]["name"]: px})[0])
    return np.concatenate(outs)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="the exported .onnx file")
    ap.add_argument("images", type=Path, nargs="+", help="image files")
    ap.add_argument("--sidecar", type=Path, default=None, help="sidecar JSON (default: <model>.json)")
    ap.add_argument("--provider", action="append", default=None,
                    help="onnxruntime execution provider, repeatable (default: CPUExecutionProvider)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--summary", action="store_true", help="print shape and L2 norm, not the values")
    ap.add_argument("--max-image-bytes", type=_positive_int, default=imagefile.ImageLimits().max_bytes,
                    help="refuse image files larger than this")
    ap.add_argument("--max-image-pixels", type=_positive_int, default=imagefile.ImageLimits().max_pixels,
                    help="refuse images with more pixels than this (read from the header)")
    args = ap.parse_args(argv)
    try:
        meta = read_sidecar(args.model, args.sidecar)
        session = open_session(args.model, meta, args.provider)
        limits = imagefile.ImageLimits(args.max_image_bytes, args.max_image_pixels)
        out = embed(session, meta, [load_rgb(p, limits) for p in args.images], args.batch_size)
    except InferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    results = []
    for path, row in zip(args.images, out):
        item = {"image": str(path), "shape": list(row.shape), "norm": float(np.linalg.norm(row))}
        if not args.summary:
            item["embedding"] = row.tolist()
        results.append(item)
    print(json.dumps({"model": str(args.model), "export_id": meta["export_id"],
                      "output": {"name": meta["output"]["name"], "shape": meta["output"]["shape"]},
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
