"""The planner: predict each phase's peak memory from config.json alone, and choose settings that fit.

Nothing but `config.json` (and `preprocessor_config.json`, for the image size) is read: the model is
built inside `FakeTensorMode` (shapes and dtypes, no memory; the meta device cannot run LLaVA's
forward), the method's real update layers are injected with placeholder selections of the exact
size, and one forward + backward of the loss is run under `memory.LiveBytes`, which counts the bytes
of every tensor created and freed. That gives activations, transient gradients and autograd workspace
as the code allocates them (autocast's bf16 copies of fp32 weights included); weights, accumulators,
gradients, optimizer state and runtime are counted from parameter shapes and the profile.

To stay fast on a 7B LLM, the simulated model keeps SIM_BLOCKS encoder blocks, SIM_LLM_LAYERS decoder
layers and SIM_TEXT_LAYERS text layers; what each simulated layer keeps alive for backward is measured
and multiplied out (the layers of a stack are identical). Batch dependence is measured at micro-batches
1 and 2 and extrapolated linearly (tested).

Phases and what each holds at its peak (weights as load.py stores them: encoder, projector and a dual
encoder's text tower fp32; the LLM bf16 with its decoder linears in 8/4-bit when quantized):
    load        runtime + weights + one checkpoint tensor being read (+ one LLM linear before
                quantization; + the VLM's tower tensors for --loss clip --text-model)
    importance  + fp32 accumulators of the candidate weights (one block group at a time) +
                activations and transient weight gradients
    train       + adapter state (selected entries, LoRA factors, index buffers) + fp32 gradients
                (twice with accumulation) + 2 AdamW moments per trainable entry + activations
    merge       + adapter state + originals of touched entries + a host copy of the encoder for the
                session file (CUDA; the optimizer is assumed released)
    export      its own process, encoder only: runtime + encoder fp32 + ONNX proto + serialized bytes
`--loss clip` on a VLM never loads the LLM: its tower trains inside the `--text-model` dual encoder
(CLIP-L/14's text tower is assumed without one). On a discrete GPU (profile unified = false) the budget
is GPU memory; host-side parts are shown but not counted. Each phase adds a safety margin.

Settings are chosen from a ladder, least intrusive first, and the first rung where every phase fits
wins: smaller micro-batches (divisors of the batch size: micro-batch x accumulation == batch size), then
activation checkpointing (for --loss clip the other way round: a contrastive loss only sees the
negatives of its micro-batch), then 8-bit and 4-bit LLM weights (only with an LLM, only where the
profile says bitsandbytes works, only for --quantize auto). Importance runs in as few block groups as
fit (each group is one more pass over the importance samples). See `apply_checkpointing` for the
checkpointing the plan assumes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lorsu_edge.budget import budget_flag, format_size
from lorsu_edge.config import MethodConfig
from lorsu_edge.errors import BadInputError, OverBudgetError
from lorsu_edge.profiles import Profile

LOSSES = ("clip", "ppl")
QUANTIZE_CHOICES = ("auto", "none", "8bit", "4bit")
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
PHASES = ("load", "importance", "train", "merge", "export")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# bitsandbytes storage per weight: int8 (+ one fp32 scale per row, ignored); NF4 + one fp32 absmax per 64.
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}
LLM_BYTES = 2  # load.py keeps an unquantized LLM in bf16 whatever the compute dtype
# Safety margin per device, as a fraction of everything but the runtime: allocator fragmentation and memory
# that is not a tensor (oneDNN / cuBLAS workspaces, data loading). CPU: bench_memory measured peak RSS
# 0.1-0.2 GiB above the predicted bytes of a 1.3 GiB ViT-B/16 run, varying run to run (glibc keeps freed
# blocks; mapped checkpoint pages): 0.30. CUDA: the caching allocator's fragmentation, not measured here
# (no GPU): 0.15.
MARGIN_FRACTION = {"cpu": 0.30, "cuda": 0.15}
MARGIN_MIN = 64 * 2**20
TEXT_TOKENS = 74  # question + answer tokens next to the image tokens (LLaVA-1.5: 576 + 74 = 650)
CAPTION_TOKENS = 77  # CLIP's text context
SIM_BLOCKS = 3  # encoder blocks simulated (block 0 differs: its input needs no grad)
SIM_LLM_LAYERS = 2
SIM_TEXT_LAYERS = 1
# CLIP ViT-L/14's text tower (123.7M parameters): the text side assumed for --loss clip on a VLM
# when no --text-model is given.
ASSUMED_TEXT_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                           projection_dim=768)


@dataclass
class Component:
    """One line of a phase's breakdown."""

    name: str
    bytes: int
    detail: str = ""
    host: bool = False  # lives in host RAM even when training runs on a GPU


@dataclass
class Phase:
    name: str
    components: list[Component]
    peak: int = 0  # bytes that count against the budget, margin included
    part_of_adapt: bool = True  # export runs later in its own process: shown, not part of the verdict


@dataclass(frozen=True)
class Settings:
    """What the recipe must apply for the plan to hold."""

    micro_batch: int
    grad_accum: int
    checkpointing: bool
    quantize: str  # none | 8bit | 4bit (LLM only)
    importance_block_groups: int


@dataclass
class Plan:
    """The planner's answer: phases with per-component bytes, the chosen settings, and a verdict."""

    model: str
    role: str
    family: str
    loss: str
    method: dict[str, Any]
    dtype: str
    profile: str
    device: str
    unified: bool
    batch_size: int
    budget_bytes: int  # effective: min(--budget, profile total - reserve)
    requested_budget_bytes: int | None
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    quantize: str
    importance_block_groups: int
    phases: list[Phase]
    predicted_peak_bytes: int
    peak_phase: str
    fits: bool
    smallest_fitting_budget: int | None
    cheapest_change: str
    trainable_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def components(self) -> list[Component]:
        """The breakdown of the phase with the highest peak."""
        return next(p.components for p in self.phases if p.name == self.peak_phase)

    @property
    def settings(self) -> Settings:
        return Settings(self.micro_batch, self.grad_accum, self.checkpointing, self.quantize,
                        self.importance_block_groups)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Reading the model description (config.json only)
