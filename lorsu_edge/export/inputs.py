"""Pixels in: the preprocessing recipe, the `preprocessor_config.json` written beside the model, and real images
turned into the batches that prove (parity) and calibrate (int8-qdq) the export.

With `fold` ("uint8" or "float") the graph takes raw pixels and normalises inside (see `trace.FoldedInput`), so
every batch here exists twice: the raw pixels the ONNX file is fed and the normalised pixels PyTorch is fed,
both derived from the same decoded image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lorsu_edge.errors import BadInputError, UnsupportedModelError
from lorsu_edge.families import EncoderSpec

INPUT_NAME = "pixel_values"
PARITY_BATCHES = (1, 3)
FOLDS = ("uint8", "float")
"""`--fold-normalize` inputs: uint8 0..255 (camera buffers, DeepStream) or float 0..1 (rescaled once)."""
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class Normalization:
    """raw -> model pixels: `(raw * rescale - mean) / std` per channel (the processor's last two steps)."""

    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (raw.float() * self.rescale - mean) / std

    def as_dict(self) -> dict[str, Any]:
        return {"rescale": self.rescale, "mean": list(self.mean), "std": list(self.std)}


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


def normalization(processor: Any, fold: str) -> Normalization:
    """What `--fold-normalize` moves into the graph: the processor's per-channel normalisation, and for uint8
    input its rescale too (float input arrives rescaled to 0..1)."""
    ip = image_processor_of(processor)
    if ip is None:
        raise BadInputError("--fold-normalize needs the model's image processor (its mean and std)",
                            hint="export a model folder that has a preprocessor_config.json")
    rescale = float(ip.rescale_factor) if fold == "uint8" and getattr(ip, "do_rescale", False) else 1.0
    if getattr(ip, "do_normalize", False):
        mean, std = _three(ip.image_mean), _three(ip.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Normalization(rescale, mean, std)


def _three(values: Any) -> tuple[float, float, float]:
    vals = [float(v) for v in (values if isinstance(values, Sequence) else [values] * 3)]
    if len(vals) != 3:
        raise UnsupportedModelError(f"the processor normalises {len(vals)} channels, not 3 (RGB)")
    return vals[0], vals[1], vals[2]


def input_hw(spec: EncoderSpec, recipe: dict[str, Any] | None) -> tuple[int, int]:
    """The (height, width) the graph takes: the processor's crop or fixed resize, else the tower's image_size."""
    if recipe is not None and recipe["center_crop"]:
        return recipe["center_crop"]["height"], recipe["center_crop"]["width"]
    if recipe is not None and recipe["resize"] and "height" in recipe["resize"]:
        return recipe["resize"]["height"], recipe["resize"]["width"]
    size = getattr(getattr(spec.tower, "config", None), "image_size", None)
    if size is None:
        raise UnsupportedModelError("cannot tell the encoder's input size", hint="pass the model's processor")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def input_spec(spec: EncoderSpec, processor: Any, fold: str | None = None) -> dict[str, Any]:
    """Sidecar `input`: tensor name/shape/layout/dtype plus the preprocessing recipe (null if unknown).

    Folded, the recipe stops before rescale/normalize (the graph does them) and says so.
    """
    recipe, why = preprocess_spec(processor)
    h, w = input_hw(spec, recipe)
    value_range = [0.0, 1.0] if fold != "uint8" else [0, 255]
    if fold and recipe is not None:
        recipe = {**recipe, "rescale_factor": None if fold == "uint8" else recipe["rescale_factor"],
                  "normalize": None}
    out = {
        "name": INPUT_NAME, "dtype": "uint8" if fold == "uint8" else "float32", "layout": "NCHW",
        "shape": ["batch", 3, h, w], "channel_order": "RGB",
        "value_range_after_rescale": value_range,
        "normalization_in_graph": normalization(processor, fold).as_dict() if fold else None,
        "preprocess": recipe,
    }
    if why:
        out["preprocess_unavailable"] = why
    return out


def preprocessor_config(processor: Any, fold: str | None = None) -> dict[str, Any] | None:
    """The image processor's own `preprocessor_config.json` content, or None without a processor.

    `AutoImageProcessor.from_pretrained(<export folder>)` then yields exactly the graph's input: with
    `fold` the steps the graph does itself (rescale for uint8, normalize) are switched off.
    """
    ip = image_processor_of(processor)
    if ip is None or not hasattr(ip, "to_dict"):
        return None
    config = ip.to_dict()
    config.pop("processor_class", None)  # names the multimodal processor, which is not exported
    if fold:
        config["do_normalize"] = False
        config["do_rescale"] = fold == "float" and bool(config.get("do_rescale", False))
    return config


@dataclass
class Batch:
    """One proof/calibration batch: what the ONNX graph is fed and what PyTorch is fed."""

    feed: np.ndarray
    pixels: torch.Tensor


def _load_pil(images: Sequence[Path | Image.Image]) -> list[Image.Image]:
    from lorsu_edge.samples import load_image

    return [im if isinstance(im, Image.Image) else load_image(Path(im)) for im in images]


def _raw_processor(processor: Any, fold: str) -> Any:
    """A copy of the image processor that stops before the steps a folded graph does itself."""
    ip = image_processor_of(processor)
    config = preprocessor_config(processor, fold)
    return type(ip).from_dict(config)


def image_batch(processor: Any, images: Sequence[Path | Image.Image], fold: str | None = None) -> Batch:
    """Real images -> (ONNX feed, PyTorch pixels) through the model's processor."""
    if processor is None:
        raise BadInputError("images need the model's processor to become pixel values",
                            hint="pass the processor, or no images (random pixels are used then)")
    pil = _load_pil(images)
    if not fold:
        px = image_processor_of(processor)(images=pil, return_tensors="pt")["pixel_values"].float()
        return Batch(px.numpy(), px)
    raw = _raw_processor(processor, fold)(images=pil, return_tensors="pt")["pixel_values"].float()
    if fold == "uint8":
        raw = raw.round().clamp(0, 255)  # already integral (PIL resize on uint8); the cast must not wrap
    feed = raw.numpy().astype(np.uint8 if fold == "uint8" else np.float32)
    return Batch(feed, normalization(processor, fold).apply(torch.from_numpy(feed)))


def random_batch(spec: EncoderSpec, processor: Any, n: int, fold: str | None = None, seed: int = 0) -> Batch:
    """Random pixels of the graph's input shape (for models exported without any image at hand)."""
    h, w = input_hw(spec, preprocess_spec(processor)[0])
    gen = torch.Generator().manual_seed(seed)
    if not fold:
        px = torch.randn(n, 3, h, w, generator=gen)
        return Batch(px.numpy(), px)
    raw = torch.randint(0, 256, (n, 3, h, w), generator=gen, dtype=torch.uint8)
    feed = raw.numpy() if fold == "uint8" else (raw.float() / 255).numpy()
    return Batch(feed, normalization(processor, fold).apply(torch.from_numpy(feed)))


def parity_batches(spec: EncoderSpec, processor: Any, images: Sequence[Path | Image.Image] | None,
                   fold: str | None = None) -> tuple[dict[int, Batch], str]:
    """Proof batches keyed by batch size (the first images, cycled when fewer than 3), and where they came from."""
    images = list(images or [])
    n = max(PARITY_BATCHES)
    if images:
        chosen = [images[i % len(images)] for i in range(n)]
        full = image_batch(processor, chosen, fold)
        source = f"{min(len(images), n)} session image(s)"
    else:
        full, source = random_batch(spec, processor, n, fold), "random normal pixels" if not fold else \
            "random uint8 pixels"
    return {b: Batch(full.feed[:b], full.pixels[:b]) for b in PARITY_BATCHES}, source
