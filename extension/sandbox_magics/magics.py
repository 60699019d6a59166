"""``%session`` and ``%%session`` in any IPython: a kernel, a terminal, nbconvert.

The commands themselves live in ``sandbox_kernel.commands`` (the sandbox
kernel runs the same ones); this module supplies their context (the current
session, a manager configured from IPython's config) and shows what they
return: as ipywidgets where a widget frontend is present, else as text.
Errors print as one line; tracebacks come only from code run in the sandbox.
What a command says is escaped (``sandbox_kernel.shown``): the commands escape
each name and reason from a sandbox, and everything printed here is escaped
once more, newlines kept, so no control character reaches the screen even from
a message that forgot. A ``%%session`` cell's own output is relayed as any
cell's is, but through the sandbox kernel's output policy (``OutputPolicy``:
scripts, active types and event handlers are held back, HTML sanitized)
unless the session is trusted (``%session trust``): republished here, it
would run in the browser with the rights of this host kernel's user.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import clear_output, display, publish_display_data
from traitlets import Bool

from sandbox_kernel import portal
from sandbox_kernel.commands import (
    CommandError,
    CommandOutput,
    _with_usage,
    in_session_words,
    not_saved,
    parse_args,
    report_text,
    run_command,
)
from sandbox_kernel.errors import SandboxError
from sandbox_kernel.host_paths import HostPaths, notebook_dir
from sandbox_kernel.manager import SessionManager
from sandbox_kernel.output_policy import OutputPolicy
from sandbox_kernel.session import AsyncSession
from sandbox_kernel.shown import shown, shown_stream
from sandbox_kernel.trust import is_trusted, session_dir


@magic_arguments("%session")
@argument("name", nargs="?", help="run in this session (default: the current one)")
@argument("--timing", action="store_true", help="show where the time went")
@argument("--insights", action="store_true", help="show the bottleneck, if any")
def _cell_args() -> None:
    """Run the cell in a sandbox session, its output relayed live."""


@magics_class
class SessionMagics(Magics):
    """The %session commands with this IPython's rights, which are the user's own.

    The sandbox kernel confines a notebook's %session lines to the notebook's own
    directory and sessions, because its cells run in a sandbox and the lines are all
    the host rights that notebook has. Here a cell is host code already (it can open
    any file or the registry itself), so confining the magics would be a sign, not a
    wall: every session is in reach, and host paths are too unless
    ``c.SessionMagics.confine_host_paths = True`` (the working directory, or the
    notebook's, and a question for anything else), for those who want the same habit.
    """

    confine_host_paths = Bool(
        False, help="Confine upload, download and artifacts --save to the notebook's "
        "directory (JPY_SESSION_NAME's, else the working directory), asking before any "
        "other path, as the sandbox kernel does. Off: this IPython's own rights.",
    ).tag(config=True)
    #: Every session is in reach (see sandbox_kernel.ownership).
    scope = None

    def __init__(self, shell: Any, manager: SessionManager | None = None) -> None:
        super().__init__(shell)
        self._manager = manager
        self._current: AsyncSession | None = None
        self.last_timing: dict[str, float] | None = None
        #: Insights of the last command that had some (an upload's, say).
        self.last_insights: list[str] = []
        #: The widget (or None) of the last command, for tests and for `stop()`.
        self.last_view: Any = None
        self._output_policy: OutputPolicy | None = None

    # -- the context the commands run in ----------------------------------------------

    @property
    def manager(self) -> SessionManager:
        if self._manager is None:
            self._manager = SessionManager(config=self.shell.config if self.shell else None)
        return self._manager

    async def current(self) -> AsyncSession:
        if self._current is None:
            raise CommandError("%session: no current session; `%session new [NAME]` creates "
                               "one, `%session use NAME` picks an existing one")
        return self._current

    async def use(self, session: AsyncSession) -> None:
        self._current = session
        session.keep_alive(True)  # while this IPython lives, the session's lease is renewed

    def default_name(self) -> None:
        return None

    @property
    def host_paths(self) -> HostPaths:
        """Where upload, download and artifacts --save may go (see confine_host_paths)."""
        if not self.confine_host_paths:
            return HostPaths(None)
        return HostPaths(notebook_dir(), self.ask)

    @property
    def output_policy(self) -> OutputPolicy:
        """What of a %%session cell's rich output is shown (configured like the kernel's)."""
        if self._output_policy is None:
            self._output_policy = OutputPolicy(config=self.shell.config if self.shell else None)
        return self._output_policy

    async def ask(self, prompt: str, password: bool = False) -> str:
        """Ask the person at this IPython's frontend (a kernel's stdin channel or the
        terminal); CommandError when it takes no input (nbconvert, papermill)."""
        from IPython.core.error import StdinNotImplementedError

        try:
            return await asyncio.to_thread(getpass.getpass if password else input, prompt)
        except (StdinNotImplementedError, EOFError, OSError) as exc:
            raise CommandError(f"%session: this needs an answer from you, and this frontend "
                               f"takes no input ({type(exc).__name__})") from None

    def watch_transfer(self, batch: Any) -> Callable[[], None]:
        """Show progress while the transfer runs (from a thread); the returned stop ends it."""
        stop = threading.Event()
        started = time.monotonic()
        view = None
        if widgets_shown(self.shell):
            from .widgets import TransferProgress

            view = TransferProgress("upload" if hasattr(batch, "commit") else "download")
            view.update(batch.get_progress())
            display(view)
            self.last_view = view

        def poll() -> None:
            while True:
                finished = stop.wait(0.1)
                progress = batch.get_progress()
                if view is not None:
                    view.update(progress)
                else:
                    from .widgets import text_bar

                    sys.stdout.write("\r" + text_bar(progress, time.monotonic() - started))
                    sys.stdout.flush()
                if finished:
                    if view is None:
                        sys.stdout.write("\n")
                    return

        thread = threading.Thread(target=poll, daemon=True, name="sandbox-transfer-progress")
        thread.start()

        def done() -> None:
            stop.set()
            thread.join()

        return done

    # -- the magic -------------------------------------------------------------------

    @line_cell_magic
    def session(self, line: str, cell: str | None = None) -> None:
        """Sandbox sessions: `%session help` lists the commands; `%%session` runs a cell.

        %session new [NAME] | use NAME | list | info | close | pause [--freeze] | resume |
        timeout SECONDS | install PKG... | upload PATH... | download PATH... |
        artifacts | checkpoint [--name L] [--list] | restore CK | fork [NEW] |
        history | timing | insights | dashboard | help [COMMAND]

        %%session [NAME] [--timing] [--insights]
            runs the cell in the session (the current one, or NAME), with its
            output relayed as it arrives.
        """
        try:
            if cell is None:
                self._show(portal.call(run_command(self, line)))
            else:
                self._run_cell(line, cell)
        except (SandboxError, UsageError) as exc:
            # One line, whatever sandbox text the error quotes, and its next step as the
            # %session command to run (a %%session cell's errors come from the session).
            message = shown(in_session_words(exc))
            print(message if message.startswith("%session") else f"%session: {message}",
                  file=sys.stderr)

    def _show(self, out: CommandOutput) -> None:
        view = out.data.get("view")
        if view and widgets_shown(self.shell):
            widget = self._widget(view, out)
            if widget is not None:
                self.last_view = widget
                display(widget)
                return
        text = shown(out.text, lines=True)
        if view == "transfer":
            print(text)  # the progress bar was drawn as it went
        elif out.html and self._rich():
            publish_display_data({"text/plain": text, "text/html": out.html})
        else:
            print(text)

    def _widget(self, view: str, out: CommandOutput) -> Any:
        from . import widgets

        if view == "timing" and out.data.get("timing"):
            return widgets.TimingView(out.data["timing"])
        if view == "insights":
            return widgets.InsightsView(out.data.get("insights", []))
        if view == "dashboard":
            return widgets.Dashboard(self._dashboard_rows, self._dashboard_act,
                                     refresh=out.data.get("refresh", 2.0))
        if view == "transfer":
            return None  # shown live by watch_transfer
        return None

    def _dashboard_rows(self) -> list[dict[str, Any]]:
        sessions = portal.call(self.manager._async_list(
            ["starting", "running", "paused", "frozen", "dead"]))
        return [_with_usage(s) for s in sessions]

    def _dashboard_act(self, action: str, session_id: str) -> str:
        """Carry out a dashboard button; what to say, escaped (a resume names variables)."""
        session = portal.call(self.manager._async_get(session_id))
        name = shown(session.name)
        if action == "pause":
            out = portal.call(session.pause())
            return "\n".join([f"{name}: {out['status']}", *not_saved(out.get("skipped", {}),
                                                                     out.get("inexact"))])
        if action == "resume":
            return f"{name}: {report_text(portal.call(session.resume()))}"
        if action == "renew":
            info = session.set_timeout(session.info()["timeout"])
            return f"{name}: lease renewed, {info['timeout']:g} s from now"
        if action == "close":
            portal.call(self.manager._async_close(session_id))
            if self._current is not None and self._current.id == session_id:
                self._current = None
            return f"{name}: closed"
        raise CommandError(f"unknown action {shown(action)!r}")

    def _rich(self) -> bool:
        return getattr(self.shell, "kernel", None) is not None

    # -- %%session ----------------------------------------------------------------------

    def _run_cell(self, line: str, cell: str) -> None:
        args = parse_args(_cell_args, line, "usage: %%session [NAME] [--timing] [--insights]")
        if args.name:
            session = portal.call(self.manager._async_get(args.name))
        elif self._current is not None:
            session = self._current
        else:
            session = portal.call(self.manager._async_create(wait=False))
            print(f"%%session: no current session, so a new one was created: {shown(session.name)} "
                  "(`%session use NAME` picks another)", file=sys.stderr)
        portal.call(self.use(session))
        result = self._relay(session, cell)
        self.last_timing = dict(result.timing)
        self.last_insights = []
        if args.timing:
            self._show(run_output("timing", self))
        if args.insights:
            self._show(run_output("insights", self))

    def _relay(self, session: AsyncSession, code: str) -> Any:
        """Run ``code``; show its outputs from this thread, in order, as they arrive."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        policy = None if is_trusted(session_dir(session)) else self.output_policy

        def ask(prompt: str, password: bool) -> str:
            answer: queue.Queue[str] = queue.Queue()
            events.put(("stdin", (prompt, password, answer)))
            return answer.get()

        fut = portal.submit(session.run(code, on_output=lambda o: events.put(("output", o)),
                                        on_stdin=ask))
        try:
            while True:
                try:
                    kind, payload = events.get(timeout=0.05)
                except queue.Empty:
                    if fut.done():
                        break
                    continue
                if kind == "output":
                    _show_output(payload, policy)
                else:
                    prompt, password, answer = payload
                    prompt = shown(prompt)  # the sandbox's text, on the user's terminal
                    answer.put(getpass.getpass(prompt) if password else input(prompt))
            while not events.empty():
                kind, payload = events.get()
                if kind == "output":
                    _show_output(payload, policy)
            return fut.result()
        except KeyboardInterrupt:
            portal.call(session.interrupt(), timeout=10)
            with contextlib.suppress(Exception):
                fut.result(timeout=self.manager.interrupt_grace)
            print("%%session: interrupted (KeyboardInterrupt in the sandbox)", file=sys.stderr)
            raise