# ---------------------------------------------------------------------------------------------


def read_config(source: Any) -> tuple[Any, str, Path | None]:
    """(config, display name, folder) from a model folder, a config.json path or a config object.

    Only config.json is opened: never a weight file.
    """
    if hasattr(source, "to_dict") and hasattr(source, "model_type"):
        return source, str(getattr(source, "_name_or_path", "") or source.model_type), None
    path = Path(str(source)).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        folder, cfg_file = path.parent, path
    else:
        folder, cfg_file = path, path / "config.json"
    if not cfg_file.is_file():
        raise BadInputError(f"no config.json at {path}",
                            hint="--model takes a model folder (with config.json) or a path to a config.json")
    try:
        return _load_config(cfg_file), str(path), folder
    except (ValueError, KeyError, OSError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"cannot read {cfg_file}: {first}", hint="is this a transformers model config?") from None


def _load_config(cfg_file: Path) -> Any:
    """AutoConfig, with a fallback for sub-model types it does not register (e.g. blip_vision_model)."""
    import transformers as tf

    try:  # a folder when the file is config.json (5.x no longer takes a bare json path)
        return tf.AutoConfig.from_pretrained(str(cfg_file.parent if cfg_file.name == "config.json" else cfg_file))
    except ValueError:
        model_type = json.loads(cfg_file.read_text()).get("model_type", "")
        name = "".join(part.capitalize() for part in model_type.split("_")[:-1]) + "Config"
        if not model_type.endswith("_model") or not hasattr(tf, name):
            raise
        return getattr(tf, name).from_json_file(str(cfg_file))


def _image_size(vision_cfg: Any, folder: Path | None) -> int:
    """Pixels per side the processor produces (preprocessor_config.json), else the config's image_size."""
    pre = None if folder is None else folder / "preprocessor_config.json"
    if pre is not None and pre.is_file():
        try:
            data = json.loads(pre.read_text())
            size = data.get("crop_size") if data.get("do_center_crop", True) else None
            size = size or data.get("size")
            if isinstance(size, dict):
                size = size.get("height") or size.get("shortest_edge")
            if isinstance(size, int) and size > 0:
                return size
        except (OSError, ValueError):
            pass
    return int(getattr(vision_cfg, "image_size", 224))


def _text_config(text_model: Any) -> Any:
    """The text tower's config: from --text-model (its text_config if it is a dual model), else CLIP-L's."""
    from transformers import CLIPTextConfig

    if text_model is None:
        return CLIPTextConfig(**ASSUMED_TEXT_CONFIG)
    cfg, _, _ = read_config(text_model)
    return getattr(cfg, "text_config", None) or cfg


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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


def _build(cfg: Any):
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


def _find_spec(model: Any, cfg: Any):
    """find_encoder, with a VLM tower inside a dual encoder limited to the blocks the VLM reads
    (as load.load_vlm_tower_in_dual does)."""
    from lorsu_edge.families import find_encoder, used_blocks_for

    spec = find_encoder(model)
    if isinstance(cfg, _PairConfig) and cfg.feature_layer is not None:
        spec.used_blocks = used_blocks_for(len(spec.blocks), cfg.feature_layer)
    return spec


def _build_pair(cfg: _PairConfig):
    from torch import nn

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = cfg
            self.vision_model = _build(cfg.vision_config)
            self.text_model = _build(cfg.text_config)
            dim = int(getattr(cfg.text_config, "projection_dim", 0) or 512)
            self.visual_projection = nn.Linear(cfg.vision_config.hidden_size, dim, bias=False)
            self.text_projection = nn.Linear(cfg.text_config.hidden_size, dim, bias=False)

        def get_image_features(self, pixel_values):
            out = self.vision_model(pixel_values=pixel_values)
            pooled = getattr(out, "pooler_output", None)
            return self.visual_projection(pooled if pooled is not None else out.last_hidden_state[:, 0])

    return Pair()


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


def _tower_keep(cfg: Any, role: str) -> int:
    """Encoder blocks to simulate: SIM_BLOCKS, unless the consumer reads a fixed positive or multiple layer."""
    layer = getattr(cfg, "vision_feature_layer", -1) if role == "vlm" else -1
    return SIM_BLOCKS if isinstance(layer, int) and layer < 0 else 10**6


def _sim_config(cfg: Any, role: str, loss: str, text_cfg: Any) -> tuple[Any, dict[str, int]]:
    """The (truncated) config to simulate, and the full layer count of each stack."""
    cfg = copy.deepcopy(cfg)
    if role == "vlm" and loss == "ppl":
        full = {"tower": _cut(cfg.vision_config, _tower_keep(cfg, role)),
                "llm": _cut(cfg.text_config, SIM_LLM_LAYERS)}
        return cfg, full
    if role == "dual":
        full = {"tower": _cut(cfg.vision_config, SIM_BLOCKS), "text": _cut(cfg.text_config, SIM_TEXT_LAYERS)}
        _eager(cfg.text_config)
        return cfg, full
    vision = cfg.vision_config if role == "vlm" else cfg
    text = _eager(copy.deepcopy(text_cfg))
    full = {"tower": _cut(vision, _tower_keep(cfg, role)), "text": _cut(text, SIM_TEXT_LAYERS)}
    return _PairConfig(vision, text, getattr(cfg, "vision_feature_layer", None)), full


