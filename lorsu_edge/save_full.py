"""`adapt --save-full DIR`: the model the user gave, as a complete folder, with the session's encoder in it.

The base model folder is copied file by file; in its safetensors shards the tower tensors are replaced
by the session's merged encoder and every other tensor is copied bit for bit. Nothing is taken from the
model in memory, so a language model that adapt loaded in 4-bit (or did not load at all, under
`--text-model`) is written exactly as the user gave it. Written into a partial folder next to DIR and
renamed into place, like every other write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

import torch

from lorsu_edge.atomic import fsync_dir, fsync_tree, storage_errors
from lorsu_edge.errors import BadInputError


def _plain(name: str) -> str:
    # 5.x flattens CLIPVisionModel (no `vision_model.` level in memory); checkpoints may keep it
    return name.replace("vision_model.", "")


def _same_tensor(checkpoint_key: str, memory_name: str) -> bool:
    """Checkpoint and in-memory names differ by a leading prefix (LLaVA's `vision_tower.` vs
    `model.vision_tower.`: transformers renames keys at load time), so they match on their common tail."""
    a, b = _plain(checkpoint_key), _plain(memory_name)
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def checkpoint_names(keys: list[str], encoder: dict[str, torch.Tensor]) -> dict[str, str]:
    """{checkpoint key: encoder name} for the keys of one shard that are tower tensors."""
    by_tail = {_plain(n).split("vision_tower.")[-1]: n for n in encoder}
    out = {}
    for key in keys:
        name = key if key in encoder else by_tail.get(_plain(key).split("vision_tower.")[-1])
        if name is not None and _same_tensor(key, name):
            out[key] = name
    return out


def _swap_shard(src: Path, dest: Path, encoder: dict[str, torch.Tensor], found: set[str]) -> None:
    """Copy one shard, replacing the tower tensors by the encoder's (the shard's dtype kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        names = checkpoint_names(list(f.keys()), encoder)
        tensors = {}
        for key in f.keys():
            tensor = f.get_tensor(key)
            if key in names:
                tensor = encoder[names[key]].detach().to("cpu", tensor.dtype).contiguous()
                found.add(names[key])
            tensors[key] = tensor
    save_file(tensors, str(dest), metadata=metadata)


def write_folder(base_dir: Path, encoder: dict[str, torch.Tensor], partial: Path) -> None:
    """The base folder's files into `partial`, shards with the encoder swapped in."""
    found: set[str] = set()
    for src in sorted(base_dir.iterdir()):
        if src.is_dir():
            continue
        if src.suffix == ".safetensors":
            _swap_shard(src, partial / src.name, encoder, found)
        else:
            shutil.copy2(src, partial / src.name)
    missing = sorted(set(encoder) - found)
    if missing:
        raise BadInputError(f"--save-full: {len(missing)} encoder tensors (e.g. {missing[0]}) are not in the "
                            f"safetensors shards of {base_dir}", hint="export the encoder with `lorsu-edge export`")


def save_full(base_dir: Path, encoder: dict[str, torch.Tensor], out: Path) -> None:
    """Write DIR = the base model with `encoder` swapped in; an existing DIR is replaced only when done."""
    out = Path(out)
    _recover(out)
    partial = out.parent / f".{out.name}.partial-{secrets.token_hex(3)}"
    old = out.parent / f".{out.name}.old-{secrets.token_hex(3)}"
    try:
        with storage_errors(str(out)):
            out.parent.mkdir(parents=True, exist_ok=True)
            partial.mkdir()
            write_folder(Path(base_dir), encoder, partial)
            fsync_tree(partial)
            _swap_into_place(partial, out, old)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(partial)
    shutil.rmtree(old, ignore_errors=True)


def _recover(out: Path) -> None:
    """Clean up after a run killed mid-write (adapt holds the workdir lock, so no writer is active): a
    partial folder is deleted; a previous DIR moved aside but not replaced is put back."""
    if not out.parent.is_dir():
        return
    for leftover in sorted(out.parent.glob(f".{out.name}.partial-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, out)


def _swap_into_place(partial: Path, out: Path, old: Path) -> None:
    """Rename `partial` to `out`; a previous `out` is moved aside first and put back if that fails."""
    if out.exists():
        os.rename(out, old)
    try:
        os.rename(partial, out)
    except BaseException:
        if old.exists():
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
