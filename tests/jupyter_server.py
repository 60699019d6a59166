"""A Jupyter Server (or JupyterLab) process for tests: started on loopback, waited for,
and stopped with everything it started."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_process(module: str, root: Path, *extra: str) -> Iterator[dict]:
    """``python -m module`` serving ``root`` with a token, its config and runtime
    directories inside ``root``; yields base URL, token, root and runtime directory."""
    runtime = root / ".runtime"
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / ".config"),
           "JUPYTER_RUNTIME_DIR": str(runtime)}
    log_path = root / "server.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--no-browser", "--allow-root", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}",
         # Deleting sends to the user's trash otherwise, which an ordinary test user lacks.
         "--FileContentsManager.delete_to_trash=False", *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{module} did not start: {log_path.read_text()}"
                                       ) from None
                time.sleep(0.3)
        yield {"base": base, "token": token, "root": root, "runtime": runtime}
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        proc.kill()
        log.close()
        shutil.rmtree(root, ignore_errors=True)
