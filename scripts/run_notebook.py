"""The main job: run a notebook through the sandbox kernel, restarting the kernel where asked.

Cells tagged ``after-restart`` run after a real kernel restart, which shows
that the session, and every variable in it, outlives the kernel. The
executed notebook is written next to the original as ``*.out.ipynb``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_core.utils import run_sync
from nbclient import NotebookClient
from traitlets.config import Config


def run(path: Path) -> Path:
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="sk-demo-") as sockets:
        # Unix sockets in a private directory, not TCP ports: ipykernel warns (rightly) that
        # a kernel on TCP without CurveZMQ keys sends code and outputs in plain text, and
        # this client and its kernel are on one machine, where a socket file needs no port.
        config = Config({"KernelManager": {"transport": "ipc",
                                           "ip": str(Path(sockets) / "kernel")}})
        client = NotebookClient(nb, kernel_name="sandbox-python", timeout=300, config=config,
                                resources={"metadata": {"path": str(path.parent)}})
        _execute(client, nb, path)
    out_path = path.with_suffix(".out.ipynb")
    nbformat.write(nb, out_path)
    return out_path


def _execute(client: NotebookClient, nb: nbformat.NotebookNode, path: Path) -> None:
    env = {**os.environ, "JPY_SESSION_NAME": str(path.resolve())}
    with client.setup_kernel(env=env):
        for index, cell in enumerate(nb.cells):
            if "after-restart" in cell.metadata.get("tags", []):
                print("restarting the kernel; the session stays", flush=True)
                run_sync(client.km.restart_kernel)()
                run_sync(client.kc.wait_for_ready)(timeout=120)
            client.execute_cell(cell, index)
            for out in cell.get("outputs", []):
                text = out.get("text") or out.get("data", {}).get("text/plain")
                if text:
                    print(text.rstrip())
                elif out.get("output_type") == "display_data":
                    print(f"[{', '.join(out['data'])}]")
        run_sync(client.km.shutdown_kernel)()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebook", nargs="?", default="notebooks/quickstart.ipynb", type=Path)
    args = parser.parse_args()
    out = run(args.notebook)
    print(f"executed {args.notebook} -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
