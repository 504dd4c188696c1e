"""Data-parallel adapt: N processes started by `torchrun` (or `accelerate launch`) run the same recipe.

What differs per rank is only what is listed here, so the recipe reads the same with 1 or N processes:
- data: each step's effective batch (same seeded order on every rank) is cut into N contiguous slices, rank r
  trains on slice r; importance batches go round-robin. With one process nothing is cut.
- gradients: after each step's backward, the gradients of the trainable tensors (sparse deltas, LoRA factors,
  bias deltas: nothing else requires grad) and the step's loss are averaged over ranks in ONE all-reduce,
  weighted by the samples each rank saw, so every rank takes the same optimizer step; importance sums and
  their sample counts are all-reduced, so every rank selects the same entries and heads.
- the workdir: rank 0 alone opens (creates) it, holds the lock, evaluates, commits and records; the others
  read it through a `FollowerWorkdir`, which never writes, and receive rank 0's scores and session id.

The run equals a single-process run whose micro-batch is the per-rank slice (ceil(batch / N)): for `--loss
ppl` that is the same loss as the whole batch; for `--loss clip` a slice's negatives are its own, as with
micro-batching. Caption templates are drawn per rank, so with several templates the draws differ.
A rank that fails exits non-zero and torchrun stops the others (their partial session is discarded).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from lorsu_edge.session import Recovery, Workdir

F = TypeVar("F", bound=Callable)


def world_size() -> int:
    """Processes in this run: torchrun's WORLD_SIZE (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return world_size() > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the one process that writes."""
    return rank() == 0


def setup() -> torch.device | None:
    """Join torchrun's process group through accelerate (gloo on CPU, nccl on GPUs); the device of this rank.

    None when not launched by torchrun or accelerate."""
    if not active():
        return None
    from accelerate import PartialState

    return PartialState().device


def shutdown() -> None:
    """Leave the process group: without it the process aborts (SIGABRT) at interpreter exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


# --- data ----------------------------------------------------------------------------------------------------


def per_rank(batch_size: int) -> int:
    """Samples of one effective batch that each rank holds (what the planner sizes memory for)."""
    return math.ceil(batch_size / world_size())


def rank_slice(chunk: list) -> list:
    """This rank's contiguous slice of one effective batch."""
    size = per_rank(len(chunk))
    return chunk[rank() * size:(rank() + 1) * size]


def rank_starts(n: int, size: int) -> range:
    """Start offsets of the size-`size` chunks of `n` items this rank takes (round-robin)."""
    return range(rank() * size, n, size * world_size())


# --- collectives -----------------------------------------------------------------------------------------------


def sum_over_ranks(sums: dict[str, torch.Tensor], count: int) -> int:
    """All-reduce importance accumulators in place; returns the samples counted on all ranks together."""
    if not active():
        return count
    for name in sorted(sums):  # the same order on every rank
        torch.distributed.all_reduce(sums[name])
    total = torch.tensor([count], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return int(total.item())


def sync_step(params: list[torch.nn.Parameter], loss: float, samples: int) -> float:
    """Average this step's gradients and loss over ranks, weighted by each rank's samples (one all-reduce).

    Every rank then holds the gradient of the whole effective batch and steps identically. Returns the
    step's loss over all ranks."""
    if not active():
        return loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.detach().float().flatten() for g in grads] + [torch.tensor([loss, 1.0])]).mul_(samples)
    torch.distributed.all_reduce(flat)
    total = flat[-1].item()
    flat.div_(max(total, 1.0))
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n
    return flat[-2].item()


def same_start(params: list[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's trainable tensors (they are seeded alike; this makes it a guarantee)."""
    if active():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not active():
        return value
    box = [value if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def main_computes(fn: F) -> F:
    """Run `fn` on rank 0 only and hand its result to the other ranks (evaluation: one rank scores)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not active():
            return fn(*args, **kwargs)
        return broadcast(fn(*args, **kwargs) if is_main() else None)

    return wrapper  # type: ignore[return-value]


# --- the workdir ------------------------------------------------------------------------------------------------


def open_workdir(root: Path) -> Workdir:
    """Rank 0 opens (or creates) the workdir; then the others open a read-only view of it."""
    if not active():
        return Workdir.open(root, create=True)
    if is_main():
        wd = MainWorkdir.open(root, create=True)
        barrier()
        return wd
    barrier()
    return FollowerWorkdir.open(root)


class MainWorkdir(Workdir):
    """Rank 0's workdir: the followers read only after the lock is taken (and leftovers cleaned up), and
    learn the id of each committed session."""

    @contextlib.contextmanager
    def lock(self) -> Iterator[Recovery]:
        with super().lock() as recovery:
            if self._depth == 1:
                barrier()
            yield recovery

    def commit_session(self, partial: Path, *, accepted: bool, reason: str = "") -> str:
        return broadcast(super().commit_session(partial, accepted=accepted, reason=reason))


class FollowerWorkdir(Workdir):
    """What ranks > 0 see of the workdir: every read as rank 0 sees it, every write dropped."""

    @contextlib.contextmanager
    def lock(self) -> Iterator[Recovery]:
        if self._depth == 0:
            barrier()  # rank 0 holds the lock (and has cleaned up) from here on
        self._depth += 1
        try:
            yield Recovery()
        finally:
            self._depth -= 1

    def update_settings(self, **changes: Any) -> dict[str, Any]:
        settings = self.settings()
        settings.update({k: v for k, v in changes.items() if v is not None})
        return settings

    @contextlib.contextmanager
    def staged_session(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="lorsu-follower-") as tmp:  # outside the workdir
            yield Path(tmp)

    def commit_session(self, partial: Path, *, accepted: bool, reason: str = "") -> str:
        return broadcast(None)

    def log_run(self, record: dict[str, Any]) -> bool:
        return True