def _language_model(model: Any):
    for path in ("model.language_model", "language_model.model", "language_model"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise BadInputError(f"{type(model).__name__} has no language model", hint="--loss ppl needs a VLM")


def _layer_list(module: Any):
    """The largest ModuleList inside `module`: its stack of transformer layers."""
    from torch import nn

    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return max(lists, key=_numel)


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


def _numel(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(source: Any, loss: str, text_model: Any = None, text_tokens: int = TEXT_TOKENS,
             image_size: int | None = None) -> Arch:
    """Read config.json (never weights) and count what each component holds."""
    cfg, name, folder = read_config(source)
    with _quiet():
        return _describe(cfg, name, folder, loss, text_model, text_tokens, image_size)


def _describe(cfg, name, folder, loss, text_model, text_tokens, image_size) -> Arch:
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
    text_cfg = _text_config(text_model) if loss == "clip" and role != "dual" else None
    sim_cfg, full = _sim_config(cfg, role, loss, text_cfg)
    with FakeTensorMode():
        model = _build(sim_cfg)
        spec = _find_spec(model, sim_cfg)
        counts = _count(model, spec, full)
    vision_cfg = getattr(sim_cfg, "vision_config", sim_cfg)
    size = image_size or _image_size(vision_cfg, folder)
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


def _ckpt_bytes(cfg: Any) -> int:
    dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32")
    return 2 if ("16" in dtype) else 4


def _count(model, spec, full: dict[str, int]) -> dict[str, Any]:
    """Parameter counts of the full model from the truncated one (missing layers equal the last one)."""
    from torch import nn

    blocks = model.get_submodule(spec.blocks[0].path.rpartition(".")[0])
    extra_blocks = full["tower"] - len(blocks)
    encoder = _numel(spec.tower) + extra_blocks * _numel(blocks[-1])
    last = spec.candidate_blocks[-1]
    per_block = sum(model.get_submodule(p).weight.numel() for p in [last.fc1, *last.attn.values()])
    used = spec.used_blocks + extra_blocks
    out = dict(encoder=encoder, projector=0, llm_quantizable=0, llm_other=0, text=0, llm_layers=0,
               used_blocks=used, candidate_numels=[per_block] * used,
               largest_tensor=max(p.numel() for p in model.parameters()), largest_llm_linear=0)
    if "text" in full:
        text_layers = _layer_list(model.text_model)
        out["text"] = (_numel(model) - _numel(spec.tower)
                       + (full["text"] - len(text_layers)) * _numel(text_layers[-1]))
        return out
    from lorsu_edge.consumer import projector

    layers = _language_model(model).layers
    per_layer = _numel(layers[-1])
    linears = [m.weight.numel() for m in layers[-1].modules() if isinstance(m, nn.Linear)]
    proj = _numel(projector(model))
    llm_sim = _numel(model) - _numel(spec.tower) - proj
    out.update(projector=proj, llm_layers=full["llm"], llm_quantizable=sum(linears) * full["llm"],
               llm_other=llm_sim - per_layer * len(layers) + (per_layer - sum(linears)) * full["llm"],
               largest_llm_linear=max(linears))
    return out


# ---------------------------------------------------------------------------------------------
# Simulation on fake tensors
# ---------------------------------------------------------------------------------------------


def apply_checkpointing(model: Any, spec: Any) -> int:
    """Activation checkpointing as the plan assumes it: every encoder block and every LLM decoder layer
    keeps only its input and recomputes the rest in backward (non-reentrant `torch.utils.checkpoint`).

    Unlike transformers' `gradient_checkpointing_enable` it also works in eval mode, so the importance
    pass (`score.compute_importance` runs in eval mode) is checkpointed too; it does nothing when grad is
    off (evaluation, export). A VLM's LLM gets `use_cache = False` (a KV cache would grow again on every
    recompute; `generate` sets its own). Undo with `remove_checkpointing`. Returns the layers wrapped.
    """
    layers = list(model.get_submodule(spec.blocks[0].path.rpartition(".")[0])) if spec.blocks else []
    if spec.role == "vlm":
        lm = _language_model(model)
        layers += list(lm.layers)
        if getattr(lm.config, "use_cache", False):
            lm.config.use_cache = False
            lm._lorsu_use_cache = True
    for layer in layers:
        if "forward" not in vars(layer):
            layer.forward = _checkpointed(layer.forward)
    return len(layers)


def remove_checkpointing(model: Any) -> None:
    """Undo `apply_checkpointing`."""
    for m in model.modules():
        if getattr(vars(m).get("forward"), "_lorsu_checkpointed", False):
            del m.forward
        if vars(m).pop("_lorsu_use_cache", False):
            m.config.use_cache = True


def _checkpointed(forward):
    import torch
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run._lorsu_checkpointed = True
    return run


def _clip_loss(model, batch):
    import torch
    import torch.nn.functional as F

    from lorsu_edge.consumer import embedding

    img = embedding(model.get_image_features(pixel_values=batch["pixel_values"]))  # a tensor, or 5.x's output
    with torch.no_grad():  # the text tower is frozen
        ids = batch["input_ids"]
        out = model.text_model(input_ids=ids, attention_mask=torch.ones_like(ids))  # no pad scan
        txt = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
        head = getattr(model, "text_projection", None)
        txt = txt if head is None else head(txt)
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() * 100.0
    target = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.t().float(), target)) / 2


def _ppl_loss(model, batch):
    """Next-token loss with logits over the text positions, upcast to fp32.

    The objective (`losses.answer_token_loss`) projects only the answer positions onto the vocabulary;
    every text position is their upper bound (the prompt's text is short beside the image tokens).
    """
    import torch
    import torch.nn.functional as F

    from lorsu_edge.consumer import projector, vlm_features

    feats = projector(model)(vlm_features(model, batch["spec"], batch["pixel_values"]))
    emb = model.get_input_embeddings()(batch["input_ids"])
    x = torch.cat([emb[:, :1], feats.to(emb.dtype), emb[:, 1:]], dim=1)
    hidden = _language_model(model)(inputs_embeds=x, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, 1 + feats.shape[1]:]).float()
    labels = torch.zeros(logits.shape[:2], dtype=torch.long)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _inputs(arch: Arch, spec, micro_batch: int, vocab: int) -> dict[str, Any]:
    import torch

    s = arch.image_size
    return dict(pixel_values=torch.randn(micro_batch, 3, s, s),
                input_ids=torch.randint(0, max(2, vocab), (micro_batch, arch.text_tokens)), spec=spec)


