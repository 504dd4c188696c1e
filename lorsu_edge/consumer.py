"""What the consumer of the image encoder reads: the features that losses, evaluation and export use.

A VLM reads a hidden layer (LLaVA: `vision_feature_layer`, CLS dropped under the "default" strategy)
and feeds it to its projector; a dual encoder reads its projected image embedding; a bare encoder
its pooled output.
"""

from __future__ import annotations

import torch
from torch import nn

from lorsu_edge.families import EncoderSpec


def projector(model: nn.Module) -> nn.Module:
    """The VLM's multimodal projector (4.57/5.x keep it under `.model`, older releases at the top)."""
    for path in ("model.multi_modal_projector", "multi_modal_projector"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AttributeError(f"{type(model).__name__} has no multi_modal_projector")


def vlm_features(model: nn.Module, spec: EncoderSpec, pixel_values: torch.Tensor) -> torch.Tensor:
    """The hidden states the projector consumes (layer(s) and select strategy from the config)."""
    out = spec.tower(pixel_values, output_hidden_states=True)
    layer = spec.feature_layer if spec.feature_layer is not None else -1
    if isinstance(layer, (list, tuple)):
        feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
    else:
        feats = out.hidden_states[layer]
    if getattr(model.config, "vision_feature_select_strategy", "default") == "default":
        feats = feats[:, 1:]
    return feats


def embedding(out) -> torch.Tensor:
    """`get_image_features` / `get_text_features` return a tensor in transformers 4.57 and an output
    object whose `pooler_output` is that projected embedding in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_features(model: nn.Module, spec: EncoderSpec, pixel_values: torch.Tensor,
                   with_projector: bool = False) -> torch.Tensor:
    """The encoder output its consumer uses (see module docstring)."""
    if spec.role == "vlm":
        feats = vlm_features(model, spec, pixel_values)
        return projector(model)(feats) if with_projector else feats
    if spec.role == "dual":
        return embedding(model.get_image_features(pixel_values=pixel_values))
    out = model(pixel_values=pixel_values)
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out.last_hidden_state[:, 0]


def add_contiguous_lm_head_hook(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the LM head's input contiguous before its matmul; returns the hook handle.

    generate() slices the last position out of the hidden states, and on CPU a bf16 F.linear
    on a non-contiguous input is ~125x slower (torch 2.13). Hooks are not saved with a model:
    call this after every load.
    """
    def _contiguous(_module: nn.Module, args: tuple) -> tuple:
        return (args[0].contiguous(), *args[1:])

    return model.get_output_embeddings().register_forward_pre_hook(_contiguous)
