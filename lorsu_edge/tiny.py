"""Tiny random models of every wired family, built from configs (tests, smoke benchmarks, demo pipeline tests).

Nothing is downloaded: configs are spelled out here and tokenizers are trained on the spot.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

_V = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
_T = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
IMAGE_SIZE = 32
KINDS = ("clip", "clip_vision", "siglip", "dinov2", "vit", "blip_vision", "llava", "dual_dinov2")


def _vision_config(kind: str) -> dict:
    return dict(_V, image_size=IMAGE_SIZE, patch_size=8 if kind != "dinov2" else 8)


def tiny_model(kind: str, seed: int = 0, vocab_size: int = 300) -> torch.nn.Module:
    """A randomly initialised model of `kind` (one of KINDS), fp32, eval mode."""
    torch.manual_seed(seed)
    v = _vision_config(kind)
    text = dict(_T, vocab_size=vocab_size, max_position_embeddings=64)
    if kind == "clip":
        m = tf.CLIPModel(tf.CLIPConfig(vision_config=v, text_config=text, projection_dim=16))
    elif kind == "clip_vision":
        m = tf.CLIPVisionModel(tf.CLIPVisionConfig(**v))
    elif kind == "siglip":
        m = tf.SiglipModel(tf.SiglipConfig(vision_config=v, text_config=text))
    elif kind == "dinov2":
        m = tf.Dinov2Model(tf.Dinov2Config(**v))
    elif kind == "vit":
        m = tf.ViTModel(tf.ViTConfig(**v))
    elif kind == "blip_vision":
        m = tf.BlipVisionModel(tf.BlipVisionConfig(**v))
    elif kind == "llava":
        lm = tf.LlamaConfig(**_T, num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=256)
        m = tf.LlavaForConditionalGeneration(tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**v).to_dict(), text_config=lm.to_dict(),
            image_token_index=vocab_size - 1, vision_feature_layer=-2, projector_hidden_act="gelu"))
    elif kind == "dual_dinov2":
        m = tf.VisionTextDualEncoderModel(vision_model=tf.Dinov2Model(tf.Dinov2Config(**v)),
                                          text_model=tf.BertModel(tf.BertConfig(**text)))
    else:
        raise ValueError(f"unknown tiny kind {kind!r}; choose from {KINDS}")
    return m.eval()
