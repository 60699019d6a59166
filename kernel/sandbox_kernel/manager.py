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
from traitlets import Bool, Dict, Enum, Float, Instance, Int, Unicode, default
from traitlets.config import LoggingConfigurable

from . import portal
from .artifacts import ArtifactPolicy, check_tag
from .deno_packages import DenoPackages, parse_specs
from .endpoints import PORTS, write_host_connection
from .errors import (
    InvalidArgument,
    NameTaken,
    SessionBusy,
    SessionClosed,
    SessionDead,
    SessionNotFound,
    StartFailed,
    TooManySessions,
)
from .kernelspecs import DENO_LANGUAGES, deno_executable, kernel_command
from .limits import DEFAULT_LIMITS, validate_limits
from .output_limits import OutputLimits
from .packages import PackageInstaller, parse_requirements
from .paths import MAX_SOCKET_PATH, SHM_ROOT, SessionLayout, default_home
from .registry import LIVE_STATUSES, Registry, lease_clock, lease_left
from .sandbox import identity, supervisor
from .sandbox.launcher import LAYERS_ENV, BwrapLauncher, SandboxLauncher
from .session import AsyncSession, Session
from .source_builds import SourceBuilder
from .store import ContentStore
from .trust import is_trusted
from .workdir import relative_parts

