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
        m = tf.BlipVisionModel(tf.BlipVisionConfig(**v, initializer_range=0.02))  # its default is 1e-10
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


def _bpe_tokenizer(extra: list[str]):
    """A byte-level BPE trained in ~0.1 s on a few sentences, wrapped as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = "a photo of the cat dog red blue What is this USER ASSISTANT answer The yes no color".split()
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>", "<pad>", "<s>", "</s>", *extra],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"}
                                   if "<image>" in extra else {})


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _clip_tokenizer(dest: Path):
    """A CLIPTokenizer over single bytes (no merges): CLIPProcessor insists on that class."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (dest / "vocab.json").write_text(json.dumps(vocab))
    (dest / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(dest / "vocab.json"), str(dest / "merges.txt"))


def _image_processor(kind: str):
    from transformers import BitImageProcessor, CLIPImageProcessor

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if kind.startswith("dual"):
        return BitImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=size, do_center_crop=True,
                                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=size)


def save_tiny(kind: str, dest: Path, seed: int = 0) -> Path:
    """Write a tiny random model of `kind` with a working processor to `dest` (for CLI tests and smoke runs)."""
    import transformers as tf

    dest.mkdir(parents=True, exist_ok=True)
    if kind == "clip":
        tokenizer = _clip_tokenizer(dest)
        model = tiny_model(kind, seed, vocab_size=len(tokenizer))
        # CLIP pools the text at the first eos; with the config's default id (49407, absent from this
        # vocabulary) it pooled position 0, and every caption got the same embedding.
        model.config.text_config.eos_token_id = tokenizer.eos_token_id
        proc = tf.CLIPProcessor(image_processor=_image_processor(kind), tokenizer=tokenizer)
    elif kind == "llava":
        tokenizer = _bpe_tokenizer(["<image>"])
        model = tiny_model(kind, seed, vocab_size=len(tokenizer))
        model.config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
        proc = tf.LlavaProcessor(image_processor=_image_processor(kind), tokenizer=tokenizer, patch_size=8,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=None)
    elif kind == "dual_dinov2":
        tokenizer = _bpe_tokenizer([])
        model = tiny_model(kind, seed, vocab_size=len(tokenizer))
        proc = tf.VisionTextDualEncoderProcessor(image_processor=_image_processor(kind), tokenizer=tokenizer)
    else:
        model, proc = tiny_model(kind, seed), _image_processor(kind)
    model.save_pretrained(dest)
    proc.save_pretrained(dest)
    return dest


def write_toy_images(dest: Path, labels: tuple[str, ...] = ("red", "blue"), per_class: int = 4, size: int = 40,
                     vqa: bool = False, seed: int = 0) -> Path:
    """Noisy colour patches per label, as class folders (or a VQA manifest.jsonl when `vqa`)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = [(200, 40, 40), (40, 40, 200), (40, 180, 40), (200, 200, 40), (160, 40, 160)]
    rows = []
    for li, label in enumerate(labels):
        folder = dest / ("images" if vqa else label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-50, 50, (size, size, 3))
            pixels = (np.array(palette[li % len(palette)])[None, None] + noise).clip(0, 255).astype("uint8")
            path = folder / f"{label}_{i}.png"
            Image.fromarray(pixels).save(path)
            rows.append({"image": f"images/{path.name}", "question": "What color is this?", "answer": label})
    if vqa:
        (dest / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return dest


def write_gray_png(path: Path, side: int, depth: int = 16) -> Path:
    """A real mid-gray grayscale PNG of side x side pixels at `depth` bits (1, 8 or 16), written row by row with
    zlib so it is never held in memory: a cheap hostile input (12000 px at 16 bits: 300 KB declaring 144 MP)."""
    import struct
    import zlib

    comp = zlib.compressobj(9)
    row = b"\0" + b"\x80" * ((side * depth + 7) // 8)  # filter byte 0, then the packed samples
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, depth, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path