def _vocab(cfg: Any) -> int:
    text = getattr(cfg, "text_config", None) or cfg
    return int(getattr(text, "vocab_size", 2) or 2)


def _simulate(arch: Arch, kind: str, method: MethodConfig, dtype: str, micro_batch: int,
              checkpointing: bool) -> int:
    """Peak bytes of everything one micro-batch's forward + backward creates (`kind`: train|importance)."""
    key = (arch.key, kind, json.dumps(method.to_dict(), sort_keys=True), dtype, micro_batch, checkpointing)
    if key not in _SIM_CACHE:
        with _quiet():
            _SIM_CACHE[key] = _run_simulation(arch, kind, method, dtype, micro_batch, checkpointing)
    return _SIM_CACHE[key]


_SIM_CACHE: dict[tuple, int] = {}


def _run_simulation(arch, kind, method, dtype, micro_batch, checkpointing) -> int:
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorsu_edge.memory import LiveBytes

    with FakeTensorMode(), torch.enable_grad():
        model = _build(arch.sim_cfg)
        spec = _find_spec(model, arch.sim_cfg)
        keep = _prepare(model, spec, kind, method)
        if arch.llm_layers:  # load.py: the LLM in bf16 (or 4/8-bit, simulated as bf16), the rest fp32
            for p in [*_language_model(model).parameters(), model.get_output_embeddings().weight]:
                p.data = p.data.to(torch.bfloat16)
        if checkpointing:
            apply_checkpointing(model, spec)
        model.train(kind == "train")  # compute_importance scores in eval mode; train() trains in train mode
        tracker = LiveBytes()
        tracker.ignore([*model.parameters(), *model.buffers(), *keep])
        forward_done: list[bool] = []
        stacks = {"tower": model.get_submodule(spec.blocks[0].path.rpartition(".")[0])}
        if arch.llm_layers:
            stacks["llm"] = _language_model(model).layers
        kept = {name: _watch(layers, tracker, forward_done) for name, layers in stacks.items()}
        loss_fn = _ppl_loss if arch.loss == "ppl" else _clip_loss
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype != "fp32" else contextlib.nullcontext()
        with tracker:
            batch = _inputs(arch, spec, micro_batch, _vocab(arch.sim_cfg))
            with autocast:
                loss = loss_fn(model, batch)
            forward_done.append(True)
            loss.backward()
            del loss, batch
        return int(tracker.peak + _missing_layers(arch, stacks, kept))


def _prepare(model, spec, kind: str, method: MethodConfig) -> list:
    """Make the tensors trainable that the phase differentiates; returns tensors that pre-exist the step.

    Gradients of trainable parameters are dropped as soon as they are accumulated: the planner counts
    them itself (they live across micro-batches), so the simulation measures activations only.
    """
    import torch

    from lorsu_edge.inject import freeze, inject, shape_targets
    from lorsu_edge.score import candidate_paths

    if kind == "train":
        inject(model, shape_targets(model, spec, method), method)
        freeze(model, spec, method)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_drop_grad)
        return []
    for p in model.parameters():
        p.requires_grad_(False)
    accumulators = []
    for path in candidate_paths(spec, fc1=method.uses_fc1, attn=method.method == "lorsu"):
        w = model.get_submodule(path).weight
        w.requires_grad_(True)
        acc = torch.zeros_like(w, dtype=torch.float32)
        w.register_post_accumulate_grad_hook(functools.partial(_fold, acc))  # as score.compute_importance
        accumulators.append(acc)
    return accumulators


def _drop_grad(param) -> None:
    param.grad = None


def _fold(acc, param) -> None:
    acc.add_(param.grad.float())
    param.grad = None


def _watch(layers, tracker, forward_done: list) -> list[int]:
    """Bytes each layer leaves alive after its forward: what it keeps for backward (forward pass only)."""
    deltas: list[int] = []
    for layer in layers:
        start: list[int] = []

        def pre(_m, _a, start=start):
            if not forward_done:
                start.append(tracker.live)

        def post(_m, _a, _o, start=start):
            if not forward_done and start:
                deltas.append(tracker.live - start.pop())

        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)
    return deltas


def _missing_layers(arch: Arch, stacks: dict, kept: dict[str, list[int]]) -> int:
    """Memory the layers left out of the simulation would have kept alive (block 0 is not typical)."""
    extra = 0
    for name, layers in stacks.items():
        missing = arch.full_layers[name] - len(layers)
        typical = kept[name][1:] or kept[name]
        if missing > 0 and typical:
            extra += missing * max(0, max(typical))
    return extra


def activation_bytes(arch: Arch, kind: str, method: MethodConfig, dtype: str, micro_batch: int,
                     checkpointing: bool) -> int:
    """Simulated peak for any micro-batch, from simulations at 1 and 2 (activations are affine in it)."""
    one = _simulate(arch, kind, method, dtype, 1, checkpointing)
    if micro_batch == 1:
        return one
    two = _simulate(arch, kind, method, dtype, 2, checkpointing)
    return int(one + (two - one) * (micro_batch - 1))


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


@dataclass
class _Context:
    arch: Arch
    method: MethodConfig
    dtype: str
    profile: Profile
    batch_size: int
    budget: int


