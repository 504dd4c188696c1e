"""The planner: predict each phase's peak memory from config.json alone, and choose settings that fit.

Only config.json (and preprocessor_config.json) is read, never a weight file: a model that does not fit is
refused before anything is loaded.

The stages, one module each, in the order a plan is made:
    config         read config.json (and preprocessor_config.json for the image size), never a weight file
    build          the stand-in model: each stack cut to a few identical layers, built without weights
    arch           describe the architecture: role, family, parameter counts, candidate blocks, tokens
    simulate       one forward + backward on fake tensors, counting every byte it allocates
                   (checkpointing: the activation checkpointing it assumes, which adapt applies too)
    adapter        what the method's update layers hold, from a fake injection
    phases         per-phase accounting: load, importance, train, merge, export, each with a margin
    search         the ladder of settings, least intrusive first; the cheapest change when none fits
    make           make_plan: flags checked, model described, settings chosen, the Plan assembled
    report         the Plan, check_fits (the refusal) and format_plan (the table the CLI prints)
"""

from __future__ import annotations

from lorsu_edge.plan.adapter import AdapterSize, adapter_size
from lorsu_edge.plan.arch import CAPTION_TOKENS, TEXT_TOKENS, Arch, describe, role_of
from lorsu_edge.plan.checkpointing import apply_checkpointing, remove_checkpointing
from lorsu_edge.plan.config import ASSUMED_TEXT_CONFIG, read_config
from lorsu_edge.plan.make import (
    DTYPE_CHOICES,
    LOSSES,
    QUANTIZE_CHOICES,
    make_plan,
    resolve_dtype,
    resolve_profile,
    resolve_quantize,
)
from lorsu_edge.plan.phases import (
    LLM_BYTES,
    MARGIN_FRACTION,
    MARGIN_MIN,
    QUANT_BYTES,
    Component,
    Phase,
    Settings,
    block_groups,
)
from lorsu_edge.plan.report import Plan, check_fits, format_plan
from lorsu_edge.plan.search import ladder
from lorsu_edge.plan.simulate import _run_simulation, _simulate, activation_bytes  # noqa: F401 (the tests reach in)

# How many layers of each stack the stand-in model keeps (block 0 of the encoder differs: its input needs
# no grad). build.py reads them from here at call time, so setting them on the package takes effect.
SIM_BLOCKS = 3
SIM_LLM_LAYERS = 2
SIM_TEXT_LAYERS = 1

__all__ = [
    "ASSUMED_TEXT_CONFIG", "CAPTION_TOKENS", "DTYPE_CHOICES", "LLM_BYTES", "LOSSES", "MARGIN_FRACTION",
    "MARGIN_MIN", "QUANTIZE_CHOICES", "QUANT_BYTES", "SIM_BLOCKS", "SIM_LLM_LAYERS", "SIM_TEXT_LAYERS",
    "TEXT_TOKENS", "AdapterSize", "Arch", "Component", "Phase", "Plan", "Settings", "activation_bytes",
    "adapter_size", "apply_checkpointing", "block_groups", "check_fits", "describe", "format_plan", "ladder",
    "make_plan", "read_config", "remove_checkpointing", "resolve_dtype", "resolve_profile", "resolve_quantize",
    "role_of",
]
