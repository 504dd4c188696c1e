"""Measuring memory: peak resident set (per phase) on the host, peak allocation on CUDA, and a hard cap.

On the host, `ru_maxrss` and VmHWM (/proc/self/status) are the same counter; writing "5" to
/proc/self/clear_refs resets it to the current RSS, so phases can be measured one after another in one
process. It resets ru_maxrss too: after a `reset_peak()` in a child, the ru_maxrss that `os.wait4`
returns covers only the time since that reset, so a whole run is the max of its phases' peaks (see
benchmarks/bench_memory.py). psutil polling misses spikes and tracemalloc does not see torch tensors,
so neither is used.
"""

from __future__ import annotations

import functools
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_bytes(usage: resource.struct_rusage) -> int:
    # Linux reports KiB, macOS bytes.
    return int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def current_rss_bytes() -> int:
    """Resident set size now (VmRSS), 0 where /proc is missing."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """Peak resident set since start or the last `reset_peak()` (VmHWM; ru_maxrss without /proc)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF))


def child_peak_rss_bytes(usage: resource.struct_rusage) -> int:
    """Peak RSS of a finished child from the rusage that `os.wait4` returned (since the child's last
    `reset_peak()`, if it called one)."""
    return _maxrss_bytes(usage)


def reset_peak() -> bool:
    """Reset the host peak (VmHWM) to the current RSS, and CUDA's peak if CUDA is up.

    Returns False when the host peak could not be reset (no /proc, or a kernel that refuses), in
    which case `peak_rss_bytes()` keeps reporting the peak since process start.
    """
    _reset_cuda_peak()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _cuda_ready():
    """The torch module when CUDA is initialised, else None (never initialises CUDA itself)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch


def _reset_cuda_peak() -> None:
    torch = _cuda_ready()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_bytes(device: int | None = None) -> int:
    """`torch.cuda.max_memory_allocated` (tensors only: the CUDA context is not included); 0 without CUDA."""
    torch = _cuda_ready()
    return 0 if torch is None else int(torch.cuda.max_memory_allocated(device))


def cap_cuda_memory(budget_bytes: int, device: int = 0) -> float | None:
    """Make the caching allocator refuse to grow past `budget_bytes` on `device` (an OOM error, not a
    swap storm or the OOM killer). Returns the fraction set, or None without CUDA.

    The cap covers tensors only; the CUDA context comes on top, which the planner accounts for in
    the profile's runtime_overhead.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = max(0.0, min(1.0, budget_bytes / total))
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


class LiveBytes:
    """Live and peak bytes of the tensor storages created while active (a TorchDispatchMode).

    Used by the planner on fake tensors (no memory is allocated, but every op still produces a
    tensor of the right size and dtype): storages are counted once when an op first returns them and
    uncounted when Python frees them, so `peak` is what the caching allocator would have had to
    hold for tensors created inside the block. Storages that exist before (weights, buffers, inputs
    passed in) are ignored: pass them to `ignore()` so views and in-place ops on them do not count.
    `marks` records (label, live) pairs for attributing memory to stages.
    """

    def __init__(self) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()
        self._refs: set = set()  # keeps the weakrefs (and so their callbacks) alive
        self._mode = None

    def ignore(self, tensors) -> None:
        """Treat the storages of `tensors` as pre-existing (never counted)."""
        for t in tensors:
            self._seen[t.untyped_storage()] = 0

    def _record(self, out) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.sparse_csr:
                self._record([t.crow_indices(), t.col_indices(), t.values()])  # no storage of its own
            elif isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.live += nbytes
                    self._refs.add(weakref.ref(storage, functools.partial(self._free, nbytes)))
        self.peak = max(self.peak, self.live)

    def _free(self, nbytes: int, ref) -> None:
        self.live -= nbytes
        self._refs.discard(ref)

    def __enter__(self) -> LiveBytes:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._mode = None
