"""Resource limits of a session: parsing, validation and sensible defaults.

Limits arrive from users as ints or strings like ``"2GiB"``; they are stored
and passed to the supervisor as plain integers so that no process needs this
module to apply them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidArgument

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

#: name -> (is a size, minimum, maximum); bounds keep a kernel able to start
#: and refuse values that can only be typos.
_BOUNDS: dict[str, tuple[bool, int, int]] = {
    "memory": (True, 128 * 1024**2, 0),  # maximum: this machine's RAM
    "processes": (False, 16, 65536),
    "file_size": (True, 1024**2, 1024**5),
    "open_files": (False, 64, 1 << 20),
    "disk": (True, 1024**2, 1024**5),
}

DEFAULT_LIMITS: dict[str, int] = {
    "memory": 4 * 1024**3,
    "processes": 256,
    "file_size": 16 * 1024**3,
    "open_files": 4096,
    "disk": 20 * 1024**3,
}


def parse_size(value: Any, what: str = "size") -> int:
    """Read ``4096``, ``"512MiB"`` or ``"1.5GB"`` as a number of bytes."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{what}: expected a number of bytes, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise InvalidArgument(
        f"{what}: {value!r} is not a size; use bytes or a unit, e.g. 512MiB or 2GiB"
    )


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def validate_limits(
    limits: Mapping[str, Any] | None, defaults: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Merge ``limits`` over ``defaults`` and check each against its bounds."""
    merged = dict(DEFAULT_LIMITS if defaults is None else defaults)
    if limits is None:
        return merged
    if not isinstance(limits, Mapping):
        raise InvalidArgument(f"limits must be a dict, got {type(limits).__name__}")
    for key, raw in limits.items():
        if key not in _BOUNDS:
            raise InvalidArgument(
                f"unknown limit {key!r}; known limits: {', '.join(sorted(_BOUNDS))}"
            )
        is_size, low, high = _BOUNDS[key]
        value = parse_size(raw, key) if is_size else _whole_number(raw, key)
        high = high or machine_memory()
        shown = format_size if is_size else str
        if value < low:
            raise InvalidArgument(
                f"limit {key}={shown(value)} is below the minimum of {shown(low)} "
                "a kernel needs to run"
            )
        if value > high:
            raise InvalidArgument(
                f"limit {key}={shown(value)} is above the maximum of {shown(high)} "
                "on this machine"
            )
        merged[key] = value
    return merged


def _whole_number(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"limit {what}: expected a whole number, got {value!r}")
    return value
