"""Helpers shared by the benchmarks: statistics and the result table."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sandbox_kernel import SessionManager
from sandbox_kernel.packages import wait_for_compilers

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    metric: str
    ours: float
    peer: float
    peer_name: str
    unit: str
    target: str
    higher_is_better: bool = False

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else float("nan")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def print_table(rows: list[Row]) -> None:
    head = ("metric", "ours", "peer", "peer is", "ratio", "target")
    lines = [head] + [
        (r.metric, f"{r.ours:.2f} {r.unit}", f"{r.peer:.2f} {r.unit}", r.peer_name,
         _ratio(r), r.target)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _ratio(row: Row) -> str:
    text = f"{row.ratio:.3g}x"
    if 0 < row.ratio < 0.5:
        text += f" ({1 / row.ratio:.0f}x {'slower' if row.higher_is_better else 'faster'})"
    return text


def save(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=2))


def close_all(manager) -> None:
    """Every session a benchmark left, paused and dead ones included."""
    for row in manager.registry.sessions(
            status=["starting", "running", "frozen", "paused", "dead"]):
        manager.close(row["id"])


@contextlib.contextmanager
def bench_manager(prefix: str, **config: Any) -> Iterator[tuple[SessionManager, Path]]:
    """A manager over a throwaway state directory, which kernels started meanwhile inherit
    (SANDBOX_KERNEL_HOME); afterwards every session is closed and the directory removed."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.environ["SANDBOX_KERNEL_HOME"] = str(home)
    manager = SessionManager(home=str(home), **config)
    try:
        yield manager, home
    finally:
        close_all(manager)
        wait_for_compilers(home / "layers")  # they would write into the removed directory
        shutil.rmtree(home, ignore_errors=True)


def report(rows: list[Row], name: str) -> None:
    """The table on stdout, the figures in bench/results/NAME.json."""
    print_table(rows)
    save(rows, RESULTS / f"{name}.json")
