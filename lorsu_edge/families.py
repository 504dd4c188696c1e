"""Encoder families: where a model keeps its image tower, blocks, q/k/v (separate or fused) and fc1.

Paths are resolved by structure, trying each candidate in turn, because transformers 4.57 and 5.x lay
the same towers out differently (LLaVA's CLIP tower is `vision_model.encoder.layers` in 4.57 and
`encoder.layers` in 5.x; DINOv2's q/k/v are `query/key/value` in 4.57 and `q_proj/...` in 5.x).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorsu_edge.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """One row of the table: candidate dotted paths, tried in order."""

    name: str
    model_types: tuple[str, ...]
    blocks: tuple[str, ...]  # from the tower to the nn.ModuleList of transformer blocks
    fc1: tuple[str, ...]  # inside a block
    q: tuple[str, ...] = ()
    k: tuple[str, ...] = ()
    v: tuple[str, ...] = ()
    qkv: tuple[str, ...] = ()  # fused (3 * hidden) x hidden, rows laid out as (3, heads, head_dim)

    @property
    def fused(self) -> bool:
        return bool(self.qkv)


_CLIP_ATTN = dict(q=("self_attn.q_proj",), k=("self_attn.k_proj",), v=("self_attn.v_proj",))
_HF_VIT_ATTN = dict(
    q=("attention.attention.query", "attention.attention.q_proj", "attention.q_proj"),
    k=("attention.attention.key", "attention.attention.k_proj", "attention.k_proj"),
    v=("attention.attention.value", "attention.attention.v_proj", "attention.v_proj"),
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("clip", ("clip_vision_model", "clip"), ("vision_model.encoder.layers", "encoder.layers"),
               fc1=("mlp.fc1",), **_CLIP_ATTN),
        Family("siglip", ("siglip_vision_model", "siglip"), ("vision_model.encoder.layers", "encoder.layers"),
               fc1=("mlp.fc1",), **_CLIP_ATTN),
        Family("dinov2", ("dinov2",), ("encoder.layer",), fc1=("mlp.fc1",), **_HF_VIT_ATTN),
        # 4.57: encoder.layer.N.intermediate.dense; 5.x: layers.N.mlp.fc1
        Family("vit", ("vit",), ("encoder.layer", "layers"), fc1=("intermediate.dense", "mlp.fc1"), **_HF_VIT_ATTN),
        # BLIP's vision attention is one fused `qkv` Linear, reshaped to (3, heads, head_dim).
        Family("blip", ("blip_vision_model", "blip"), ("encoder.layers", "vision_model.encoder.layers"),
               fc1=("mlp.fc1",), qkv=("self_attn.qkv",)),
    )
}


@dataclass
class BlockTargets:
    """The adaptable linears of one transformer block, as paths relative to the top model."""

    index: int
    path: str
    fc1: str
    attn: dict[str, str]  # {"q","k","v"} -> path, or {"qkv"} -> path when fused


@dataclass
class EncoderSpec:
    """Everything the LoRSU core needs to know about a model's image encoder."""

    family: Family
    role: str  # "vlm", "dual" or "encoder"
    tower: nn.Module
    tower_path: str  # dotted path of the tower in the top model; "" when the model is the tower
    blocks: list[BlockTargets]
    num_heads: int
    hidden_size: int
    used_blocks: int  # blocks [0, used_blocks) influence the consumer's input; the rest get no gradient
    feature_layer: int | list[int] | None = None
    notes: list[str] = field(default_factory=list)
    projection: str | None = None
    """Path of the dual encoder's visual projection once this model's lineage adapted it (adapt
    --projection-rank, or a session file or adapter that holds it): from then on the projection is part of
    "the encoder" (session files, hashes). None: the tower alone, as every session without the option."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def candidate_blocks(self) -> list[BlockTargets]:
        return self.blocks[: self.used_blocks]

    @property
    def param_prefix(self) -> str:
        """The tower's parameters (what structured updates and `full` change)."""
        return f"{self.tower_path}." if self.tower_path else ""

    @property
    def encoder_prefixes(self) -> tuple[str, ...]:
        """Names that make up "the encoder" a session stores and hashes: the tower, plus the adapted projection."""
        return (self.param_prefix, *((f"{self.projection}.",) if self.projection else ()))


# The Linear from the pooled image tower output to the joint embedding (CLIP, BLIP, VisionTextDualEncoder).
# SigLIP has none outside its tower (its head is inside the vision model).
PROJECTIONS = ("visual_projection",)


