"""Adapter files: `adapter.safetensors` (indices, deltas, LoRA factors, bias deltas) + `adapter.json`.

The JSON names the method, its hyperparameters, the encoder family, the base model and a hash of the
base encoder's weights, so an adapter is never applied to a model it was not trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorsu_edge.config import MethodConfig
from lorsu_edge.errors import AdapterMismatchError
from lorsu_edge.families import EncoderSpec
from lorsu_edge.inject import adapter_modules, replace_module
from lorsu_edge.layers import HeadLoRALinear, SparseDeltaLinear
from lorsu_edge.merge import encoder_state_dict, tensors_hash

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT = "lorsu-edge-adapter/1"


def adapter_tensors(model: nn.Module, spec: EncoderSpec, cfg: MethodConfig) -> dict[str, torch.Tensor]:
    """Trainable state by name: `<module path>.<indices|delta|rows|lora_A|lora_B|bias_delta>` (fc1 indices int32
    since the sampled-gradient change; int64 ones from older adapters load the same).

    For `full` there are no wrappers: every tower tensor is stored as `<param name>.value`.
    """
    out: dict[str, torch.Tensor] = {}
    if cfg.method == "full":
        prefix = spec.param_prefix
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                out[f"{name}.value"] = p.detach()
    for path, m in adapter_modules(model).items():
        for name, t in m.state_dict().items():  # persistent state only: derived buffers are rebuilt on load
            if not name.startswith("base."):
                out[f"{path}.{name}"] = t
    return {k: v.contiguous().cpu() for k, v in out.items()}


def module_records(model: nn.Module, targets_meta: dict[str, dict]) -> dict[str, dict]:
    """Per-module JSON records: kind, shape and the structural choices needed to rebuild the wrapper."""
    records = {}
    for path, m in adapter_modules(model).items():
        rec = {"shape": list(m.base.weight.shape), **targets_meta.get(path, {})}
        if isinstance(m, SparseDeltaLinear):
            rec.update(kind="sparse", entries=int(m.indices.numel()))
        else:
            rec.update(kind="lora", parts=m.parts, rank=m.rank, scaling=m.scaling, rows=int(m.rows.numel()))
        rec["bias"] = m.bias_delta is not None
        records[path] = rec
    return records


def save_adapter(dest: Path, model: nn.Module, spec: EncoderSpec, cfg: MethodConfig, meta: dict[str, Any],
                 targets_meta: dict[str, dict] | None = None) -> None:
    """Write the adapter's two files into `dest` (the caller makes the directory write atomic)."""
    dest.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(model, spec, cfg), str(dest / ADAPTER_WEIGHTS))
    doc = {"format": FORMAT, "method": cfg.method, "config": cfg.to_dict(), "family": spec.family.name,
           "tower_path": spec.tower_path, **meta, "modules": module_records(model, targets_meta or {})}
    (dest / ADAPTER_CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True))


def read_adapter_config(src: Path) -> dict[str, Any]:
    path = src / ADAPTER_CONFIG
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterMismatchError(f"no {ADAPTER_CONFIG} in {src}", hint="pass a session directory") from None
    except json.JSONDecodeError as e:
        raise AdapterMismatchError(f"{path} is not valid JSON ({e})", hint="the session is damaged") from None
    if doc.get("format") != FORMAT:
        raise AdapterMismatchError(f"{path} has format {doc.get('format')!r}, expected {FORMAT}",
                                   hint="written by an incompatible lorsu-edge version")
    return doc


def load_adapter(src: Path, model: nn.Module, spec: EncoderSpec, check_base: bool = True) -> dict[str, Any]:
    """Rebuild the adapter's wrappers (unmerged) on `model`; fail clearly on a different base. An adapter of the
    visual projection makes it part of `spec`'s encoder (as adapt did when it trained it)."""
    doc = read_adapter_config(src)
    if doc["family"] != spec.family.name:
        raise AdapterMismatchError(f"adapter is for a {doc['family']} encoder, this model has {spec.family.name}",
                                   hint="load it onto the base model it was trained on")
    if check_base and doc.get("base_encoder_sha256"):
        have = tensors_hash(encoder_state_dict(model, spec))
        if have != doc["base_encoder_sha256"]:
            raise AdapterMismatchError(
                f"adapter base hash {doc['base_encoder_sha256'][:12]} != this encoder's {have[:12]}",
                hint="the adapter was trained on different weights (another model or session)")
    tensors = load_file(str(src / ADAPTER_WEIGHTS))
    if doc["method"] == "full":
        _load_dense(model, tensors)
    for path, rec in doc["modules"].items():
        _rebuild(model, path, rec, tensors)
        if rec.get("projection"):  # after the base check: the parent's encoder may not have held it yet
            spec.projection = path
    return doc


def _load_dense(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            name = key.removesuffix(".value")
            if name not in params or params[name].shape != value.shape:
                raise AdapterMismatchError(f"adapter tensor {name} does not fit this model",
                                           hint="load it onto the base model it was trained on")
            params[name].copy_(value)


def _rebuild(model: nn.Module, path: str, rec: dict, tensors: dict[str, torch.Tensor]) -> None:
    try:
        base = model.get_submodule(path)
    except AttributeError:
        raise AdapterMismatchError(f"adapter module {path} not found in this model",
                                   hint="load it onto the base model it was trained on") from None
    if not isinstance(base, nn.Linear) or list(base.weight.shape) != rec["shape"]:
        raise AdapterMismatchError(f"adapter module {path} expects a Linear of shape {rec['shape']}",
                                   hint="load it onto the base model it was trained on")
    if rec["kind"] == "sparse":
        wrapper = SparseDeltaLinear(base, tensors[f"{path}.indices"], train_bias=rec["bias"])
    else:
        wrapper = HeadLoRALinear(base, tensors[f"{path}.rows"], rec["rank"], rec["scaling"] * rec["rank"],
                                 parts=rec["parts"], train_bias=rec["bias"])
    state = {k.removeprefix(f"{path}."): v for k, v in tensors.items() if k.startswith(f"{path}.")}
    try:
        wrapper.load_state_dict({**{f"base.{k}": v for k, v in base.state_dict().items()}, **state})
    except RuntimeError as e:
        raise AdapterMismatchError(f"adapter tensors for {path} do not fit ({str(e).splitlines()[0]})",
                                   hint="the adapter file is damaged or from another model") from None
    index, limit = ((wrapper.indices, base.weight.numel()) if isinstance(wrapper, SparseDeltaLinear)
                    else (wrapper.rows, base.out_features))
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < limit:
        raise AdapterMismatchError(f"adapter indices for {path} fall outside its weight", hint="damaged adapter")
    replace_module(model, path, wrapper)
