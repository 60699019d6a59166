"""A Jupyter Server extension: a notebook keeps its session when it is renamed or moved.

The sandbox kernel finds a notebook's session by the notebook's path (Jupyter
Server gives it as ``JPY_SESSION_NAME``). JupyterLab asks for a name on the
first save, so most notebooks are renamed once, and a path key alone would
leave the session behind: reopened under the new name, the notebook would get
a fresh one. Jupyter Server emits an event for every rename (the contents
service's ``rename`` action, for files and directories alike); this extension
listens and moves the bindings and the ownership of the old path, and of every
notebook under it, to the new path in the registry (``Registry.rename_notebook``).
A kernel already running under the old name follows the rename (see
``SandboxKernel.binding_key``), and so do Jupyter Server's own sessions of the
moved notebooks: otherwise a notebook renamed while no document had it open (a
closed tab keeps its kernel; another client renamed it) kept its server session
at the old path, and a new notebook made there was given its running kernel,
and so its sandbox session.

Enabled by ``sandbox-kernel install`` (a ``jupyter_server_config.d`` file).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
from typing import Any

#: The contents service's event schema (jupyter_server 2.x).
CONTENTS_EVENTS = "https://events.jupyter.org/jupyter_server/contents_service/v1"
#: The file that enables this extension, under a ``jupyter_server_config.d`` directory.
CONFIG_NAME = "sandbox_kernel.json"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "sandbox_kernel.server_extension"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    root = getattr(serverapp.contents_manager, "root_dir", None)
    if not root:  # a contents manager without files on this machine: nothing to follow
        serverapp.log.info("sandbox-kernel: no root directory; renames are not followed")
        return

    async def on_contents_event(logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        if data.get("action") != "rename" or not data.get("source_path"):
            return
        old = os_path(root, data["source_path"])
        new = os_path(root, data["path"])
        try:
            await _move_server_sessions(serverapp.session_manager, data["source_path"],
                                        data["path"])
        except Exception as exc:  # a rename must never fail because of us
            serverapp.log.warning("sandbox-kernel: could not move the server sessions of %s: "
                                  "%s", data["source_path"], exc)
        try:
            moved = await asyncio.to_thread(_rename, old, new)
        except Exception as exc:  # a rename must never fail because of us
            serverapp.log.warning("sandbox-kernel: could not follow the rename of %s: %s",
                                  data["source_path"], exc)
            return
        if moved:
            serverapp.log.info("sandbox-kernel: %s renamed to %s; sessions kept: %s",
                               data["source_path"], data["path"], ", ".join(moved))

    serverapp.event_logger.add_listener(schema_id=CONTENTS_EVENTS, listener=on_contents_event)


async def _move_server_sessions(sessions: Any, old: str, new: str) -> None:
    """Jupyter Server's sessions of the notebook at API path ``old`` (or of the notebooks
    under it) now have their new path, as JupyterLab does for the documents it has open;
    a kernel restarted later is given the new path (``JPY_SESSION_NAME``)."""
    from jupyter_server.utils import ensure_async

    old, new = old.strip("/"), new.strip("/")
    for model in await ensure_async(sessions.list_sessions()):
        path = (model.get("path") or "").strip("/")
        if path == old:
            moved = {"path": new}
            if model.get("name") == posixpath.basename(old):
                moved["name"] = posixpath.basename(new)
        elif path.startswith(old + "/"):
            moved = {"path": new + path[len(old):]}
        else:
            continue
        await ensure_async(sessions.update_session(model["id"], **moved))


def os_path(root: str, api_path: str) -> str:
    """The notebook path the kernel is given (``JPY_SESSION_NAME``) for an API path."""
    from jupyter_server.utils import to_os_path

    return os.path.normpath(to_os_path(api_path, root))


def _rename(old: str, new: str) -> list[str]:
    from .paths import default_home
    from .registry import Registry

    registry_file = default_home() / "registry.db"
    if not registry_file.exists():  # no session was ever made: nothing to move
        return []
    registry = Registry(registry_file)
    try:
        return registry.rename_notebook(old, new)
    finally:
        registry.close()
