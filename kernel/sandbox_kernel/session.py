"""A session: one sandboxed kernel, reachable from any process that can read the registry.

:class:`AsyncSession` is the core; :class:`Session` is its blocking face. A
session object is a cheap handle: it connects to the kernel on first use
("attach"), and watches the sandbox's supervisor with a pidfd so that a
sandbox that dies fails waiting requests at once instead of leaving them to
hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import portal
from .artifacts import Artifact, ArtifactRecorder
from .connection import ConnectionLost, KernelConnection, MessageHook
from .endpoints import connection_info, link_sockets, sockets_bound
from .errors import (
    ConnectionDropped,
    ExecutionTimeout,
    InvalidArgument,
    SandboxError,
    SessionBusy,
    SessionClosed,
    SessionDead,
    StartFailed,
    StateDirFull,
)
from .kernelspecs import DENO_LANGUAGES
from .lifecycle import SUSPENDED_MARK, Checkpoint, LifecycleMixin, ResumeReport
from .limits import format_size
from .output_limits import KeptOutputs
from .packages import InstallResult
from .paths import SessionLayout
from .registry import lease_left
from .result import ExecutionResult, output_from_message
from .sandbox import identity
from .timing import Timing
from .transfer import DownloadGroup, UploadCommit, upload_paths

if TYPE_CHECKING:
    from .manager import SessionManager

OutputHook = Callable[[dict[str, Any]], None]
StdinHook = Callable[[str, bool], "str | Awaitable[str]"]
#: Seconds a dropped connection waits for the supervisor to say the kernel ended.
_LOST_GRACE = 3.0

#: Runs in the sandbox's kernel to load new package layers; PATHS and PINS are filled in.
_ACTIVATE = """
def _sandbox_kernel_activate(paths, pins):
    import importlib, importlib.metadata as md, json, re, site, sys
    def canon(name):
        return re.sub(r"[-_.]+", "-", name).lower()
    before = {}
    for name in pins:
        try:
            before[name] = md.version(name)
        except md.PackageNotFoundError:
            before[name] = None
    for path in paths:
        if path not in sys.path:
            site.addsitedir(path)
            sys.path.remove(path)
            sys.path.insert(0, path)
    importlib.invalidate_caches()
    owners = md.packages_distributions()
    stale = set()
    for module in {m.split(".")[0] for m in list(sys.modules)}:
        for dist in owners.get(module, []):
            name = canon(dist)
            if name in pins and before.get(name) and before[name] != pins[name]:
                stale.add(f"{name} {before[name]} -> {pins[name]}")
    print(json.dumps(sorted(stale)))
