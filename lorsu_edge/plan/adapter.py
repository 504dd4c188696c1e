"""What the method's update layers hold for the whole encoder (trainable entries, index buffers, entries a
merge touches), counted by injecting them into the stand-in model on fake tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass

from lorsu_edge.config import MethodConfig
from lorsu_edge.plan.arch import Arch
from lorsu_edge.plan.build import build, find_spec, quiet


@dataclass(frozen=True)
class AdapterSize:
    """The method's update layers for the whole encoder, from shapes (elements unless named bytes)."""

    trainable: int  # fp32 entries the optimizer sees (selected fc1 entries, LoRA factors, bias deltas)
    index_bytes: int  # int64 index buffers (selected entries, LoRA rows)
    touched: int  # base-weight entries a merge overwrites (their originals are kept for unmerge)
    largest_touched: int  # the most touched entries of one layer (its int64 index list is built on merge)


_CACHE: dict[tuple, AdapterSize] = {}


def adapter_size(arch: Arch, method: MethodConfig) -> AdapterSize:
    """What the method's update layers hold once injected (cached per model and method)."""
    key = ("adapter", arch.key, json.dumps(method.to_dict(), sort_keys=True))
    if key not in _CACHE:
        with quiet():
            _CACHE[key] = _count_adapter(arch, method)
    return _CACHE[key]


def _count_adapter(arch: Arch, method: MethodConfig) -> AdapterSize:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorsu_edge.inject import adapter_modules, freeze, inject, shape_targets

    if method.method == "full":  # dense: no wrappers, the optimizer sees the whole encoder
        return AdapterSize(arch.encoder, 0, 0, 0)
    with FakeTensorMode():
        model = build(arch.sim_cfg)
        spec = find_spec(model, arch.sim_cfg)
        inject(model, shape_targets(model, spec, method), method)
        freeze(model, spec, method)
        per_block: dict[int, list[int]] = {}
        largest = 0
        for path, m in adapter_modules(model).items():
            block = next(b.index for b in spec.blocks if path.startswith(b.path + "."))
            touched = m._touched().numel()
            sums = per_block.setdefault(block, [0, 0, 0])
            sums[0] += sum(p.numel() for p in m.parameters(recurse=False))
            sums[1] += sum(b.numel() * b.element_size() for n, b in m.named_buffers() if not n.startswith("base."))
            sums[2] += touched
            largest = max(largest, touched)
    if not per_block:
        return AdapterSize(0, 0, 0, 0)
    extra = arch.used_blocks - spec.used_blocks  # blocks left out of the simulated tower
    last = per_block[max(per_block)]
    totals = [sum(v[i] for v in per_block.values()) + extra * last[i] for i in range(3)]
    return AdapterSize(*totals, largest)
