"""The Jupyter kernel: "Python 3 (sandbox)".

A thin ipykernel ``Kernel`` that runs nothing itself. Every request goes to
the notebook's session, an ordinary ipykernel in a sandbox, over the Jupyter
protocol; every message that comes back is relayed to the frontend with the
frontend's own request as its parent. So streams, rich output, errors,
completion, inspection, history, ``input()`` and widget comms work as they do
in a plain kernel, without rewriting cells (sparkmagic's lesson).

The session outlives this process: it is found again through a binding from
the notebook's path (``JPY_SESSION_NAME``, set by Jupyter Server) or, when
there is none, from this kernel's connection file (which a restart keeps), so
restarting the kernel re-attaches with the variables intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
import re
import signal
import threading
import time
from collections import OrderedDict
from typing import Any

import zmq
from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel
from traitlets import Bool, Instance, Unicode

from . import __version__
from .commands import CommandError, run_command, split_cell
from .connection import unpack_message
from .errors import ConnectionDropped, SandboxError, SessionBusy, SessionClosed, SessionDead
from .frontend_guard import COMMS, FrontendGuard, help_links
from .host_paths import HostPaths
from .host_paths import notebook_dir as find_notebook_dir
from .manager import AsyncSessionManager
from .output_policy import OutputPolicy
from .ownership import SessionScope
from .session import AsyncSession, PendingExecution
from .shown import shown
from .trust import TrustFlag, is_trusted, session_dir
from .widget_policy import WidgetPolicy

#: Requests answered by the sandbox's kernel, passed through as they came.
FORWARDED = ("complete_request", "inspect_request", "is_complete_request",
             "history_request", "comm_info_request")
_ANSI_RED = "\x1b[0;31m"
_ANSI_RESET = "\x1b[0m"


#: When this kernel process started: renames made before it are not its own (a notebook
#: opened later under an old name is another notebook).
_STARTED = time.time()


class InputCancelled(Exception):
    """The frontend's answer to input() will not come: the cell was interrupted."""


