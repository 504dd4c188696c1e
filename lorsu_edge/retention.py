"""What sessions keep on disk: pruning old encoders, rebuilding them when asked, room for the next session.

Every session stores a full merged encoder (88 MB a night on the default model, 1.2 GB on a CLIP-L
tower). Only a few are ever needed whole: the current one (adapt chains onto it, export publishes
it) and recent accepted ones (instant rollback targets). `prune` keeps those and removes the
`encoder.safetensors` of every other session; everything else stays (status, report, samples, adapter:
a few hundred KB), so history, the inbox's memory of seen samples and any encoder can be recovered:
an encoder is rebuilt from its nearest ancestor's encoder (or the base model) by replaying the
adapters along the parent chain, and checked against the sha256 the session recorded.

Removal order makes a crash harmless: `pruned.json` is written (atomically) before the encoder is
unlinked, and a restored encoder is renamed into place before `pruned.json` goes.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from lorsu_edge.atomic import TEMP_MARK, atomic_write_json, fsync_dir, storage_errors
from lorsu_edge.errors import BadInputError, StorageError
from lorsu_edge.integrity import PRUNED_FILE, ancestors, check_base_encoder, is_pruned, read_report
from lorsu_edge.session import ENCODER_FILE, Workdir, now_iso

MARGIN_BYTES = 1 << 20
"""Room for report, samples and adapter JSON on top of the tensor files."""


# --- free space -------------------------------------------------------------------------------------


def session_bytes_needed(encoder_bytes: int) -> int:
    """Upper bound on one session's size: the merged encoder, an adapter of at most the encoder's size
    (method `full` stores every tower tensor), and a margin for the JSON files."""
    return 2 * encoder_bytes + MARGIN_BYTES


def check_free_space(wd: Workdir, encoder_bytes: int) -> None:
    """StorageError (exit 8) before training when the workdir's filesystem cannot take another session."""
    needed = session_bytes_needed(encoder_bytes)
    free = shutil.disk_usage(wd.sessions_root).free
    if free < needed:
        raise StorageError(f"{wd.sessions_root} has {free / 2**20:.1f} MiB free; a session needs about "
                           f"{needed / 2**20:.1f} MiB",
                           hint="free disk space or run `lorsu-edge prune --keep N`; nothing was changed")


def check_before_training(wd: Workdir, loaded) -> None:
    """adapt, with the base model just loaded: its encoder is the one this workdir started from, and the
    disk has room for the session (both refuse before any training time is spent)."""
    from lorsu_edge.adapt import session_encoder
    from lorsu_edge.merge import tensors_hash

    encoder = session_encoder(loaded)
    check_base_encoder(wd, tensors_hash(encoder), "text-model" if loaded.encoder_names else "model")
    check_free_space(wd, sum(t.numel() * t.element_size() for t in encoder.values()))


# --- prune --------------------------------------------------------------------------------------------


def kept_encoders(wd: Workdir, keep: int) -> set[str]:
    """Sessions whose encoder stays: the current one and the `keep` newest accepted ones."""
    if keep < 0:
        raise BadInputError(f"--keep must be >= 0, got {keep}", hint="0 keeps only the current model's encoder")
    current = wd.current()
    accepted = [s.id for s in wd.sessions() if s.accepted]
    kept = set(accepted[len(accepted) - keep:]) if keep else set()
    return kept | ({current} if current else set())


def prune(wd: Workdir, keep: int) -> dict[str, int]:
    """Remove the encoder of every session outside `kept_encoders`; returns {id: bytes freed}. Needs the lock.

    Rejected sessions never keep theirs (they are no rollback target). Sessions whose report records
    no encoder hash are left alone: their encoder could not be verified after a rebuild.
    """
    kept = kept_encoders(wd, keep)
    removed: dict[str, int] = {}
    for info in wd.sessions():
        encoder = info.path / ENCODER_FILE
        report = read_report(info.path) or {}
        if info.id in kept or not encoder.is_file() or not isinstance(report.get("encoder_sha256"), str):
            continue
        atomic_write_json(info.path / PRUNED_FILE, {"removed": [ENCODER_FILE], "pruned": now_iso(),
                                                    "encoder_sha256": report["encoder_sha256"]})
        size = encoder.stat().st_size
        with storage_errors(str(encoder)):
            encoder.unlink()
            fsync_dir(info.path)
        removed[info.id] = size
    return removed


# --- rebuild ------------------------------------------------------------------------------------------


def _replay_chain(wd: Workdir, sid: str) -> tuple[str | None, list[str]]:
    """(nearest ancestor with an encoder file or None for the base, sessions to replay oldest first)."""
    replay: list[str] = []
    for s in ancestors(wd, sid):
        if not is_pruned(wd.sessions_root / s):
            return s, replay[::-1]
        replay.append(s)
    return None, replay[::-1]


def rebuild_into(loaded, wd: Workdir, sid: str) -> None:
    """Put session `sid`'s encoder into `loaded` (which holds the base model's weights) by replaying the
    adapters from its nearest stored ancestor; BadInputError unless the result has the recorded hash."""
    from lorsu_edge.adapt import session_encoder
    from lorsu_edge.adapter import load_adapter
    from lorsu_edge.load import apply_encoder
    from lorsu_edge.merge import tensors_hash, unload

    start, replay = _replay_chain(wd, sid)
    if start is not None:
        apply_encoder(loaded, wd.sessions_root / start / ENCODER_FILE)
    for s in replay:
        load_adapter(wd.sessions_root / s, loaded.model, loaded.spec)  # checks the parent's hash first
        unload(loaded.model)
    expected = (read_report(wd.sessions_root / sid) or {}).get("encoder_sha256")
    if tensors_hash(session_encoder(loaded)) != expected:
        raise BadInputError(f"session {sid}'s encoder rebuilt from its adapters does not match its recorded sha256",
                            hint="the base model or an ancestor's adapter changed; roll back to a session whose "
                                 "encoder is stored")


def restore_encoder(wd: Workdir, sid: str, base_model: str) -> bool:
    """Write a pruned session's encoder back (before it becomes current again). Needs the lock.

    Returns False when there was nothing to restore."""
    from safetensors.torch import save_file

    from lorsu_edge.adapt import session_encoder
    from lorsu_edge.load import load_model

    path = wd.sessions_root / sid
    if not is_pruned(path):
        return False
    loaded = load_model(base_model, "auto", device="cpu")
    rebuild_into(loaded, wd, sid)
    tmp = wd.sessions_root / f".{sid}-{ENCODER_FILE}{TEMP_MARK}{os.getpid()}"
    try:
        with storage_errors(str(path / ENCODER_FILE)):
            save_file({k: v.contiguous() for k, v in session_encoder(loaded).items()}, str(tmp))
            os.replace(tmp, path / ENCODER_FILE)  # sessions/ and the session dir share a filesystem
            fsync_dir(path)
            (path / PRUNED_FILE).unlink()
            fsync_dir(path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return True


def apply_retention(wd: Workdir, keep: int | None) -> dict[str, int]:
    """`adapt --keep N`: remember N in the workdir (None: use the remembered one) and prune with it."""
    if keep is not None:
        wd.update_settings(keep=keep)
    remembered = wd.settings().get("keep")
    return {} if remembered is None else prune(wd, int(remembered))

