"""Package caching: a second session with the same set, against pip and warm-cache uv."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Row

from sandbox_kernel import SessionManager

PACKAGES = ["pandas", "scikit-learn"]  # neither is in the sandbox's base environment


def _timed(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, **kw)
    return time.perf_counter() - t


def _new_venv(root: Path, name: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(root / name)], check=True)
    return root / name / "bin" / "python"


def bench_packages(manager: SessionManager) -> list[Row]:
    uv = manager.installer.uv
    cache = Path(manager.home) / "uv-cache"
    manager.installer.cache_dir = str(cache)
    env = {**os.environ, "UV_CACHE_DIR": str(cache)}
    env.pop("VIRTUAL_ENV", None)
    with tempfile.TemporaryDirectory(prefix="skbp-") as tmp:
        root = Path(tmp)
        pip_s = _timed([str(_new_venv(root, "pip")), "-m", "pip", "install", "-q", *PACKAGES])
        _timed([uv, "pip", "install", "-q", "--python", str(_new_venv(root, "warm")), *PACKAGES],
               env=env)  # warms uv's cache
        uv_s = _timed([uv, "pip", "install", "-q", "--python", str(_new_venv(root, "uv")),
                       *PACKAGES], env=env)
    first = manager.create(name="bench-packages-1", packages=PACKAGES)
    cold = first.last_install.timing["total"]
    second = manager.create(name="bench-packages-2", packages=PACKAGES)
    hit = second.last_install
    assert hit.cache_hit and hit.layers == first.last_install.layers
    ok = second.run("import pandas, sklearn; pandas.__version__").ok
    for s in (first, second):
        manager.close(s.id)
    if not ok:
        raise RuntimeError("the sandbox could not import the cached packages")
    ms = 1000
    label = " ".join(PACKAGES)
    return [
        Row(f"packages '{label}', 2nd session", hit.timing["total"] * ms, uv_s * ms,
            "uv pip install, new venv, warm cache", "ms", ">= 10x faster"),
        Row(f"packages '{label}', 2nd session", hit.timing["total"] * ms, pip_s * ms,
            "pip install, new venv", "ms", "-"),
        Row(f"packages '{label}', 1st session", cold * ms, uv_s * ms,
            "uv pip install, new venv, warm cache", "ms", "-"),
    ]
