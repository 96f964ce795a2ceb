"""Byte sizes as users write them ("2GiB", "512M", "1e9")."""
from __future__ import annotations

import math
import re

from .errors import UsageError

#: Larger sizes than this are certainly mistakes (1 EiB), and would overflow later arithmetic.
MAX_SIZE = 1 << 60

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: int | float | str, what: str = "size") -> int:
    """Parse a byte count: an int, or a string such as "2GiB", "1.5 GB", "4096". Units: k/M/G/T
    are powers of 1000, KiB/MiB/GiB/TiB powers of 1024. Raises UsageError (a ValueError) naming `what`."""
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a byte size, got {value!r}")
    if isinstance(value, (int, float)):
        size = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise UsageError(f"{what}: cannot parse {value!r} as a byte size (examples: 4096, 512MiB, 2GiB, 1.5GB)")
        size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if isinstance(size, float) and not math.isfinite(size):
        raise UsageError(f"{what}: {value!r} is not a finite byte size")
    if size < 0:
        raise UsageError(f"{what}: must not be negative, got {value!r}")
    if size > MAX_SIZE:
        raise UsageError(f"{what}: {value!r} is larger than 1 EiB")
    return int(size)


def format_size(n: int | float) -> str:
    """Human-readable bytes, powers of 1024."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
