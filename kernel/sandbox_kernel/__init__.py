"""Persistent sandbox sessions for Jupyter.

The package root stays import-light on purpose: the detached supervisor that
watches every sandbox imports submodules of it with the standard library
alone, and must start in milliseconds. Public names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncSessionManager": "sandbox_kernel.manager",
    "SessionManager": "sandbox_kernel.manager",
    "AsyncSession": "sandbox_kernel.session",
    "Session": "sandbox_kernel.session",
    "ExecutionResult": "sandbox_kernel.result",
    "SandboxError": "sandbox_kernel.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox_kernel' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