@dataclass(frozen=True)
class AdapterSize:
    """The method's update layers for the whole encoder, from shapes (elements unless named bytes)."""

    trainable: int  # fp32 entries the optimizer sees (selected fc1 entries, LoRA factors, bias deltas)
    index_bytes: int  # int64 index buffers (selected entries, LoRA rows)
    touched: int  # base-weight entries a merge overwrites (their originals are kept for unmerge)
    largest_touched: int  # the most touched entries of one layer (its int64 index list is built on merge)


def adapter_size(arch: Arch, method: MethodConfig) -> AdapterSize:
    """What the method's update layers hold once injected (cached per model and method)."""
    key = ("adapter", arch.key, json.dumps(method.to_dict(), sort_keys=True))
    if key not in _SIM_CACHE:
        with _quiet():
            _SIM_CACHE[key] = _count_adapter(arch, method)
    return _SIM_CACHE[key]


def _count_adapter(arch: Arch, method: MethodConfig) -> AdapterSize:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorsu_edge.inject import adapter_modules, freeze, inject, shape_targets

    if method.method == "full":  # dense: no wrappers, the optimizer sees the whole encoder
        return AdapterSize(arch.encoder, 0, 0, 0)
    with FakeTensorMode():
        model = _build(arch.sim_cfg)
        spec = _find_spec(model, arch.sim_cfg)
        inject(model, shape_targets(model, spec, method), method)
        freeze(model, spec, method)
        per_block: dict[int, list[int]] = {}
        largest = 0
        for path, m in adapter_modules(model).items():
            block = next(b.index for b in spec.blocks if path.startswith(b.path + "."))
            touched = m._touched().numel()
            sums = per_block.setdefault(block, [0, 0, 0])
            sums[0] += sum(p.numel() for p in m.parameters(recurse=False))
            sums[1] += sum(b.numel() * b.element_size() for n, b in m.named_buffers() if not n.startswith("base."))
            sums[2] += touched
            largest = max(largest, touched)
    if not per_block:
        return AdapterSize(0, 0, 0, 0)
    extra = arch.used_blocks - spec.used_blocks  # blocks left out of the simulated tower
    last = per_block[max(per_block)]
    totals = [sum(v[i] for v in per_block.values()) + extra * last[i] for i in range(3)]
    return AdapterSize(*totals, largest)


def _weights(ctx: _Context, quantize: str) -> list[Component]:
    """Weights as load.py stores them: encoder, projector and dual-encoder text tower fp32, LLM bf16 with
    its decoder linears optionally in 8/4-bit (embeddings, norms and lm_head stay bf16)."""
    a = ctx.arch
    parts = [Component("encoder weights", a.encoder * 4, f"{a.encoder / 1e6:.1f}M params, fp32 (trained)")]
    if a.projector:
        parts.append(Component("projector weights", a.projector * 4, f"{a.projector / 1e6:.1f}M, fp32"))
    if a.llm_layers:
        q = QUANT_BYTES.get(quantize, LLM_BYTES)
        parts.append(Component("LLM weights", int(a.llm_quantizable * q + a.llm_other * LLM_BYTES),
                               f"{(a.llm_quantizable + a.llm_other) / 1e9:.2f}B params, "
                               f"{quantize if quantize != 'none' else 'bf16'} decoder linears"))
    if a.text:
        parts.append(Component("text tower weights", a.text * 4, f"{a.text / 1e6:.1f}M, fp32, frozen"))
    return parts


def _runtime(ctx: _Context) -> Component:
    what = "python + torch + CUDA context" if ctx.profile.device == "cuda" else "python + torch + transformers"
    return Component("runtime", ctx.profile.runtime_overhead, what)


def _finish(ctx: _Context, name: str, comps: list[Component], count_all: bool = False) -> Phase:
    counted = sum(c.bytes for c in comps if count_all or _counts(ctx, c))
    runtime = sum(c.bytes for c in comps if c.name == "runtime")
    fraction = MARGIN_FRACTION[ctx.profile.device]
    margin = max(MARGIN_MIN, int(fraction * (counted - runtime)))
    comps.append(Component("safety margin", margin, f"{fraction:.0%}, at least {format_size(MARGIN_MIN, 0)}"))
    return Phase(name, comps, counted + margin)


def _counts(ctx: _Context, c: Component) -> bool:
    return ctx.profile.unified or ctx.profile.device == "cpu" or not c.host


def _load_phase(ctx: _Context, s: Settings) -> Phase:
    a = ctx.arch
    comps = [_runtime(ctx), *_weights(ctx, s.quantize),
             Component("checkpoint staging", a.largest_tensor * a.ckpt_bytes,
                       "largest tensor read from disk while converting", host=True)]
    if a.llm_layers and s.quantize != "none":
        comps.append(Component("quantization staging", a.largest_llm_linear * LLM_BYTES,
                               "one LLM linear before bitsandbytes packs it"))
    if a.role == "vlm" and a.loss == "clip":
        comps.append(Component("VLM tower tensors", a.encoder * a.ckpt_bytes,
                               "read from the VLM's files, then copied into the dual encoder", host=True))
    return _finish(ctx, "load", comps)


def block_groups(n_blocks: int, groups: int) -> list[list[int]]:
    """Candidate block indices split into at most `groups` contiguous groups of equal size (the last may be
    shorter): score importance one group at a time, e.g. with `candidate_paths(spec, block_ids=group)`."""
    size = math.ceil(n_blocks / max(1, groups))
    return [list(range(i, min(i + size, n_blocks))) for i in range(0, n_blocks, size)]


def _group_bytes(arch: Arch, groups: int) -> int:
    """fp32 accumulator bytes of the largest group (what one importance pass holds)."""
    return 4 * max(sum(arch.candidate_numels[i] for i in g) for g in block_groups(len(arch.candidate_numels), groups))


