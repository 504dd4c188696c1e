"""Options shared by the verbs that read a data folder (`adapt`, `eval`): how far an inbox is trusted."""

from __future__ import annotations

from typing import Annotated

import typer

from lorsu_edge.budget import parse_size
from lorsu_edge.errors import BadInputError
from lorsu_edge.imagefile import ImageLimits

_DEFAULT = ImageLimits()
DEFAULT_MAX_SIZE = f"{_DEFAULT.max_bytes // 10**6}MB"
DEFAULT_MAX_MEGAPIXELS = _DEFAULT.max_pixels / 1e6

MaxImageSize = Annotated[str, typer.Option(
    help="skip image files larger than this (e.g. 50MB, 200MiB): an inbox file is read into memory whole")]
MaxImageMegapixels = Annotated[float, typer.Option(
    help="skip images with more pixels than this many million, read from the header before decoding")]
AllowOutsideData = Annotated[bool, typer.Option(
    "--allow-outside-data", help="accept manifest paths and links that resolve outside the data folder")]


def image_limits(max_size: str, max_megapixels: float) -> ImageLimits:
    """The flags as `ImageLimits`; a bad value is a one-line BadInputError naming the flag."""
    if not max_megapixels > 0:
        raise BadInputError(f"--max-image-megapixels must be > 0, got {max_megapixels}",
                            hint=f"the default is {DEFAULT_MAX_MEGAPIXELS:g}")
    return ImageLimits(parse_size(max_size, "--max-image-size"), int(max_megapixels * 1e6))
