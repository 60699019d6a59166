"""Install the "Python 3 (sandbox)" and "TypeScript (sandbox)" kernelspecs, as ipykernel does."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

KERNEL_NAME = "sandbox-python"
#: Every kernelspec the package ships; the TypeScript one runs Deno in the sandbox.
KERNEL_NAMES = (KERNEL_NAME, "sandbox-typescript")
_SOURCES = Path(__file__).resolve().parents[2] / "share" / "jupyter" / "kernels"


def spec_source(name: str = KERNEL_NAME) -> Path:
    """A kernelspec shipped with the package (a data file, or the source tree's copy)."""
    if (_SOURCES / name).is_dir():
        return _SOURCES / name
    installed = Path(sys.prefix) / "share" / "jupyter" / "kernels" / name
    if installed.is_dir():
        return installed
    raise FileNotFoundError(f"the {name} kernelspec is not installed with this package")


def install(user: bool = False, prefix: str | None = None) -> list[str]:
    """Install the kernelspecs with this interpreter's absolute path; return where they went."""
    where = []
    for name in KERNEL_NAMES:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            shutil.copytree(spec_source(name), target)
            spec = json.loads((target / "kernel.json").read_text())
            spec["argv"][0] = sys.executable
            (target / "kernel.json").write_text(json.dumps(spec, indent=1))
            where.append(KernelSpecManager().install_kernel_spec(
                str(target), name, user=user, prefix=prefix))
        for logo in spec_source(KERNEL_NAME).glob("logo-*"):
            shutil.copy(logo, Path(where[-1]) / logo.name)
    return where


def enable_server_extension(user: bool = False, prefix: str | None = None) -> Path:
    """Turn on the Jupyter Server extension that keeps a renamed notebook's session
    (``server_extension``), beside the kernelspecs; return the config file written."""
    from jupyter_core.paths import SYSTEM_CONFIG_PATH, jupyter_config_dir

    from .server_extension import CONFIG_NAME

    if prefix:
        base = Path(prefix) / "etc" / "jupyter"
    elif user:
        base = Path(jupyter_config_dir())
    else:
        base = Path(SYSTEM_CONFIG_PATH[0])
    target = base / "jupyter_server_config.d" / CONFIG_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {"sandbox_kernel.server_extension": True}}},
        indent=2) + "\n")
    return target
