"""One load client: attaches to a session by name and runs numbered cells in it.

``python tests/load_client.py HOME SESSION CLIENT CELLS START_AT`` waits until
the wall clock reaches START_AT (so every client starts together), runs CELLS
cells that each print a number only this client and cell produce, and prints
one JSON line: the latency of each cell and every output that was not its own.
SESSION ``plain:CONNECTION_FILE`` runs the same cells on a plain ipykernel
through jupyter_client, the peer `make stress` compares with. Used by
tests/test_load.py and by `make stress`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from sandbox_kernel import SessionManager


class PlainKernel:
    """The same ``run`` over a plain ipykernel's connection file."""

    def __init__(self, connection_file: str):
        from jupyter_client import BlockingKernelClient

        self.client = BlockingKernelClient(connection_file=connection_file)
        self.client.load_connection_file()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str) -> SimpleNamespace:
        out: list[str] = []

        def hook(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])

        reply = self.client.execute_interactive(code, output_hook=hook, timeout=120)
        ok = reply["content"]["status"] == "ok"
        return SimpleNamespace(ok=ok, stdout="".join(out),
                               error=None if ok else reply["content"].get("evalue"))


def main(home: str, name: str, client: int, cells: int, start_at: float) -> dict:
    if name.startswith("plain:"):
        session = PlainKernel(name.removeprefix("plain:"))
    else:
        session = SessionManager(home=home).get(name)
    session.run("pass")  # attached before the clock starts
    time.sleep(max(0.0, start_at - time.time()))
    latencies, wrong = [], []
    for i in range(cells):
        expected = client * 100_000 + i
        t = time.perf_counter()
        result = session.run(f"print({client} * 100_000 + {i})")
        latencies.append(time.perf_counter() - t)
        if not result.ok or result.stdout != f"{expected}\n":
            wrong.append({"expected": expected, "stdout": result.stdout, "error": result.error})
    return {"client": client, "latencies": latencies, "wrong": wrong}


def run_clients(home: Path, targets: list[str], per_target: int, cells: int) -> list[dict]:
    """``per_target`` client processes on each target, started together; their reports."""
    start_at = time.time() + 5 + 0.1 * len(targets) * per_target  # time to import and attach
    procs = [subprocess.Popen([sys.executable, __file__, str(home), target,
                               str(k * per_target + j), str(cells), str(start_at)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "SANDBOX_KERNEL_HOME": str(home)})
             for k, target in enumerate(targets) for j in range(per_target)]
    reports = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        assert p.returncode == 0, out
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


if __name__ == "__main__":
    home, name, client, cells, start_at = sys.argv[1:]
    print(json.dumps(main(home, name, int(client), int(cells), float(start_at))))
