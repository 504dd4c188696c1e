#!/usr/bin/env python3
"""FLOPs per training sample and trainable parameters: LoRSU vs the baselines on LLaVA-1.5-7B's architecture.

Every model is built from its config inside `FakeTensorMode` (shapes only: no weights, no memory;
the meta device cannot run these forwards) and one training step on one sample is counted with
`torch.utils.flop_counter.FlopCounterMode`. Counts are what autograd actually executes: a frozen
weight gets no weight-gradient matmul, a frozen prefix of the network gets no backward at all.
The methods' own layers are used (`lorsu_edge.inject` / `lorsu_edge.layers` on the fake model);
LoRA on the LLM wraps each LLM linear in `HeadLoRALinear` with every row selected (= plain LoRA).

Configurations
  CLIP loss, CLIP-L/14-336 image tower + CLIP-L text tower (frozen, forward only; our objective
  caches text features per caption, so this is an upper bound):
    lorsu-clip        sparse fc1 (10%) + head-masked LoRA (top-2 heads, r 64) on q/k/v, 24 blocks
    dense-ref-clip    the same selection done the research code's way (dense fc1 grad x mask,
                      full-size LoRA x full-size mask)
    lora-enc          LoRA r 64 on q/k/v, all heads
    spu               sparse fc1 (10%)
    full-enc          every image-tower weight
  Perplexity loss, LLaVA-1.5-7B (576 image + 74 text tokens = 650; penultimate CLIP layer):
    lorsu-ppl         LoRSU in blocks 0-22; gradients flow through the frozen LLM and projector
    llm-lora-qv-r8    LoRA r 8 on q_proj, v_proj of every LLM layer (tower, projector frozen)
    llm-lora-all-r64  LoRA r 64 on every LLM linear (q, k, v, o, gate, up, down)
    llava-ft          LLaVA-1.5's own fine-tuning recipe: LLM + projector, tower frozen
    full-vlm          every weight of the VLM (the reference of the paper's compute claim)

Caveats: matmuls, convolutions and attention only (no elementwise ops, norms or the optimizer step);
eager attention is used because FlopCounterMode does not count the CPU SDPA kernel (349 vs 382
GFLOPs for the CLIP-L tower forward). The sparse fc1 layers run their sampled weight gradient (2 x
tokens x selected FLOPs; on fake tensors the layer computes it as batched dot products, the same
count): the FLOP-minimal path. For rows denser than the measured crossover the layer forms those rows'
gradient with one dense matmul instead (faster in wall time, more FLOPs; see bench_sparse_grad.py):
the `dense-fb` column is the other extreme, every row dense, 2 x tokens x (out x in - selected) more per fc1.

    python benchmarks/bench_flops.py            # writes benchmarks/results/bench_flops.json (~1 min)
    python benchmarks/bench_flops.py --smoke    # tiny models, seconds
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from lorsu_edge.config import MethodConfig  # noqa: E402
from lorsu_edge.consumer import image_features, projector  # noqa: E402
from lorsu_edge.families import find_encoder  # noqa: E402
from lorsu_edge.inject import freeze, inject, replace_module, shape_targets  # noqa: E402
from lorsu_edge.layers import HeadLoRALinear, SparseDeltaLinear  # noqa: E402
from lorsu_edge.losses import contrastive_loss  # noqa: E402
from lorsu_edge.score import candidate_paths, compute_importance  # noqa: E402

LLM_TEXT_TOKENS = 74  # question + answer tokens next to the 576 image tokens (LLaVA-1.5: 650 in all)
ANSWER_TOKENS = 8
LORSU = MethodConfig(method="lorsu", sparsity=0.1, top_k_heads=2, rank=64, alpha=64)
PAPER_CLAIM = 25.0


@dataclass
class Setup:
    name: str
    loss: str  # "clip" or "ppl"
    what: str
    prepare: Callable[[nn.Module, Any], None]  # makes exactly the method's tensors trainable


class Meter:
    """FLOPs per named stage: each stage is counted by its own FlopCounterMode."""

    def __init__(self) -> None:
        self.flops: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            yield
        self.flops[name] += fc.get_total_flops()

    @property
    def total(self) -> int:
        return sum(self.flops.values())


# --- method preparation (on the fake model) ------------------------------------------------------


def _package_method(cfg: MethodConfig) -> Callable[[nn.Module, Any], None]:
    def prepare(model: nn.Module, spec) -> None:
        inject(model, shape_targets(model, spec, cfg), cfg)
        freeze(model, spec, cfg)
        for m in model.modules():
            if isinstance(m, SparseDeltaLinear):
                m.grad_mode = "sampled"  # count the FLOP-minimal path; `dense-fb` adds the fallback's extra
    return prepare


def _dense_reference(model: nn.Module, spec) -> None:
    C.inject_dense_reference(model, shape_targets(model, spec, LORSU), LORSU.rank, LORSU.alpha)


def _llm_lora(names: tuple[str, ...], rank: int, alpha: float) -> Callable[[nn.Module, Any], None]:
    def prepare(model: nn.Module, spec) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in language_model(model).layers:
            for path, mod in list(layer.named_modules()):
                if isinstance(mod, nn.Linear) and path.rsplit(".", 1)[-1] in names:
                    rows = torch.arange(mod.out_features)  # every row: plain LoRA
                    replace_module(layer, path, HeadLoRALinear(mod, rows, rank, alpha, train_bias=False))
    return prepare


def _llava_ft(model: nn.Module, spec) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(spec.param_prefix))


def _everything(model: nn.Module, spec) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


LLM_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SETUPS = [
    Setup("lorsu-clip", "clip", "LoRSU: fc1 10% + top-2-head LoRA r64 on q/k/v (CLIP loss)", _package_method(LORSU)),
    Setup("dense-ref-clip", "clip", "same selection, research code's dense masking", _dense_reference),
    Setup("lora-enc", "clip", "LoRA r64 on q/k/v of the encoder, all heads",
          _package_method(MethodConfig(method="lora", rank=64, alpha=64))),
    Setup("spu", "clip", "SPU: sparse fc1 10%", _package_method(MethodConfig(method="spu", sparsity=0.1))),
    Setup("full-enc", "clip", "full image-tower fine-tuning", _package_method(MethodConfig(method="full"))),
    Setup("lorsu-ppl", "ppl", "LoRSU (perplexity loss through the frozen LLM)", _package_method(LORSU)),
    Setup("llm-lora-qv-r8", "ppl", "LoRA r8 on LLM q/v (tower, projector frozen)",
          _llm_lora(("q_proj", "v_proj"), 8, 16)),
    Setup("llm-lora-all-r64", "ppl", "LoRA r64 on all LLM linears", _llm_lora(LLM_ALL, 64, 128)),
    Setup("llava-ft", "ppl", "LLM + projector full (LLaVA-1.5 recipe)", _llava_ft),
    Setup("full-vlm", "ppl", "full VLM update (tower + projector + LLM)", _everything),
]


# --- models and one step ---------------------------------------------------------------------------


def language_model(model: nn.Module) -> nn.Module:
    for path in ("model.language_model", "language_model.model", "language_model"):
        with contextlib.suppress(AttributeError):
            return model.get_submodule(path)
    raise AttributeError(f"{type(model).__name__} has no language model")


def build(loss: str, smoke: bool) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A fake fp32 model for `loss` (call inside FakeTensorMode), its encoder spec and a description."""
    from transformers import CLIPModel, LlavaForConditionalGeneration

    if loss == "clip":
        vision, text = (C.TINY_VISION, C.TINY_TEXT) if smoke else (C.CLIP_L336_VISION, C.CLIP_L_TEXT)
        model = CLIPModel._from_config(C.clip_config(vision, text), attn_implementation="eager")
        source = "tiny CLIP (smoke)" if smoke else "CLIP ViT-L/14-336 + CLIP-L text (benchmarks/_common.py)"
    else:
        cfg, source = C.llava_config(smoke)
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    spec = find_encoder(model)
    vc = model.config.vision_config
    info = {"model": source, "image_size": vc.image_size, "image_tokens": (vc.image_size // vc.patch_size) ** 2 + 1,
            "params": sum(p.numel() for p in model.parameters()), "used_blocks": spec.used_blocks,
            "blocks": len(spec.blocks)}
    return model.train(), spec, info


def inputs(model: nn.Module, loss: str, smoke: bool) -> dict[str, torch.Tensor]:
    vc = model.config.vision_config
    px = torch.randn(1, 3, vc.image_size, vc.image_size)
    if loss == "clip":
        n = model.config.text_config.max_position_embeddings  # CLIP pads captions to its full context
        return {"pixel_values": px, "input_ids": torch.randint(0, 100, (1, n))}
    n = 8 if smoke else LLM_TEXT_TOKENS
    return {"pixel_values": px, "input_ids": torch.randint(0, 100, (1, n))}


def clip_loss(model: nn.Module, spec, batch: dict[str, torch.Tensor], meter: Meter) -> torch.Tensor:
    with meter.stage("image_fwd"):
        img = image_features(model, spec, batch["pixel_values"])
    with meter.stage("text_fwd"), torch.no_grad():
        txt = model.get_text_features(input_ids=batch["input_ids"])
    with meter.stage("loss_fwd"):
        return contrastive_loss(img, txt, model.logit_scale.exp())


def ppl_loss(model: nn.Module, spec, batch: dict[str, torch.Tensor], meter: Meter) -> torch.Tensor:
    """LLaVA's forward written out (its `nonzero` has no fake kernel): same matmuls, image tokens after BOS."""
    with meter.stage("image_fwd"):
        feats = image_features(model, spec, batch["pixel_values"])
    with meter.stage("projector_fwd"):
        feats = projector(model)(feats)
    with meter.stage("llm_fwd"):
        emb = model.get_input_embeddings()(batch["input_ids"])
        x = torch.cat([emb[:, :1], feats, emb[:, 1:]], dim=1)
        hidden = language_model(model)(inputs_embeds=x).last_hidden_state
        logits = model.get_output_embeddings()(hidden)  # transformers computes logits at every position
        labels = torch.full(x.shape[:2], -100, dtype=torch.long)
        labels[:, -ANSWER_TOKENS:] = 0
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


LOSS_FNS = {"clip": clip_loss, "ppl": ppl_loss}


def dense_fallback_extra(model: nn.Module, tokens: int) -> int:
    """FLOPs the sparse fc1 layers' dense fallback adds: the weight-gradient entries it forms and drops."""
    extra = 0
    for m in model.modules():
        if isinstance(m, SparseDeltaLinear) and m.delta.requires_grad:
            extra += 2 * tokens * (m.base.weight.numel() - m.delta.numel())
    return extra


def count_setup(setup: Setup, smoke: bool) -> dict[str, Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.perf_counter()
    with FakeTensorMode(), torch.enable_grad():
        model, spec, info = build(setup.loss, smoke)
        setup.prepare(model, spec)
        meter = Meter()
        batch = inputs(model, setup.loss, smoke)
        loss = LOSS_FNS[setup.loss](model, spec, batch, meter)
        with meter.stage("backward"):
            loss.backward()
        trainable = C.trainable_params(model)
        extra = dense_fallback_extra(model, info["image_tokens"])
    fwd = meter.total - meter.flops["backward"]
    row = {"name": setup.name, "loss": setup.loss, "what": setup.what, "trainable_params": trainable,
           "total_params": info["params"], "fwd_flops": fwd, "bwd_flops": meter.flops["backward"],
           # ideal_flops == flops now (no entry of the fc1 gradient is wasted); key kept for old readers
           "flops": meter.total, "ideal_flops": meter.total, "dense_fallback_flops": meter.total + extra,
           "stages": dict(meter.flops),
           "seconds": round(time.perf_counter() - start, 1)}
    return row | {"model": info}


def count_importance(loss: str, fc1: bool, attn: bool, smoke: bool) -> int:
    """FLOPs per sample of the importance pass (package's `compute_importance`: fc1 and/or q/k/v weight grads)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.enable_grad():
        model, spec, _ = build(loss, smoke)
        batch = inputs(model, loss, smoke)
        meter = Meter()
        with meter.stage("importance"):
            compute_importance(model, candidate_paths(spec, fc1=fc1, attn=attn), [(batch, 1)],
                               lambda m, b: LOSS_FNS[loss](m, spec, b, Meter()), max_samples=1)
    return meter.total


def run(args) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    rows = [count_setup(s, args.smoke) for s in SETUPS]
    by = {r["name"]: r for r in rows}
    lorsu_clip_importance = count_importance("clip", True, True, args.smoke)
    importance = {"lorsu-clip": lorsu_clip_importance, "dense-ref-clip": lorsu_clip_importance,  # same pass
                  "spu": count_importance("clip", True, False, args.smoke),
                  "lorsu-ppl": count_importance("ppl", True, True, args.smoke)}
    epochs = args.epochs
    for r in rows:
        r["importance_flops"] = importance.get(r["name"], 0)
        # A session: one importance pass over the samples, then `epochs` training passes.
        r["session_flops_per_sample"] = r["importance_flops"] + epochs * r["flops"]
        r["full_vlm_over_this"] = by["full-vlm"]["flops"] / r["flops"]
    full = by["full-vlm"]
    session = {name: r["session_flops_per_sample"] for name, r in by.items()}
    ratios = {
        "full_vlm/lorsu_clip": full["flops"] / by["lorsu-clip"]["flops"],
        "full_vlm/lorsu_ppl": full["flops"] / by["lorsu-ppl"]["flops"],
        "full_vlm/lorsu_clip_ideal_sparse": full["flops"] / by["lorsu-clip"]["ideal_flops"],
        "full_vlm/lorsu_clip_dense_fallback": full["flops"] / by["lorsu-clip"]["dense_fallback_flops"],
        "full_vlm/lorsu_clip_per_session": session["full-vlm"] / session["lorsu-clip"],
        "full_vlm/lorsu_ppl_per_session": session["full-vlm"] / session["lorsu-ppl"],
        "llm_lora_qv_r8/lorsu_clip": by["llm-lora-qv-r8"]["flops"] / by["lorsu-clip"]["flops"],
    }
    return {"benchmark": "bench_flops", "smoke": args.smoke, "epochs": epochs, "paper_claim": PAPER_CLAIM,
            "clip_model": rows[0]["model"], "vlm_model": by["full-vlm"]["model"], "rows": rows, "ratios": ratios,
            "env": C.env_info()}


def table(doc: dict[str, Any]) -> str:
    vlm = doc["vlm_model"]
    lines = [f"CLIP loss on {doc['clip_model']['model']}; perplexity loss on {vlm['model']} "
             f"({C.fmt_count(vlm['params'])} params). FLOPs per training sample (one fwd+bwd step, batch 1).",
             f"{'config':<18}{'trainable':>11}{'fwd':>10}{'bwd':>10}{'total':>10}{'dense-fb':>10}"
             f"{'importance':>12}{'full-VLM/x':>12}  what"]
    for r in doc["rows"]:
        fallback = C.fmt_count(r["dense_fallback_flops"]) if r["dense_fallback_flops"] != r["flops"] else "="
        imp = C.fmt_count(r["importance_flops"]) if r["importance_flops"] else "-"
        lines.append(f"{r['name']:<18}{C.fmt_count(r['trainable_params']):>11}{C.fmt_count(r['fwd_flops']):>10}"
                     f"{C.fmt_count(r['bwd_flops']):>10}{C.fmt_count(r['flops']):>10}{fallback:>10}{imp:>12}"
                     f"{r['full_vlm_over_this']:>11.1f}x  {r['what']}")
    q = doc["ratios"]
    lines += [
        f"full VLM update / LoRSU-CLIP = {q['full_vlm/lorsu_clip']:.1f}x per step "
        f"({q['full_vlm/lorsu_clip_dense_fallback']:.1f}x with the dense fc1-gradient fallback; "
        f"{q['full_vlm/lorsu_clip_per_session']:.1f}x per session incl. the importance pass, {doc['epochs']} epochs)"
        f"   [paper: > {doc['paper_claim']:.0f}x]",
        f"full VLM update / LoRSU-ppl  = {q['full_vlm/lorsu_ppl']:.2f}x per step "
        f"({q['full_vlm/lorsu_ppl_per_session']:.2f}x per session)",
        "total: the fc1 weight gradient at the selected entries only (sampled); dense-fb: every fc1 row's gradient\n"
        "formed densely, then gathered (the layer does that for the rows denser than the measured crossover).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__)
    ap.add_argument("--epochs", type=int, default=5, help="training passes per session (importance: one pass)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # fake tensors compute nothing; no reason to take cores from others
    doc = run(args)
    return C.report(doc, table(doc), "bench_flops", args)


if __name__ == "__main__":
    raise SystemExit(main())
