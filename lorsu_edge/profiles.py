"""Device profiles: what a target offers (memory, dtypes, 4-bit kernels), as data in `profiles/*.toml`.

Where profiles come from, later entries overriding earlier ones of the same name:
1. the built-in `profiles/` folder at the top of the repository
   (`Path(lorsu_edge.__file__).parent.parent / "profiles"`), or `lorsu_edge/profiles/` in a wheel;
2. the user's folder: `$LORSU_EDGE_HOME/profiles` if LORSU_EDGE_HOME is set, else
   `<user config dir>/lorsu-edge/profiles` (platformdirs; ~/.config/lorsu-edge/profiles on Linux).
A name is the file's stem (`jetson-orin-nano-8gb.toml` -> `jetson-orin-nano-8gb`); `--profile` also
takes a path to a .toml file. Copy a built-in file to the user folder to change e.g. its reserve.

Fields (sizes use the `--budget` syntax, see budget.py):
    title            human name, e.g. "NVIDIA Jetson Orin Nano 8GB"
    device           "cuda" or "cpu"
    total_memory     memory the OS reports (or "auto" for this machine's MemTotal)
    unified          true when CPU, GPU and OS share that memory (Jetson, CPU-only)
    reserve          kept free for the OS and the inference service that runs beside adaptation
    runtime_overhead python + torch (+ CUDA context) before any weight is loaded
    compute_dtypes   supported autocast dtypes, preferred first: "bf16", "fp16", "fp32"
    bnb_4bit         whether bitsandbytes 4-bit (and 8-bit) kernels are expected to work
    note             one line shown by `lorsu-edge profiles`
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lorsu_edge
from lorsu_edge.budget import parse_size
from lorsu_edge.errors import ProfileError, decode_utf8

log = logging.getLogger(__name__)
DTYPES = ("bf16", "fp16", "fp32")
DEVICES = ("cuda", "cpu")
_REQUIRED = ("title", "device", "total_memory", "unified", "reserve", "runtime_overhead",
             "compute_dtypes", "bnb_4bit", "note")


@dataclass(frozen=True)
class Profile:
    """One validated target. Sizes are in bytes."""

    name: str
    title: str
    device: str
    total_memory: int
    unified: bool
    reserve: int
    runtime_overhead: int
    compute_dtypes: tuple[str, ...]
    bnb_4bit: bool
    note: str
    path: str = ""

    @property
    def available(self) -> int:
        """What adaptation may use: total memory minus the reserve."""
        return self.total_memory - self.reserve

    @property
    def default_dtype(self) -> str:
        return self.compute_dtypes[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def builtin_dirs() -> list[Path]:
    """Built-in profile folders: the repository's `profiles/` (editable installs), then the copy a wheel
    installs under `<prefix>/share/lorsu-edge/profiles`."""
    pkg = Path(lorsu_edge.__file__).parent
    return [d for d in (pkg.parent / "profiles", Path(sys.prefix) / "share" / "lorsu-edge" / "profiles") if d.is_dir()]


def user_dir() -> Path:
    """`$LORSU_EDGE_HOME/profiles`, else the user config dir's `profiles` (may not exist)."""
    home = os.environ.get("LORSU_EDGE_HOME")
    if home:
        return Path(home).expanduser() / "profiles"
    import platformdirs

    return Path(platformdirs.user_config_dir("lorsu-edge")) / "profiles"


