"""Read one image file safely and decode it to 8-bit RGB, the same way in training and on the device.

Dependency-free on purpose (Pillow + numpy + the standard library; nothing from lorsu_edge):
`export/infer_onnx.py` imports it, and on a deployment box this file is copied next to that script.
The two must decode alike, or the device sees other pixels than the encoder was adapted on.

What an unattended inbox may hold, and what is refused (`ImageRefused`, its message is the reason):
- anything but a regular file (a FIFO would block `read()` for ever, `/dev/zero` never ends, a socket
  cannot be read): checked with fstat on a descriptor opened non-blocking and without following links;
- a file over `ImageLimits.max_bytes`, or an image over `ImageLimits.max_pixels` (checked from the
  header, before any pixel is decoded: a 300 KB PNG can declare 144 megapixels);
- any format but the raster ones in `RASTER_FORMATS` (Pillow would hand an EPS/PS/PDF file, whatever
  its name, to Ghostscript).
"""

from __future__ import annotations

import errno
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's format ids (its JPEG opener also returns phone MPO files); PPM covers PGM/PBM too.
RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_CHUNK_PIXELS = 1 << 20  # high-bit conversion works on ~1M pixels at a time (8 MB of float64)
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageLimits:
    """Per-image caps, sized for an 8 GB edge box that also runs the inference service.

    50 MB holds any camera JPEG and a 40 MP 8-bit PNG of real content; 40 MP is above every common
    camera sensor (Jetson CSI cameras are 8-12 MP) while its worst decode (RGBA composited on white,
    four full-size 4-byte copies) stays under 1 GB. The model sees a few hundred pixels a side anyway.
    """

    max_bytes: int = 50_000_000
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


class ImageRefused(ValueError):
    """A file that is not read or not decoded; str(e) is the one-line reason."""


# --- reading ----------------------------------------------------------------------------------


def read_image_bytes(path: Path | str, limits: ImageLimits = ImageLimits()) -> bytes:
    """The file's bytes, if it is a non-empty regular file within `limits.max_bytes`.

    The path is resolved first (links followed), then opened with O_NOFOLLOW | O_NONBLOCK: a FIFO opens
    without waiting for a writer and is refused by fstat, and a link swapped in after resolving fails.
    """
    real = Path(path).resolve()
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as e:
        raise ImageRefused(_open_reason(e)) from None
    try:
        return _read_regular(fd, limits.max_bytes)
    finally:
        os.close(fd)


def _open_reason(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "missing file"
    if e.errno == errno.ENXIO:  # opening a socket
        return "not a regular file (socket)"
    if e.errno == errno.ELOOP:
        return "the path became a symbolic link after it was checked"
    if e.errno == errno.EISDIR:
        return "not a file"
    return f"unreadable: {e.strerror or e}"


def _read_regular(fd: int, max_bytes: int) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return _refuse_kind(st.st_mode)
    if st.st_size > max_bytes:
        raise ImageRefused(f"{st.st_size:,} bytes, over the {max_bytes:,}-byte cap (raise it with --max-image-size)")
    if st.st_size == 0:
        raise ImageRefused("empty file")
    os.set_blocking(fd, True)
    with os.fdopen(os.dup(fd), "rb") as f:
        data = f.read(max_bytes + 1)  # +1: a file still growing past the cap is refused, not truncated
    if len(data) > max_bytes:
        raise ImageRefused(f"grew past the {max_bytes:,}-byte cap while being read")
    if not data:
        raise ImageRefused("empty file")
    return data


def _refuse_kind(mode: int) -> bytes:
    kinds = {stat.S_ISDIR: "not a file", stat.S_ISFIFO: "not a regular file (FIFO)",
             stat.S_ISCHR: "not a regular file (character device)", stat.S_ISBLK: "not a regular file (block device)",
             stat.S_ISSOCK: "not a regular file (socket)"}
    raise ImageRefused(next((why for test, why in kinds.items() if test(mode)), "not a regular file"))


# --- decoding ---------------------------------------------------------------------------------


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), *, reduced: bool = False) -> Image.Image:
    """Decode fully (truncation is caught now, not mid-training) to 8-bit RGB, EXIF orientation applied.

    Grayscale and palette images are converted; transparency (RGBA, LA, palette or colour-key) is
    composited on white; 16-bit, 32-bit and float grayscale are scaled to 8 bits rather than clipped.
    `reduced=True` is for verification only: JPEG pixels may come back at 1/8 scale.
    Raises `ImageRefused` for a format outside `RASTER_FORMATS` or too many pixels; Pillow's own
    exceptions for a corrupt file.
    """
    try:
        im = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
    except UnidentifiedImageError:
        known = ", ".join(RASTER_FORMATS)
        raise ImageRefused(f"cannot decode image: not one of the raster formats read here ({known})") from None
    pixels = im.width * im.height
    if pixels > limits.max_pixels:
        raise ImageRefused(f"{im.width}x{im.height} = {pixels / 1e6:.1f} MP, over the {limits.max_pixels / 1e6:g} MP "
                           "cap (raise it with --max-image-megapixels)")
    if reduced:
        # JPEG only: decode at 1/8 scale. libjpeg still walks the whole entropy-coded stream,
        # so truncation is caught, at half the cost on large photos.
        im.draft(None, (1, 1))
    im.load()
    return to_rgb(exif_upright(im))


