"""SessionManager: create, attach to, list and close sessions.

There is no daemon. The manager writes a session's plan into its directory,
starts the session's supervisor fully detached, records it in the registry
and returns; any process that can read the registry attaches to the session
later. Following jupyter_client, :class:`SessionManager` holds the
configuration and the async core (``_async_*``) behind blocking methods, and
:class:`AsyncSessionManager` exposes the same methods as coroutines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.connect import write_connection_file
from traitlets import Dict, Enum, Float, Instance, Unicode, default
from traitlets.config import LoggingConfigurable

from . import portal
from .artifacts import ArtifactPolicy
from .errors import (
    InvalidArgument,
    NameTaken,
    SessionClosed,
    SessionDead,
    SessionNotFound,
    StartFailed,
)
from .kernelspecs import kernel_command
from .limits import DEFAULT_LIMITS, validate_limits
from .packages import PackageInstaller, parse_requirements
from .paths import MAX_SOCKET_PATH, SessionLayout, default_home
from .registry import LIVE_STATUSES, Registry
from .sandbox import supervisor
from .sandbox.launcher import LAYERS_ENV, BwrapLauncher, SandboxLauncher
from .session import PORTS, AsyncSession, Session
from .store import ContentStore

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TAG_PATTERN = re.compile(r"^[\w.:/=+@-]{1,64}$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: Starts the supervisor with the standard library alone (-I -S): fast, and
#: immune to whatever the session's environment does to site-packages.
_SUPERVISOR_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from sandbox_kernel.sandbox.supervisor import main; sys.exit(main(sys.argv[2:]))"
)


class SessionManager(LoggingConfigurable):
    """Creates and finds sessions; configurable like any Jupyter component."""

    home = Unicode(help="The state directory: registry and session directories. "
                   "Default: $SANDBOX_KERNEL_HOME, else sandbox-kernel in Jupyter's data dir."
                   ).tag(config=True)

    @default("home")
    def _home_default(self) -> str:
        return str(default_home())

    isolation = Enum(
        ["auto", "bwrap", "process"], default_value="auto",
        help="'bwrap' confines sandboxes with bubblewrap; 'process' runs plain processes; "
        "'auto' uses bwrap where it works and warns when it falls back.",
    ).tag(config=True)
    python = Unicode(sys.executable, help="The interpreter of Python sessions.").tag(config=True)
    start_timeout = Float(60.0, help="Seconds to wait for a new kernel to answer.").tag(
        config=True)
    interrupt_grace = Float(
        10.0, help="Seconds a run that timed out gets to stop after its interrupt."
    ).tag(config=True)
    close_timeout = Float(10.0, help="Seconds to wait for a sandbox to stop on close.").tag(
        config=True)
    default_timeout = Float(600.0, help="The lease of a new session, in seconds.").tag(
        config=True)
    default_limits = Dict(
        help="Resource limits of new sessions (memory, processes, file_size, open_files); "
        "merged over the built-in defaults."
    ).tag(config=True)
    bwrap_launcher = Instance(BwrapLauncher)
    installer = Instance(PackageInstaller)
    artifact_policy = Instance(ArtifactPolicy)

    @default("artifact_policy")
    def _artifact_policy_default(self) -> ArtifactPolicy:
        return ArtifactPolicy(parent=self)

    @default("installer")
    def _installer_default(self) -> PackageInstaller:
        return PackageInstaller(Path(self.home), self.registry, parent=self)

    @default("bwrap_launcher")
    def _bwrap_launcher_default(self) -> BwrapLauncher:
        return BwrapLauncher(parent=self)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._registry: Registry | None = None
        self._store: ContentStore | None = None
        self._sessions: dict[str, AsyncSession] = {}

    # -- shared plumbing ----------------------------------------------------

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(Path(self.home) / "registry.db")
        return self._registry

    def _launcher(self) -> SandboxLauncher:
        if self.isolation != "process":
            launcher = self.bwrap_launcher
            launcher.hidden = [str(Path(self.home).resolve())]
            if launcher.available():
                return launcher
            if self.isolation == "bwrap":
                raise StartFailed(
                    "isolation='bwrap' but bubblewrap does not work here; install the Debian "
                    "package 'bubblewrap' (and allow user namespaces) or use isolation='process'"
                )
            warnings.warn(
                "bubblewrap is missing or cannot create namespaces: sessions run as plain "
                "processes, NOT isolated from the host (info()['isolation'] == 'process'). "
                "Install the Debian package 'bubblewrap' to confine them.",
                RuntimeWarning, stacklevel=3,
            )
        return SandboxLauncher(parent=self)

    def _refresh(self, session_id: str, supervisor_gone: bool = False) -> dict[str, Any]:
        """The registry row, after marking the session dead if its sandbox is gone."""
        row = self.registry.session(session_id)
        if row is None:
            raise SessionNotFound(session_id)
        if row["status"] in LIVE_STATUSES and (
            supervisor_gone or self._supervisor_pid(row) is None
        ):
            reason = self._exit_reason(row)
            if reason is not None or supervisor_gone:
                self.registry.transition(
                    session_id, "dead", allowed_from=LIVE_STATUSES,
                    reason=reason or "its supervisor process is gone",
                )
                row = self.registry.session(session_id) or row
        return row

    def _exit_reason(self, row: dict[str, Any]) -> str | None:
        """Why the sandbox ended, or None when it may still be starting."""
        try:
            return json.loads((Path(row["session_dir"]) / supervisor.EXIT_FILE).read_text())[
                "reason"]
        except (OSError, ValueError, KeyError):
            pass
        if row["supervisor_pid"] is not None:
            return "its supervisor process is gone (killed?)"
        if time.time() - row["created"] > self.start_timeout + 10:
            return "its sandbox was never started"
        return None

    def _supervisor_pid(self, row: dict[str, Any]) -> int | None:
        """The supervisor's pid if that very process (not a reused pid) is alive."""
        pid = row["supervisor_pid"]
        if pid is None:
            return None
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != row["supervisor_started"]:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return pid

    def _info(self, row: dict[str, Any]) -> dict[str, Any]:
        sdir = Path(row["session_dir"])
        enforcement = {}
        with contextlib.suppress(OSError, ValueError, KeyError):
            enforcement = json.loads((sdir / supervisor.STATE_FILE).read_text())["enforcement"]
        return {
            "id": row["id"],
            "name": row["name"],
            "language": row["language"],
            "status": row["status"],
            "reason": row["reason"],
            "isolation": row["isolation"],
            "created": row["created"],
            "last_activity": row["last_activity"],
            "timeout": row["timeout"],
            "tags": row["tags"],
            "limits": row["limits"],
            "enforcement": enforcement,
            "execution_count": row["execution_count"],
            "work_dir": str(sdir / "work"),
            "pid": row["supervisor_pid"],
            "packages": row["packages"].get("requested", []),
            "layers": row["packages"].get("layers", []),
        }

    @property
    def store(self) -> ContentStore:
        """The content-addressed store of uploads, downloads and artifacts, shared by sessions."""
        if self._store is None:
            self._store = ContentStore(Path(self.home) / "store")
        return self._store

    def _layer_dir(self, isolation: str, layer_id: str) -> str:
        """A layer's site-packages as the kernel of a sandbox of that isolation sees it."""
        launcher = self.bwrap_launcher if isolation == "bwrap" else SandboxLauncher(parent=self)
        return f"{launcher.layers_path(self.installer.layers_dir)}/{layer_id}/site-packages"

    def gc(self) -> list[str]:
        """Remove package layers no session uses, and store content nothing references."""
        removed = self.installer.gc(self.registry.layers_in_use())
        self.store.gc()
        return removed

    def _handle(self, row: dict[str, Any]) -> AsyncSession:
        session = self._sessions.get(row["id"])
        if session is None:
            session = self._sessions[row["id"]] = AsyncSession(self, row)
        return session

    # -- the async core -----------------------------------------------------

    async def _async_create(
        self,
        name: str | None = None,
        language: str = "python",
        timeout: float | None = None,
        tags: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
        limits: Mapping[str, Any] | None = None,
        wait: bool = True,
        packages: Iterable[str] | None = None,
        files: Any = None,
    ) -> AsyncSession:
        session_id = secrets.token_hex(6)
        name = session_id if name is None else _check_name(name)
        tags = _check_tags(tags)
        env = _check_env(env)
        limits = validate_limits(limits, validate_limits(self.default_limits, DEFAULT_LIMITS))
        if timeout is None:
            timeout = self.default_timeout
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
        requested = [str(r) for r in parse_requirements(packages or [],
                                                        self.installer.allow_direct_references)]
        launcher = self._launcher()
        command = kernel_command(language, self.python)
        layout = SessionLayout(Path(self.home) / "sessions" / session_id)
        if len(f"{layout.socket_prefix}-{max(PORTS.values())}") > MAX_SOCKET_PATH:
            raise InvalidArgument(
                f"the state directory {self.home!r} is too deep for unix sockets "
                f"(their paths must stay under {MAX_SOCKET_PATH} bytes); set "
                "SANDBOX_KERNEL_HOME to a shorter path"
            )
        now = time.time()
        try:
            self.registry.insert_session({
                "id": session_id, "name": name, "language": language, "status": "starting",
                "created": now, "last_activity": now, "timeout": float(timeout),
                "tags": tags, "limits": limits, "env": env, "isolation": launcher.isolation,
                "session_dir": str(layout.root), "connection_file": str(layout.connection_file),
            })
        except sqlite3.IntegrityError:
            raise NameTaken(name) from None
        try:
            layout.make()
            install = None
            if requested:
                install = await asyncio.to_thread(self.installer.install, self.python, requested)
                self.registry.update(session_id, packages={"requested": install.all_requested,
                                                           "layers": install.layers})
            env = {**env, "SANDBOX_KERNEL_SESSION": session_id,
                   "SANDBOX_KERNEL_SESSION_NAME": name}
            if install and install.layers:
                env[LAYERS_ENV] = os.pathsep.join(
                    self._layer_dir(launcher.isolation, lid) for lid in install.layers)
            plan = launcher.plan(layout, command, env, self.installer.layers_dir)
            key = str(uuid.uuid4()).encode()
            write_connection_file(str(layout.kernel / "kernel.json"), ip=plan.kernel_socket_prefix,
                                  key=key, transport="ipc", **PORTS)
            write_connection_file(str(layout.connection_file), ip=str(layout.socket_prefix),
                                  key=key, transport="ipc", **PORTS)
            supervisor.write_json_atomic(layout.root / supervisor.PLAN_FILE, {
                "session_id": session_id, "registry": str(self.registry.path),
                "argv": plan.argv, "env": plan.env, "cwd": plan.cwd, "limits": limits,
                "bwrap": plan.isolation == "bwrap",
            })
            pid, started = self._spawn_supervisor(layout.root)
            self.registry.update(session_id, supervisor_pid=pid, supervisor_started=started)
        except BaseException as exc:
            self.registry.transition(session_id, "dead", allowed_from=LIVE_STATUSES,
                                     reason=f"could not be started: {exc}")
            raise
        session = self._handle(self.registry.session(session_id) or {})
        session.last_install = install
        if files:
            try:
                session.last_upload = await asyncio.to_thread(session.upload, files)
            except BaseException as exc:
                await self._abandon(session, f"its files could not be uploaded: {exc}")
                raise
        if wait:
            try:
                await session.connection()
            except BaseException as exc:
                if isinstance(exc, StartFailed):
                    failure = exc
                else:
                    why = exc.reason if isinstance(exc, SessionDead) else str(exc)
                    failure = StartFailed(f"session {name!r} did not start: {why}")
                await self._abandon(session, str(failure))
                raise failure from exc
        return session

    async def _abandon(self, session: AsyncSession, reason: str) -> None:
        """A sandbox that failed to start: stop it, keep its files (and log) for a look."""
        self.registry.transition(session.id, "dead", allowed_from=LIVE_STATUSES, reason=reason)
        self._sessions.pop(session.id, None)
        session._detach()
        row = self.registry.session(session.id)
        pid = self._supervisor_pid(row) if row else None
        if pid is not None:
            await _stop_process(pid, self.close_timeout)

    def _spawn_supervisor(self, session_dir: Path) -> tuple[int, float]:
        package_root = str(Path(__file__).resolve().parent.parent)
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _SUPERVISOR_BOOT, package_root, str(session_dir)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, start_new_session=True,
            timeout=30,
        )
        try:
            pid = int(proc.stdout.strip())
        except ValueError:
            raise StartFailed(
                f"the supervisor did not start: {proc.stderr.strip() or proc.stdout.strip()}"
            ) from None
        try:
            started = psutil.Process(pid).create_time()
        except psutil.Error:
            started = 0.0
        return pid, started

    async def _async_get(self, key: str) -> AsyncSession:
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"a session id or name is a non-empty string, got {key!r}")
        row = self.registry.find(key)
        if row is None:
            raise SessionNotFound(key)
        row = self._refresh(row["id"])
        if row["status"] == "closed":
            raise SessionClosed(key)
        return self._handle(row)

    async def _async_list(
        self, status: str | Iterable[str] | None = None, tags: Iterable[str] | None = None
    ) -> list[AsyncSession]:
        for row in self.registry.sessions(status=LIVE_STATUSES):
            self._refresh(row["id"])
        return [self._handle(r) for r in self.registry.sessions(status=status, tags=tags)]

    async def _async_close(self, key: str) -> None:
        """Stop the sandbox and remove the session's files; the registry keeps its history."""
        row = self.registry.find(key)
        if row is None:
            raise SessionNotFound(key)
        if row["status"] == "closed":
            raise SessionClosed(key)
        self.registry.transition(row["id"], "closed", allowed_from=("starting", "running", "dead"),
                                 reason="closed by request")
        session = self._sessions.pop(row["id"], None)
        if session is not None:
            session._detach()
        pid = self._supervisor_pid(row)
        if pid is not None:
            await _stop_process(pid, self.close_timeout)
        shutil.rmtree(row["session_dir"], ignore_errors=True)

    # -- the blocking face ----------------------------------------------------

    def create(
        self,
        name: str | None = None,
        language: str = "python",
        timeout: float | None = None,
        tags: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
        limits: Mapping[str, Any] | None = None,
        wait: bool = True,
        packages: Iterable[str] | None = None,
        files: Any = None,
    ) -> Session:
        """Start a new session; with ``wait`` (default) return when its kernel answers.

        ``packages`` are requirement strings, installed with uv outside the sandbox
        (once per resolved set, then shared) before the kernel starts. ``files``
        (paths, or a {local: dest} dict) are uploaded into the work directory.
        """
        return Session(portal.call(self._async_create(
            name, language, timeout, tags, env, limits, wait, packages, files)))

    def get(self, key: str) -> Session:
        """Attach to a session by id or name, from this or any other process."""
        return Session(portal.call(self._async_get(key)))

    def list(
        self, status: str | Iterable[str] | None = None, tags: Iterable[str] | None = None
    ) -> list[Session]:
        """Sessions, oldest first, optionally only those with a status and all of ``tags``."""
        return [Session(s) for s in portal.call(self._async_list(status, tags))]

    def close(self, key: str) -> None:
        """Stop the session's sandbox and delete its files."""
        portal.call(self._async_close(key))

    def get_info(self, key: str) -> dict[str, Any]:
        """A session's info by id or name, closed sessions included."""
        row = self.registry.find(key)
        if row is None:
            raise SessionNotFound(key)
        return self._info(self._refresh(row["id"]))


