"""Seconds per stage of a run, so that every result says where its time went."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


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