def _importance_phase(ctx: _Context, s: Settings) -> Phase | None:
    if not ctx.method.needs_importance:
        return None
    a = ctx.arch
    acts = activation_bytes(a, "importance", ctx.method, ctx.dtype, s.micro_batch, s.checkpointing)
    if a.llm_layers and s.quantize != "none":
        acts += a.largest_llm_linear * LLM_BYTES  # dequantized weight in backward
    per_group = math.ceil(len(a.candidate_numels) / s.importance_block_groups)
    groups = f"{s.importance_block_groups} group(s) of {per_group} blocks"
    comps = [_runtime(ctx), *_weights(ctx, s.quantize),
             Component("importance accumulators", _group_bytes(a, s.importance_block_groups), f"fp32, {groups}"),
             Component("activations + gradients", acts, f"micro-batch {s.micro_batch}"
                       f"{', checkpointed' if s.checkpointing else ''}")]
    return _finish(ctx, "importance", comps)


def _train_phase(ctx: _Context, s: Settings) -> Phase:
    a = ctx.arch
    size = adapter_size(a, ctx.method)
    grads = size.trainable * 4 * (2 if s.grad_accum > 1 else 1)  # accumulated grads live across micro-batches
    acts = activation_bytes(a, "train", ctx.method, ctx.dtype, s.micro_batch, s.checkpointing)
    if a.llm_layers and s.quantize != "none":
        acts += a.largest_llm_linear * LLM_BYTES
    accumulated = ", accumulated" if s.grad_accum > 1 else ""
    comps = [_runtime(ctx), *_weights(ctx, s.quantize),
             Component("adapter state", size.trainable * 4 + size.index_bytes,
                       f"{size.trainable / 1e6:.2f}M trainable fp32 + selection indices"),
             Component("gradients", grads, f"fp32, trainable entries only{accumulated}"),
             Component("optimizer state", size.trainable * 8, "AdamW: 2 fp32 moments per trainable entry"),
             # the optimizer step's temporaries (about one gradient's size) replace the activations
             Component("activations + workspace", max(acts, size.trainable * 4),
                       f"micro-batch {s.micro_batch} x {s.grad_accum}{', checkpointed' if s.checkpointing else ''}")]
    return _finish(ctx, "train", comps)


def _merge_phase(ctx: _Context, s: Settings) -> Phase:
    a = ctx.arch
    size = adapter_size(a, ctx.method)
    comps = [_runtime(ctx), *_weights(ctx, s.quantize),
             Component("adapter state", size.trainable * 4 + size.index_bytes, "until every wrapper is merged"),
             Component("merge originals", size.touched * 4 + size.largest_touched * 8,
                       "fp32 originals of every touched entry (kept for unmerge) + one layer's index list")]
    if ctx.profile.device == "cuda":
        comps.append(Component("session write", a.encoder * 4, "host copy of the merged encoder", host=True))
    return _finish(ctx, "merge", comps)


def _export_phase(ctx: _Context) -> Phase:
    a = ctx.arch
    enc = a.encoder * 4
    comps = [Component("runtime", ctx.profile.runtime_overhead, "separate process, encoder only", host=True),
             Component("encoder weights", enc, "fp32", host=True),
             Component("ONNX proto + serialized bytes", 2 * enc, "torch.onnx.export holds both before writing",
                       host=True),
             Component("parity forward", 3 * a.vision_tokens * a.vision_width * 4 * 2,
                       "batch 3, no grad: one block's input and output (estimate)", host=True)]
    phase = _finish(ctx, "export", comps, count_all=True)  # informational: host RAM included
    phase.part_of_adapt = False
    return phase


def _phases(ctx: _Context, s: Settings) -> list[Phase]:
    phases = [_load_phase(ctx, s), _importance_phase(ctx, s), _train_phase(ctx, s), _merge_phase(ctx, s),
              _export_phase(ctx)]
    return [p for p in phases if p is not None]


# ---------------------------------------------------------------------------------------------
# Choosing settings
# ---------------------------------------------------------------------------------------------


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def resolve_quantize(quantize: str, role: str, loss: str, bitsandbytes_works: bool) -> str:
    """What `adapt` and `plan` load the LLM as: `auto` is 4-bit NF4 where bitsandbytes works, else none.

    Only a VLM under --loss ppl loads its LLM. Where bitsandbytes does not work, an explicit 8bit/4bit
    also becomes none: `adapt` falls back to an unquantized LLM at load time, so the plan must budget for it.
    """
    if role != "vlm" or loss != "ppl" or quantize == "none":
        return quantize
    if not bitsandbytes_works:
        return "none"
    return "4bit" if quantize == "auto" else quantize


def _quant_options(ctx: _Context, quantize: str) -> list[str]:
    if not ctx.arch.llm_layers:
        return ["none"]
    if quantize != "auto":
        return [quantize]
    return ["none", "8bit", "4bit"] if ctx.profile.bnb_4bit else ["none"]


def ladder(batch_size: int, quant_options: list[str], loss: str = "ppl") -> list[tuple[str, bool, int]]:
    """(quantize, checkpointing, micro_batch), least intrusive first.

    Per-sample losses (ppl) accumulate exactly, so smaller micro-batches come first and checkpointing
    (a third more compute) after. A contrastive loss (clip) sees only its micro-batch's negatives, so
    splitting the batch changes the objective: checkpointing comes first there.
    """
    sizes = _divisors_desc(batch_size)
    if loss == "clip":
        rungs = [(ckpt, mb) for mb in sizes for ckpt in (False, True)]
    else:
        rungs = [(ckpt, mb) for ckpt in (False, True) for mb in sizes]
    return [(q, ckpt, mb) for q in quant_options for ckpt, mb in rungs]


