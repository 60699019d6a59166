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


#: Address space a Python kernel reserves beyond its data, whatever the machine:
#: the interpreter, its shared libraries and ipykernel's own threads (about 11, each
#: reserving an 8 MiB stack and, once it allocates, a 64 MiB glibc malloc arena).
#: Measured in a sandbox on 2 CPUs: 0.65 GiB at start, 1.0 GiB after ``import numpy``,
#: a matrix product and printing 16 MiB, all with under 0.15 GiB resident. Twice
#: that, for libraries that map more (SciPy, pandas, Matplotlib, PyTorch's CPU build).
ADDRESS_SPACE_BASE = 2 * 1024**3
#: Address space per CPU: thread pools are sized by the CPU count (OpenBLAS and OpenMP
#: start a thread per CPU, concurrent.futures CPUs + 4), and glibc gives threads up to
#: 8 malloc arenas of 64 MiB per CPU, 512 MiB, reserved as soon as they allocate.
ADDRESS_SPACE_PER_CPU = 512 * 1024**2


def address_space_limit(memory: int, cpus: int | None = None) -> int:
    """The RLIMIT_AS that stands in for a memory limit where no memory cgroup does.

    RLIMIT_AS counts address space, not memory: set to the memory limit itself it
    fails ordinary code long before the memory is used (a 512 MiB limit refused
    ``import numpy`` with "failed to map segment from shared object", and printing
    16 MiB raised MemoryError inside ipykernel). So it
    is set far above the limit: twice the limit (a copy and its source alive at
    once, as when a str is encoded to be sent, and buffers reserved before they
    are touched), plus what a kernel reserves whatever its data
    (:data:`ADDRESS_SPACE_BASE`) and per CPU (:data:`ADDRESS_SPACE_PER_CPU`).
    512 MiB on 2 CPUs gives 4 GiB. It stops a runaway allocation, not a session
    using somewhat more than its limit: ``info()["enforcement"]`` says so.
    """
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return 2 * memory + ADDRESS_SPACE_BASE + ADDRESS_SPACE_PER_CPU * max(1, cpus)


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
