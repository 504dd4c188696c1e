"""The stand-in model the planner measures: the user's config with each stack cut to a few identical
layers (the depths are the package's SIM_BLOCKS, SIM_LLM_LAYERS, SIM_TEXT_LAYERS), built without
initialising weights (inside FakeTensorMode for the simulation), and the submodules the planner looks up."""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lorsu_edge.errors import BadInputError


def sim_config(cfg: Any, role: str, loss: str, text_cfg: Any) -> tuple[Any, dict[str, int]]:
    """The (truncated) config to simulate, and the full layer count of each stack."""
    cfg = copy.deepcopy(cfg)
    if role == "vlm" and loss == "ppl":
        full = {"tower": _cut(cfg.vision_config, _tower_keep(cfg, role)),
                "llm": _cut(cfg.text_config, _depth("SIM_LLM_LAYERS"))}
        return cfg, full
    if role == "dual":
        full = {"tower": _cut(cfg.vision_config, _depth("SIM_BLOCKS")),
                "text": _cut(cfg.text_config, _depth("SIM_TEXT_LAYERS"))}
        _eager(cfg.text_config)
        return cfg, full
    vision = cfg.vision_config if role == "vlm" else cfg
    text = _eager(copy.deepcopy(text_cfg))
    full = {"tower": _cut(vision, _tower_keep(cfg, role)), "text": _cut(text, _depth("SIM_TEXT_LAYERS"))}
    return _PairConfig(vision, text, getattr(cfg, "vision_feature_layer", None)), full


def _tower_keep(cfg: Any, role: str) -> int:
    """Encoder blocks to simulate: SIM_BLOCKS, unless the consumer reads a fixed positive or multiple layer."""
    layer = getattr(cfg, "vision_feature_layer", -1) if role == "vlm" else -1
    return _depth("SIM_BLOCKS") if isinstance(layer, int) and layer < 0 else 10**6


def _depth(name: str) -> int:
    """A simulation depth, read from the package when used: setting `lorsu_edge.plan.SIM_BLOCKS` (the tests
    simulate whole stacks to check the extrapolation) must reach the truncation here."""
    from lorsu_edge import plan

    return int(getattr(plan, name))


def _cut(cfg: Any, keep: int) -> int:
    """Keep `keep` layers of a (copied) sub-config; returns the full count. Layers of a stack are identical."""
    full = int(cfg.num_hidden_layers)
    if full > keep:
        cfg.num_hidden_layers = keep
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:keep]
    return full


def _eager(text_cfg: Any) -> Any:
    """Eager attention for the (frozen, no-grad) text tower: BERT's SDPA mask helper inspects the
    mask's values (`torch.all(mask == 1)`), which fake tensors do not have."""
    text_cfg._attn_implementation = "eager"
    return text_cfg


@dataclass
class _PairConfig:
    """A VLM's image tower + a dual encoder's text tower, joined by projection heads: what --loss clip
    --text-model trains. Built by hand: transformers' VisionTextDualEncoder refuses some towers (BLIP)."""

    vision_config: Any
    text_config: Any
    feature_layer: Any = None  # the VLM's vision_feature_layer: blocks after it are never candidates

    def to_json_string(self) -> str:
        return json.dumps([self.vision_config.to_json_string(), self.text_config.to_json_string(),
                           self.feature_layer])


def build(cfg: Any):
    """An fp32 model from `cfg` (call inside FakeTensorMode). Weight init is skipped: values do not
    matter here, and some initialisers (trunc_normal_) read tensor values, which fake tensors lack."""
    import torch

    try:
        from transformers.initialization import no_init_weights  # 5.x
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # 4.57
    if isinstance(cfg, _PairConfig):
        return _build_pair(cfg).train()
    cls = _model_class(cfg)
    with no_init_weights():
        if hasattr(cls, "_from_config"):
            return cls._from_config(cfg, dtype=torch.float32).train()
        return cls.from_config(cfg, dtype=torch.float32).train()


def _model_class(cfg: Any):
    import transformers as tf

    if cfg.model_type == "vision-text-dual-encoder":
        return tf.VisionTextDualEncoderModel
    for arch in getattr(cfg, "architectures", None) or []:
        if hasattr(tf, arch):
            return getattr(tf, arch)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if cfg.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return tf.AutoModelForImageTextToText
    named = type(cfg).__name__.replace("Config", "Model")  # BlipVisionConfig -> BlipVisionModel
    return getattr(tf, named) if hasattr(tf, named) else tf.AutoModel


def _build_pair(cfg: _PairConfig):
    from torch import nn

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = cfg
            self.vision_model = build(cfg.vision_config)
            self.text_model = build(cfg.text_config)
            dim = int(getattr(cfg.text_config, "projection_dim", 0) or 512)
            self.visual_projection = nn.Linear(cfg.vision_config.hidden_size, dim, bias=False)
            self.text_projection = nn.Linear(cfg.text_config.hidden_size, dim, bias=False)

        def get_image_features(self, pixel_values):
            out = self.vision_model(pixel_values=pixel_values)
            pooled = getattr(out, "pooler_output", None)
            return self.visual_projection(pooled if pooled is not None else out.last_hidden_state[:, 0])

    return Pair()


def find_spec(model: Any, cfg: Any):
    """find_encoder, with a VLM tower inside a dual encoder limited to the blocks the VLM reads
    (as load.load_vlm_tower_in_dual does)."""
    from lorsu_edge.families import find_encoder, used_blocks_for

    spec = find_encoder(model)
    if isinstance(cfg, _PairConfig) and cfg.feature_layer is not None:
        spec.used_blocks = used_blocks_for(len(spec.blocks), cfg.feature_layer)
    return spec


def language_model(model: Any):
    for path in ("model.language_model", "language_model.model", "language_model"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise BadInputError(f"{type(model).__name__} has no language model", hint="--loss ppl needs a VLM")


def layer_list(module: Any):
    """The largest ModuleList inside `module`: its stack of transformer layers."""
    from torch import nn

    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return max(lists, key=numel)


def numel(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' advice (use_cache vs checkpointing, deprecated kwargs) while simulating."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
