"""Session create time and run("1+1") round trip, against plain ipykernel via jupyter_client."""

from __future__ import annotations

import time
from pathlib import Path

from common import Row, median, percentile
from jupyter_client.manager import KernelManager, start_new_kernel

from sandbox_kernel import SessionManager


def _plain_kernel_ready() -> float:
    """A plain ipykernel started by KernelManager, until it answers kernel_info."""
    t = time.perf_counter()
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        while True:
            kc.kernel_info()
            try:
                kc.get_shell_msg(timeout=0.5)
                return time.perf_counter() - t
            except Exception:
                continue
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _start_new_kernel() -> float:
    t = time.perf_counter()
    km, kc = start_new_kernel(kernel_name="python3")
    elapsed = time.perf_counter() - t
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    return elapsed


def bench_create(manager: SessionManager, rounds: int) -> list[Row]:
    ours, plain, standard = [], [], []
    for i in range(rounds):
        t = time.perf_counter()
        s = manager.create(name=f"bench-create-{i}")
        ours.append(time.perf_counter() - t)
        manager.close(s.id)
        plain.append(_plain_kernel_ready())
        standard.append(_start_new_kernel())
    return [
        Row("cold create, median", median(ours), median(plain),
            "plain ipykernel until kernel_info answers", "s", "<= 1.2x"),
        Row("cold create, median", median(ours), median(standard),
            "jupyter_client.start_new_kernel", "s", "<= 1.2x"),
    ]


def bench_run(manager: SessionManager, rounds: int) -> list[Row]:
    session = manager.create(name="bench-run")
    km, kc = start_new_kernel(kernel_name="python3")
    ours, peer = [], []
    try:
        for _ in range(10):  # warm both
            session.run("1+1")
            kc.execute_interactive("1+1", output_hook=lambda m: None)
        for _ in range(rounds // 20):
            for _ in range(20):
                t = time.perf_counter()
                session.run("1+1")
                ours.append(time.perf_counter() - t)
            for _ in range(20):
                t = time.perf_counter()
                kc.execute_interactive("1+1", output_hook=lambda m: None)
                peer.append(time.perf_counter() - t)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        manager.close(session.id)
    ms = 1000
    p50, peer50 = percentile(ours, 0.5) * ms, percentile(peer, 0.5) * ms
    return [
        Row("run('1+1') p50", p50, peer50, "execute_interactive, plain ipykernel", "ms",
            "<= +1 ms"),
        Row("run('1+1') p99", percentile(ours, 0.99) * ms, percentile(peer, 0.99) * ms,
            "execute_interactive, plain ipykernel", "ms", "-"),
    ]


def bench_kernel_cell(rounds: int) -> list[Row]:
    """Per-cell overhead of the sandbox kernel: the same client and cell on a plain ipykernel."""
    import os

    repo_share = str(Path(__file__).resolve().parent.parent / "share" / "jupyter")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [repo_share, *filter(None, [os.environ.get("JUPYTER_PATH")])])
    sandbox_km, sandbox_kc = start_new_kernel(kernel_name="sandbox-python")
    plain_km, plain_kc = start_new_kernel(kernel_name="python3")
    ours, peer = [], []

    def cell(kc) -> float:
        t = time.perf_counter()
        kc.execute_interactive("1+1", output_hook=lambda m: None, timeout=60)
        return time.perf_counter() - t

    try:
        for _ in range(10):
            cell(sandbox_kc)
            cell(plain_kc)
        for _ in range(rounds // 20):
            ours += [cell(sandbox_kc) for _ in range(20)]
            peer += [cell(plain_kc) for _ in range(20)]
    finally:
        for km, kc in ((sandbox_km, sandbox_kc), (plain_km, plain_kc)):
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    ms = 1000
    return [
        Row("kernel cell '1+1' p50", percentile(ours, 0.5) * ms, percentile(peer, 0.5) * ms,
            "same client, plain ipykernel", "ms", "<= +1 ms"),
        Row("kernel cell '1+1' p99", percentile(ours, 0.99) * ms, percentile(peer, 0.99) * ms,
            "same client, plain ipykernel", "ms", "-"),
    ]
