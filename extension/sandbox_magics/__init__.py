"""The sandbox-kernel IPython extension: ``%load_ext sandbox_magics``.

Adds ``%session`` (manage sandbox sessions: new, use, list, pause, upload,
checkpoint, dashboard, ...) and ``%%session`` (run a cell in a session) to any
IPython: a notebook's kernel, a terminal, nbconvert.
"""

from __future__ import annotations

from typing import Any

from .magics import SessionMagics

__all__ = ["SessionMagics", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(SessionMagics)


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.registry.get("SessionMagics")
    if magics is not None and magics.last_view is not None and hasattr(magics.last_view, "stop"):
        magics.last_view.stop()