class AsyncSessionManager(SessionManager):
    """The same manager with coroutine methods, for asyncio programs."""

    async def create(self, *args: Any, **kwargs: Any) -> AsyncSession:  # type: ignore[override]
        return await self._async_create(*args, **kwargs)

    async def get(self, key: str) -> AsyncSession:  # type: ignore[override]
        return await self._async_get(key)

    async def list(  # type: ignore[override]
        self, status: str | Iterable[str] | None = None, tags: Iterable[str] | None = None
    ) -> list[AsyncSession]:
        return await self._async_list(status, tags)

    async def close(self, key: str) -> None:  # type: ignore[override]
        await self._async_close(key)


async def _stop_process(pid: int, timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL: the supervisor takes its sandbox down with it."""
    import asyncio

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return
        await asyncio.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidArgument(
            f"invalid session name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _check_tags(tags: Iterable[str] | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    out = []
    for tag in tags:
        if not isinstance(tag, str) or not TAG_PATTERN.match(tag):
            raise InvalidArgument(f"invalid tag {tag!r}: 1-64 letters, digits or . : / = + @ -")
        out.append(tag)
    return sorted(set(out))


def _check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidArgument(f"env must be a dict of strings, got {type(env).__name__}")
    out = {}
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_NAME_PATTERN.match(k):
            raise InvalidArgument(f"invalid environment variable name {k!r}")
        if not isinstance(v, str) or "\0" in v:
            raise InvalidArgument(f"environment variable {k} must be a string without NUL bytes")
        out[k] = v
    return out
