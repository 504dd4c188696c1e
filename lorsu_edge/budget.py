"""Memory sizes as users write them (`--budget 8GB`) and as the planner prints them.

One rule, used everywhere (CLI help, profiles, plan output):
- `GB`, `MB`, `KB`, `TB` are SI: 10^9, 10^6, 10^3, 10^12 bytes.
- `GiB`, `MiB`, `KiB`, `TiB` are binary: 2^30, 2^20, 2^10, 2^40 bytes.
- A bare `G`, `M`, `K`, `T` is binary, like `free -h`, `docker --memory` and `ulimit` (so `7.5G` is
  7.5 GiB).
- `B` or no unit is bytes only when the number is at least 1 MiB: `--budget 8` is refused rather
  than read as eight bytes, because nobody means that.
Units are case-insensitive (`8gb` == `8GB`); a space between number and unit is allowed.
Printed sizes are always binary (`GiB`), so a printed figure can be pasted back into `--budget`.
"""

from __future__ import annotations

import math
import re

from lorsu_edge.errors import BadInputError

UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
SIZE_HELP = ("memory size: GB/MB are SI (10^9/10^6 bytes), GiB/MiB and bare G/M are binary "
             "(2^30/2^20); e.g. 8GB, 7.5GiB, 7.5G, 8000MB, 512MiB")
_MIN_BARE_BYTES = 2**20
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "--budget") -> int:
    """Bytes in `text` (see the module docstring for units). Raises BadInputError naming `what`."""
    match = _SIZE_RE.match(str(text))
    hint = f"write a size such as 8GB, 7.5GiB or 512MiB ({SIZE_HELP})"
    if not match:
        raise BadInputError(f"{what}: cannot read {text!r} as a memory size", hint=hint)
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in UNITS:
        raise BadInputError(f"{what}: unknown unit {match.group(2)!r} in {text!r}", hint=hint)
    size = number * UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise BadInputError(f"{what}: {text!r} is not a positive size", hint=hint)
    if unit in ("", "b") and size < _MIN_BARE_BYTES:
        raise BadInputError(f"{what}: {text!r} has no unit and is only {int(size)} bytes",
                            hint=f"add a unit, e.g. {match.group(1)}GB or {match.group(1)}GiB")
    return int(round(size))


def format_size(n: int | float, digits: int = 2) -> str:
    """Binary units, e.g. '2.10 GiB', '512.00 MiB' (negative sizes keep their sign)."""
    sign, n = ("-" if n < 0 else ""), abs(float(n))
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.{digits}f} {unit}"
    return f"{sign}{int(n)} B"


def budget_flag(n: int) -> str:
    """A `--budget` value of at least `n` bytes, rounded up to 0.1 GiB (or 1 MiB below 1 GiB)."""
    if n >= 2**30:
        return f"{math.ceil(n / 2**30 * 10) / 10:g}GiB"
    return f"{math.ceil(n / 2**20)}MiB"