# Used with fullmatch: a "^...$" pattern with match() lets "name\n" through.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

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
    store_gc_grace = Float(3600.0, help="gc keeps store content stored less than this many "
                           "seconds ago even when nothing references it: an upload, artifact "
                           "or checkpoint may be about to.").tag(config=True)
    default_timeout = Float(600.0, help="The lease of a new session, in seconds.").tag(
        config=True)
    default_on_timeout = Enum(["pause", "close"], default_value="pause",
                              help="What a session's lease expiry does by default.").tag(
        config=True)
    renew_threshold = Float(
        120.0, help="A client with keep-alive on renews the lease when fewer seconds remain."
    ).tag(config=True)
    pause_wait = Float(30.0, help="Seconds a pause or checkpoint waits for a running cell.").tag(
        config=True)
    variable_timeout = Float(
        60.0, help="Seconds one variable may take to pickle before a pause skips it (0: no bound)."
    ).tag(config=True)
    snapshot_timeout = Float(
        900.0, help="Seconds a capture, load or restore may take in the kernel before it is "
        "interrupted and the pause, checkpoint or resume fails (0: no bound)."
    ).tag(config=True)
    auto_checkpoint = Bool(
        False, help="Take a checkpoint after every cell run through the API or the kernel."
    ).tag(config=True)
    max_sessions = Int(
        64, help="Live sessions (starting, running or frozen) at most; paused ones do not count."
    ).tag(config=True)
    pool_size = Dict(
        {}, help="Warm sandboxes kept started per language, e.g. {'python': 2}, so that "
        "create() returns in milliseconds."
    ).tag(config=True)
    pool_timeout = Float(600.0, help="Seconds an unclaimed warm sandbox lives.").tag(config=True)
    default_limits = Dict(
        help="Resource limits of new sessions (memory, processes, file_size, open_files); "
        "merged over the built-in defaults."
    ).tag(config=True)
    cgroups = Bool(
        True, help="Enforce the memory and process limits with per-session cgroups where the "
        "cgroup tree is writable. Off: rlimits only, as on a host without writable cgroups "
        "(where another agent owns the tree); memory is then bounded only by an address-space "
        "limit well above it, and info()['enforcement'] says so."
    ).tag(config=True)
    bwrap_launcher = Instance(BwrapLauncher)
    installer = Instance(PackageInstaller)
    artifact_policy = Instance(ArtifactPolicy)
    output_limits = Instance(OutputLimits)

    @default("output_limits")
    def _output_limits_default(self) -> OutputLimits:
        return OutputLimits(parent=self)

    @default("artifact_policy")
    def _artifact_policy_default(self) -> ArtifactPolicy:
        return ArtifactPolicy(parent=self)

    @default("installer")
    def _installer_default(self) -> PackageInstaller:
        builder = SourceBuilder(Path(self.home), self.bwrap_launcher, parent=self)
        return PackageInstaller(Path(self.home), self.registry, parent=self, builder=builder)

    @default("bwrap_launcher")
    def _bwrap_launcher_default(self) -> BwrapLauncher:
        return BwrapLauncher(parent=self)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._registry: Registry | None = None
        self._store: ContentStore | None = None
        self._deno: DenoPackages | None = None
        self._sessions: dict[str, AsyncSession] = {}
        self._pool_starting: dict[str, int] = {}
        self._pool_tasks: set[asyncio.Task[None]] = set()

    # -- shared plumbing ----------------------------------------------------

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(Path(self.home) / "registry.db")
        return self._registry

    @property
    def deno_packages(self) -> DenoPackages:
        """npm:/jsr: packages of JavaScript and TypeScript sessions (a cache shared by all)."""
        if self._deno is None:
            self._deno = DenoPackages(Path(self.home), self.registry, parent=self)
        return self._deno

    def _kernel_command(self, language: str) -> Any:
        command = kernel_command(language, self.python)
        if language in DENO_LANGUAGES:
            env = self.deno_packages.sandbox_env()
            command.env.update(env)
            command.read_only.append(env["DENO_DIR"])
        return command

    def _parse_packages(self, language: str, packages: Iterable[str]) -> list[str]:
        if language in DENO_LANGUAGES:
            return parse_specs(list(packages))
        return [str(r) for r in parse_requirements(packages,
                                                   self.installer.allow_direct_references)]

    def _install(self, language: str, requested: list[str], have: list[str],
                 layers: list[str]) -> Any:
        """Packages for a session of ``language``: uv layers for Python, Deno's cache for JS."""
        if language in DENO_LANGUAGES:
            deno = deno_executable()
            if deno is None:
                raise StartFailed("Deno is not installed; `pip install deno`")
            return self.deno_packages.install(deno, requested, have)
        return self.installer.install(self.python, requested, have, layers)

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
        state: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((sdir / supervisor.STATE_FILE).read_text())
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
            "enforcement": state.get("enforcement", {}),
            "user": _sandbox_user(row),
            "seccomp": state.get("seccomp", {"filter": "off"}),
            "execution_count": row["execution_count"],
            "work_dir": str(sdir / "work"),
            "pid": row["supervisor_pid"],
            "packages": row["packages"].get("requested", []),
            "layers": row["packages"].get("layers", []),
            "expires_at": time.time() + lease_left(row),
            "on_timeout": row["on_timeout"],
            "parent": row["parent_id"],
            "checkpoint": row["checkpoint_id"],
            # Outputs reach frontends unfiltered (`%session trust`); see trust.py.
            "trusted": is_trusted(sdir),
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
        """Remove package layers no session uses, store content nothing references, the
        shared-memory directories of closed sessions, and session directories the registry
        does not know (a session's row is written before its directory, so such a directory
        is one whose row a crash took with it)."""
        removed = self.installer.gc(self.registry.layers_in_use())
        identity.gc_claims()
        self.store.gc(grace=self.store_gc_grace)
        if SHM_ROOT.is_dir():
            for entry in SHM_ROOT.iterdir():
                row = self.registry.session(entry.name.removesuffix(".staging"))
                if row is not None and row["status"] == "closed":
                    remove_tree(entry)
        sessions = Path(self.home) / "sessions"
        if sessions.is_dir():
            for entry in sessions.iterdir():
                if entry.is_dir() and self.registry.session(entry.name) is None:
                    remove_tree(entry)
                    removed.append(f"sessions/{entry.name}")
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
        language: str | None = None,
        timeout: float | None = None,
        tags: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
        limits: Mapping[str, Any] | None = None,
        wait: bool = True,
        packages: Iterable[str] | None = None,
        files: Any = None,
        template: str | None = None,
        on_timeout: str | None = None,
        parent_id: str | None = None,
        _pooled: bool = False,
    ) -> AsyncSession:
        recipe: dict[str, Any] = {}
        if template is not None:
            recipe = self.registry.template(template) or {}
            if not recipe:
                known = ", ".join(self.registry.templates()) or "none yet"
                raise InvalidArgument(f"no template {template!r} (templates: {known}); "
                                      "save one with save_template()")
        language = language or recipe.get("language") or "python"
        packages = [*recipe.get("packages", []), *(packages or [])]
        if env is None and recipe.get("env"):
            env = recipe["env"]
        session_id = secrets.token_hex(6)
        name = session_id if name is None else _check_name(name)
        tags = _check_tags(tags)
        env = _check_env(env)
        limits = validate_limits(limits, validate_limits(self.default_limits, DEFAULT_LIMITS))
        if timeout is None:
            timeout = self.default_timeout
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
        on_timeout = on_timeout or self.default_on_timeout
        if on_timeout not in ("pause", "close"):
            raise InvalidArgument(f"on_timeout must be 'pause' or 'close', got {on_timeout!r}")
        requested = self._parse_packages(language, packages or [])
        if not _pooled:
            self._check_capacity()  # a warm sandbox, once claimed, is live like any other
            claimed = self._claim_pooled(name, language, timeout, tags, env, limits, requested,
                                         on_timeout, parent_id)
            if claimed is not None:
                return await self._finish_create(claimed, None, files, recipe, wait)
        launcher = self._launcher()
        command = self._kernel_command(language)
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
                "on_timeout": on_timeout, "parent_id": parent_id, "pooled": int(_pooled),
            })
        except sqlite3.IntegrityError:
            raise NameTaken(name) from None
        try:
            layout.make()
            install = None
            if requested:
                install = await asyncio.to_thread(self._install, language, requested, [], [])
                self.registry.update(session_id, packages={"requested": install.all_requested,
                                                           "layers": install.layers})
            # Off the event loop: spawning the supervisor blocks for tens of milliseconds,
            # and the loop may be relaying other sessions' cells (the kernel, a pool refill).
            await asyncio.to_thread(self._write_plan, session_id, layout, launcher, command,
                                    env, limits, install.layers if install else [])
            await asyncio.to_thread(self._start_supervisor, session_id, layout)
        except BaseException as exc:
            self.registry.transition(session_id, "dead", allowed_from=LIVE_STATUSES,
                                     reason=f"could not be started: {exc}")
            raise
        session = self._handle(self.registry.session(session_id) or {})
        if not _pooled:
            self._refill_pool(language)
        return await self._finish_create(session, install, files, recipe, wait)

    async def _finish_create(self, session: AsyncSession, install: Any, files: Any,
                             recipe: dict[str, Any], wait: bool) -> AsyncSession:
        """Files, the template's files and setup, and the wait for a kernel that answers."""
        session.last_install = install
        try:
            if recipe.get("files"):
                await asyncio.to_thread(session._place_files,
                                        {f["dest"]: f for f in recipe["files"]})
            if files:
                session.last_upload = await asyncio.to_thread(session.upload, files)
        except BaseException as exc:
            await self._abandon(session, f"its files could not be uploaded: {exc}")
            raise
        if wait or recipe.get("setup"):
            try:
                await session.connection()
            except BaseException as exc:
                if isinstance(exc, StartFailed):
                    failure = exc
                else:
                    why = exc.reason if isinstance(exc, SessionDead) else str(exc)
                    failure = StartFailed(f"session {session.name!r} did not start: {why}")
                await self._abandon(session, str(failure))
                raise failure from exc
        if recipe.get("setup"):
            result = await session.run(recipe["setup"])
            if not result.ok:
                await self._abandon(session, "its template's setup code failed")
                raise StartFailed(f"session {session.name!r}: the template's setup code failed: "
                                  f"{result.error['ename']}: {result.error['evalue']}")
        return session

    def _check_capacity(self) -> None:
        live = self.registry.count_live()
        if live >= self.max_sessions:
            raise TooManySessions(
                f"{live} sessions are live, the most this manager allows (max_sessions="
                f"{self.max_sessions}); pause or close some (`sandbox-kernel list`), or raise "
                "SessionManager.max_sessions")

    # -- the warm pool --------------------------------------------------------

    def _claim_pooled(self, name: str, language: str, timeout: float, tags: list[str],
                      env: dict[str, str], limits: dict[str, Any], requested: list[str],
                      on_timeout: str, parent_id: str | None) -> AsyncSession | None:
        """A warm sandbox, if one is ready and this session needs nothing it lacks."""
        default_limits = validate_limits(self.default_limits, DEFAULT_LIMITS)
        if not self.pool_size.get(language) or env or requested or limits != default_limits:
            return None
        now = time.time()
        try:
            row = self.registry.claim_pooled(language, {
                "name": name, "tags": tags, "timeout": float(timeout), "on_timeout": on_timeout,
                "parent_id": parent_id, "created": now, "last_activity": now,
                "active_clock": lease_clock()})
        except sqlite3.IntegrityError:
            raise NameTaken(name) from None
        if row is None:
            self._refill_pool(language)
            return None
        session = self._handle(row)
        session.name, session._row = row["name"], row
        self._refill_pool(language)
        return session

    def _refill_pool(self, language: str) -> None:
        """Start warm sandboxes in the background until the pool is full again."""
        want = int(self.pool_size.get(language, 0))
        if want <= 0:
            return
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            pooled = [r for r in self.registry.sessions(status=LIVE_STATUSES, pooled=True)
                      if r["language"] == language]
            for _ in range(want - len(pooled) - self._pool_starting.get(language, 0)):
                self._pool_starting[language] = self._pool_starting.get(language, 0) + 1
                task = loop.create_task(self._start_pooled(language))
                self._pool_tasks.add(task)
                task.add_done_callback(self._pool_tasks.discard)

    async def _start_pooled(self, language: str) -> None:
        try:
            await asyncio.sleep(0.05)  # let the create that took a warm sandbox return first
            await self._async_create(name=f"pool-{secrets.token_hex(4)}", language=language,
                                     timeout=self.pool_timeout, on_timeout="close",
                                     wait=True, _pooled=True)
        except Exception as exc:  # noqa: BLE001 - the pool is an optimization; say why, go on
            self.log.warning("a warm sandbox could not be started: %s", exc)
        finally:
            self._pool_starting[language] -= 1

    async def _async_fill_pool(self, wait: bool = True) -> int:
        """Fill the pool now; with ``wait``, return when its sandboxes answer. How many are warm."""
        for language in self.pool_size:
            self._refill_pool(language)
        if wait:
            while self._pool_tasks:
                await asyncio.gather(*list(self._pool_tasks), return_exceptions=True)
        return len(self.registry.sessions(status="running", pooled=True))

    # -- resume: the same session, a new sandbox -------------------------------

    def _relaunch(self, row: dict[str, Any]) -> None:
        """Start a paused (or dead) session's sandbox again, with its packages and settings."""
        self._check_capacity()
        if row["isolation"] == "bwrap":
            launcher = self._launcher()
            if launcher.isolation != "bwrap":
                raise StartFailed(f"session {row['name']!r} was confined by bubblewrap, which "
                                  "does not work here now; it cannot be resumed unconfined")
        else:
            launcher = SandboxLauncher(parent=self)
        layout = SessionLayout(Path(row["session_dir"]))
        command = self._kernel_command(row["language"])
        if not self.registry.transition(row["id"], "starting", allowed_from=("paused", "dead"),
                                        reason="resuming"):
            raise SessionBusy(f"session {row['name']!r} changed state while it was resumed")
        try:
            self._write_plan(row["id"], layout, launcher, command, row["env"], row["limits"],
                             row["packages"].get("layers", []))
            self._start_supervisor(row["id"], layout)
            self.registry.renew(row["id"])
        except BaseException as exc:
            self.registry.transition(row["id"], row["status"], allowed_from=("starting",),
                                     reason=f"its resume failed: {exc}")
            raise

    # -- templates ---------------------------------------------------------------

    def save_template(self, name: str, language: str = "python",
                      packages: Iterable[str] | None = None, files: Any = None,
                      setup: str | None = None, env: Mapping[str, str] | None = None
                      ) -> dict[str, Any]:
        """A named recipe for new sessions: ``create(template=name)`` starts from it.

        Packages are resolved and installed now (so sessions from it start from the
        cached layer); files go into the store now, so later changes to the local
        copies do not change the template.
        """
        name = _check_name(name)
        requested = [str(r) for r in parse_requirements(
            list(packages or []), self.installer.allow_direct_references)]
        if requested:
            self.installer.install(self.python, requested)
        stored = []
        for local, dest in _file_pairs(files):
            record = self.store.ingest(local)
            self.store.add_ref(record.hash)
            stored.append({"dest": dest, "hash": record.hash, "size": record.size})
        if setup is not None and not isinstance(setup, str):
            raise InvalidArgument("setup is Python source code, a string")
        recipe = {"language": language, "packages": requested, "files": stored,
                  "setup": setup, "env": _check_env(env)}
        self._kernel_command(language)  # an unknown language fails now, not at create
        self.registry.save_template(name, recipe)
        return recipe

    def templates(self) -> dict[str, dict[str, Any]]:
        return self.registry.templates()

    async def _abandon(self, session: AsyncSession, reason: str) -> None:
        """A sandbox that failed to start: stop it, keep its files (and log) for a look."""
        self.registry.transition(session.id, "dead", allowed_from=LIVE_STATUSES, reason=reason)
        self._sessions.pop(session.id, None)
        session._detach()
        row = self.registry.session(session.id)
        pid = self._supervisor_pid(row) if row else None
        if pid is not None:
            await _stop_process(pid, self.close_timeout)

    def _write_plan(self, session_id: str, layout: SessionLayout, launcher: SandboxLauncher,
                    command: Any, env: dict[str, str], limits: dict[str, Any],
                    layers: list[str]) -> None:
        """The supervisor's launch plan and a fresh pair of connection files (a new key)."""
        row = self.registry.session(session_id) or {}
        env = {**env, "SANDBOX_KERNEL_SESSION": session_id,
               "SANDBOX_KERNEL_SESSION_NAME": row.get("name", session_id)}
        if layers:
            env[LAYERS_ENV] = os.pathsep.join(
                self._layer_dir(launcher.isolation, lid) for lid in layers)
        ident = None
        if launcher.isolation == "bwrap":
            ident = identity.claim(layout.root, session_id)
            for shared in (layout.work, layout.kernel, layout.views, layout.make_snapshots()):
                if shared is not None:
                    identity.hand_over(shared, ident)
        plan = launcher.plan(layout, command, env, self.installer.layers_dir, ident)
        key = str(uuid.uuid4()).encode()
        for stale in layout.kernel.glob("k-*"):  # sockets of a sandbox that has ended
            stale.unlink(missing_ok=True)
        layout.legacy_connection_file.unlink(missing_ok=True)
        # The kernel's copy (it needs the key), written host-side and renamed in: the name
        # in the kernel directory may be a link the last sandbox left. Clients use the
        # host's own record (see endpoints).
        staged = layout.root / ".kernel.json.tmp"
        staged.unlink(missing_ok=True)
        write_connection_file(str(staged), ip=plan.kernel_socket_prefix,
                              key=key, transport="ipc", **PORTS)
        identity.hand_over(staged, ident)
        os.replace(staged, layout.kernel / "kernel.json")
        write_host_connection(layout, key)
        supervisor.write_json_atomic(layout.root / supervisor.PLAN_FILE, {
            "session_id": session_id, "registry": str(self.registry.path),
            "argv": plan.argv, "env": plan.env, "cwd": plan.cwd, "limits": limits,
            "run_as": plan.run_as, "stage": plan.stage,
            "seccomp_file": plan.seccomp_file, "seccomp": plan.seccomp,
            "bwrap": plan.isolation == "bwrap",
            "address_space_limit": command.address_space_limit,
            "cgroups": self.cgroups,
            "on_expiry": [sys.executable, "-m", "sandbox_kernel.lease", str(self.home),
                          session_id],
        })

    def _start_supervisor(self, session_id: str, layout: SessionLayout) -> None:
        for old in (supervisor.EXIT_FILE, supervisor.STATE_FILE):
            (layout.root / old).unlink(missing_ok=True)
        pid, started = self._spawn_supervisor(layout.root)
        self.registry.update(session_id, supervisor_pid=pid, supervisor_started=started)

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
        return [self._handle(r) for r in self.registry.sessions(status=status, tags=tags,
                                                                pooled=False)]

    async def _async_close(self, key: str) -> None:
        """Stop the sandbox and remove the session's files; the registry keeps its history."""
        row = self.registry.find(key)
        if row is None:
            raise SessionNotFound(key)
        if row["status"] == "closed":
            raise SessionClosed(key)
        if not self.registry.transition(
                row["id"], "closed", allowed_from=("starting", "running", "frozen", "paused",
                                                   "dead"), reason="closed by request"):
            raise SessionClosed(key)  # by another process meanwhile: it releases the content
        session = self._sessions.pop(row["id"], None)
        if session is not None:
            session._detach()
        pid = self._supervisor_pid(row)
        if pid is not None:
            await _stop_process(pid, self.close_timeout)
        held = identity.load(Path(row["session_dir"]))
        if remove_tree(Path(row["session_dir"])):  # its uid is free once its files are gone
            identity.release(Path(row["session_dir"]), held)
        shm = SessionLayout(Path(row["session_dir"])).snapshots
        if shm is not None:
            remove_tree(shm)
            remove_tree(shm.with_name(shm.name + ".staging"))
        for checkpoint in self.registry.checkpoints(row["id"]):  # their content may be gc'd now
            manifest = checkpoint["manifest"]
            for v in manifest["variables"].values():
                for _, digest, _ in v["files"]:
                    self.store.release(digest)
            for f in (manifest.get("files") or {}).values():
                self.store.release(f["hash"])
        # Artifacts (but those tagged to outlive the session) and uploads, likewise.
        for digest in self.registry.release_artifacts(row["id"], self.artifact_policy.keep_tag):
            self.store.release(digest)
        for digest in self.registry.forget_session_files(row["id"]):
            self.store.release(digest)

    # -- the blocking face ----------------------------------------------------

    def create(
        self,
        name: str | None = None,
        language: str | None = None,
        timeout: float | None = None,
        tags: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
        limits: Mapping[str, Any] | None = None,
        wait: bool = True,
        packages: Iterable[str] | None = None,
        files: Any = None,
        template: str | None = None,
        on_timeout: str | None = None,
    ) -> Session:
        """Start a new session; with ``wait`` (default) return when its kernel answers.

        ``language`` is "python" unless a template says otherwise. ``packages``
        are requirement strings, installed with uv outside the sandbox (once per
        resolved set, then shared) before the kernel starts. ``files`` (paths, or
        a {local: dest} dict) are uploaded into the work directory.
        ``template`` starts from a saved recipe (see save_template). The lease
        is ``timeout`` seconds (renewed by activity); on expiry ``on_timeout``
        ("pause" or "close") applies, enforced even when no client is alive.
        """
        return Session(portal.call(self._async_create(
            name, language, timeout, tags, env, limits, wait, packages, files, template,
            on_timeout)))

    def fill_pool(self, wait: bool = True) -> int:
        """Start the warm sandboxes ``pool_size`` asks for; the number ready."""
        return portal.call(self._async_fill_pool(wait))

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

    def get_history(self, key: str) -> list[dict[str, Any]]:
        """A session's recorded runs by id or name, closed sessions included."""
        row = self.registry.find(key)
        if row is None:
            raise SessionNotFound(key)
        return self.registry.executions(row["id"])

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


