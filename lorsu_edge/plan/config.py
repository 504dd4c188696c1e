"""Reading the model description: config.json (and preprocessor_config.json for the image size), never a
weight file; the text tower's config for --loss clip on a VLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorsu_edge.errors import BadInputError

# CLIP ViT-L/14's text tower (123.7M parameters): the text side assumed for --loss clip on a VLM
# when no --text-model is given.
ASSUMED_TEXT_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                           projection_dim=768)


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


def processor_image_size(vision_cfg: Any, folder: Path | None) -> int:
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


def text_tower_config(text_model: Any) -> Any:
    """The text tower's config: from --text-model (its text_config if it is a dual model), else CLIP-L's."""
    from transformers import CLIPTextConfig

    if text_model is None:
        return CLIPTextConfig(**ASSUMED_TEXT_CONFIG)
    cfg, _, _ = read_config(text_model)
    return getattr(cfg, "text_config", None) or cfg
