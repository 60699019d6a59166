"""Install the "Python 3 (sandbox)" kernelspec, the way ``ipykernel install`` does."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

KERNEL_NAME = "sandbox-python"
_SOURCE = Path(__file__).resolve().parents[2] / "share" / "jupyter" / "kernels" / KERNEL_NAME


def spec_source() -> Path:
    """The kernelspec shipped with the package (a data file, or the source tree's copy)."""
    if _SOURCE.is_dir():
        return _SOURCE
    installed = Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME
    if installed.is_dir():
        return installed
    raise FileNotFoundError(f"the {KERNEL_NAME} kernelspec is not installed with this package")


def install(user: bool = False, prefix: str | None = None) -> str:
    """Install the kernelspec with this interpreter's absolute path; return where it went."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / KERNEL_NAME
        shutil.copytree(spec_source(), target)
        spec = json.loads((target / "kernel.json").read_text())
        spec["argv"][0] = sys.executable
        (target / "kernel.json").write_text(json.dumps(spec, indent=1))
        return KernelSpecManager().install_kernel_spec(
            str(target), KERNEL_NAME, user=user, prefix=prefix
        )
