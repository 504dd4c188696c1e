"""Anchor distillation (ZSCL-style): keep the encoder's features of unlabeled anchor images close to the
night-start model's, so a session cannot move what the model does on data it no longer trains on.

The night-start features are computed once per night without gradients; each training micro-batch then
carries a slice of the anchors (cycling through them) and the term `weight * mean(1 - cos(new, start))` is
added to the loss. The term is training-only: the importance pass scores the plain task loss, since
the distillation gradient is exactly zero at the night-start weights (where importance is measured)
and would only add a forward pass there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorsu_edge.consumer import image_features
from lorsu_edge.errors import BadInputError
from lorsu_edge.families import EncoderSpec
from lorsu_edge.losses import Batch, pixel_values
from lorsu_edge.samples import IMAGE_EXTENSIONS, Sample, read_samples


def read_anchor_images(root: Path, limit: int) -> list[Sample]:
    """The first `limit` images under `root`, sorted by path: a labelled data folder, or any folder of images
    (labels are not needed). Unreadable images are left out by the sample reader's own checks."""
    if not root.is_dir():
        raise BadInputError(f"anchor set {root} is not a folder", hint="pass a folder of images with --anchor")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise BadInputError(f"no images in anchor set {root}", hint="pass a folder of images with --anchor")
    samples = _labelled(root) or [Sample(p, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]
    return samples[:limit]


def _labelled(root: Path) -> list[Sample]:
    """The verified samples when `root` is a data folder; [] for a flat folder of images."""
    try:
        return read_samples(root).samples
    except BadInputError:
        return []


def distillation_loss(new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) over the feature vectors (last dim; a VLM's per-token features count each token)."""
    return (1 - F.cosine_similarity(new.float(), start.float(), dim=-1)).mean()


class AnchorObjective:
    """Wraps the task objective: its batches carry anchor images, its loss adds the distillation term."""

    def __init__(self, task: Any, spec: EncoderSpec, processor: Any, anchors: list[Sample],
                 start_features: torch.Tensor, weight: float) -> None:
        self.task, self.spec, self.processor = task, spec, processor
        self.anchors, self.start, self.weight = anchors, start_features, weight
        self._next = 0

    def _slice(self, n: int) -> list[int]:
        rows = [(self._next + i) % len(self.anchors) for i in range(min(n, len(self.anchors)))]
        self._next = (self._next + len(rows)) % len(self.anchors)
        return rows

    def make_batch(self, samples: list[Sample]) -> Batch:
        batch = self.task.make_batch(samples)
        rows = self._slice(len(samples))
        batch.inputs["anchor_pixels"] = pixel_values(self.processor, [self.anchors[i] for i in rows])
        batch.inputs["anchor_rows"] = torch.tensor(rows)
        return batch

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        task_inputs = {k: v for k, v in batch.inputs.items() if not k.startswith("anchor_")}
        loss = self.task(model, Batch(task_inputs, batch.size, batch.groups, batch.class_ids))
        pixels = batch.inputs["anchor_pixels"]
        new = image_features(model, self.spec, pixels.to(next(model.parameters()).device))
        start = self.start[batch.inputs["anchor_rows"]].to(new.device)
        return loss + self.weight * distillation_loss(new, start)


@torch.no_grad()
def start_features(model: nn.Module, spec: EncoderSpec, processor: Any, anchors: list[Sample],
                   autocast: Callable[[], AbstractContextManager], batch_size: int = 32) -> torch.Tensor:
    """The night-start model's features of every anchor (fp32, on CPU), computed once per night."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(anchors), batch_size):
            with autocast():
                out.append(image_features(model, spec, pixel_values(processor, anchors[i:i + batch_size]).to(device))
                           .float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def anchored(task: Any, spec: EncoderSpec, processor: Any, model: nn.Module, anchors: list[Sample],
             weight: float, autocast: Callable[[], AbstractContextManager]) -> Any:
    """The training objective: `task` plus the anchor term (just `task` without anchors or weight)."""
    if not anchors or weight <= 0:
        return task
    return AnchorObjective(task, spec, processor, anchors, start_features(model, spec, processor, anchors, autocast),
                           weight)
