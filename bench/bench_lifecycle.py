"""Pause, resume and checkpoints of ~1 GiB of state, against dill; warm-pool create.

The same state is built in our sandbox and in a plain Python process: NumPy
arrays (random, so nothing compresses) plus a list of small Python objects.
dill.dump_session / load_session is what a notebook user would reach for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_core import _start_new_kernel
from bench_kishu import bench_kishu
from common import Row, close_all, median

from sandbox_kernel import SessionManager

STATE = """
import numpy as np
_rng = np.random.default_rng(0)
arrays = [_rng.random({n} // 8 // 4) for _ in range(4)]
objects = [{{"id": i, "name": f"item{{i}}", "tags": [i, i + 1]}} for i in range(200_000)]
small = 1
"""

DILL = """
import json, sys, time
import dill
{state}
t = time.perf_counter()
dill.dump_session(sys.argv[1])
dump = time.perf_counter() - t
small = 2
t = time.perf_counter()
dill.dump_session(sys.argv[1] + ".2")
dump2 = time.perf_counter() - t
print(json.dumps({{"dump": dump, "dump_after_small_change": dump2}}))
"""

DILL_LOAD = """
import json, sys, time
import dill
t = time.perf_counter()
dill.load_session(sys.argv[1])
print(json.dumps({"load": time.perf_counter() - t, "ok": len(arrays) == 4}))
"""


def _dill(nbytes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        path = f"{d}/session.pkl"
        out = subprocess.run([sys.executable, "-c", DILL.format(state=STATE.format(n=nbytes)),
                              path], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)
        os.sync()  # as for ours: the dump is on disk before the load is timed
        out = subprocess.run([sys.executable, "-c", DILL_LOAD, path], capture_output=True,
                             text=True, check=True)
        result |= json.loads(out.stdout)
    return result


def bench_lifecycle(manager: SessionManager, nbytes: int, kishu: bool = True) -> list[Row]:
    gib = nbytes / 1024**3
    s = manager.create(name="bench-lifecycle", limits={"memory": "8GiB"})
    assert s.run(STATE.format(n=nbytes)).ok
    t = time.perf_counter()
    paused = s.pause()
    pause = time.perf_counter() - t
    # A session is resumed minutes after its pause, not while the disk still writes the
    # pause's data back; on this VM that writeback slows the next second of I/O severalfold.
    os.sync()
    t = time.perf_counter()
    report = s.resume()
    resume = time.perf_counter() - t
    assert not report.lost, report
    first = s.checkpoint()
    s.run("small = 2")
    t = time.perf_counter()
    second = s.checkpoint()
    checkpoint = time.perf_counter() - t
    manager.close(s.id)
    peer = _dill(nbytes)
    assert peer["ok"]
    rows = [
        Row(f"pause, {gib:.2g} GiB of arrays + 200k objects", pause, peer["dump"],
            "dill.dump_session", "s", ">= 3x faster"),
        Row(f"resume (new sandbox + restore), {gib:.2g} GiB", resume, peer["load"],
            "dill.load_session (no process start)", "s", "<= 1 s per GiB"),
        Row("checkpoint after a cell changed one small variable", checkpoint,
            peer["dump_after_small_change"], "dill.dump_session again", "s", "-"),
        Row("  new chunks written by that checkpoint", second.stats["chunks_new"],
            first.stats["chunks_new"] + first.stats["chunks_reused"],
            "all chunks of the state (a copy without dedup)", "chunks",
            "0 for the unchanged arrays"),
    ]
    if kishu:
        k = bench_kishu(nbytes)
        rows[1:1] = [Row("pause (a checkpoint of the whole state)", pause, k["commit"],
                         "kishu commit after the cell", "s", "-")]
        rows[3:3] = [Row("resume", resume, k["checkout"], "kishu checkout (in the kernel)",
                         "s", "-")]
        rows.insert(5, Row("checkpoint after a small change", checkpoint,
                           k["commit_after_small_change"], "kishu's cell + commit", "s", "-"))
    print(f"pause stats: {paused['timing']}; checkpoint stats: {second.stats}", file=sys.stderr)
    return rows


def bench_pool(home: Path, rounds: int) -> list[Row]:
    manager = SessionManager(home=str(home), pool_size={"python": 1})
    ours = []
    try:
        for i in range(rounds):
            manager.fill_pool(wait=True)
            t = time.perf_counter()
            s = manager.create(name=f"bench-pool-{i}")
            ours.append(time.perf_counter() - t)
            assert s.run("1").ok
            manager.close(s.id)
    finally:
        manager.pool_size = {}  # no more refills; wait for the one the last create began
        manager.fill_pool(wait=True)
        close_all(manager)
    plain = [_start_new_kernel() for _ in range(3)]
    return [Row("warm-pool create, p50", median(ours) * 1000, median(plain) * 1000,
                "jupyter_client.start_new_kernel", "ms", "<= 30 ms")]