def _evaluate(ctx: _Context, q: str, ckpt: bool, mb: int) -> tuple[Settings, list[Phase]]:
    """Phases for one rung, with the fewest importance block groups that fit (the most if none does)."""
    n = max(1, len(ctx.arch.candidate_numels))
    options = sorted({math.ceil(n / math.ceil(n / g)) for g in range(1, n + 1)})
    for groups in options:
        s = Settings(mb, ctx.batch_size // mb, ckpt, q, groups)
        phases = _phases(ctx, s)
        imp = next((p for p in phases if p.name == "importance"), None)
        if imp is None or imp.peak <= ctx.budget or groups == options[-1]:
            return s, phases
    raise AssertionError("unreachable")


def _peak(phases: list[Phase]) -> Phase:
    """The adapt phase with the highest peak (export is planned separately)."""
    return max((p for p in phases if p.part_of_adapt), key=lambda p: p.peak)


def _search(ctx: _Context, quantize: str) -> tuple[Settings, list[Phase], int]:
    """First rung whose every phase fits; else the rung with the lowest peak. Also the lowest peak."""
    best: tuple[Settings, list[Phase]] | None = None
    for q, ckpt, mb in ladder(ctx.batch_size, _quant_options(ctx, quantize), ctx.arch.loss):
        s, phases = _evaluate(ctx, q, ckpt, mb)
        if _peak(phases).peak <= ctx.budget:
            return s, phases, _smallest(ctx, quantize)
        if best is None or _peak(phases).peak <= _peak(best[1]).peak:  # ties: the more frugal rung
            best = (s, phases)
    return best[0], best[1], _peak(best[1]).peak


def _smallest(ctx: _Context, quantize: str) -> int:
    """Lowest peak over the whole ladder (with as many importance groups as blocks)."""
    tight = replace(ctx, budget=0)
    return min(_peak(_evaluate(tight, q, ckpt, mb)[1]).peak
               for q, ckpt, mb in ladder(ctx.batch_size, _quant_options(ctx, quantize), ctx.arch.loss) if mb == 1)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def resolve_profile(profile: Profile | str | Path | None) -> Profile:
    """A Profile from a name, a .toml path, or None / "auto" (this machine: `cpu`, or the GPU found)."""
    from lorsu_edge.profiles import resolve

    return resolve(profile)


def resolve_dtype(dtype: str, profile: Profile) -> str:
    if dtype not in DTYPE_CHOICES:
        raise BadInputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}", hint="use --dtype auto")
    if dtype == "auto":
        return profile.default_dtype
    if dtype not in profile.compute_dtypes:
        raise BadInputError(f"--dtype {dtype} is not supported on {profile.title}",
                            hint=f"use one of {', '.join(profile.compute_dtypes)} (or --dtype auto)")
    return dtype


def make_plan(model_dir_or_config: Any, *, method_cfg: MethodConfig | None = None, loss: str = "clip",
              batch_size: int = 16, budget_bytes: int | None = None, profile: Profile | str | Path | None = None,
              dtype: str = "auto", quantize: str = "auto", text_model: Any = None,
              text_tokens: int = TEXT_TOKENS, image_size: int | None = None) -> Plan:
    """Predict every phase's peak and choose micro-batch, accumulation, checkpointing, quantization and
    importance block groups so that all fit in min(budget_bytes, profile total - reserve).

    Reads config.json only: call it before loading any weight. Never raises for a budget that is too
    small: the Plan says `fits=False`; `check_fits(plan)` turns that into OverBudgetError.
    """
    method_cfg = method_cfg or MethodConfig()
    if loss not in LOSSES:
        raise BadInputError(f"--loss {loss!r} is not one of {', '.join(LOSSES)}", hint="use --loss clip or --loss ppl")
    if quantize not in QUANTIZE_CHOICES:
        raise BadInputError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}",
                            hint="use --quantize auto")
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {batch_size}", hint="e.g. --batch-size 16")
    prof = resolve_profile(profile)
    dt = resolve_dtype(dtype, prof)
    arch = describe(model_dir_or_config, loss, text_model, text_tokens, image_size)
    return _plan_for(arch, method_cfg, loss, batch_size, budget_bytes, prof, dt, quantize)


def _plan_for(arch: Arch, method_cfg, loss, batch_size, budget_bytes, prof, dt, quantize) -> Plan:
    budget = prof.available if budget_bytes is None else min(budget_bytes, prof.available)
    ctx = _Context(arch, method_cfg, dt, prof, batch_size, budget)
    s, phases, smallest = _search(ctx, quantize)
    peak = _peak(phases)
    fits = peak.peak <= budget
    trainable = adapter_size(arch, method_cfg).trainable
    plan = Plan(model=arch.name, role=arch.role, family=arch.family, loss=loss, method=method_cfg.to_dict(),
                dtype=dt, profile=prof.name, device=prof.device, unified=prof.unified, batch_size=batch_size,
                budget_bytes=budget, requested_budget_bytes=budget_bytes, micro_batch=s.micro_batch,
                grad_accum=s.grad_accum, checkpointing=s.checkpointing,
                quantize=s.quantize if arch.llm_layers else "none",
                importance_block_groups=s.importance_block_groups, phases=phases,
                predicted_peak_bytes=peak.peak, peak_phase=peak.name, fits=fits,
                smallest_fitting_budget=smallest if smallest <= prof.available else None,
                cheapest_change="", trainable_params=trainable,
                notes=arch.notes + _notes(arch, prof, dt, quantize, budget_bytes, budget, phases))
    if not fits:
        plan.cheapest_change = _cheapest_change(arch, method_cfg, loss, batch_size, prof, dt, quantize, budget,
                                                smallest)
    return plan


