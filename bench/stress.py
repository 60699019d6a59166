"""`make stress`: the load figures of issue 9, ours beside a plain ipykernel's from the same run.

Three loads, each checked as it runs (a wrong output or a lost variable fails the run):
- **held**: 100 sessions alive at once on this machine, at most 8 running; the
  idle ones paused (no process) or frozen (SIGSTOP, memory kept). Memory per
  idle session is measured as the unique memory (USS) of a session's processes;
  the peer is one idle plain ipykernel, which is what a session costs without pause.
- **clients**: 50 client processes, 5 on each of 10 sessions, running numbered
  cells at once; cells per second and latency percentiles. The peer is the same
  50 clients on 10 plain ipykernels through jupyter_client.
- **registry**: 1000 sessions in the registry; `sandbox-kernel list` and
  `SessionManager.list()` wall time.

Usage: python bench/stress.py [--sessions 100] [--clients 50] [--cells 40]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, bench_manager, close_all, median, percentile, report  # noqa: E402

from sandbox_kernel import SessionManager  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from load_client import run_clients  # noqa: E402

STATE = "import json, collections\nx = {i}\nrows = [dict(n=n, s=str(n)) for n in range(2000)]"
MIB = 2**20


def uss(pids: list[int]) -> float:
    """Unique memory of processes (what freeing them would give back)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().uss
    return total


def sandbox_pids(session) -> list[int]:
    state = json.loads((session.work_dir.parent / "supervisor.json").read_text())
    top = psutil.Process(state["sandbox_pid"])
    return [top.pid, *(p.pid for p in top.children(recursive=True))]


