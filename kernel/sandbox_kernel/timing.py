"""Seconds per stage of a run, so that every result says where its time went."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Timing(dict[str, float]):
    """A dict of stage -> seconds that also measures stages as they happen."""

    def __init__(self) -> None:
        super().__init__()
        self._t0 = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t

    def finish(self) -> Timing:
        self["total"] = time.perf_counter() - self._t0
        return self

    def summary(self) -> str:
        return "  ".join(f"{k} {_ms(v)}" for k, v in self.items())


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def install_insights(result: Any, commands: bool = False) -> list[str]:
    """What an install's figures say, and what to do about them: in the API's words, or
    with ``commands`` in those of the %session commands (a notebook's user types those)."""
    timing = result.timing
    total = timing.get("total", 0.0)
    out = []
    if not result.cache_hit and timing.get("install", 0.0) > 0.5 * total and total > 1.0:
        how = ("`%session new --packages PKG...` names this set when a session starts"
               if commands else
               "create sessions with packages=[...] or a template that names this set")
        out.append(
            f"installing took {timing['install']:.1f} s of {total:.1f} s (cache miss): the layer "
            "is cached now, so every session asking for the same set reuses it in milliseconds; "
            f"{how}"
        )
    if timing.get("resolve", 0.0) > 1.0:
        out.append(
            f"resolving took {timing['resolve']:.1f} s: pin versions (name==1.2.3) or keep the "
            "set stable so the cached resolution is reused"
        )
    if result.restart_needed:
        out.append("packages already imported changed version: " + (
            "`%session new` starts a fresh session that imports the new versions (this one "
            "keeps the old ones until its interpreter restarts)" if commands else
            "restart the session's kernel (or start a fresh session) to use the new versions"))
    return out


def run_insights(timing: dict[str, float], commands: bool = False) -> list[str]:
    """What a run's stages say: the bottleneck, with the figure it is based on; what to do
    in the API's words, or with ``commands`` as the %session command to run."""
    total = timing.get("total", 0.0)
    out = []
    resume = timing.get("resume", 0.0)
    if resume > 0.5 * total and resume > 0.3:
        how = ("`%session pause --freeze` keeps the memory, so the resume is instant, or "
               "`%session timeout SECONDS` gives the session a longer lease so it is not "
               "paused between runs" if commands else
               "pause with mode='freeze' to resume instantly (memory is kept), or give the "
               "session a longer lease with set_timeout() so it is not paused between runs")
        out.append(f"resuming the paused session took {_ms(resume)} of {_ms(total)}: {how}")
    start = timing.get("start", 0.0)
    if start > 0.5 * total and start > 0.3:
        out.append(
            f"starting the sandbox took {_ms(start)} of {_ms(total)}: a warm pool "
            "(c.SessionManager.pool_size = {'python': 1} in jupyter_sandbox_config.py) hands "
            "out started sandboxes"
        )
    return out


def transfer_insights(stats: dict[str, int], seconds: float, bytes_total: int) -> list[str]:
    """An upload's figures (its %session command's): when it was slow because its data was
    new to the store."""
    out = []
    new = stats.get("bytes_hashed", 0)
    if seconds > 1.0 and bytes_total and new > 0.5 * bytes_total:
        out.append(
            f"the upload took {_ms(seconds)}, and {100 * new / bytes_total:.0f}% of its "
            f"{bytes_total / 1024**2:.1f} MiB had to be read and hashed (cache misses): the "
            "store has it now, so the next `%session upload` of these files skips them by the "
            "stat cache, and their chunks are never stored again"
        )
    return out