def find_projection(model: nn.Module, spec: EncoderSpec) -> str:
    """Path of a dual encoder's visual projection; UnsupportedModelError when there is no plain Linear one."""
    path = _resolve(model, PROJECTIONS) if spec.role == "dual" else None
    if path is None or not isinstance(model.get_submodule(path), nn.Linear):
        raise UnsupportedModelError(f"{type(model).__name__} has no visual projection Linear "
                                    f"(looked for {', '.join(PROJECTIONS)})",
                                    hint="drop --projection-rank: this dual encoder's image embedding is the tower's own output")
    return path


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _resolve(root: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for path in candidates:
        try:
            root.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def locate_tower(model: nn.Module) -> tuple[nn.Module, str, str]:
    """Return (tower, dotted path, role) for a VLM, a dual encoder or a bare vision encoder."""
    for path in ("model.vision_tower", "vision_tower"):  # LLaVA-style VLMs (4.57/5.x, older)
        if _resolve(model, (path,)):
            return model.get_submodule(path), path, "vlm"
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        return model.vision_model, "vision_model", "dual"
    return model, "", "encoder"


def _tower_config(model: nn.Module, tower: nn.Module, role: str):
    cfg = getattr(model, "config", None)
    if role != "encoder" and cfg is not None and getattr(cfg, "vision_config", None) is not None:
        return cfg.vision_config
    return getattr(tower, "config", cfg)


def used_blocks_for(n_blocks: int, feature_layer: int | list[int] | None) -> int:
    """hidden_states has n+1 entries (embeddings, then each block); layer L reads blocks < its index."""
    if feature_layer is None:
        return n_blocks
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    positions = [(n_blocks + 1 + layer) if layer < 0 else layer for layer in layers]
    if any(p < 1 or p > n_blocks for p in positions):
        raise UnsupportedModelError(
            f"vision_feature_layer {feature_layer} is out of range for {n_blocks} blocks",
            hint="fix vision_feature_layer in the model's config.json",
        )
    return max(positions)


def _match_family(tower_cfg, tower: nn.Module) -> Family:
    model_type = getattr(tower_cfg, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"unsupported image encoder: model_type={model_type!r} ({type(tower).__name__})",
        hint=f"supported families: {', '.join(FAMILIES)} (CLIP, SigLIP, DINOv2, ViT, BLIP vision towers)",
    )


def _block_targets(model: nn.Module, family: Family, blocks_path: str, n: int) -> list[BlockTargets]:
    targets = []
    for i in range(n):
        block_path = _join(blocks_path, str(i))
        block = model.get_submodule(block_path)
        names = {"qkv": family.qkv} if family.fused else {"q": family.q, "k": family.k, "v": family.v}
        attn, missing = {}, []
        for key, cands in {**names, "fc1": family.fc1}.items():
            found = _resolve(block, cands)
            if found is None:
                missing.append(f"{key} (tried {', '.join(cands)})")
                continue
            if not isinstance(block.get_submodule(found), nn.Linear):
                raise UnsupportedModelError(
                    f"{block_path}.{found} is {type(block.get_submodule(found)).__name__}, not a plain Linear",
                    hint="the image tower must not be quantized: load it in fp32/bf16 (--quantize applies to the LLM only)",
                )
            attn[key] = _join(block_path, found)
        if missing:
            raise UnsupportedModelError(
                f"{family.name} block {i} at {block_path} lacks {'; '.join(missing)}",
                hint="this layout is not in lorsu_edge/families.py; please report the model class and transformers version",
            )
        fc1 = attn.pop("fc1")
        targets.append(BlockTargets(index=i, path=block_path, fc1=fc1, attn=attn))
    return targets


def find_encoder(model: nn.Module, feature_layer: int | list[int] | None = None) -> EncoderSpec:
    """Resolve the image encoder of `model` against the family table.

    `feature_layer` overrides which hidden state the consumer reads (LLaVA's `vision_feature_layer`,
    read from the config for VLMs). Blocks after it get no gradient and are never candidates.
    """
    tower, tower_path, role = locate_tower(model)
    cfg = _tower_config(model, tower, role)
    family = _match_family(cfg, tower)
    blocks_rel = _resolve(tower, family.blocks)
    if blocks_rel is None:
        raise UnsupportedModelError(
            f"{family.name} tower {type(tower).__name__} has no blocks at {' or '.join(family.blocks)}",
            hint="check the transformers version (4.57 and 5.x are supported)",
        )
    blocks_path = _join(tower_path, blocks_rel)
    n_blocks = len(model.get_submodule(blocks_path))
    if feature_layer is None and role == "vlm":
        feature_layer = getattr(model.config, "vision_feature_layer", None)
    return EncoderSpec(
        family=family,
        role=role,
        tower=tower,
        tower_path=tower_path,
        blocks=_block_targets(model, family, blocks_path, n_blocks),
        num_heads=int(cfg.num_attention_heads),
        hidden_size=int(cfg.hidden_size),
        used_blocks=used_blocks_for(n_blocks, feature_layer),
        feature_layer=feature_layer,
    )
