"""Crash-safe writes: a file is either its old content or its new content, never a torn mix.

The recipe is the classic one: write a temp file in the same directory (same filesystem, so the
rename is atomic), flush + fsync it, `os.replace` it over the target, then fsync the directory so
the rename itself survives a power cut. A failure at any step removes the temp file and leaves the
target as it was.

A full disk, an exhausted quota, a file-size limit, a read-only filesystem or a permission problem
become a `StorageError` (exit code IO) with a hint, so the user sees one line instead of a traceback.
That includes libraries that do not raise OSError for them: safetensors raises `SafetensorError`
("... (os error 28)") on a full disk, so the errno is read from the message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorsu_edge.errors import StorageError

TEMP_MARK = ".tmp-"
"""Temp files are named `.<target name>.tmp-<pid>-<random>`; `is_temp_name` recognises them."""

_HINTS = {
    errno.ENOSPC: "free some disk space and run again; nothing already saved was changed",
    errno.EDQUOT: "free some space under your quota and run again; nothing already saved was changed",
    errno.EROFS: "the filesystem is read-only: pass a writable --workdir; nothing already saved was changed",
    errno.EACCES: "fix the permissions or pass another --workdir; nothing already saved was changed",
    errno.EFBIG: "a file-size limit (ulimit -f) stopped the write: raise it; nothing already saved was changed",
}
STORAGE_ERRNOS = frozenset(_HINTS)


def is_temp_name(name: str) -> bool:
    """True for a leftover temp file of `atomic_write_bytes` (safe to delete when no writer runs)."""
    return name.startswith(".") and TEMP_MARK in name


# Rust-backed writers (safetensors) report the OS error only in their message.
_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")


def error_number(e: BaseException) -> int | None:
    """The errno behind `e`: an OSError's own, or the `(os error N)` a Rust library's message carries."""
    if isinstance(e, OSError):
        return e.errno
    match = _OS_ERROR_RE.search(str(e))
    return int(match.group(1)) if match else None


def storage_error(e: BaseException, what: str) -> StorageError | None:
    """The `StorageError` for a disk-full/size-limit/read-only/permission error while doing `what`, else None."""
    number = error_number(e)
    hint = _HINTS.get(number or 0)
    if hint is None or number is None:
        return None
    return StorageError(f"cannot write {what}: {os.strerror(number)}", hint=hint)


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Translate a storage OSError raised in the body into `StorageError` (other errors pass through).

    Wrap writes done by other libraries (e.g. `safetensors.save_file` into a partial session dir).
    """
    try:
        yield
    except Exception as e:
        err = storage_error(e, what)
        if err is None:
            raise
        raise err from e


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync one already-written file's data and metadata."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under `root`, then every directory bottom-up, `root` last.

    Call before renaming a directory into place: the rename must not become durable before the
    contents it publishes.
    """
    root = Path(root)
    with storage_errors(str(root)):
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames:
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    fsync_file(path)
            fsync_dir(Path(dirpath))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (temp + fsync + rename + fsync of the dir).

    On any failure (including KeyboardInterrupt) the temp file is removed and `path` keeps its old
    content. Storage failures raise `StorageError`; other OSErrors propagate unchanged.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, Exception) and (err := storage_error(e, str(path))) is not None:
            raise err from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON (with a trailing newline) via `atomic_write_bytes`."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
