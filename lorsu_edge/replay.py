"""Rehearsal: a bounded, hashed copy of earlier accepted nights' samples, replayed into later nights.

The buffer is part of each accepted session (`sessions/NNNN/replay/`: one PNG per sample at the
processor's input resolution, named by its hash, plus `manifest.jsonl`). It is written into the partial
session directory, so it is committed (or lost) with the session, atomically: a crash never leaves a torn
buffer, a rejected night never enters it, and `rollback` brings back the buffer of the session rolled back to.
Files kept from the previous buffer are hard links (copies where links fail), so a session costs only its
new images on disk. The inbox can be emptied after each night: the buffer does not point into it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from lorsu_edge.atomic import storage_errors
from lorsu_edge.samples import Sample, load_image

log = logging.getLogger(__name__)
REPLAY_DIR = "replay"
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Entry:
    """One stored sample: the original's hash (identity), the stored file and its own hash (integrity)."""

    sha256: str
    file: str
    file_sha256: str
    session: str
    label: str | None = None
    question: str | None = None
    answer: str | None = None

    def sample(self, root: Path) -> Sample:
        return Sample(root / self.file, self.sha256, self.label, self.question, self.answer)

    @property
    def key(self) -> str:
        """Class-balance key: the label, or the answer for a VQA sample (the class it names; questions are
        often phrasings of one question, as in the VLM demo, and would balance nothing that matters)."""
        return f"label:{self.label}" if self.question is None else f"answer:{self.answer}"


def read_buffer(session_dir: Path | None) -> list[Entry]:
    """The buffer stored with a session (oldest first); entries whose file is missing or altered are dropped."""
    root = None if session_dir is None else session_dir / REPLAY_DIR
    if root is None or not (root / MANIFEST).is_file():
        return []
    entries = [Entry(**json.loads(line)) for line in (root / MANIFEST).read_text().splitlines() if line.strip()]
    good = [e for e in entries if _file_hash(root / e.file) == e.file_sha256]
    if len(good) < len(entries):
        log.warning("replay buffer %s: %d of %d files missing or altered, left out", root, len(entries) - len(good),
                    len(entries))
    return good


def _file_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def draw(entries: list[Entry], n: int, seed: int) -> list[Entry]:
    """Up to `n` entries, class-balanced: round-robin over classes, a seeded random order within each."""
    rng = random.Random(seed)
    by_class: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_class[e.key].append(e)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_class.items())]
    out: list[Entry] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out


def evict(entries: list[Entry], capacity: int) -> list[Entry]:
    """Keep at most `capacity` entries: drop the oldest entry of the largest class until it fits."""
    kept = list(entries)
    while len(kept) > capacity:
        counts: dict[str, int] = defaultdict(int)
        for e in kept:
            counts[e.key] += 1
        largest = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        kept.remove(next(e for e in kept if e.key == largest))
    return kept


def stored_size(processor: Any) -> int:
    """The shorter side the processor resizes to (images are stored at that size, never upscaled)."""
    image_processor = getattr(processor, "image_processor", processor)
    size = getattr(image_processor, "size", None) or {}
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    return min(int(size.get("height", 224)), int(size.get("width", 224)))


def _png(sample: Sample, side: int) -> bytes:
    image = load_image(sample.path)
    scale = side / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_buffer(dest_session: Path, session: str, previous: list[Entry], previous_dir: Path | None,
                 new: list[Sample], capacity: int, processor: Any) -> list[Entry]:
    """Write the next buffer (previous entries + `new`, deduplicated by hash, evicted to `capacity`) into
    the partial session `dest_session`; returns its entries. Call only for a session about to be accepted."""
    have = {e.sha256 for e in previous}
    side = stored_size(processor)
    root = dest_session / REPLAY_DIR
    with storage_errors(str(root)):
        root.mkdir(exist_ok=True)
        fresh = []
        for s in new:
            if s.sha256 in have:
                continue
            have.add(s.sha256)
            data = _png(s, side)
            (root / f"{s.sha256}.png").write_bytes(data)
            fresh.append(Entry(s.sha256, f"{s.sha256}.png", hashlib.sha256(data).hexdigest(), session,
                               s.label, s.question, s.answer))
        entries = evict([*previous, *fresh], capacity)
        for e in entries:
            if e.session != session:
                _link_or_copy(previous_dir / REPLAY_DIR / e.file, root / e.file)
        for e in fresh:
            if e not in entries:
                (root / e.file).unlink()
        # no fsync here: commit_session fsyncs the whole partial tree before it renames it
        (root / MANIFEST).write_text("".join(json.dumps(asdict(e), sort_keys=True) + "\n" for e in entries))
    return entries


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