def exif_upright(im: Image.Image) -> Image.Image:
    """`im` turned as its EXIF orientation says (no copy when it says nothing); a malformed EXIF is ignored."""
    try:
        if im.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
            return im
        upright = ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block must not cost us an otherwise good image
        return im
    return upright if upright is not None else im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded mode -> RGB; transparency composited on white, high-bit grayscale scaled to 8 bits."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = high_bit_to_l(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # composite on white: converting straight to RGB would show transparent pixels as
        # whatever colour they happen to store (often black)
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def high_bit_to_l(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit or float grayscale to 8 bits (PIL's own convert("L") clips at 255).

    Works on row bands of about a million pixels, so no full-size int64/float64 copy is ever made
    (a 16-bit 12000x12000 PNG peaked at 4.9 GiB that way). Rules: 16-bit -> v/257; "I" holding 0..255
    kept as is, 0..65535 -> v/257, anything else stretched min..max; float in [0, 1] -> x*255, else
    stretched; float NaN counts as 0 and +-inf as the finite extremes (a stretch over float64's
    range would overflow); all rounded half to even.
    """
    lo, hi = _extrema(im)
    if im.mode == "F":
        scale, offset = (255.0, 0.0) if 0.0 <= lo and hi <= 1.0 else _stretch_params(lo, hi)
    elif im.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
        scale, offset = 1 / 257.0, 0.0  # 65535 -> 255 exactly
    elif lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0  # 8-bit data stored in a 32-bit image
    else:
        scale, offset = _stretch_params(lo, hi)
    out = np.empty((im.height, im.width), dtype=np.uint8)
    for top, band in _bands(im):
        if im.mode == "F":
            band = np.nan_to_num(band, nan=0.0, posinf=hi, neginf=lo)
        scaled = (band - offset) * scale
        out[top:top + band.shape[0]] = np.clip(np.rint(scaled), 0, 255)
    return Image.fromarray(out)


def _stretch_params(lo: float, hi: float) -> tuple[float, float]:
    """(scale, offset) mapping lo..hi to 0..255; a flat image maps to 0."""
    return (255.0 / (hi - lo), lo) if hi > lo else (0.0, lo)


def _bands(im: Image.Image):
    """(top row, float64 array) for horizontal bands of about `_CHUNK_PIXELS` pixels."""
    rows = max(1, _CHUNK_PIXELS // max(1, im.width))
    for top in range(0, im.height, rows):
        yield top, np.asarray(im.crop((0, top, im.width, min(im.height, top + rows)))).astype(np.float64)


def _extrema(im: Image.Image) -> tuple[float, float]:
    """Min and max of the finite values (and 0 where a float is NaN), band by band."""
    lo, hi = np.inf, -np.inf
    for _, band in _bands(im):
        finite = band[np.isfinite(band)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        if np.isnan(band).any():
            lo, hi = min(lo, 0.0), max(hi, 0.0)
    return (0.0, 0.0) if lo > hi else (lo, hi)
