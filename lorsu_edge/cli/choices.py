"""Choice-like flag values as `Literal` types: Typer turns them into choices, so a typo such as
`--precision fp8` exits 2 (bad flags) with the allowed values, before any model is loaded.

Kept here, free of torch imports, so `--help` stays fast; tests check each against the library's own
tuple (config.METHODS, losses.LOSSES, load.QUANTIZE, export.PRECISIONS, train's precisions; export's FOLDS in
test_export_deploy)."""

from __future__ import annotations

import re
from typing import Literal

import typer

from lorsu_edge.config import METHODS

Method = Literal[METHODS]  # type: ignore[valid-type]
Loss = Literal["clip", "ppl"]
Quantize = Literal["auto", "4bit", "8bit", "none"]
TrainPrecision = Literal["auto", "bf16", "fp16", "fp32"]
ExportPrecision = Literal["fp32", "fp16", "int8", "int8-qdq"]
Fold = Literal["uint8", "float"]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(value: str) -> str:
    """Typer callback: auto | cpu | cuda | cuda:N, else exit 2 naming the flag."""
    if not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value
