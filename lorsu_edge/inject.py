"""Injection in explicit steps: choose targets from scores, replace modules, then freeze everything else."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorsu_edge.config import MethodConfig
from lorsu_edge.families import EncoderSpec, find_projection
from lorsu_edge.layers import HeadLoRALinear, SparseDeltaLinear, _Mergeable
from lorsu_edge.select import budget_count, head_rows, head_scores, top_entries, top_heads


@dataclass
class Target:
    """One module to wrap: sparse fc1 entries (flat indices), LoRA rows (part-major) or the visual projection."""

    path: str
    kind: str  # "sparse", "lora" or "projection" (plain LoRA, every row; block -1)
    index: torch.Tensor
    block: int
    parts: int = 1
    heads: list[int] = field(default_factory=list)


def select_targets(spec: EncoderSpec, cfg: MethodConfig,
                   grads: dict[str, torch.Tensor] | None = None) -> list[Target]:
    """The method's targets for every used block; `grads` (path -> mean gradient) drives lorsu and spu."""
    if cfg.method == "full":
        return []
    if cfg.needs_importance and grads is None:
        raise ValueError(f"method {cfg.method!r} needs importance gradients")
    targets = []
    for block in spec.candidate_blocks:
        if cfg.uses_fc1:
            targets.append(Target(block.fc1, "sparse", top_entries(grads[block.fc1], cfg.sparsity), block.index))
        heads = _chosen_heads(spec, cfg, block, grads).tolist() if cfg.uses_lora else []
        if heads:  # --top-k-heads 0: no LoRA at all, not rank-r factors on zero rows that train for nothing
            targets.extend(lora_targets(spec, block, heads))
    return targets


def shape_targets(model: nn.Module, spec: EncoderSpec, cfg: MethodConfig) -> list[Target]:
    """Targets of exactly the sizes `cfg` selects, at placeholder positions: memory and FLOPs depend on how
    many entries and heads are chosen, not on which (the planner and benchmarks use this)."""
    if cfg.method == "full":
        return []
    heads = list(range(spec.num_heads if cfg.method == "lora" else min(cfg.top_k_heads, spec.num_heads)))
    targets = []
    for block in spec.candidate_blocks:
        if cfg.uses_fc1:
            numel = model.get_submodule(block.fc1).weight.numel()
            targets.append(Target(block.fc1, "sparse", torch.arange(budget_count(numel, cfg.sparsity)), block.index))
        if cfg.uses_lora and heads:
            targets.extend(lora_targets(spec, block, heads))
    return targets


def _chosen_heads(spec: EncoderSpec, cfg: MethodConfig, block, grads) -> torch.Tensor:
    if cfg.method == "lora":
        return torch.arange(spec.num_heads)
    per_proj = [grads[p] for p in block.attn.values()]
    if len(per_proj) == 1:  # fused qkv: score q, k and v parts as three projections
        per_proj = list(per_proj[0].chunk(3, dim=0))
    return top_heads(head_scores(per_proj, spec.num_heads), cfg.top_k_heads)


def lora_targets(spec: EncoderSpec, block, heads: list[int]) -> list[Target]:
    """LoRA targets on the rows of `heads`: one fused qkv target, or the same rows of q, k and v."""
    chosen = torch.tensor(heads, dtype=torch.long)
    if "qkv" in block.attn:
        rows = head_rows(chosen, spec.head_dim, parts=3, part_stride=spec.hidden_size)
        return [Target(block.attn["qkv"], "lora", rows, block.index, parts=3, heads=list(heads))]
    rows = head_rows(chosen, spec.head_dim)
    return [Target(path, "lora", rows, block.index, heads=list(heads)) for path in block.attn.values()]


def projection_target(model: nn.Module, spec: EncoderSpec) -> Target:
    """Plain LoRA on the dual encoder's visual projection (every row selected): the research code's visual.proj."""
    path = find_projection(model, spec)
    return Target(path, "projection", torch.arange(model.get_submodule(path).out_features), block=-1)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


def inject(model: nn.Module, targets: list[Target], cfg: MethodConfig) -> None:
    """Replace each target Linear by its structured-update wrapper (trainable tensors in fp32)."""
    for t in targets:
        base = model.get_submodule(t.path)
        if isinstance(base, _Mergeable):
            raise ValueError(f"{t.path} is already wrapped; merge and unload the previous session first")
        if t.kind == "sparse":
            wrapper = SparseDeltaLinear(base, t.index, train_bias=cfg.train_biases)
        elif t.kind == "projection":  # bias-free in every family; LoRA on the weight only, as the research code
            wrapper = HeadLoRALinear(base, t.index, cfg.projection_rank, cfg.alpha, train_bias=False)
        else:
            wrapper = HeadLoRALinear(base, t.index, cfg.rank, cfg.alpha, parts=t.parts,
                                     train_bias=cfg.train_qkv_biases)
        replace_module(model, t.path, wrapper)


def adapter_modules(model: nn.Module) -> dict[str, _Mergeable]:
    """Every structured-update wrapper in the model, by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _Mergeable)}


def freeze(model: nn.Module, spec: EncoderSpec, cfg: MethodConfig) -> dict[str, int]:
    """Make exactly the method's tensors trainable; return counts of trainable entries.

    Counts are of stored entries (selected fc1 deltas, LoRA factors, bias deltas), which for the
    structured layers are exactly the selected parameters, not the sizes of the tensors they touch.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {"fc1_entries": 0, "lora_params": 0, "bias_params": 0, "dense_params": 0}
    if cfg.method == "full":
        for p in spec.tower.parameters():
            p.requires_grad_(True)
            counts["dense_params"] += p.numel()
    for m in adapter_modules(model).values():
        for name, p in m.named_parameters(recurse=False):
            p.requires_grad_(True)
            key = {"delta": "fc1_entries", "bias_delta": "bias_params"}.get(name, "lora_params")
            counts[key] += p.numel()
    counts["trainable_params"] = sum(counts.values())
    counts["encoder_params"] = sum(p.numel() for n, p in model.named_parameters()
                                   if n.startswith(spec.encoder_prefixes) and ".lora_" not in n
                                   and not n.endswith(("delta", "bias_delta")))
    return counts
