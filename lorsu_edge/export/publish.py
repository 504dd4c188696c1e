"""Metadata, the sidecar, `preprocessor_config.json`, and the crash-safe move of a proven export into place.

Everything is built in a hidden scratch folder beside `out` (`.<out name>.tmp-<pid>-<random>`, same
filesystem), fsynced, then renamed into place: external data first (under a name unique to this export, so
the previous graph never reads new weights), the preprocessor config and the sidecar next, the graph last.
A runtime that sees the graph finds everything it needs. Scratch folders left by a killed export are
removed by the next export to the same folder (`remove_orphans`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lorsu_edge
from lorsu_edge.atomic import TEMP_MARK, fsync_dir, fsync_file, storage_errors
from lorsu_edge.errors import BadInputError

SIDECAR_FORMAT = "lorsu-edge-onnx/1"
META_PREFIX = "lorsu_edge."
PREPROCESSOR_FILE = "preprocessor_config.json"
_NOT_IN_GRAPH = ("onnx_sha256", "onnx_bytes")


def sidecar_path(out: Path) -> Path:
    """`<out>.json`: where the sidecar of an export at `out` lives."""
    return Path(f"{out}.json")


def scratch_prefix(out: Path) -> str:
    """Prefix of the scratch folders of exports to `out` (the pid follows, so orphans can be told apart)."""
    return f".{Path(out).name}{TEMP_MARK}"


def metadata_props(meta: Mapping[str, Any]) -> dict[str, str]:
    """Sidecar fields as ONNX `metadata_props` (strings; structured values as JSON)."""
    return {f"{META_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            for k, v in meta.items() if k not in _NOT_IN_GRAPH and v is not None}


def write_metadata(path: Path, meta: Mapping[str, Any]) -> None:
    """Rewrite the graph file at `path` with `meta` in `metadata_props` (external data left untouched)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    keep = [p for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in metadata_props(meta).items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = f"lorsu-edge {lorsu_edge.__version__} export ({meta.get('precision')}); see {META_PREFIX}* metadata"
    onnx.save_model(proto, str(path))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_preprocessor_slot(folder: Path, config: Mapping[str, Any] | None) -> None:
    """Refuse (before any work) an output folder whose preprocessor_config.json says something else."""
    path = folder / PREPROCESSOR_FILE
    if config is None or not path.is_file():
        return
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = None
    if current != json.loads(json.dumps(config)):
        raise BadInputError(f"{path} describes other preprocessing than this export needs",
                            hint="export into its own folder (--out DIR/encoder.onnx): one preprocessor_config.json "
                                 "serves every ONNX file beside it")


def publish(out: Path, staged: Path, external_data: str | None, sidecar: Mapping[str, Any],
            preprocessor: Mapping[str, Any] | None) -> None:
    """Move the proven graph `staged` (inside the scratch folder beside `out`) and its companions into place."""
    scratch = staged.parent
    previous = _previous_external_data(out)
    side, pre = scratch / sidecar_path(out).name, scratch / PREPROCESSOR_FILE
    with storage_errors(str(out)):
        side.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if preprocessor is not None:
            pre.write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        moves = [(scratch / external_data, out.parent / external_data)] if external_data else []
        moves += [(pre, out.parent / PREPROCESSOR_FILE)] if preprocessor is not None else []
        moves += [(side, sidecar_path(out)), (staged, out)]
        for src, _ in moves:
            fsync_file(src)
        for src, dst in moves:
            os.replace(src, dst)
        fsync_dir(out.parent)
    if previous and previous != external_data:  # the old graph is gone: its weights are unreferenced now
        with contextlib.suppress(OSError):
            (out.parent / previous).unlink()


def _previous_external_data(out: Path) -> str | None:
    try:
        name = json.loads(sidecar_path(out).read_text(encoding="utf-8")).get("external_data")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and "/" not in name and name.startswith(out.stem) else None


def remove_orphans(out: Path) -> list[Path]:
    """Delete scratch folders of earlier exports to `out` whose process is gone (killed, power cut)."""
    removed = []
    for prefix in (scratch_prefix(out), scratch_prefix(sidecar_path(out))):  # the latter: older versions' temp files
        for path in out.parent.glob(f"{prefix}*"):
            if _remove_if_orphan(path, prefix):
                removed.append(path)
    return removed


def _remove_if_orphan(path: Path, prefix: str) -> bool:
    pid = path.name[len(prefix):].split("-", 1)[0]
    if pid.isdigit() and _alive(int(pid)):
        return False  # another export to the same file is running: its scratch is not ours
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return True


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own pid on a leftover: a previous process that had the same pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_sidecar(out: Path) -> dict[str, Any]:
    """The sidecar JSON of the export at `out` (BadInputError if absent or unreadable)."""
    path = sidecar_path(Path(out))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read {path}: {e}", hint="re-run lorsu-edge export") from None
