"""kishu (PyPI ``kishu``), the notebook checkpoint/checkout tool, on the same state as ours.

kishu runs inside an IPython kernel and commits the changed variables after
every cell. It pins old versions of several packages, so it gets a venv of
its own (``bench/.peers/kishu``, made with uv on first use; needs PyPI). It
is driven in its test mode (``ENV_KISHU_TEST_MODE``, ``TEST_NOTEBOOK_PATH``),
which skips talking to a Jupyter frontend, and otherwise runs as in a
notebook. The commit cost is the state cell's wall time minus the time its
own code took; checkout is timed inside the kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager

VENV = Path(__file__).resolve().parent / ".peers" / "kishu"

STATE = """
import time as _time
_t0 = _time.perf_counter()
import numpy as np
_rng = np.random.default_rng(0)
arrays = [_rng.random({n} // 8 // 4) for _ in range(4)]
objects = [{{"id": i, "name": f"item{{i}}", "tags": [i, i + 1]}} for i in range(200_000)]
small = 1
print(_time.perf_counter() - _t0)
"""


def _venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
        subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(VENV)], check=True)
        subprocess.run([uv, "pip", "install", "-q", "--python", str(python), "kishu",
                        "ipykernel", "numpy"], check=True)
    return python


def bench_kishu(nbytes: int) -> dict[str, float]:
    python = _venv()
    work = Path(tempfile.mkdtemp(prefix="skb-kishu-", dir="/tmp"))
    notebook = work / "nb.ipynb"
    notebook.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    env = {**os.environ, "TEST_NOTEBOOK_PATH": str(notebook), "ENV_KISHU_TEST_MODE": "1",
           "KISHU_PATH_ROOT": str(work / "root")}
    km = KernelManager(kernel_name="python3")
    km._kernel_spec = KernelSpec(argv=[str(python), "-m", "ipykernel_launcher", "-f",
                                       "{connection_file}"],
                                 display_name="kishu", language="python")
    km.start_kernel(env=env, cwd=str(work))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)

        def run(code: str) -> tuple[float, str]:
            out: list[str] = []
            t = time.perf_counter()
            reply = kc.execute_interactive(code, timeout=1800, output_hook=lambda m: out.append(
                m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"kishu cell failed: {reply['content'].get('evalue')}")
            return time.perf_counter() - t, "".join(out)

        run("from kishu import init_kishu; init_kishu()")
        wall, own = run(STATE.format(n=nbytes))
        commit = wall - float(own.strip())
        _, head = run("print(_kishu._kishu_branch.get_head().commit_id)")
        small_change, _ = run("small = 2")
        _, timed = run("import time as _t; _s = _t.perf_counter(); "
                       f"_kishu.checkout({head.strip()!r}); print(_t.perf_counter() - _s)")
        return {"commit": commit, "commit_after_small_change": small_change,
                "checkout": float(timed.strip().splitlines()[-1])}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        shutil.rmtree(work, ignore_errors=True)
