"""What one night needs from the nights before it: its own seed, the labels seen so far, the replayed
samples and the anchor set (all remembered by the workdir, so a nightly job passes the same flags)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lorsu_edge.losses import DEFAULT_TEMPLATES
from lorsu_edge.replay import REPLAY_DIR, Entry, draw, read_buffer
from lorsu_edge.samples import Sample, SampleSet
from lorsu_edge.session import Workdir


def night_seed(seed: int, session: str) -> int:
    """A seed of its own for every session, derived from --seed and the session number: repeating --seed
    every night would replay the same shuffles, templates and LoRA init on different data."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{int(session)}".encode()).digest()[:4], "big")


def known_classes(wd: Workdir, night: SampleSet, replayed: list[Sample], control: SampleSet | None,
                  templates: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Every label seen so far (remembered; this night's and the replayed ones added) with the session's
    caption templates, plus the control set's labels with the control set's own templates."""
    seen = set(wd.settings().get("labels", [])) | set(night.labels)
    seen |= {s.label for s in replayed if not s.is_vqa and s.label is not None}
    wd.update_settings(labels=sorted(seen))
    classes = {label: templates or DEFAULT_TEMPLATES for label in sorted(seen)}
    if control is not None:
        for label in control.labels:
            classes.setdefault(label, control.templates or DEFAULT_TEMPLATES)
    return classes


def replay_samples(current_dir: Path | None, n: int, seed: int) -> tuple[list[Entry], list[Sample]]:
    """(the whole buffer of the current session, up to `n` of its samples drawn class-balanced)."""
    buffer = read_buffer(current_dir) if current_dir is not None else []
    root = None if current_dir is None else current_dir / REPLAY_DIR
    return buffer, [e.sample(root) for e in draw(buffer, n, seed)] if n else []


def remembered_anchor(wd: Workdir, anchor: Path | None) -> Path | None:
    """--anchor given now (and remembered as an absolute path), else the workdir's, else None."""
    if anchor is not None:
        wd.update_settings(anchor=str(anchor.resolve()))
        return anchor
    remembered = wd.settings().get("anchor")
    return Path(remembered) if remembered else None
