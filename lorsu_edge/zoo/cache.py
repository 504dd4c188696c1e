"""Where built models live, and how a build lands there without ever looking half-done.

A model folder is only ever created by renaming a finished temp folder next to it (same
filesystem, so the rename is atomic): a crash mid-build leaves a hidden `.name.tmp-*` folder,
never a `name/` folder that looks complete.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from filelock import FileLock

from lorsu_edge.errors import BadInputError, StorageError

HOME_ENV = "LORSU_EDGE_HOME"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def models_home() -> Path:
    """Root of the model cache: `$LORSU_EDGE_HOME` if set, else the user cache dir."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("lorsu-edge"))


def model_dir(name: str) -> Path:
    """Folder of the cached model `name` (it may not exist yet)."""
    if not _NAME_RE.match(name):
        raise BadInputError(
            f"invalid model name {name!r}", hint="use letters, digits, '.', '_' or '-'"
        )
    return models_home() / name


@contextlib.contextmanager
def build_lock(dest: Path) -> Iterator[None]:
    """Hold a lock so two processes never build the same model folder at once."""
    _mkdir(dest.parent)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        yield


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `dest`; on success it replaces `dest` by rename.

    On any exception the temp folder is removed and `dest` (old or absent) is left untouched.
    """
    _mkdir(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a model folder is an ordinary folder
        yield tmp
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, dest: Path) -> None:
    # Move the old copy aside first: rename() cannot replace a non-empty directory.
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    try:
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    except OSError as exc:
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise StorageError(f"cannot move the built model into {dest}: {exc}",
                           hint="check free space and write permission") from exc
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc}",
                           hint=f"set {HOME_ENV} to a writable folder") from exc


@dataclass(frozen=True)
class CachedModel:
    """One finished model folder in the cache."""

    name: str
    path: Path
    size_bytes: int


def folder_size(path: Path) -> int:
    """Total size in bytes of the regular files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_cached() -> list[CachedModel]:
    """Finished models in the cache, sorted by name (temp and lock files are skipped)."""
    home = models_home()
    if not home.is_dir():
        return []
    return [
        CachedModel(p.name, p, folder_size(p))
        for p in sorted(home.iterdir())
        if p.is_dir() and not p.name.startswith(".")
    ]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings while assembling models from parts (e.g. "the projection heads are
    newly initialised": that is the point)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def package_version(dist: str) -> str | None:
    """Installed version of a distribution (recorded next to models built from package-shipped weights)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_complete(path: Path, marker: str) -> bool:
    """True if `path` holds a finished build: builders write `marker` last, next to config.json."""
    return (path / marker).is_file() and (path / "config.json").is_file()


def build_cached(name: str, marker: str, build: Callable[[Path], object], force: bool = False) -> Path:
    """The cached model `name`, built once: under a lock, into a temp dir renamed into place, so a crash or a
    concurrent build never leaves a half model that looks complete. Reused unless `force`."""
    dest = model_dir(name)
    with build_lock(dest):
        if is_complete(dest, marker) and not force:
            return dest
        with atomic_dir(dest) as tmp:
            build(tmp)
    return dest