def stress_held(manager: SessionManager, count: int, running_at_most: int = 8) -> list[Row]:
    sessions, frozen_uss = [], []
    t0 = time.perf_counter()
    for i in range(count):
        s = manager.create(name=f"held{i}")
        assert s.run(STATE.format(i=i)).ok
        sessions.append(s)
        if i >= running_at_most:
            idle = sessions[i - running_at_most]
            if i % 3 == 0:
                idle.pause(mode="freeze")
                frozen_uss.append(uss(sandbox_pids(idle)))
            else:
                idle.pause()
    held_seconds = time.perf_counter() - t0
    statuses = [s.info()["status"] for s in sessions]
    assert len(statuses) == count and "dead" not in statuses, statuses
    paused = [s for s, st in zip(sessions, statuses, strict=True) if st == "paused"]
    assert all(s.usage() is None for s in paused)
    snapshot_bytes = [manager.registry.checkpoint(s.info()["checkpoint"])["manifest"]["stats"]
                      ["bytes"] for s in paused]
    for i in range(0, count, max(1, count // 10)):  # every kind comes back with its state
        out = sessions[i].run("print(x, len(rows))").stdout
        assert out == f"{i} 2000\n", (i, out)
    running_uss = [uss(sandbox_pids(s)) for s in sessions[-running_at_most:]]

    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        kc.execute_interactive(STATE.format(i=0), timeout=60)
        plain = uss([km.provisioner.process.pid])
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(f"held {count} sessions ({statuses.count('running')} running, "
          f"{statuses.count('frozen')} frozen, {statuses.count('paused')} paused) "
          f"in {held_seconds:.1f} s; a paused session's snapshot: "
          f"{median(snapshot_bytes) / 1024:.0f} KiB on disk", flush=True)
    peer = "one idle plain ipykernel (same state)"
    return [
        Row("sessions held at once (no peer: a count)", count, count, "-", "sessions",
            f">= {count}", higher_is_better=True),
        Row("memory per idle session, paused", 0.0, plain / MIB, peer, "MiB", "-"),
        Row("memory per idle session, frozen", median(frozen_uss) / MIB, plain / MIB, peer,
            "MiB", "-"),
        Row("memory per running session", median(running_uss) / MIB, plain / MIB,
            "one plain ipykernel (same state)", "MiB", "-"),
    ]


def checked(reports: list[dict]) -> list[dict]:
    wrong = [w for r in reports for w in r["wrong"]]
    assert not wrong, wrong[:5]
    return reports


def figures(reports: list[dict]) -> tuple[float, float, float]:
    """Cells per second over the whole run, p50 and p99 latency (ms)."""
    latencies = [t for r in reports for t in r["latencies"]]
    wall = max(sum(r["latencies"]) for r in reports)
    return len(latencies) / wall, percentile(latencies, 0.5) * 1000, \
        percentile(latencies, 0.99) * 1000


def stress_clients(manager: SessionManager, home: Path, clients: int, cells: int) -> list[Row]:
    from jupyter_client.manager import start_new_kernel

    n_sessions, per = max(1, clients // 5), 5
    names = [f"load{k}" for k in range(n_sessions)]
    for name in names:
        manager.create(name=name)
    ours = figures(checked(run_clients(home, names, per, cells)))
    for name in names:
        manager.close(name)
    kernels = [start_new_kernel(kernel_name="python3") for _ in range(n_sessions)]
    try:
        peer = figures(checked(run_clients(
            home, [f"plain:{km.connection_file}" for km, _ in kernels], per, cells)))
    finally:
        for km, kc in kernels:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    what = f"{clients} clients on {n_sessions} plain ipykernels"
    return [
        Row(f"{clients} clients at once: cells per second", ours[0], peer[0], what, "cells/s",
            "-", higher_is_better=True),
        Row(f"{clients} clients at once: latency p50", ours[1], peer[1], what, "ms", "-"),
        Row(f"{clients} clients at once: latency p99", ours[2], peer[2], what, "ms", "-"),
    ]


def time_list(manager: SessionManager, expected: int) -> tuple[float, float]:
    """Median wall time of `sandbox-kernel list` and of SessionManager.list()."""
    cli = str(Path(sys.executable).parent / "sandbox-kernel")
    cli_times, api_times = [], []
    for _ in range(5):
        t = time.perf_counter()
        out = subprocess.run([cli, "list"], capture_output=True, text=True, check=True).stdout
        cli_times.append(time.perf_counter() - t)
        assert len(out.splitlines()) == expected + 1, out[-300:]
        t = time.perf_counter()
        assert len(manager.list()) == expected
        api_times.append(time.perf_counter() - t)
    return median(cli_times), median(api_times)


def stress_registry(manager: SessionManager, home: Path, count: int, small: int = 10) -> list[Row]:
    """`list` with ``count`` sessions in the registry against the same with ``small``."""
    now = time.time()

    def add(first: int, last: int) -> None:
        for i in range(first, last):
            manager.registry.insert_session({
                "id": uuid.uuid4().hex[:12], "name": f"old{i}", "language": "python",
                "status": ("closed", "paused")[i % 2], "created": now - count + i,
                "last_activity": now, "timeout": 600.0, "isolation": "bwrap",
                "session_dir": str(home / "gone" / str(i)), "connection_file": "-"})

    before = len(manager.list())
    add(0, small)
    cli_small, api_small = time_list(manager, before + small)
    add(small, count)
    cli_big, api_big = time_list(manager, before + count)
    peer = f"the same with {small} sessions"
    return [
        Row(f"`sandbox-kernel list`, {count} sessions", cli_big * 1000, cli_small * 1000, peer,
            "ms", "< 1000 ms"),
        Row(f"SessionManager.list(), {count} sessions", api_big * 1000, api_small * 1000, peer,
            "ms", "-"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--cells", type=int, default=40)
    parser.add_argument("--registry", type=int, default=1000)
    args = parser.parse_args()
    with bench_manager("sks-", isolation="bwrap", max_sessions=args.sessions + 8) as (
            manager, home):
        rows = stress_held(manager, args.sessions)
        close_all(manager)  # the next load starts on an idle machine
        rows += stress_clients(manager, home, args.clients, args.cells)
        rows += stress_registry(manager, home, args.registry)
    report(rows, "stress")


if __name__ == "__main__":
    main()