class SandboxKernel(Kernel):
    implementation = "sandbox-kernel"
    implementation_version = __version__
    banner = "Python in a persistent sandbox session (sandbox-kernel)"

    session_manager = Instance(AsyncSessionManager, allow_none=True)
    session_name = Unicode(
        None, allow_none=True,
        help="Attach to this session (by name or id) instead of the notebook's own.",
    ).tag(config=True)
    session_language = Unicode(
        "python", help="The language of the sessions this kernel creates: python, or "
        "javascript/typescript (Deno).",
    ).tag(config=True)
    close_on_shutdown = Bool(
        False, help="Close the session when the kernel shuts down (not on restart). "
        "Off: the session stays, subject to its lease.",
    ).tag(config=True)
    see_all_sessions = Bool(
        False, help="Let this notebook's %session commands see and act on every session "
        "(list, use, close...). Off: only the notebook's own, those it created or forked "
        "and the one it is bound to; a notebook is untrusted code and another notebook's "
        "session holds that notebook's variables.",
    ).tag(config=True)
    confine_host_paths = Bool(
        True, help="%session upload, download and artifacts --save reach only the "
        "notebook's directory on the host (never through a link, no hidden names) unless "
        "the user allows a path when asked. Off: any path the host user can reach.",
    ).tag(config=True)
    notebook_dir = Unicode(
        None, allow_none=True, help="The notebook's directory on the host, where its "
        "%session lines may read and write (default: the directory of JPY_SESSION_NAME, "
        "else the kernel's working directory).",
    ).tag(config=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        for msg_type in FORWARDED:
            self.shell_handlers[msg_type] = self._forward_request
        for msg_type in COMMS:
            self.shell_handlers[msg_type] = self._forward_comm
        self._execute_sleep = 0  # our stdout carries nothing to wait for
        self.sandbox: AsyncSession | None = None
        self._ready: asyncio.Future[AsyncSession] | None = None
        self._inner_info: dict[str, Any] | None = None
        self._last_timing: dict[str, float] | None = None
        self._parents: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._stdin_cancel = threading.Event()
        self._comm_chain: asyncio.Future[None] | None = None
        #: Comm messages handed on to the sandbox, and how many of them it has finished
        #: as far as we know (see _settle_comms).
        self._comms_forwarded = 0
        self._comms_settled = 0
        #: The number the sandbox's next stored cell takes, as last seen (None: not known,
        #: as after a restart, a %session command or a resume). See _run_code.
        self._sandbox_next: int | None = None
        self._early: _CellRelay | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: What the first cell should be told about how its session was found.
        self._notice: str | None = None
        #: Cells waiting for their session to start, and whether an interrupt came meanwhile.
        self._cells_waiting = 0
        self._interrupted_waiting = False
        #: Interrupts handed to the sandbox so far (one that came between requests is lost).
        self._interrupts = 0
        #: What the sandbox sends the frontend passes these (see frontend_guard).
        self.output_policy = OutputPolicy(parent=self)
        self.widget_policy = WidgetPolicy(parent=self)
        self._guard = self._new_guard(None)

    # -- start-up: find or create the session, in the background -----------

    def start(self) -> None:
        # Before any request: a restarted kernel's first cell goes on from the numbers the
        # notebook has shown, not from 1 (its execute_input goes out before the session
        # is found).
        self.execution_count = self._count_so_far()
        super().start()
        self.io_loop.add_callback(self._begin)

    def _count_so_far(self) -> int:
        """The highest execution count the notebook's session has shown (0 when none)."""
        try:
            registry = self._manager().registry
            wanted = (self.session_name or registry.bound(self.binding_key)
                      or registry.bound(self._kernel_key))  # (a restart after a rename)
            row = registry.find(wanted) if wanted else None
        except Exception as exc:  # the first cell reports what is wrong; start-up goes on
            self.log.warning("could not read the session's execution count: %s", exc)
            return 0
        return int(row["execution_count"] or 0) if row else 0

    def _keep_count(self) -> None:
        """Record the count of a cell the session did not run (a %session command, or a
        cell that never reached it), so that a restarted kernel goes on after it."""
        try:
            registry = self._manager().registry
            session_id = registry.bound(self.binding_key) or (self.sandbox and self.sandbox.id)
            if session_id:
                registry.raise_execution_count(session_id, self.execution_count)
        except Exception as exc:  # the cell's reply must go out all the same
            self.log.warning("could not record execution count %s: %s",
                             self.execution_count, exc)

    def _begin(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Ctrl-C delivered to this process (signal interrupt mode) goes to the sandbox.
        signal.signal(signal.SIGINT, lambda *_: self._loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(self._interrupt_sandbox())))
        self._ready = asyncio.ensure_future(self._open_session())
        self._ready.add_done_callback(lambda f: f.exception())  # reported at the first cell

    #: The notebook's key when it was found through this kernel's connection file: a
    #: kernel restarted after a rename still has the old path in its environment.
    _notebook_key: str | None = None

    @property
    def binding_key(self) -> str:
        """Which notebook this is: its path as Jupyter Server gave it (``JPY_SESSION_NAME``),
        followed through the renames made since this kernel started (the server extension
        records them); without a path, this kernel's connection file."""
        notebook = os.environ.get("JPY_SESSION_NAME")
        if not notebook:
            return self._kernel_key
        key = self._notebook_key or f"notebook:{notebook}"
        with contextlib.suppress(Exception):  # the registry's trouble shows at the first cell
            key = self._manager().registry.renamed(key, since=_STARTED)
        return key

    @property
    def _kernel_key(self) -> str:
        """This kernel's connection file, which a restart keeps."""
        conn = getattr(self.parent, "abs_connection_file", None) or f"pid-{os.getpid()}"
        return f"kernel:{conn}"

    def _manager(self) -> AsyncSessionManager:
        if self.session_manager is None:
            self.session_manager = AsyncSessionManager(parent=self)
        return self.session_manager

    async def _open_session(self) -> AsyncSession:
        manager = self._manager()
        registry = manager.registry
        key = self.binding_key
        session: AsyncSession | None = None
        wanted = self.session_name
        if not wanted and key != self._kernel_key:
            # A restarted kernel's connection file leads to the session it had, before the
            # path does: after a rename its environment has the old path (the session went
            # to the new one), and the path may now be another notebook's (renamed onto a
            # deleted notebook's path, whose kernel this is). Its notebook is the one bound
            # to that session now.
            wanted = registry.bound(self._kernel_key)
            own = registry.notebook_key_of(wanted) if wanted else None
            if own:
                self._notebook_key = key = own
        wanted = wanted or registry.bound(key)
        if wanted and key.startswith("notebook:"):
            since = registry.binding_updated(key) or 0.0
            old = registry.renamed_from(key, after=since)
            row = registry.find(wanted) if old else None
            if row is not None:
                was = os.path.relpath(old.removeprefix("notebook:"),
                                      os.path.dirname(key.removeprefix("notebook:")))
                self._notice = (f"renamed from {shown(was)}: this notebook keeps its "
                                f"session {shown(row['name'])!r}")
        if wanted:
            with contextlib.suppress(SessionClosed, SandboxError):
                session = await manager.get(wanted)
        if session is not None and session.status == "dead":
            session = await self._recover(session)
        if session is None:
            session = await manager.create(name=_free_name(manager, key),
                                           language=self.session_language, wait=False)
            manager.registry.set_owner(session.id, key)
        manager.registry.bind(key, session.id)
        if key != self._kernel_key:
            manager.registry.bind(self._kernel_key, session.id)
        return await self._adopt(session)

    async def _recover(self, dead: AsyncSession) -> AsyncSession | None:
        """The notebook's session died (its memory limit, a crash, a kill, a reboot): back
        from its last checkpoint; without one (or when it fails to load), started again
        with no variables, as Jupyter restarts a kernel that died, so that its files stay
        where the notebook had them; None (a fresh session is made) when neither works."""
        reason = shown(dead.info()["reason"])
        try:
            try:
                report = await dead.resume()
            except SessionDead as exc:
                why = ("" if exc.checkpoint is None else
                       f" (its checkpoint {exc.checkpoint} did not load: {shown(exc.reason)})")
                report = await dead.restart()
                self._notice = (f"session {dead.name!r} had died ({reason}); it was {report}"
                                f"{why}. `%session checkpoint` after a costly cell lets the "
                                "next restart begin from there.")
                return dead
        except SandboxError as exc:
            self._notice = (f"session {dead.name!r} had died ({reason}) and cannot come back "
                            f"({shown(exc)}); this notebook now runs in a fresh session.")
            return None
        self._notice = (f"session {dead.name!r} had died ({reason}); it was started again "
                        f"from checkpoint {report.checkpoint}:\n{report}")
        return dead

    def _new_guard(self, session: AsyncSession | None) -> FrontendGuard:
        """A fresh filter for ``session``'s messages: no comms let through yet."""
        where = session_dir(session) if session is not None else None
        trusted = TrustFlag(lambda: where is not None and is_trusted(where))
        return FrontendGuard(self.output_policy, self.widget_policy, trusted)

    async def _adopt(self, session: AsyncSession) -> AsyncSession:
        self.sandbox = session
        self._guard = self._new_guard(session)
        self._sandbox_next = None  # another sandbox, or the same one started again
        session.on_unrouted = self._relay_unrouted
        session.keep_alive(True)  # an open notebook keeps its session's lease
        row = self._manager().registry.session(session.id)
        self.execution_count = max(self.execution_count, row["execution_count"] if row else 0)
        if session.status in ("starting", "running", "paused", "frozen"):  # attaching resumes
            with contextlib.suppress(SandboxError):
                reply = await session.request("kernel_info_request", {})
                self._inner_info = reply["content"]
        return session

    async def _sandbox(self) -> AsyncSession:
        if self._ready is None:  # a request before start-up ran, or after the session died
            self._begin()
        assert self._ready is not None
        return await asyncio.shield(self._ready)

    # -- the context of the %session commands (see commands.CommandContext) ---------

    @property
    def manager(self) -> AsyncSessionManager:
        return self._manager()

    @property
    def last_timing(self) -> dict[str, float] | None:
        return self._last_timing

    @last_timing.setter
    def last_timing(self, value: dict[str, float] | None) -> None:
        self._last_timing = value

    async def current(self) -> AsyncSession:
        try:
            return await self._sandbox()
        except SandboxError as exc:
            raise CommandError(f"%session: this notebook's session is not usable: {exc}; "
                               "`%session new` starts a fresh one") from None

    async def use(self, session: AsyncSession) -> None:
        """Bind this notebook to ``session`` (a restart keeps the binding: its connection
        file's too, which a restarted kernel reads first)."""
        registry = self._manager().registry
        registry.bind(self.binding_key, session.id)
        if self.binding_key != self._kernel_key:
            registry.bind(self._kernel_key, session.id)
        self._inner_info = None
        self._ready = asyncio.ensure_future(self._adopt(session))

    @property
    def scope(self) -> SessionScope:
        """This notebook's sessions: those it made, and the one it is bound to."""
        return SessionScope(self._manager().registry, self.binding_key, self.see_all_sessions)

    @property
    def host_paths(self) -> HostPaths:
        """The notebook's directory on the host, and the user's yes for anything else."""
        if not self.confine_host_paths:
            return HostPaths(None)
        # A path elsewhere is asked about (see ask), or refused where nobody can answer.
        return HostPaths(find_notebook_dir(self.notebook_dir), self.ask)

    #: Insights of the last command that had some (an upload's, say).
    last_insights: list[str] = []

    def watch_transfer(self, batch: Any) -> None:
        return None  # the command's result shows the figures; widgets need the extension

    def default_name(self) -> str:
        return _free_name(self._manager(), self.binding_key)

    def default_language(self) -> str:
        return self.session_language

    async def ask(self, prompt: str, password: bool = False) -> str:
        """Ask the person at the frontend (an input_request on the stdin channel), as a
        command's confirmation: only the frontend answers there, never the sandbox."""
        if not self._allow_stdin:
            raise CommandError("%session: this needs an answer from you, and this frontend "
                               "does not take input for this cell (run it interactively)")
        parent = self.get_parent("shell")
        ident = self._get_shell_context_var(self._shell_parent_ident)
        try:
            return await self._ask_in_thread(prompt, password, ident, parent)
        except InputCancelled:
            raise CommandError("%session: interrupted while waiting for your answer") from None

    async def _ask_in_thread(self, prompt: str, password: bool, ident: Any,
                             parent: dict[str, Any]) -> str:
        """An input_request answered by the frontend, waited for off the event loop."""
        self._stdin_cancel.clear()
        return await asyncio.get_running_loop().run_in_executor(
            None, self._ask_frontend, prompt, password, ident, parent)

    # -- kernel_info ----------------------------------------------------------

    @property
    def language_info(self) -> dict[str, Any]:  # type: ignore[override]
        if self._inner_info:
            return self._inner_info["language_info"]
        if self.session_language in ("javascript", "typescript"):
            return {"name": self.session_language, "mimetype": "text/typescript",
                    "file_extension": ".ts" if self.session_language == "typescript" else ".js",
                    "codemirror_mode": "typescript", "pygments_lexer": "typescript"}
        return {
            "name": "python", "version": platform.python_version(), "mimetype": "text/x-python",
            "codemirror_mode": {"name": "ipython", "version": 3}, "pygments_lexer": "ipython3",
            "nbconvert_exporter": "python", "file_extension": ".py",
        }

    @property
    def kernel_info(self) -> dict[str, Any]:  # type: ignore[override]
        info = super().kernel_info
        info["supported_features"] = []  # no subshells or debugger across the sandbox yet
        if self._inner_info:  # the Help menu opens them: web links only
            info["help_links"] = help_links(self._inner_info.get("help_links"),
                                            self.output_policy.link_schemes)
        return info

    # -- execute ----------------------------------------------------------------

    async def dispatch_shell(self, msg: Any, /, subshell_id: str | None = None, *,
                             concurrent: bool = False) -> None:
        """Let the sandbox finish the comm messages before this request, then start a plain
        execute_request in the sandbox before ipykernel's bookkeeping.

        A plain kernel handles shell messages one at a time: a comm message's
        busy, outputs and idle all come before the next request's busy. Comm
        messages are handed on at once (see _forward_comm), so a request that
        follows them first waits until the sandbox has finished them; else the
        comm's idle, arriving while a cell runs, showed the kernel idle.

        ipykernel parses the request again and publishes busy and
        execute_input before ``do_execute`` runs (about 0.6 ms here); sending
        the request first overlaps that with the sandbox's own work. Outputs
        that come back early are held until ``do_execute`` starts, so the
        frontend sees the usual order.
        """
        if not concurrent:
            request = self._peek(msg)
            if request is not None and request["msg_type"] not in COMMS:
                if self._comms_forwarded > self._comms_settled:
                    await self._settle_comms()
                if not self._aborting:
                    self._early = self._start_early(request)
        await super().dispatch_shell(msg, subshell_id=subshell_id, concurrent=concurrent)

    def _peek(self, frames: Any) -> dict[str, Any] | None:
        """The request in ``frames``, or None when it does not parse (ipykernel's own
        parsing then rejects or handles it)."""
        try:
            idents, body = self.session.feed_identities(frames, copy=False)
            return unpack_message(self.session, [bytes(f) for f in body],
                                  self.session.digest_history)
        except Exception:
            return None

    def _start_early(self, request: dict[str, Any]) -> _CellRelay | None:
        sandbox = self.sandbox
        if sandbox is None or not sandbox.ready():
            return None
        content = request["content"]
        if request["msg_type"] != "execute_request" or "%session" in content.get("code", ""):
            return None
        if not content.get("silent") and self._sandbox_next != self.execution_count + 1:
            return None  # the sandbox's count must catch up first (see _run_code)
        early = _CellRelay(self, request["msg_id"])
        cell_id = request["metadata"].get("cellId")
        try:
            early.pending = sandbox.start_execute(
                {**content, "stop_on_error": False}, on_message=early.relay,
                on_stdin=early.ask if content.get("allow_stdin") else None,
                metadata={"cellId": cell_id} if cell_id else None, msg_id=request["msg_id"])
        except SessionBusy:
            return None  # being paused: do_execute waits, then resumes it
        return early

    async def do_execute(  # type: ignore[override]
        self, code: str, silent: bool, store_history: bool = True,
        user_expressions: dict[str, Any] | None = None, allow_stdin: bool = False,
        *, cell_meta: dict[str, Any] | None = None, cell_id: str | None = None,
    ) -> dict[str, Any]:
        self._allow_stdin = allow_stdin  # whether a %session command may ask (see ask())
        parts = split_cell(code) if "%session" in code else [("code", code)]
        reply: dict[str, Any] = {"status": "ok", "execution_count": self.execution_count,
                                 "payload": [], "user_expressions": {}}
        for kind, text in parts:
            try:
                if kind == "command":
                    reply = await self._run_command(text)
                else:
                    reply = await self._run_code(text, silent, store_history,
                                                 user_expressions or {}, allow_stdin, cell_meta)
            except Exception as exc:  # a reply must always come, or the frontend waits forever
                self.log.exception("sandbox kernel failed to run a cell")
                reply = self._error_reply(exc, hint="(an internal error of sandbox-kernel)")
            if reply["status"] != "ok":
                break
        if not silent and (reply["status"] != "ok" or any(k == "command" for k, _ in parts)):
            self._keep_count()  # a number the session's own record may not have
        return reply

    async def _run_command(self, line: str) -> dict[str, Any]:
        # A command may start, resume, restore or swap the sandbox: its count is asked
        # again before the next cell.
        self._sandbox_next = None
        try:
            out = await run_command(self, line)
        except SandboxError as exc:
            return self._error_reply(exc)
        data = {"text/plain": out.text}
        if out.html:
            data["text/html"] = out.html
        self.send_response(self.iopub_socket, "display_data", {"data": data, "metadata": {}})
        return {"status": "ok", "execution_count": self.execution_count, "payload": [],
                "user_expressions": {}}

    async def _run_code(
        self, code: str, silent: bool, store_history: bool, user_expressions: dict[str, Any],
        allow_stdin: bool, cell_meta: dict[str, Any] | None,
    ) -> dict[str, Any]:
        parent = self.get_parent("shell")
        ident = self._get_shell_context_var(self._shell_parent_ident)
        self._cells_waiting += 1
        try:
            sandbox = await self._sandbox()
        except SandboxError as exc:
            return self._error_reply(exc)
        finally:
            self._cells_waiting -= 1
            interrupted = self._interrupted_waiting
            if not self._cells_waiting:
                self._interrupted_waiting = False
        if interrupted:  # before the session was there to receive it: the cell does not run
            return self._error_reply(KeyboardInterrupt(
                "interrupted while its session was starting; the cell did not run"))
        self._guard.trusted.expire()  # a %session trust or untrust applies from this cell
        notice, self._notice = self._notice, None
        if notice:
            self.send_response(self.iopub_socket, "stream",
                               {"name": "stderr", "text": notice + "\n"})
        content = {"code": code, "silent": silent, "store_history": store_history,
                   "user_expressions": user_expressions, "allow_stdin": allow_stdin,
                   "stop_on_error": False}

        early, self._early = self._early, None
        if early is not None and early.msg_id != parent["header"]["msg_id"]:
            early = None
        caught_up: dict[str, float] = {}
        try:
            if early is None and not silent:
                interrupts = self._interrupts
                caught_up = await self._catch_up(sandbox)
                if self._interrupts != interrupts:  # it met the count's request, not the cell
                    return self._error_reply(KeyboardInterrupt(
                        "interrupted before the cell ran; the cell did not run"))
            self._sandbox_next = None  # until the reply says (a cell can end the sandbox)
            if early is not None:
                early.go_live(parent, ident)
                reply, result = await early.pending.finish(record_later=True)
            else:
                cell = _CellRelay(self, parent["header"]["msg_id"])
                cell.go_live(parent, ident)
                reply, result = await sandbox.execute(
                    content, on_message=cell.relay, on_stdin=cell.ask if allow_stdin else None,
                    metadata={"cellId": cell_meta.get("cellId")} if cell_meta else None,
                    record_later=True, msg_id=parent["header"]["msg_id"])
        except SessionDead as exc:
            return self._died(sandbox, exc)
        except SessionClosed as exc:
            return self._error_reply(exc, hint="In this notebook, `%session new` starts a fresh "
                                     "session.")
        except ConnectionDropped as exc:  # the output was shown; the next cell reconnects
            return self._error_reply(exc)
        self._last_timing = _with_stages(result.timing, caught_up)
        count = reply["content"].get("execution_count")
        if isinstance(count, int):
            self._sandbox_next = count + 1
            self.execution_count = max(self.execution_count, count)
        content, notes = self._guard.execute_reply(reply["content"])
        if content.get("execution_count") != self.execution_count:  # never a number gone back
            content = {**content, "execution_count": self.execution_count}
        if notes:
            self.send_response(self.iopub_socket, "display_data",
                               {"data": {"text/plain": "\n".join(notes)}, "metadata": {}})
        return content

    async def _catch_up(self, sandbox: AsyncSession) -> dict[str, float]:
        """Before a cell, move the sandbox's count up to the cell's number when it is behind
        or not known; the stages that took time (a resume), for the cell's timing.

        The frontend's numbers are this kernel's: it counts ``%session`` cells, which the
        sandbox never sees, and goes on across restarts, while a resumed sandbox counts
        from where it was paused (an older checkpoint's count, after a restore). So the
        sandbox's next stored cell is made to take this cell's number, and ``In`` gets
        empty entries for the numbers it skips, so that In[n] and Out[n] stay the
        cell shown as [n]. One silent request, only when the counts differ or are not
        known; a Deno kernel's count cannot be set, and its numbers are mapped instead
        (see _CellRelay and _run_code).
        """
        if self._sandbox_next is not None and self._sandbox_next >= self.execution_count \
                and sandbox.ready():
            return {}
        if sandbox.language != "python":
            return {}
        code = (f"exec(compile({_CONTINUE_COUNT!r}, 'sandbox-kernel-count', 'exec'), "
                f"{{'shell': get_ipython(), 'COUNT': {int(self.execution_count)}}})")
        reply, result = await sandbox.execute(
            {"code": code, "silent": True, "store_history": False, "user_expressions": {},
             "allow_stdin": False, "stop_on_error": False}, record=False)
        count = reply["content"].get("execution_count")
        self._sandbox_next = count + 1 if isinstance(count, int) else None
        return {k: v for k, v in result.timing.items() if k != "execute"}

    def _died(self, sandbox: AsyncSession, exc: SessionDead) -> dict[str, Any]:
        """The session's kernel died under this cell (its memory limit, a crash, a kill):
        the cell ends now, saying why and what comes next. The next cell opens the session
        again, which brings it back (see _recover) and says how; not sooner, so that a
        `%session new` or `%session use` run first is not raced by a restart."""
        if self.sandbox is sandbox:
            self._ready = None
        if exc.checkpoint is None:
            how = ("with no variables (it has no checkpoint); the files in its work "
                   "directory and its packages are kept")
        else:
            how = f"from its checkpoint {exc.checkpoint} and replays the cells run since"
        said = SessionDead(sandbox.name, exc.reason, exc.checkpoint)  # other waiters share exc
        said.args = (f"{exc.reason or 'the session ended'}. The next cell starts session "
                     f"{sandbox.name!r} again {how}; `%session new` starts a fresh session "
                     "instead.",)
        return self._error_reply(said)

    def _error_reply(self, exc: Exception, hint: str = "") -> dict[str, Any]:
        evalue = shown(f"{exc} {hint}".strip())  # errors may quote what the sandbox wrote
        content = {"ename": type(exc).__name__, "evalue": evalue,
                   "traceback": [f"{_ANSI_RED}{type(exc).__name__}{_ANSI_RESET}: {evalue}"]}
        self.send_response(self.iopub_socket, "error", content)
        return {"status": "error", "execution_count": self.execution_count, **content}

    def _publish(self, msg: dict[str, Any], parent: dict[str, Any]) -> None:
        """Send a sandbox's message to the frontend under ``parent``, if the policy lets it."""
        checked = self._guard.iopub(msg)
        if checked is None:
            return
        msg = checked
        kind = msg["header"]["msg_type"]
        self.session.send(self.iopub_socket, kind, msg["content"], parent=parent,
                          metadata=msg.get("metadata"), buffers=msg.get("buffers"),
                          ident=self._topic(kind))

    # -- stdin: the sandbox asks, the frontend answers ---------------------------

    def _ask_frontend(self, prompt: str, password: bool, ident: Any, parent: dict) -> str:
        """Runs in a worker thread so that the loop keeps relaying and can interrupt."""
        sock = self.stdin_socket
        while True:  # purge stale replies
            try:
                sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        self.session.send(sock, "input_request", {"prompt": prompt, "password": password},
                          parent, ident=ident)
        while not self._stdin_cancel.is_set():
            if sock.poll(50):
                _, reply = self.session.recv(sock)
                if reply is not None:
                    return reply["content"].get("value", "")
        raise InputCancelled("interrupted while waiting for input")

    # -- interrupt ------------------------------------------------------------------

    async def interrupt_request(self, stream: Any, ident: Any, parent: dict) -> None:
        """Runs on the control thread: hand the interrupt to the loop that owns the sandbox."""
        self._stdin_cancel.set()
        content: dict[str, Any] = {"status": "ok"}
        if self._loop is not None:
            fut = asyncio.run_coroutine_threadsafe(self._interrupt_sandbox(), self._loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), 15)
            except Exception as exc:
                content = {"status": "error", "ename": type(exc).__name__, "evalue": str(exc),
                           "traceback": []}
        self.session.send(stream, "interrupt_reply", content, parent, ident=ident)

    async def _interrupt_sandbox(self) -> None:
        self._interrupts += 1
        if self._cells_waiting:  # the session is still starting: those cells will not run
            self._interrupted_waiting = True
        if self.sandbox is not None:
            await self.sandbox.interrupt()

    # -- everything else goes through ----------------------------------------------

    async def _forward_request(self, stream: Any, ident: Any, parent: dict) -> None:
        msg_type = parent["header"]["msg_type"]
        try:
            sandbox = await self._sandbox()
            reply = (await sandbox.request(msg_type, parent["content"]))["content"]
            if msg_type == "inspect_request":  # its bundle is rendered like an output
                reply = self._guard.inspect_reply(reply)
        except Exception as exc:
            reply = _fallback_reply(msg_type, parent["content"], exc)
        self.session.send(stream, msg_type.replace("_request", "_reply"), reply, parent,
                          ident=ident)

    async def _forward_comm(self, stream: Any, ident: Any, parent: dict) -> None:
        """Comm messages from the frontend (widgets) go to the sandbox under their own id.

        The handler returns at once and the message goes out from a chain of
        tasks, in order: ipykernel runs comm handlers concurrently with a
        running cell and restores its own idea of the current parent when each
        one ends, so a comm handler that waited (for a sandbox still starting)
        would end after the cell began and stamp the cell's idle status with
        the comm's parent.
        """
        self._remember(parent)
        self._guard.comms.from_frontend(parent["header"]["msg_type"], parent["content"])
        previous = self._comm_chain
        self._comm_chain = asyncio.ensure_future(self._send_comm(parent, previous))
        self._comms_forwarded += 1

    async def _settle_comms(self) -> None:
        """Wait until the sandbox has finished the comm messages handed on so far.

        One kernel_info_request after them on the same socket: the sandbox handles shell
        messages in order, so its idle for that request follows everything it published
        for them (on one iopub socket, relayed as it comes). A comm it handled while a
        cell of its own awaited (ipykernel does so, with no busy or idle) is done by then
        too. Not before the sandbox is up: comms still waiting for it go first then.
        """
        target = self._comms_forwarded
        chain, sandbox = self._comm_chain, self.sandbox
        if sandbox is None or not sandbox.ready():
            return
        if chain is not None:
            await asyncio.wait([chain])
        try:
            await sandbox.request("kernel_info_request", {})
        except Exception as exc:  # the request that follows meets the reason, if it lasts
            self.log.warning("could not wait for the sandbox's comm handlers: %s", exc)
        self._comms_settled = max(self._comms_settled, target)

    async def _send_comm(self, parent: dict, previous: asyncio.Future[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            sandbox = await self._sandbox()
            conn = await sandbox.connection()
        except Exception as exc:
            self.log.warning("dropped %s: %s", parent["header"]["msg_type"], exc)
            for status in ("busy", "idle"):  # as a kernel that ignores it: its future ends
                Kernel._publish_status(self, status, "shell", parent)
            return
        msg = self.session.msg(parent["header"]["msg_type"], parent["content"],
                               metadata=parent.get("metadata"))
        msg["header"]["msg_id"] = parent["header"]["msg_id"]
        conn.send_raw("shell", msg, buffers=parent.get("buffers"))

    def _publish_status(self, status: str, channel: str, parent: Any = None) -> None:
        """A comm message's busy and idle are the sandbox's (relayed by _relay_unrouted).

        Ours would say idle the moment the message is handed on, and JupyterLab
        ends a comm message's future at its idle: what the sandbox sends in
        answer (an ``interact`` printing into its Output widget, which captures
        by that message's id through the future) would find no one listening.
        """
        if channel == "shell":
            current = parent or self.get_parent("shell")
            if current and current.get("header", {}).get("msg_type") in COMMS:
                return
        super()._publish_status(status, channel, parent)

    def _remember(self, parent: dict[str, Any]) -> None:
        self._parents[parent["header"]["msg_id"]] = parent
        while len(self._parents) > 256:
            self._parents.popitem(last=False)

    def _relay_unrouted(self, channel: str, msg: dict[str, Any]) -> None:
        """Sandbox output no request of ours waits for: replies to comms, output from threads.

        What names a request of this frontend goes out under that request.
        Comm traffic goes out in any case (widgets updated from threads need
        it). The rest (the sandbox kernel's own start-up output, its
        iopub_welcome, another client's cells) is not this frontend's.
        """
        kind = msg["header"]["msg_type"]
        if channel != "iopub" or kind == "iopub_welcome":
            return
        parent = self._parents.get(msg.get("parent_header", {}).get("msg_id"))
        if kind == "status":  # only a comm message's: see _publish_status
            if parent is not None and parent["header"]["msg_type"] in COMMS:
                self._publish(msg, parent)
            return
        if parent is not None:
            self._publish(msg, parent)
        elif kind.startswith("comm_"):
            self._publish(msg, msg.get("parent_header") or {})

    # -- shutdown -----------------------------------------------------------------

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        """The session is left to its lease (or closed, when so configured)."""
        sandbox, self.sandbox = self.sandbox, None
        if sandbox is not None:
            if self.close_on_shutdown and not restart:
                with contextlib.suppress(SandboxError):
                    await sandbox.close()
            else:
                sandbox._detach()
        return {"status": "ok", "restart": restart}


class _CellRelay:
    """One cell's traffic from the sandbox to the frontend: outputs and input requests.

    A cell sent early (before ipykernel's bookkeeping) holds what comes back
    until ``go_live`` names the frontend's request; a cell sent from
    ``do_execute`` is live from the start.
    """

    def __init__(self, kernel: SandboxKernel, msg_id: str):
        self.kernel = kernel
        self.msg_id = msg_id
        self.pending: PendingExecution | None = None
        self.parent: dict[str, Any] | None = None
        self.ident: Any = None
        self.held: list[dict[str, Any]] = []
        self.live = asyncio.Event()

    def relay(self, channel: str, msg: dict[str, Any]) -> None:
        if channel != "iopub" or msg["header"]["msg_type"] in ("status", "execute_input"):
            return
        if self.parent is None:
            self.held.append(msg)
        else:
            self._show(msg)

    def go_live(self, parent: dict[str, Any], ident: Any) -> None:
        self.parent, self.ident = parent, ident
        self.kernel._remember(parent)
        for msg in self.held:
            self._show(msg)
        self.held.clear()
        self.live.set()

    def _show(self, msg: dict[str, Any]) -> None:
        """Publish under the frontend's request; a result is numbered as the frontend
        numbered the cell (the kernel's count, never lower than the sandbox's)."""
        assert self.parent is not None
        if msg["header"]["msg_type"] == "execute_result":
            kernel, content = self.kernel, msg["content"]
            count = content.get("execution_count")
            if isinstance(count, int):
                kernel.execution_count = max(kernel.execution_count, count)
            if count != kernel.execution_count:
                msg = {**msg, "content": {**content, "execution_count": kernel.execution_count}}
        self.kernel._publish(msg, self.parent)

    async def ask(self, prompt: str, password: bool) -> str:
        await self.live.wait()
        return await self.kernel._ask_in_thread(prompt, password, self.ident, self.parent)


#: Runs in the sandbox's kernel (silently, out of the history; see SandboxKernel._catch_up):
#: its next stored cell takes at least COUNT, and ``In`` (which IPython appends to) gets an
#: empty entry for each number skipped, so that In[n] stays the cell numbered n.
_CONTINUE_COUNT = """
if shell.execution_count < COUNT:
    shell.execution_count = COUNT
for hist in (shell.history_manager.input_hist_parsed, shell.history_manager.input_hist_raw):
    hist.extend([''] * (shell.execution_count - len(hist)))
"""


def _with_stages(timing: dict[str, float], earlier: dict[str, float]) -> dict[str, float]:
    """A cell's timing with the stages of what ran for it first (a resume, say), in the
    order they happened, the total last."""
    if not earlier:
        return timing
    merged: dict[str, float] = {}
    for source in (earlier, timing):
        for stage, seconds in source.items():
            merged[stage] = merged.get(stage, 0.0) + seconds
    if "total" in merged:
        merged["total"] = merged.pop("total")
    return merged


def _fallback_reply(msg_type: str, content: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """What a forwarded request answers when the sandbox cannot."""
    if msg_type == "complete_request":
        pos = content.get("cursor_pos", 0)
        return {"status": "ok", "matches": [], "cursor_start": pos, "cursor_end": pos,
                "metadata": {}}
    if msg_type == "is_complete_request":
        return {"status": "unknown"}
    if msg_type == "inspect_request":
        return {"status": "ok", "found": False, "data": {}, "metadata": {}}
    if msg_type == "comm_info_request":
        return {"status": "ok", "comms": {}}
    return {"status": "error", "ename": type(exc).__name__, "evalue": str(exc), "traceback": [],
            "history": []}


def _free_name(manager: AsyncSessionManager, key: str) -> str:
    """A readable session name from the notebook path, unique by a short hash of the key."""
    kind, _, where = key.partition(":")
    base = os.path.basename(where) if kind == "notebook" else "kernel"
    base = re.sub(r"\.ipynb$|\.json$", "", base)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._")[:40] or "notebook"
    digest = hashlib.blake2b(key.encode(), digest_size=3).hexdigest()
    name = f"{slug}-{digest}"
    taken = {s["name"] for s in manager.registry.sessions(status=("starting", "running", "dead"))}
    n = 2
    candidate = name
    while candidate in taken:
        candidate = f"{name}-{n}"
        n += 1
    return candidate



class SandboxKernelApp(IPKernelApp):
    """IPKernelApp, minus what a proxy pays for and does not use.

    - Captured stdout/stderr: the proxy prints nothing of the user's (that is
      relayed from the sandbox), and ipykernel flushes its captured streams
      four times per cell, each a round trip to its iopub thread.
    - The shell-channel thread: it exists for subshells, which the proxy does
      not offer, and costs two thread hops per request and per reply.
    Measured by ``make bench`` (row "kernel cell").
    """

    name = "sandbox-kernel"

    def init_sockets(self) -> None:
        super().init_sockets()
        self.shell_channel_thread = None

    def init_io(self) -> None:
        from types import SimpleNamespace

        self.displayhook = SimpleNamespace()  # init_kernel hands it the execution count

    def reset_io(self) -> None:
        pass