def remove_tree(path: Path) -> bool:
    """Remove a session's directory tree, whatever the sandbox made of it; True when it is
    gone. coreutils' rm walks by descriptors and never follows a link; shutil.rmtree
    (Python 3.11) recurses, and a chain of 1,500 directories raised RecursionError out of
    close() and every later gc(). Called once the session's sandbox has stopped."""
    if not os.path.lexists(path):
        return True
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)],
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=600, check=False)
    return not os.path.lexists(path)


def _sandbox_user(row: dict[str, Any]) -> dict[str, Any]:
    """Which host user the session's sandbox runs as (see sandbox.identity)."""
    ident = identity.load(Path(row["session_dir"]))
    if ident is not None:
        return ident.describe()
    if row["isolation"] != "bwrap":
        return {"uid": os.getuid(), "gid": os.getgid(), "separate": False,
                "note": "a plain process of the manager's own user (no isolation)"}
    return {"uid": None, "gid": None, "separate": False,
            "note": "not recorded: started by an older version; it gets a uid of its own "
            "when it is next resumed"}


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


def _file_pairs(files: Any) -> list[tuple[Path, str]]:
    """(local file, destination) pairs from a path, a list of paths or a {local: dest} dict."""
    if not files:
        return []
    if isinstance(files, dict):
        pairs = list(files.items())
    else:
        pairs = [(f, None) for f in ([files] if isinstance(files, str | os.PathLike) else files)]
    out = []
    for local, dest in pairs:
        path = Path(local).expanduser().absolute()
        if not path.is_file():
            raise InvalidArgument(f"template files must be regular files; {path} is not")
        out.append((path, "/".join(relative_parts(dest or path.name, "destination"))))
    return out


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
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
    return sorted({check_tag(tag) for tag in tags})


def _check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidArgument(f"env must be a dict of strings, got {type(env).__name__}")
    out = {}
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_NAME_PATTERN.fullmatch(k):
            raise InvalidArgument(f"invalid environment variable name {k!r}")
        if not isinstance(v, str) or "\0" in v:
            raise InvalidArgument(f"environment variable {k} must be a string without NUL bytes")
        out[k] = v
    return out
