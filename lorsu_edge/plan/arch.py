"""The architecture description: what the planner knows once config.json is read (role, family, parameter
counts per component, candidate blocks, token counts), counted on the stand-in model."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorsu_edge.errors import BadInputError
from lorsu_edge.plan.build import build, find_spec, language_model, layer_list, numel, quiet, sim_config
from lorsu_edge.plan.config import processor_image_size, read_config, text_tower_config

TEXT_TOKENS = 74  # question + answer tokens next to the image tokens (LLaVA-1.5: 576 + 74 = 650)
CAPTION_TOKENS = 77  # CLIP's text context


@dataclass
class Arch:
    """What the planner knows about a model once its config has been read (counts are elements)."""

    name: str
    role: str  # role of the user's model: vlm, dual, encoder
    family: str
    loss: str
    sim_cfg: Any  # the config simulated (stacks truncated): the VLM for ppl, a dual encoder for clip
    full_layers: dict[str, int]  # real layer count per simulated stack: tower, llm, text
    image_size: int
    text_tokens: int
    llm_layers: int  # decoder layers of the LLM (0: no LLM loaded)
    encoder: int
    projector: int
    llm_quantizable: int  # Linear weights of the LLM's decoder layers (what bitsandbytes replaces)
    llm_other: int  # embeddings, norms, lm_head: stay in the compute dtype
    text: int  # frozen text tower and projection heads (clip)
    used_blocks: int  # encoder blocks whose output reaches the loss (candidates)
    candidate_numels: list[int]  # per candidate block: fc1 + q/k/v (or fused qkv) weight elements
    largest_tensor: int
    largest_llm_linear: int
    ckpt_bytes: int  # bytes per element in the checkpoint files (config torch_dtype)
    vision_tokens: int  # tokens per image in the encoder (CLS included)
    vision_width: int  # widest per-token activation of an encoder block (fc1 output or q/k/v)
    config: Any = None  # the user's config, folder and text model (to re-plan with another loss)
    folder: Path | None = None
    text_model: Any = None
    notes: list[str] = field(default_factory=list)

    @functools.cached_property
    def key(self) -> str:
        """Identity for the simulation cache: everything a simulation depends on."""
        return json.dumps([self.sim_cfg.to_json_string(), self.loss, self.image_size, self.text_tokens,
                           self.full_layers])


def describe(source: Any, loss: str, text_model: Any = None, text_tokens: int = TEXT_TOKENS,
             image_size: int | None = None) -> Arch:
    """Read config.json (never weights) and count what each component holds."""
    cfg, name, folder = read_config(source)
    with quiet():
        return describe_config(cfg, name, folder, loss, text_model, text_tokens, image_size)


def describe_config(cfg, name, folder, loss, text_model, text_tokens, image_size) -> Arch:
    from torch._subclasses.fake_tensor import FakeTensorMode

    role = role_of(cfg)
    if loss == "ppl" and role != "vlm":
        raise BadInputError(f"--loss ppl needs a VLM; {name} is a {role} model", hint="use --loss clip")
    if role == "encoder":  # as losses.check_loss: neither loss has what it needs
        raise BadInputError(f"{name} is a bare image encoder: --loss clip needs a text tower, --loss ppl a VLM",
                            hint="load a dual encoder (CLIPModel, SiglipModel, VisionTextDualEncoderModel) or a VLM")
    notes: list[str] = []
    if loss == "clip" and role == "vlm":
        notes.append("--loss clip: the LLM is not loaded; its tower trains inside the --text-model dual encoder")
        if text_model is None:
            notes.append("no --text-model: assumed CLIP-L/14's text tower (123M params); adapt needs --text-model")
    text_cfg = text_tower_config(text_model) if loss == "clip" and role != "dual" else None
    sim_cfg, full = sim_config(cfg, role, loss, text_cfg)
    with FakeTensorMode():
        model = build(sim_cfg)
        spec = find_spec(model, sim_cfg)
        counts = _count(model, spec, full)
    vision_cfg = getattr(sim_cfg, "vision_config", sim_cfg)
    size = image_size or processor_image_size(vision_cfg, folder)
    patch = int(getattr(vision_cfg, "patch_size", 16))
    caption = min(CAPTION_TOKENS, int(getattr(getattr(sim_cfg, "text_config", None), "max_position_embeddings", 77)))
    return Arch(name=name, role=role, family=spec.family.name, loss=loss, sim_cfg=sim_cfg, full_layers=full,
                image_size=size, text_tokens=text_tokens if loss == "ppl" else caption,
                ckpt_bytes=_ckpt_bytes(cfg), vision_tokens=(size // patch) ** 2 + 1,
                vision_width=max(int(getattr(vision_cfg, "intermediate_size", 0)), 3 * spec.hidden_size),
                config=cfg, folder=folder, text_model=text_model, notes=notes, **counts)


def role_of(cfg: Any) -> str:
    """vlm | dual | encoder, from the config alone (load.config_role's answer, without refusing)."""
    if cfg.model_type == "vision-text-dual-encoder":
        return "dual"
    if getattr(cfg, "vision_config", None) is not None and getattr(cfg, "text_config", None) is not None:
        is_vlm = any("ConditionalGeneration" in a or "ImageTextToText" in a
                     for a in getattr(cfg, "architectures", None) or [])
        return "vlm" if is_vlm or hasattr(cfg, "vision_feature_layer") else "dual"
    return "encoder"


def _count(model, spec, full: dict[str, int]) -> dict[str, Any]:
    """Parameter counts of the full model from the truncated one (missing layers equal the last one)."""
    from torch import nn

    blocks = model.get_submodule(spec.blocks[0].path.rpartition(".")[0])
    extra_blocks = full["tower"] - len(blocks)
    encoder = numel(spec.tower) + extra_blocks * numel(blocks[-1])
    last = spec.candidate_blocks[-1]
    per_block = sum(model.get_submodule(p).weight.numel() for p in [last.fc1, *last.attn.values()])
    used = spec.used_blocks + extra_blocks
    out = dict(encoder=encoder, projector=0, llm_quantizable=0, llm_other=0, text=0, llm_layers=0,
               used_blocks=used, candidate_numels=[per_block] * used,
               largest_tensor=max(p.numel() for p in model.parameters()), largest_llm_linear=0)
    if "text" in full:
        text_layers = layer_list(model.text_model)
        out["text"] = (numel(model) - numel(spec.tower)
                       + (full["text"] - len(text_layers)) * numel(text_layers[-1]))
        return out
    from lorsu_edge.consumer import projector

    layers = language_model(model).layers
    per_layer = numel(layers[-1])
    linears = [m.weight.numel() for m in layers[-1].modules() if isinstance(m, nn.Linear)]
    proj = numel(projector(model))
    llm_sim = numel(model) - numel(spec.tower) - proj
    out.update(projector=proj, llm_layers=full["llm"], llm_quantizable=sum(linears) * full["llm"],
               llm_other=llm_sim - per_layer * len(layers) + (per_layer - sum(linears)) * full["llm"],
               largest_llm_linear=max(linears))
    return out


def _ckpt_bytes(cfg: Any) -> int:
    dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32")
    return 2 if ("16" in dtype) else 4