_sandbox_kernel_activate(PATHS, PINS)
del _sandbox_kernel_activate
"""

class _PauseInProgress(SessionBusy):
    """Another client holds the session still (pausing it); a run waits, then resumes it."""


class AsyncSession(LifecycleMixin):
    def __init__(self, manager: SessionManager, row: dict[str, Any]):
        self.manager = manager
        self.id: str = row["id"]
        self.name: str = row["name"]
        self.language: str = row["language"]
        self._row = row
        self._conn: KernelConnection | None = None
        self._attach_lock = asyncio.Lock()
        self._watch_fd: int | None = None
        self._gone: BaseException | None = None
        self._opening: KernelConnection | None = None
        self._install_lock = asyncio.Lock()
        self._recorder: ArtifactRecorder | None = None
        #: The outcome of the last install (or of create's packages).
        self.last_install: InstallResult | None = None
        #: The manifest of the files given to create().
        self.last_upload: dict[str, Any] | None = None
        #: Called with (channel, message) for kernel messages no request of ours claims.
        self.on_unrouted: Callable[[str, dict[str, Any]], None] | None = None
        #: What the last resume brought back (and what it could not).
        self.last_resume: ResumeReport | None = None
        self._busy_fd: int | None = None
        self._inflight = 0
        self._keep_alive = False
        self._lease_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        #: Checked before every cell (see ready()): built once.
        self._suspended_mark = str(Path(row["session_dir"]) / SUSPENDED_MARK)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} id={self.id}>"

    # -- state --------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the registry knows of this session, checked against the living processes."""
        return self.manager._info(self.manager._refresh(self.id))

    @property
    def status(self) -> str:
        return self.manager._refresh(self.id)["status"]

    @property
    def work_dir(self) -> Path:
        return Path(self._row["session_dir"]) / "work"

    def executions(self) -> list[dict[str, Any]]:
        """Every recorded run of this session, oldest first."""
        return self.manager.registry.executions(self.id)

    # -- running code -------------------------------------------------------

    async def run(
        self,
        code: str,
        timeout: float | None = None,
        on_output: OutputHook | None = None,
        on_stdin: StdinHook | None = None,
    ) -> ExecutionResult:
        """Run ``code`` in the session's kernel and collect what it produced.

        ``on_output`` receives each output (nbformat-shaped dict) as it
        arrives. ``on_stdin(prompt, password)`` answers ``input()``; without
        it, ``input()`` raises in the sandbox. On ``timeout`` the kernel is
        interrupted and :class:`ExecutionTimeout` carries the partial result.
        """
        content = {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": on_stdin is not None, "stop_on_error": True,
        }
        _, result = await self.execute(content, timeout=timeout, on_output=on_output,
                                       on_stdin=on_stdin)
        return result

    async def execute(
        self,
        content: dict[str, Any],
        *,
        timeout: float | None = None,
        on_output: OutputHook | None = None,
        on_stdin: StdinHook | None = None,
        on_message: MessageHook | None = None,
        metadata: dict[str, Any] | None = None,
        record_later: bool = False,
        record: bool = True,
        msg_id: str | None = None,
        gate: bool = True,
    ) -> tuple[dict[str, Any], ExecutionResult]:
        """Send an execute_request as given; return the raw reply and the result.

        The kernel proxy uses this to pass a frontend's request through
        unchanged and to see every raw message (``on_message``) as it arrives;
        with ``record_later`` the registry write happens after the caller has
        sent its reply, off the cell's critical path. A paused or frozen session
        is resumed first; ``gate=False`` (our own code during a pause or
        resume) skips that and the busy lock.
        """
        timing = Timing()
        while True:
            if gate:
                await self._wake(timing)
            await self._ensure_attached(timing)
            try:
                pending = self.start_execute(content, on_output=on_output, on_stdin=on_stdin,
                                             on_message=on_message, metadata=metadata,
                                             timing=timing, msg_id=msg_id, gate=gate)
                break
            except _PauseInProgress:  # wait it out; the run then resumes the session
                await asyncio.sleep(0.01)
        pending.record = record
        return await pending.finish(timeout, record_later)

    def start_execute(
        self,
        content: dict[str, Any],
        *,
        on_output: OutputHook | None = None,
        on_stdin: StdinHook | None = None,
        on_message: MessageHook | None = None,
        metadata: dict[str, Any] | None = None,
        timing: Timing | None = None,
        msg_id: str | None = None,
        gate: bool = True,
    ) -> PendingExecution:
        """Send the request now, synchronously (the session must be attached).

        Lets the kernel proxy start the sandbox's work the moment a request
        arrives and do its own bookkeeping meanwhile; ``finish()`` awaits it.
        ``msg_id`` reuses a frontend's id, so that output arriving after the
        request is done (from threads) still names the frontend's request.
        """
        if self._conn is None:
            raise RuntimeError("start_execute needs an attached session; use execute()")
        if gate:
            self._begin_run()
        pending = PendingExecution(self, content, timing or Timing(), on_output, on_message)
        try:
            pending.future = self._conn.send("shell", "execute_request", content,
                                             on_message=pending.collect, on_stdin=on_stdin,
                                             metadata=metadata,
                                             header={"msg_id": msg_id} if msg_id else None)
        except BaseException:
            if gate:
                self._end_run()
            raise
        if gate:
            pending.future.add_done_callback(self._end_run)
        return pending

    def ready(self) -> bool:
        """Attached and neither paused nor frozen: a cell can be sent at once."""
        return self._conn is not None and not os.path.exists(self._suspended_mark)

    def _begin_run(self) -> None:
        """Hold the shared busy lock while cells run, so that a pause waits for them."""
        if self._inflight == 0:
            if self._busy_fd is None:
                self._busy_fd = os.open(Path(self._row["session_dir"]) / "busy.lock",
                                        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(self._busy_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _PauseInProgress(f"session {self.name!r} is being paused") from None
        self._inflight += 1

    def _end_run(self, _done: Any = None) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._busy_fd is not None:
            fcntl.flock(self._busy_fd, fcntl.LOCK_UN)

    async def _wake(self, timing: Timing | None = None) -> None:
        """Resume a paused or frozen session before using it."""
        if self.ready():
            return
        row = self.manager._refresh(self.id)
        if row["status"] in ("paused", "frozen"):
            await self.resume(timing=timing)

    async def request(
        self, msg_type: str, content: dict[str, Any], timeout: float | None = 60
    ) -> dict[str, Any]:
        """Any other shell request (complete, inspect, history, comm_info…): its reply."""
        await self._wake()
        conn = await self._ensure_attached(Timing())
        return await self._wait(conn.send("shell", msg_type, content), timeout)

    async def connection(self) -> KernelConnection:
        """The attached connection, for relaying messages that expect no reply."""
        await self._wake()
        return await self._ensure_attached(Timing())

    async def install(self, packages: Iterable[str]) -> InstallResult:
        """Install packages (with uv, outside the sandbox) and make them importable now.

        The set is resolved together with what the session has; only what is
        new is installed, as a layer shared with every session that needs the
        same pins. The running kernel picks the layer up without a restart
        (its import caches are invalidated); when a package it already
        imported changed version, ``restart_needed`` names it. On failure the
        session keeps the packages it had.
        """
        async with self._install_lock:
            row = self.manager._refresh(self.id)
            if row["status"] == "closed":
                raise SessionClosed(self.name)
            current = row["packages"]
            requested = self.manager._parse_packages(row["language"], list(packages))
            result = await asyncio.to_thread(
                self.manager._install, row["language"], requested,
                current.get("requested", []), current.get("layers", []))
            self.manager.registry.update(self.id, packages={"requested": result.all_requested,
                                                            "layers": result.layers})
            new_layers = result.layers[len(current.get("layers", [])):]
            if new_layers and row["status"] in ("starting", "running"):
                t = time.perf_counter()
                result.restart_needed = await self._activate(row, new_layers,
                                                             result.new_packages)
                result.timing["activate"] = time.perf_counter() - t
                result.timing["total"] += result.timing["activate"]
            self.last_install = result
            return result

    async def _activate(self, row: dict[str, Any], layers: list[str],
                        pins: dict[str, str]) -> list[str]:
        """Put new layers on the running kernel's sys.path; name imported packages now stale."""
        paths = [self.manager._layer_dir(row["isolation"], lid) for lid in layers]
        code = _ACTIVATE.replace("PATHS", repr(paths)).replace("PINS", repr(pins))
        _, result = await self.execute(
            {"code": code, "silent": True, "store_history": False, "user_expressions": {},
             "allow_stdin": False, "stop_on_error": False}, record=False)
        if not result.ok:
            raise SandboxError(f"the kernel could not load the new packages: {result.error}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    # -- files ----------------------------------------------------------------

    def upload_commit(self) -> UploadCommit:
        """A batch of uploads: add() files, poll get_progress(), commit() for the manifest."""
        self._check_usable()
        return UploadCommit(self)

    def upload(self, paths: Any, dest: str | None = None) -> dict[str, Any]:
        """Upload files or directories (or a {local: dest} dict) and commit; the manifest."""
        commit = self.upload_commit()
        if dest is not None:
            commit.add(paths, dest)
        else:
            upload_paths(commit, paths)
        return commit.commit()

    def download_group(self) -> DownloadGroup:
        """A batch of downloads: add(sandbox path or manifest entry, local dest), finish()."""
        self._check_usable()
        return DownloadGroup(self)

    def download(self, sources: Any, local_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Download work-directory paths (or a manifest's files) into ``local_dir``."""
        group = self.download_group()
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        if isinstance(sources, dict) and "files" in sources:
            sources = sources["files"]
        for source in [sources] if isinstance(sources, str | dict) else sources:
            group.add(source, local_dir)
        return group.finish()

    def _check_usable(self) -> None:
        row = self.manager._refresh(self.id)
        if row["status"] == "closed":
            raise SessionClosed(self.name)

    async def interrupt(self) -> None:
        """Interrupt the running code, as Ctrl-C would (KeyboardInterrupt in the sandbox)."""
        conn = await self._ensure_attached(Timing())
        await self._wait(conn.send("control", "interrupt_request", {}, wait_idle=False), 10)

    async def close(self) -> None:
        await self.manager._async_close(self.id)

    # -- internals ----------------------------------------------------------

    async def _wait(self, fut: asyncio.Future[Any], timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except ConnectionLost:
            raise self._gone or SessionDead(
                self.name, "the connection to its kernel was lost"
            ) from None

    async def _interrupt_after_timeout(
        self, fut: asyncio.Future[Any], timeout: float | None
    ) -> dict[str, Any]:
        await self.interrupt()
        grace = self.manager.interrupt_grace
        try:
            return await self._wait(fut, grace)
        except TimeoutError:
            raise ExecutionTimeout(
                f"the code ran longer than {timeout:g} s and did not stop within {grace:g} s "
                f"of an interrupt; close the session with `sandbox-kernel close {self.name}`"
            ) from None

    def _result(
        self, reply: dict[str, Any], outputs: list[dict[str, Any]], timing: Timing
    ) -> ExecutionResult:
        c = reply["content"]
        status = c.get("status", "error")
        error = None
        if status == "error":
            error = {k: c.get(k) for k in ("ename", "evalue", "traceback")}
        elif status == "aborted":
            status = "error"
            error = {"ename": "Aborted", "evalue": "an earlier cell failed", "traceback": []}
        return ExecutionResult(
            status=status, execution_count=c.get("execution_count"), outputs=outputs,
            error=error, timing=dict(timing),
        )

    def _record(self, code: str, status: str, result: ExecutionResult, started: float) -> None:
        try:
            execution_id = self.manager.registry.record_execution(
                self.id, code, status, result.execution_count, started, result.timing
            )
        except StateDirFull as exc:  # the cell ran: its result is the user's all the same
            warning = f"this run was not recorded (history and replay will miss it): {exc}"
            result.warnings.append(warning)
            self.manager.log.warning("session %s: %s", self.name, warning)
            return
        if self._recorder is not None:  # artifacts an earlier run could not store, if any
            result.warnings += self._recorder.after_run(execution_id, result.outputs)
        if self.manager.auto_checkpoint and status == "ok":
            task = asyncio.get_running_loop().create_task(self._auto_checkpoint())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _auto_checkpoint(self) -> None:
        """After a cell, in the background: taken when no cell runs (it waits for quiet)."""
        try:
            await self.checkpoint()
        except SandboxError as exc:
            self.manager.log.warning("session %s: automatic checkpoint failed: %s",
                                     self.name, exc)

    def artifacts(self, tag: str | None = None, path: str | None = None,
                  since: float | None = None) -> list[Artifact]:
        """What runs produced: changed work-directory files and rich outputs, oldest first."""
        if self._recorder is not None:
            return self._recorder.list(tag, path, since)
        return [Artifact(**row, _store=self.manager.store, _registry=self.manager.registry)
                for row in self.manager.registry.artifacts(self.id, tag, path, since)]

    async def _ensure_attached(self, timing: Timing) -> KernelConnection:
        if self._conn is not None:
            return self._conn
        began = time.perf_counter()
        stage = "start" if self._row["status"] == "starting" else "attach"
        try:
            async with self._attach_lock:
                if self._conn is not None:  # attached meanwhile (a background start)
                    return self._conn
                row = self._usable_row()
                if row["status"] == "paused":
                    raise SandboxError(f"session {self.name!r} is paused; resume() it first")
                self._conn = await self._attach(row)
                self._row = self.manager._refresh(self.id)
                if self._lease_task is None or self._lease_task.done():
                    self._lease_task = asyncio.ensure_future(self._keep_lease())
                if self._recorder is None:  # the work directory as it is before our first run
                    self._recorder = ArtifactRecorder(
                        self.id, self.work_dir, self.manager.store, self.manager.registry,
                        self.manager.artifact_policy)
                return self._conn
        finally:
            timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - began

    async def _attach(self, row: dict[str, Any]) -> KernelConnection:
        """Connect, and prove the kernel answers and its iopub reaches us."""
        deadline = time.monotonic() + self.manager.start_timeout
        self._gone = None
        self._watch(row)
        layout = SessionLayout(Path(row["session_dir"]))
        while not sockets_bound(layout):
            self._check_gone()
            if time.monotonic() > deadline:
                raise self._start_timed_out(row)
            await asyncio.sleep(0.003)
        # What we connect to is the host's: checked links to the kernel's own sockets.
        link_sockets(layout, identity.load(layout.root))
        # Deno can publish a cell's output after its idle status when the machine is busy.
        linger = 0.05 if row["language"] in DENO_LANGUAGES else 0.0
        conn = KernelConnection(connection_info(layout), on_unrouted=self._unrouted,
                                linger=linger)
        limits = self.manager.output_limits
        conn.open(limits.max_message_size, limits.receive_hwm,
                  on_lost=lambda channel: self._lost(conn, channel))
        self._opening = conn
        try:
            while True:
                self._check_gone()
                fut = conn.send("shell", "kernel_info_request", {})
                try:
                    await self._wait(fut, min(2.0, max(0.01, deadline - time.monotonic())))
                    break
                except TimeoutError:
                    fut.cancel()
                    if time.monotonic() > deadline:
                        raise self._start_timed_out(row) from None
        except BaseException:
            conn.close()
            raise
        finally:
            self._opening = None
        if row["status"] == "starting":
            self.manager.registry.transition(self.id, "running", allowed_from=("starting",))
        return conn

    def _lost(self, conn: KernelConnection, channel: str) -> None:
        """ZeroMQ dropped one of ``conn``'s channels; find out why, off the reader."""
        task = asyncio.get_running_loop().create_task(self._judge_lost(conn, channel))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _judge_lost(self, conn: KernelConnection, channel: str) -> None:
        """A kernel that ended is reported by the supervisor's watch (``_on_gone``) a moment
        later; if it is not, the kernel lives and sent a message over ``max_message_size``,
        after which ZeroMQ never reconnects: waiting requests would hang. They fail instead,
        and the next run attaches afresh."""
        deadline = time.monotonic() + _LOST_GRACE
        while self._gone is None and time.monotonic() < deadline and \
                conn in (self._conn, self._opening):
            await asyncio.sleep(0.02)
        if self._gone is not None or conn not in (self._conn, self._opening):
            return  # the kernel ended (its reason is given), or we let go of the connection
        limit = self.manager.output_limits.max_message_size
        dropped = ConnectionDropped(
            f"session {self.name!r}: its kernel sent a message larger than "
            f"OutputLimits.max_message_size ({format_size(limit)}) on its {channel} channel, "
            "and the connection was dropped: the waiting run's result is lost. The session "
            "still runs with its state and the next run reconnects; the cell may still be "
            "running (interrupt() stops it). Print less at once, or raise the limit")
        if self._conn is conn:
            self._conn = None
        conn.fail(dropped)
        conn.close()

    def _unrouted(self, channel: str, msg: dict[str, Any]) -> None:
        if self.on_unrouted is not None:
            self.on_unrouted(channel, msg)

    def _check_gone(self) -> None:
        if self._gone is not None:
            raise self._gone

    def _start_timed_out(self, row: dict[str, Any]) -> StartFailed:
        return StartFailed(
            f"session {self.name!r}: the kernel did not answer within "
            f"{self.manager.start_timeout:g} s; its log is {row['session_dir']}/kernel.log"
        )

    def _watch(self, row: dict[str, Any]) -> None:
        """Be told the moment the sandbox's supervisor exits (a pidfd becomes readable)."""
        if self._watch_fd is not None:
            return
        pid = self.manager._supervisor_pid(row)
        if pid is None:
            self._on_gone()
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._on_gone()
            return
        self._watch_fd = fd
        asyncio.get_running_loop().add_reader(fd, self._on_gone)

    def _on_gone(self) -> None:
        if self._watch_fd is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._watch_fd)
            os.close(self._watch_fd)
            self._watch_fd = None
        row = self.manager._refresh(self.id, supervisor_gone=True)
        if row["status"] == "closed":
            self._gone = SessionClosed(self.name)
        elif row["status"] == "paused":
            self._gone = SandboxError(f"session {self.name!r} was paused while this request "
                                      "waited; run it again (that resumes the session)")
        else:
            self._gone = self._dead(row["reason"])
        conn, self._conn = self._conn or self._opening, None
        if conn is not None:
            conn.fail(self._gone)
            conn.close()

    # -- the lease ------------------------------------------------------------

    def keep_alive(self, enabled: bool = True) -> None:
        """While on, this client renews the lease whenever less than ``renew_threshold`` remains.

        The kernel and the magics turn it on: a notebook that is open keeps its
        session. Running cells renew the lease either way.
        """
        self._keep_alive = enabled

    def set_timeout(self, seconds: float, on_timeout: str | None = None) -> dict[str, Any]:
        """A new lease length (from now), and optionally what expiry does: pause or close."""
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, got {seconds!r}")
        fields: dict[str, Any] = {"timeout": float(seconds)}
        if on_timeout is not None:
            if on_timeout not in ("pause", "close"):
                raise InvalidArgument(f"on_timeout must be 'pause' or 'close', got {on_timeout!r}")
            fields["on_timeout"] = on_timeout
        self.manager.registry.update(self.id, **fields)
        self.manager.registry.renew(self.id)
        return self.info()

    async def _keep_lease(self) -> None:
        """Renew while kept alive or running; ends with the session (or its manager)."""
        registry = self.manager.registry
        try:
            row = registry.session(self.id)
            while row is not None and row["status"] not in ("closed", "dead"):
                threshold = self.manager.renew_threshold
                await asyncio.sleep(max(0.2, min(30.0, threshold / 4, row["timeout"] / 4)))
                row = registry.session(self.id)
                if (row is not None and (self._keep_alive or self._inflight)
                        and row["status"] == "running"
                        and lease_left(row) < threshold):
                    registry.renew(self.id)
        except Exception:  # noqa: BLE001 - a closed registry: the manager is gone
            return

    def _detach(self) -> None:
        """Drop the connection and the watch (the session itself is untouched)."""
        if self._watch_fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._watch_fd)
            os.close(self._watch_fd)
            self._watch_fd = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PendingExecution:
    """An execute_request on its way: outputs gather as they come; ``finish()`` waits."""

    def __init__(self, session: AsyncSession, content: dict[str, Any], timing: Timing,
                 on_output: OutputHook | None, on_message: MessageHook | None):
        self.session = session
        self.content = content
        self.timing = timing
        self.on_output = on_output
        self.on_message = on_message
        limits = session.manager.output_limits
        #: What the result keeps; on_output and on_message still see every output.
        self.kept = KeptOutputs(limits.max_output_bytes, limits.max_output_messages)
        self.started = time.time()
        self.sent = time.perf_counter()
        self.future: asyncio.Future[dict[str, Any]] | None = None
        #: Internal requests (activating packages) are not the user's history.
        self.record = True

    def collect(self, channel: str, msg: dict[str, Any]) -> None:
        if self.on_message is not None:
            self.on_message(channel, msg)
        if channel == "iopub":
            out = output_from_message(msg)
            if out is not None:
                self.kept.add(out)
                if self.on_output is not None:
                    self.on_output(out)

    async def finish(
        self, timeout: float | None = None, record_later: bool = False
    ) -> tuple[dict[str, Any], ExecutionResult]:
        session, code = self.session, self.content["code"]
        assert self.future is not None
        try:
            reply = await session._wait(self.future, timeout)
        except TimeoutError:
            reply = await session._interrupt_after_timeout(self.future, timeout)
            result = self._result(reply)
            session._record(code, "timeout", result, self.started)
            raise ExecutionTimeout(
                f"the code ran longer than {timeout:g} s and was interrupted; "
                "the session is still usable"
            ) from None
        except SessionDead:
            session._record(code, "dead", ExecutionResult("dead", None), self.started)
            raise
        except ConnectionDropped:  # it ran, as far as anyone knows: the history says so
            session._record(code, "error", ExecutionResult("error", None), self.started)
            raise
        result = self._result(reply)
        if not self.record:
            return reply, result
        if record_later:
            asyncio.get_running_loop().call_soon(
                session._record, code, result.status, result, self.started)
        else:
            session._record(code, result.status, result, self.started)
        return reply, result

    def _result(self, reply: dict[str, Any]) -> ExecutionResult:
        self.timing["execute"] = self.timing.get("execute", 0.0) + time.perf_counter() - self.sent
        result = self.session._result(reply, self.kept.result(), self.timing.finish())
        if self.kept.dropped_messages:
            result.warnings.append(self.kept.summary())
        return result


def _delegate(name: str) -> Any:
    """A read-only attribute of the wrapped AsyncSession."""
    return property(lambda self: getattr(self._inner, name),
                    doc=f"The session's ``{name}`` (see AsyncSession).")


class Session:
    """The blocking face of :class:`AsyncSession`; callbacks run on the portal thread."""

    def __init__(self, inner: AsyncSession):
        self._inner = inner

    id = _delegate("id")
    name = _delegate("name")
    language = _delegate("language")
    status = _delegate("status")
    work_dir = _delegate("work_dir")

    @property
    def async_session(self) -> AsyncSession:
        return self._inner

    def __repr__(self) -> str:
        return f"<Session {self.name!r} id={self.id}>"

    def info(self) -> dict[str, Any]:
        return self._inner.info()

    def usage(self) -> dict[str, float] | None:
        """CPU seconds and resident memory of the sandbox; None when no process runs."""
        return self._inner.usage()

    def executions(self) -> list[dict[str, Any]]:
        return self._inner.executions()

    def run(
        self,
        code: str,
        timeout: float | None = None,
        on_output: OutputHook | None = None,
        on_stdin: StdinHook | None = None,
    ) -> ExecutionResult:
        """Run ``code``; Ctrl-C while waiting interrupts the sandbox, then re-raises."""
        fut = portal.submit(self._inner.run(code, timeout, on_output, on_stdin))
        try:
            return fut.result()
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                portal.call(self._inner.interrupt(), timeout=10)
                fut.result(timeout=self._inner.manager.interrupt_grace)
            raise
        except concurrent.futures.CancelledError:
            raise SessionDead(self.name, "the run was cancelled") from None

    def upload_commit(self) -> UploadCommit:
        return self._inner.upload_commit()

    def upload(self, paths: Any, dest: str | None = None) -> dict[str, Any]:
        """Upload files or directories (or a {local: dest} dict) and commit; the manifest."""
        return self._inner.upload(paths, dest)

    def download_group(self) -> DownloadGroup:
        return self._inner.download_group()

    def download(self, sources: Any, local_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Download work-directory paths (or a manifest's files) into ``local_dir``."""
        return self._inner.download(sources, local_dir)

    @property
    def last_upload(self) -> dict[str, Any] | None:
        return self._inner.last_upload

    def artifacts(self, tag: str | None = None, path: str | None = None,
                  since: float | None = None) -> list[Artifact]:
        """What runs produced: changed work-directory files and rich outputs, oldest first."""
        return self._inner.artifacts(tag, path, since)

    def install(self, packages: Iterable[str]) -> InstallResult:
        """Install packages into this session (see AsyncSession.install)."""
        if isinstance(packages, str):
            packages = [packages]
        return portal.call(self._inner.install(packages))

    @property
    def last_install(self) -> InstallResult | None:
        return self._inner.last_install

    def interrupt(self) -> None:
        portal.call(self._inner.interrupt())

    def close(self) -> None:
        portal.call(self._inner.close())

    # -- lifecycle (see lifecycle.py) -----------------------------------------------

    def pause(self, mode: str = "snapshot") -> dict[str, Any]:
        """Free the sandbox's memory (snapshot) or stop it in place (freeze); keeps everything."""
        return portal.call(self._inner.pause(mode))

    def resume(self, checkpoint: int | None = None) -> ResumeReport:
        """Bring the session back; the report names what was restored, replayed or lost."""
        return portal.call(self._inner.resume(checkpoint))

    def restart(self) -> ResumeReport:
        """Start a dead session again with no variables, its files and packages kept."""
        return portal.call(self._inner.restart())

    @property
    def last_resume(self) -> ResumeReport | None:
        return self._inner.last_resume

    def checkpoint(self, name: str | None = None) -> Checkpoint:
        """Save variables, imports and files now; unchanged ones cost no new storage."""
        return portal.call(self._inner.checkpoint(name))

    def checkpoints(self) -> list[Checkpoint]:
        return self._inner.checkpoints()

    def restore(self, checkpoint: int | str | Checkpoint) -> ResumeReport:
        """Go back to a checkpoint (by id, name or object)."""
        return portal.call(self._inner.restore(checkpoint))

    def fork(self, checkpoint: int | str | Checkpoint | None = None,
             name: str | None = None) -> Session:
        """A new session from a checkpoint (a new one now by default), linked to this one."""
        return Session(portal.call(self._inner.fork(checkpoint, name)))

    def history(self) -> list[dict[str, Any]]:
        """Every recorded run of this session, oldest first."""
        return self._inner.history()

    def replay(self, into: str | Session | None = None, until: int | None = None) -> Session:
        """Run the recorded cells again (up to execution count ``until``) in a new session."""
        target = into.async_session if isinstance(into, Session) else into
        return Session(portal.call(self._inner.replay(target, until)))

    def set_timeout(self, seconds: float, on_timeout: str | None = None) -> dict[str, Any]:
        """A new lease of ``seconds`` from now; ``on_timeout`` 'pause' or 'close'."""
        return self._inner.set_timeout(seconds, on_timeout)

    def keep_alive(self, enabled: bool = True) -> None:
        """Renew the lease automatically while this client lives (and ``enabled``)."""
        portal.call(_set_keep_alive(self._inner, enabled))


async def _set_keep_alive(session: AsyncSession, enabled: bool) -> None:
    session.keep_alive(enabled)
    if enabled:
        await session.connection()  # attach, which starts the lease keeper