def run_output(name: str, magics: SessionMagics) -> CommandOutput:
    return portal.call(run_command(magics, name))


def _show_output(out: dict[str, Any], policy: OutputPolicy | None) -> None:
    """Show one output of a %%session cell; rich ones through ``policy`` (None: trusted)."""
    kind = out["output_type"]
    if kind == "stream":
        stream = sys.stdout if out["name"] == "stdout" else sys.stderr
        stream.write(shown_stream(out["text"]))  # colours and \r kept, other escapes not
        stream.flush()
    elif kind in ("display_data", "execute_result", "update_display_data"):
        if policy is not None:  # no widget of the sandbox's can be shown here: no view passes
            out = policy.filter_output(out)
        transient = {"display_id": out["display_id"]} if out.get("display_id") else None
        publish_display_data(out["data"], out.get("metadata") or {}, transient=transient,
                             update=kind == "update_display_data")
    elif kind == "clear_output":
        clear_output(wait=out.get("wait", False))
    elif kind == "error":
        print(shown_stream("\n".join(out.get("traceback")
                                     or [f"{out['ename']}: {out['evalue']}"])),
              file=sys.stderr)


def widgets_shown(shell: Any) -> bool:
    """A frontend that can render widgets: a kernel (not a terminal) with ipywidgets."""
    if getattr(shell, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True