def _notes(arch: Arch, prof: Profile, dt: str, quantize: str, budget_bytes: int | None, budget: int,
           phases: list[Phase]) -> list[str]:
    notes = []
    if budget_bytes is not None and budget_bytes > prof.available:
        notes.append(f"--budget {format_size(budget_bytes)} capped at {format_size(prof.available)} "
                     f"({prof.title}: total minus reserve)")
    if quantize != "auto" and not arch.llm_layers:
        notes.append(f"--quantize {quantize} ignored: no LLM is loaded")
    if quantize in ("8bit", "4bit") and arch.llm_layers and not prof.bnb_4bit:
        notes.append(f"profile {prof.name} expects bitsandbytes to fail here; "
                     "an unquantized LLM would not fit this plan")
    if prof.device == "cpu" and dt == "fp16":
        notes.append("fp16 on a CPU is very slow in backward; prefer bf16")
    export = next(p for p in phases if p.name == "export")
    if export.peak > budget:
        notes.append(f"export (its own process, later) needs {format_size(export.peak, 1)}, more than the budget: "
                     "export on a machine with more memory free")
    return notes


def _alternatives(arch: Arch, method_cfg: MethodConfig, loss: str, prof: Profile, dt: str, quantize: str):
    """(flag, why, kwargs for make_plan) in order of how little each changes the run."""
    if dt == "fp32" and len(prof.compute_dtypes) > 1:
        low = next(d for d in prof.compute_dtypes if d != "fp32")
        yield f"--dtype {low}", "frozen weights and activations in 16-bit", dict(dtype=low)
    if arch.llm_layers and quantize in ("none", "8bit"):
        yield "--quantize 4bit", "LLM decoder weights in NF4", dict(quantize="4bit")
    if arch.llm_layers and quantize == "auto" and not prof.bnb_4bit:
        yield ("--quantize 4bit", "needs a bitsandbytes build that works here (profile bnb_4bit = false)",
               dict(quantize="4bit"))
    if method_cfg.method == "full":
        yield "--method lorsu", "updates a few percent of the encoder", dict(method_cfg=MethodConfig())
    if loss == "ppl":
        yield "--loss clip --text-model DIR", "the LLM is not loaded", dict(loss="clip")


def _cheapest_change(arch, method_cfg, loss, batch_size, prof, dt, quantize, budget, smallest) -> str:
    options = []
    for flag, why, change in _alternatives(arch, method_cfg, loss, prof, dt, quantize):
        a = arch
        if "loss" in change:
            with _quiet():
                a = _describe(arch.config, arch.name, arch.folder, change["loss"], arch.text_model,
                              TEXT_TOKENS, arch.image_size)
        m = change.get("method_cfg", method_cfg)
        ctx = _Context(a, m, change.get("dtype", dt), prof, batch_size, budget)
        need = _smallest(ctx, change.get("quantize", quantize))
        options.append((need <= budget, need, f"{flag} ({why}): {format_size(need, 1)}"))
    if not options:
        return "none: only more memory helps" if smallest > prof.available else f"--budget {budget_flag(smallest)}"
    fitting = [o for o in options if o[0]]
    return (fitting[0] if fitting else min(options, key=lambda o: o[1]))[2]


def check_fits(plan: Plan) -> None:
    """Raise OverBudgetError (exit 4) naming the smallest budget that fits and the cheapest change."""
    if plan.fits:
        return
    smallest = ("no setting fits this device" if plan.smallest_fitting_budget is None
                else f"the smallest budget that fits is --budget {budget_flag(plan.smallest_fitting_budget)}")
    change = "" if plan.cheapest_change.startswith("--budget") else f"; cheapest change: {plan.cheapest_change}"
    raise OverBudgetError(
        f"needs {format_size(plan.predicted_peak_bytes, 1)} in phase {plan.peak_phase} even at micro-batch "
        f"{plan.micro_batch}{' with checkpointing' if plan.checkpointing else ''}"
        f"{'' if plan.quantize == 'none' else ', LLM ' + plan.quantize}; the budget is "
        f"{format_size(plan.budget_bytes, 1)}",
        hint=smallest + change,
    )


def format_plan(plan: Plan) -> str:
    """The per-phase, per-component table and the chosen settings, as the CLI prints them."""
    names = list(dict.fromkeys(c.name for p in plan.phases for c in p.components if c.name != "safety margin"))
    names.append("safety margin")
    width = max(len(n) for n in names) + 2
    titles = [p.name if p.part_of_adapt else f"({p.name})" for p in plan.phases]
    head = "component".ljust(width) + "".join(t.rjust(12) for t in titles)
    lines = [f"model {plan.model}: {plan.role}, {plan.family} encoder; loss {plan.loss}, method "
             f"{plan.method['method']}, dtype {plan.dtype}, profile {plan.profile}", "", head, "-" * len(head)]
    for n in names:
        cells = []
        for p in plan.phases:
            c = next((c for c in p.components if c.name == n), None)
            cells.append("-" if c is None else format_size(c.bytes) + ("*" if c.host and not plan.unified else ""))
        lines.append(n.ljust(width) + "".join(cell.rjust(12) for cell in cells))
    lines += ["-" * len(head), "peak".ljust(width) + "".join(format_size(p.peak).rjust(12) for p in plan.phases)]
    if not plan.unified:
        lines.append("* host RAM: not counted against GPU memory")
    lines.append("(export) runs later in its own process: shown, not part of the verdict")
    lines += ["", f"settings: micro-batch {plan.micro_batch} x {plan.grad_accum} accumulation = batch "
              f"{plan.batch_size}; checkpointing {'on' if plan.checkpointing else 'off'}; LLM quantization "
              f"{plan.quantize}; importance in {plan.importance_block_groups} block group(s)",
              f"predicted peak {format_size(plan.predicted_peak_bytes)} ({plan.peak_phase}) of budget "
              f"{format_size(plan.budget_bytes)}: {'fits' if plan.fits else 'does NOT fit'}"]
    if not plan.fits:
        smallest = plan.smallest_fitting_budget
        lines.append(f"smallest fitting budget: {'none on this device' if smallest is None else budget_flag(smallest)}"
                     f"; cheapest change: {plan.cheapest_change}")
    return "\n".join(lines + [f"note: {n}" for n in plan.notes])
