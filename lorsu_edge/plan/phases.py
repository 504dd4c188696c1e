"""Per-phase memory: what each phase of a session holds at its peak, component by component, plus a margin.

Weights as load.py stores them: encoder, projector and a dual encoder's text tower fp32; the LLM bf16 with
its decoder linears in 8/4-bit when quantized. Weights, accumulators, gradients, optimizer state and runtime
are counted from parameter shapes and the profile; activations come from the simulation.
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorsu_edge.budget import format_size
from lorsu_edge.config import MethodConfig
from lorsu_edge.plan.adapter import adapter_size
from lorsu_edge.plan.arch import Arch
from lorsu_edge.plan.simulate import activation_bytes
from lorsu_edge.profiles import Profile

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
class Context:
    arch: Arch
    method: MethodConfig
    dtype: str
    profile: Profile
    batch_size: int
    budget: int
    anchors: int = 0  # anchor images distilled per night (adapt --anchor): one more image forward per step


def all_phases(ctx: Context, s: Settings) -> list[Phase]:
    phases = [_load_phase(ctx, s), _importance_phase(ctx, s), _train_phase(ctx, s), _merge_phase(ctx, s),
              _export_phase(ctx)]
    return [p for p in phases if p is not None]


def _load_phase(ctx: Context, s: Settings) -> Phase:
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


def _importance_phase(ctx: Context, s: Settings) -> Phase | None:
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


def block_groups(n_blocks: int, groups: int) -> list[list[int]]:
    """Candidate block indices split into at most `groups` contiguous groups of equal size (the last may be
    shorter): score importance one group at a time, e.g. with `candidate_paths(spec, block_ids=group)`."""
    size = math.ceil(n_blocks / max(1, groups))
    return [list(range(i, min(i + size, n_blocks))) for i in range(0, n_blocks, size)]


def _group_bytes(arch: Arch, groups: int) -> int:
    """fp32 accumulator bytes of the largest group (what one importance pass holds)."""
    return 4 * max(sum(arch.candidate_numels[i] for i in g) for g in block_groups(len(arch.candidate_numels), groups))


def _train_phase(ctx: Context, s: Settings) -> Phase:
    a = ctx.arch
    size = adapter_size(a, ctx.method)
    grads = size.trainable * 4 * (2 if s.grad_accum > 1 else 1)  # accumulated grads live across micro-batches
    # anchors: each micro-batch also runs as many anchor images through the tower, in the same graph;
    # counted as a micro-batch twice the size (an upper bound for a VLM, whose anchor pass skips the LLM)
    per_step = s.micro_batch * (2 if ctx.anchors else 1)
    acts = activation_bytes(a, "train", ctx.method, ctx.dtype, per_step, s.checkpointing)
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
                       f"micro-batch {s.micro_batch} x {s.grad_accum}{', checkpointed' if s.checkpointing else ''}"
                       f"{' + as many anchor images' if ctx.anchors else ''}"),
             *_continual(ctx, size.trainable, "train")]
    return _finish(ctx, "train", comps)


def _continual(ctx: Context, trainable: int, phase: str) -> list[Component]:
    """Anchor features (night-start model, fp32) and the forgetting-bounded merge's copies of the update:
    the trained values (to rescale from), and for `full` the tower as it was before training."""
    a, comps = ctx.arch, []
    if ctx.anchors:
        per_image = a.vision_width * (a.vision_tokens if a.role == "vlm" and a.loss == "ppl" else 1)
        comps.append(Component("anchor features", ctx.anchors * per_image * 4,
                               f"{ctx.anchors} anchors, fp32 (at most {per_image:,} values each)"))
    full = a.encoder * 4 if ctx.method.method == "full" else 0
    copies = full + (trainable * 4 if phase == "merge" else 0)
    if copies:
        comps.append(Component("scale-search copies", copies, "the update before scaling" +
                               (" + the tower before training" if full else "")))
    return comps


def _merge_phase(ctx: Context, s: Settings) -> Phase:
    a = ctx.arch
    size = adapter_size(a, ctx.method)
    comps = [_runtime(ctx), *_weights(ctx, s.quantize),
             Component("adapter state", size.trainable * 4 + size.index_bytes, "until every wrapper is merged"),
             Component("merge originals", size.touched * 4 + size.largest_touched * 8,
                       "fp32 originals of every touched entry (kept for unmerge) + one layer's index list"),
             *_continual(ctx, size.trainable, "merge")]
    if ctx.profile.device == "cuda":
        comps.append(Component("session write", a.encoder * 4, "host copy of the merged encoder", host=True))
    return _finish(ctx, "merge", comps)


def _export_phase(ctx: Context) -> Phase:
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


def _weights(ctx: Context, quantize: str) -> list[Component]:
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


def _runtime(ctx: Context) -> Component:
    what = "python + torch + CUDA context" if ctx.profile.device == "cuda" else "python + torch + transformers"
    return Component("runtime", ctx.profile.runtime_overhead, what)


def _finish(ctx: Context, name: str, comps: list[Component], count_all: bool = False) -> Phase:
    counted = sum(c.bytes for c in comps if count_all or _counts(ctx, c))
    runtime = sum(c.bytes for c in comps if c.name == "runtime")
    fraction = MARGIN_FRACTION[ctx.profile.device]
    margin = max(MARGIN_MIN, int(fraction * (counted - runtime)))
    comps.append(Component("safety margin", margin, f"{fraction:.0%}, at least {format_size(MARGIN_MIN, 0)}"))
    return Phase(name, comps, counted + margin)


def _counts(ctx: Context, c: Component) -> bool:
    return ctx.profile.unified or ctx.profile.device == "cpu" or not c.host
