"""`make demo`'s job, run as the Makefile runs it: scripts/run_notebook.py on the quickstart."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, needs_bwrap


@needs_bwrap
def test_demo_runs_the_quickstart_and_prints_no_warning(home: Path, tmp_path: Path) -> None:
    """The demo's output is the notebook's, and nothing else: no kernel warning (ipykernel's
    "running over TCP without encryption" was printed twice, once per kernel start)."""
    notebook = tmp_path / "quickstart.ipynb"
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", notebook)
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebook.py"),
                           str(notebook)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "restarting the kernel; the session stays" in done.stdout
    assert "still has 10000 samples" in done.stdout, done.stdout
    assert "WARNING" not in done.stderr and "without encryption" not in done.stderr, done.stderr
    assert done.stderr.strip() == f"executed {notebook} -> {tmp_path / 'quickstart.out.ipynb'}"
    assert not list(tmp_path.glob("kernel-ipc*")), "no socket files left beside the notebook"