def _toml_load(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ProfileError("reading profiles on Python 3.10 needs the tomli package",
                               hint="pip install tomli") from None
    try:
        text = decode_utf8(Path(path).read_bytes(), f"profile {path}", ProfileError, hint="save the profile as UTF-8")
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profile {path}: not valid TOML ({e})", hint="fix the file's syntax") from None
    except OSError as e:
        raise ProfileError(f"profile {path}: cannot read ({e.strerror})", hint="check the path") from None


def _field_error(path: Path, field: str, problem: str) -> ProfileError:
    return ProfileError(f"profile {path.name}: field {field!r} {problem}",
                        hint=f"fix {field!r} in {path} (fields are documented in lorsu_edge/profiles.py)")


def _typed(raw: dict[str, Any], path: Path, field: str, kind: type) -> Any:
    value = raw[field]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _field_error(path, field, f"must be a {kind.__name__}, got {value!r}")
    return value


def _size(raw: dict[str, Any], path: Path, field: str) -> int:
    value = raw[field]
    if field == "total_memory" and value == "auto":
        return machine_memory()
    if not isinstance(value, str):
        raise _field_error(path, field, f"must be a size string such as \"8GiB\", got {value!r}")
    try:
        return parse_size(value, what=field)
    except Exception as e:  # noqa: BLE001 (re-raised as a profile error naming the field)
        raise _field_error(path, field, f"is not a size: {getattr(e, 'message', e)}") from None


def machine_memory() -> int:
    """Total RAM of this machine (MemTotal), for `total_memory = "auto"`."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_profile(raw: dict[str, Any], path: Path) -> Profile:
    """Validate one profile's table; a bad field raises ProfileError naming it."""
    unknown = sorted(set(raw) - set(_REQUIRED))
    if unknown:
        raise _field_error(path, unknown[0], f"is unknown (allowed: {', '.join(_REQUIRED)})")
    for name in _REQUIRED:
        if name not in raw:
            raise _field_error(path, name, "is missing")
    device = _typed(raw, path, "device", str)
    if device not in DEVICES:
        raise _field_error(path, "device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    dtypes = raw["compute_dtypes"]
    if not isinstance(dtypes, list) or not dtypes or any(d not in DTYPES for d in dtypes):
        raise _field_error(path, "compute_dtypes", f"must be a non-empty list of {', '.join(DTYPES)}, got {dtypes!r}")
    total, reserve, overhead = (_size(raw, path, f) for f in ("total_memory", "reserve", "runtime_overhead"))
    if reserve + overhead >= total:
        raise _field_error(path, "reserve", "plus runtime_overhead leaves nothing of total_memory")
    note = _typed(raw, path, "note", str)
    if "\n" in note:
        raise _field_error(path, "note", "must be one line")
    return Profile(name=path.stem, title=_typed(raw, path, "title", str), device=device,
                   total_memory=total, unified=_typed(raw, path, "unified", bool), reserve=reserve,
                   runtime_overhead=overhead, compute_dtypes=tuple(dtypes),
                   bnb_4bit=_typed(raw, path, "bnb_4bit", bool), note=note, path=str(path))


def load_profile_file(path: str | Path) -> Profile:
    """Read and validate one profile file."""
    path = Path(path)
    return parse_profile(_toml_load(path), path)


def profile_files() -> dict[str, Path]:
    """Every profile file by name; a user file overrides a built-in one of the same name."""
    found: dict[str, Path] = {}
    for folder in [*reversed(builtin_dirs()), user_dir()]:
        if folder.is_dir():
            for f in sorted(folder.glob("*.toml")):
                found[f.stem] = f
    return found


def list_profiles() -> list[Profile]:
    """All profiles (built-in and user), validated, sorted by name."""
    return [load_profile_file(p) for _, p in sorted(profile_files().items())]


def get_profile(name_or_path: str | Path) -> Profile:
    """A profile by name, or from a path to a .toml file."""
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        if not Path(text).is_file():
            raise ProfileError(f"profile file {text} does not exist", hint="check the path")
        return load_profile_file(text)
    files = profile_files()
    if text not in files:
        raise ProfileError(f"unknown profile {text!r}",
                           hint=f"choose one of {', '.join(sorted(files))} (lorsu-edge profiles), or pass a .toml path")
    return load_profile_file(files[text])


def host_profile() -> Profile:
    """The `cpu` profile (this machine's RAM): the default when no profile is given and there is no GPU."""
    return get_profile("cpu")


# Where a Jetson says what it is. Paths are parameters of `detect` so tests can fake a board.
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
MEMINFO = Path("/proc/meminfo")
MEMORY_MISMATCH = 0.15
"""A board whose memory differs from its family's profile by more than this keeps the profile but its own size."""
# Board name fragment (device-tree model, lower case) -> the shipped profiles of that module family. Several
# memory sizes share one name (AGX Orin 32/64 GB): the closest total memory among them wins.
_JETSON_BOARDS = (
    ("orin nano", ("jetson-orin-nano-8gb",)),
    ("orin nx", ("jetson-orin-nx-16gb",)),
    ("agx orin", ("jetson-agx-orin-32gb", "jetson-agx-orin-64gb")),
    ("xavier", ("jetson-agx-xavier-32gb",)),
)


@dataclass(frozen=True)
class Detection:
    """The profile chosen for this machine and why (shown by `lorsu-edge profiles`)."""

    profile: Profile
    reason: str


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().replace(b"\0", b"").decode("utf-8", "replace").strip()
    except OSError:
        return None


def jetson_board(model_file: Path = DEVICE_TREE_MODEL, release_file: Path = TEGRA_RELEASE) -> str | None:
    """The board name when this machine is a Jetson (L4T), else None.

    The device-tree model names the board ("NVIDIA Jetson Orin Nano Developer Kit"); /etc/nv_tegra_release
    exists on every L4T install even where the device tree is hidden (containers).
    """
    model = _read_text(model_file)
    if model and "jetson" in model.lower():
        return model
    release = _read_text(release_file)
    if release is not None:
        return model or f"an L4T system ({release.splitlines()[0][:60] if release else 'nv_tegra_release'})"
    return None


def mem_total(meminfo: Path = MEMINFO) -> int | None:
    """MemTotal in bytes from /proc/meminfo (None when unreadable)."""
    for line in (_read_text(meminfo) or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def jetson_profile(board: str, total: int | None) -> Detection:
    """The shipped profile of this Jetson board: by module family, then by memory."""
    low = board.lower()
    names = next((names for key, names in _JETSON_BOARDS if key in low), None)
    pool = [get_profile(n) for n in names] if names else \
        [p for p in list_profiles() if p.unified and p.device == "cuda"]
    mem = f"{total / 2**30:.1f} GiB" if total else "memory unknown"
    chosen = min(pool, key=lambda p: abs(p.total_memory - total)) if total else pool[0]
    why = "board family" if names else "closest memory among the Jetson profiles (unknown board)"
    if total and abs(chosen.total_memory - total) > MEMORY_MISMATCH * chosen.total_memory:
        # e.g. an Orin Nano 4GB: the 8 GB profile's dtypes and reserve apply, its memory does not
        chosen = replace(chosen, name=f"{chosen.name}-as-detected", total_memory=total,
                         title=f"{chosen.title} ({mem} detected)")
        why += f", total memory set to this board's {mem}"
    return Detection(chosen, f"Jetson {board!r}, {mem}: {why}")


def detect(model_file: Path = DEVICE_TREE_MODEL, release_file: Path = TEGRA_RELEASE, meminfo: Path = MEMINFO,
           cuda: bool | None = None) -> Detection:
    """The profile for the machine this runs on, and why.

    A Jetson gets its board's profile, and must have a CUDA torch: the pinned PyPI torch is CPU-only on
    aarch64, and adapting on the Jetson's CPU cores instead of its GPU would be a silent 10x slowdown, so
    that case raises ProfileError. Elsewhere: `cpu` without CUDA; the closest unified profile on another
    integrated GPU; a profile built from the properties of a discrete GPU.
    """
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    board = jetson_board(model_file, release_file)
    if board is not None:
        found = jetson_profile(board, mem_total(meminfo))
        if not cuda:
            raise ProfileError(f"this is {board} but torch {torch.__version__} sees no CUDA device",
                               hint="install JetPack's torch from NVIDIA's Jetson wheel index (README: Jetson), "
                                    "or pass --profile cpu to adapt on the CPU on purpose")
        return found
    if not cuda:
        return Detection(get_profile("cpu"), "no CUDA device")
    return _gpu_detection(torch.cuda.get_device_properties(0))


def _gpu_detection(props: Any) -> Detection:
    if getattr(props, "is_integrated", False):
        unified = [p for p in list_profiles() if p.unified and p.device == "cuda"]
        chosen = min(unified, key=lambda p: abs(p.total_memory - props.total_memory))
        return Detection(chosen, f"integrated GPU {props.name}: closest memory among unified profiles")
    dtypes = ("bf16", "fp16", "fp32") if props.major >= 8 else ("fp16", "fp32")
    return Detection(Profile(name="detected-gpu", title=f"{props.name} (detected)", device="cuda",
                             total_memory=int(props.total_memory), unified=False, reserve=parse_size("0.5GiB"),
                             runtime_overhead=parse_size("0.6GiB"), compute_dtypes=dtypes, bnb_4bit=True,
                             note="built from torch.cuda.get_device_properties; pass --profile for a tuned one"),
                     f"discrete GPU {props.name} (compute capability {props.major}.{props.minor})")


def detect_profile() -> Profile:
    """`detect().profile`, the reason logged (see `detect`)."""
    found = detect()
    log.info("profile %s: %s", found.profile.name, found.reason)
    return found.profile


def resolve(name_or_path: str | Path | Profile | None) -> Profile:
    """`--profile` as the CLI takes it: a Profile, a name, a .toml path, or None / "auto" (detect)."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    if name_or_path is None or str(name_or_path) == "auto":
        return detect_profile()
    return get_profile(name_or_path)
