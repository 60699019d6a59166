"""The ``%session`` commands, shared by the sandbox kernel and the IPython extension.

Each subcommand is a coroutine over a :class:`CommandContext` (which session
is current, the manager, the last run's timing) and returns a
:class:`CommandOutput`: plain text, optional HTML, and structured ``data``
with a ``view`` name, so that each surface shows it its own way (the
extension as an ipywidget, the kernel and terminals as HTML or text).
Arguments are parsed with IPython's ``magic_arguments``, so ``%session?`` and
``%session help COMMAND`` print the same usage the parser enforces. Misuse
raises :class:`CommandError`, shown as one line. Every string that can come
from a sandbox (file names, MIME types, variable names, reasons, a dead
kernel's log) goes through :func:`~sandbox_kernel.shown.shown` here, so the
text and HTML of every surface show it escaped.
"""

from __future__ import annotations

import dataclasses
import html
import re
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .errors import NameTaken, SandboxError, SessionClosed, SessionDead, SessionNotFound
from .limits import format_size
from .shown import shown
from .timing import install_insights, run_insights, transfer_insights
from .workdir import relative_parts

if TYPE_CHECKING:
    from .host_paths import HostPaths
    from .lifecycle import ResumeReport
    from .manager import SessionManager
    from .ownership import SessionScope
    from .session import AsyncSession


class CommandError(SandboxError):
    """A %session command was misused; the message says how to use it."""


@dataclass
class CommandOutput:
    text: str
    html: str | None = None
    #: Structured figures; ``data["view"]`` names the widget that can show them.
    data: dict[str, Any] = field(default_factory=dict)


class CommandContext(Protocol):
    """What a surface (the kernel, the magics) gives the commands."""

    manager: SessionManager
    last_timing: dict[str, float] | None
    #: Insights of the last command that produced some (an install's, an upload's).
    last_insights: list[str]

    async def current(self) -> AsyncSession:
        """The session commands act on by default; CommandError if there is none."""

    async def use(self, session: AsyncSession) -> None:
        """Make ``session`` the current one."""

    def watch_transfer(self, batch: Any) -> Callable[[], None] | None:
        """Show a transfer's progress while it runs; returns a function that ends the display."""

    def default_name(self) -> str | None:
        """The name `%session new` gives when none is asked for (None: generated)."""

    #: The sessions this surface may see and act on (None: every session, the user's own
    #: rights: the magics); see ownership. Required, so that no surface is open by omission.
    scope: SessionScope | None
    #: The host paths upload, download and artifacts --save may use; see host_paths.
    host_paths: HostPaths


Command = Callable[[CommandContext, Any], Awaitable[CommandOutput]]
COMMANDS: dict[str, Command] = {}


def command(func: Callable[..., Awaitable[CommandOutput]]) -> Command:
    """Register a subcommand under its parser's name (``session NAME``)."""
    COMMANDS[func.parser.prog.split()[-1]] = func  # type: ignore[attr-defined]
    return func


def is_command(line: str) -> bool:
    stripped = line.strip()
    return stripped == "%session" or stripped.startswith("%session ")


def split_cell(code: str) -> list[tuple[str, str]]:
    """Split a cell into ("command", line) and ("code", text) parts, in order."""
    parts: list[tuple[str, str]] = []
    block: list[str] = []
    for line in code.splitlines(keepends=True):
        if is_command(line):
            if block:
                parts.append(("code", "".join(block)))
                block = []
            parts.append(("command", line.strip()[len("%session"):].strip()))
        else:
            block.append(line)
    if block and "".join(block).strip():
        parts.append(("code", "".join(block)))
    return parts


async def run_command(ctx: CommandContext, line: str) -> CommandOutput:
    """Parse ``line`` (the text after %session) and run it."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise CommandError(f"%session: cannot parse {line!r}: {exc}") from None
    if not words:
        return usage(None)
    name = words[0]
    func = COMMANDS.get(name)
    if func is None:
        raise CommandError(f"%session: unknown command {name!r}; commands: "
                           f"{', '.join(COMMANDS)} (`%session help` explains them)")
    args = parse_args(func, line.strip()[len(name):], f"see `%session help {name}`")
    try:
        return await func(ctx, args)
    except SandboxError as exc:
        reworded = in_session_words(exc)
        if reworded is exc:
            raise
        raise reworded from None


def parse_args(func: Any, text: str, hint: str) -> Any:
    """``func``'s magic arguments from ``text``; CommandError (with ``hint``) if they are wrong.

    IPython's parser raises UsageError for bad arguments but ValueError for an
    unclosed quote; both are the user's to fix, so both become one line.
    """
    prog = func.parser.prog  # type: ignore[attr-defined]
    try:
        return parse_argstring(func, text)
    except (UsageError, ValueError) as exc:
        raise CommandError(f"%{prog}: {exc}; {hint}") from None


def usage(name: str | None) -> CommandOutput:
    if name is None:
        lines = ["%session COMMAND [ARGS]   (`%session help COMMAND` for one command)", ""]
        lines += [f"  {n:11} {_summary(f)}" for n, f in COMMANDS.items()]
        lines += ["", "%%session [NAME] [--timing] [--insights]   runs the cell in the session"]
        return CommandOutput("\n".join(lines))
    func = COMMANDS.get(name)
    if func is None:
        raise CommandError(f"%session help: no command {name!r}; commands: {', '.join(COMMANDS)}")
    text = func.parser.format_help()  # type: ignore[attr-defined]
    return CommandOutput("usage:" + text.removeprefix("::\n\n").rstrip())


def _summary(func: Any) -> str:
    return (func.parser.description or "").strip().splitlines()[0]


async def _target(ctx: CommandContext, name: str | None,
                  command: str | None = None) -> AsyncSession:
    """The session called ``name`` (one of the surface's own), or the current one."""
    if name:
        return await _lookup(ctx, name, command)
    return await ctx.current()


async def _lookup(ctx: CommandContext, name: str, command: str | None) -> AsyncSession:
    """A session by name or id, if the surface may reach it. Another notebook's session
    and no session at all get the same words, so a notebook cannot probe for names."""
    scope = ctx.scope
    if scope is None:
        return await ctx.manager._async_get(name)
    row = scope.find(name)
    if row is None:
        where = f"%session {command} {shown(name)}" if command else "%session"
        raise CommandError(f"{where}: no session {shown(name)!r} belongs to this notebook; "
                           "`%session list` shows its sessions")
    return await ctx.manager._async_get(row["id"])


def _visible(ctx: CommandContext, sessions: list[AsyncSession]) -> list[AsyncSession]:
    scope = ctx.scope
    return sessions if scope is None else scope.visible(sessions)


def _claim(ctx: CommandContext, session: AsyncSession) -> None:
    """A session the surface made (new, fork) is its own."""
    scope = ctx.scope
    if scope is not None:
        scope.claim(session)


# -- sessions ------------------------------------------------------------------


@command
@magic_arguments("session new")
@argument("name", nargs="?", help="a name for the session (default: generated)")
@argument("--language", default=None, help="the kernel (default: python)")
@argument("--template", default=None, help="start from a saved template")
@argument("--timeout", type=float, default=None, help="the lease in seconds")
@argument("--packages", nargs="+", default=None, metavar="PKG", help="packages to install")
async def new(ctx: CommandContext, args: Any) -> CommandOutput:
    """Create a session and make it the current one."""
    name = args.name or ctx.default_name()
    began = time.time()
    try:
        session = await ctx.manager._async_create(
            name=name, language=args.language or getattr(ctx, "default_language", lambda: None)(),
            template=args.template, timeout=args.timeout, packages=args.packages, wait=False)
    except NameTaken as exc:
        raise CommandError(_name_taken(ctx, exc.name)) from None
    except Exception as exc:
        if not await _drop_unborn(ctx, name, began):
            raise
        again = f"`%session new {shown(args.name)}`" if args.name else "`%session new`"
        raise CommandError(f"%session new: the session could not be started: {shown(exc)}; "
                           f"nothing of it was kept, so {again} can try again") from None
    _claim(ctx, session)
    await ctx.use(session)
    info = session.info()
    return CommandOutput(f"new session {shown(info['name'])} ({info['id']}) is starting and is now "
                         "current; variables of the previous session are not carried over",
                         data=info)


async def _drop_unborn(ctx: CommandContext, name: str | None, since: float) -> bool:
    """Close what a failed create left: a dead session that never ran a cell, made since
    ``since`` under ``name`` (or, unnamed, under its own id). The manager keeps such a
    session for a look at its log, and so it held the name: the next `%session new NAME`
    was refused. Whether any was closed."""
    dropped = False
    for row in ctx.manager.registry.sessions(status="dead"):
        ours = row["name"] == name if name else row["name"] == row["id"]
        if ours and row["created"] >= since and not row["execution_count"]:
            await ctx.manager._async_close(row["id"])
            dropped = True
    return dropped


def _name_taken(ctx: CommandContext, name: str) -> str:
    """Why `%session new NAME` was refused, and the %session command to run instead."""
    shown_name = shown(name)
    scope = ctx.scope
    row = ctx.manager.registry.find(name) if scope is None else scope.find(name)
    if row is None:  # another notebook's: its state is not this notebook's to know
        return (f"%session new: the name {shown_name!r} is taken; choose another, or "
                "`%session new` without a name picks a free one")
    status = shown(row["status"])
    if row["status"] == "dead":
        return (f"%session new: session {shown_name} already exists and is dead "
                f"({shown(row['reason'] or 'reason unknown')}); `%session resume {shown_name}` "
                f"starts it again if it has a checkpoint, `%session close {shown_name}` frees "
                "the name")
    return (f"%session new: session {shown_name} already exists ({status}); `%session use "
            f"{shown_name}` makes it current, `%session close {shown_name}` frees the name")


#: A hint naming a CLI command that %session has too, with the same arguments.
_CLI_HINT = re.compile(r"`sandbox-kernel (close|list|pause|resume)((?: [^`\s]+)*)`")


def in_session_words(exc: BaseException) -> BaseException:
    """``exc`` with its next step said as the %session command to run. The manager's errors
    name the Python API and the CLI (``get()``, ``sandbox-kernel close``), which is not what
    someone at a notebook types. Same class and attributes; only the message is new."""
    message: str | None = None
    if isinstance(exc, NameTaken):
        message = (f"a session named {shown(exc.name)!r} already exists; `%session use "
                   f"{shown(exc.name)}` makes it current, or choose another name")
    elif isinstance(exc, SessionNotFound):
        message = f"no session {shown(exc.key)!r}; `%session list` shows the sessions"
    elif isinstance(exc, SessionClosed):
        message = f"session {shown(exc.key)!r} is closed; `%session new` starts a fresh one"
    elif isinstance(exc, SessionDead):
        key = shown(exc.key)
        why = shown(exc.reason or "reason unknown")
        if exc.checkpoint is None:
            then = f"`%session close {key}`, then `%session new`, starts afresh"
        else:
            then = (f"`%session resume {key}` starts it again from its checkpoint "
                    f"{exc.checkpoint} and replays the cells run since; `%session close "
                    f"{key}` ends it")
        message = f"session {key!r} is dead ({why}); {then}"
    elif isinstance(exc, SandboxError) and _CLI_HINT.search(str(exc)):
        message = _CLI_HINT.sub(r"`%session \1\2`", str(exc))  # the same verbs and NAME
    if message is None:
        return exc
    reworded = type(exc).__new__(type(exc))
    reworded.__dict__.update(exc.__dict__)
    reworded.args = (message,)
    return reworded


@command
@magic_arguments("session use")
@argument("name", help="a session's name or id")
async def use(ctx: CommandContext, args: Any) -> CommandOutput:
    """Make an existing session the current one."""
    session = await _lookup(ctx, args.name, "use")
    await ctx.use(session)
    return CommandOutput(f"using session {shown(session.name)} ({session.id}, {session.status})",
                         data=session.info())


@command
@magic_arguments("session list")
@argument("--status", default=None, help="only sessions with this status")
@argument("--all", action="store_true", help="closed sessions too")
async def list_(ctx: CommandContext, args: Any) -> CommandOutput:
    """List the sessions: status, lease, activity, packages."""
    status = args.status or (None if args.all else
                             ["starting", "running", "paused", "frozen", "dead"])
    return render_sessions([_with_usage(s)
                            for s in _visible(ctx, await ctx.manager._async_list(status))])



@command
@magic_arguments("session info")
@argument("name", nargs="?", help="a session (default: the current one)")
async def info(ctx: CommandContext, args: Any) -> CommandOutput:
    """Show a session: id, status, lease, isolation, limits, packages, work directory."""
    return render_info((await _target(ctx, args.name, "info")).info())


@command
@magic_arguments("session close")
@argument("name", nargs="?", help="a session (default: the current one)")
async def close(ctx: CommandContext, args: Any) -> CommandOutput:
    """Close a session: stop its sandbox and delete its files."""
    session = await _target(ctx, args.name, "close")
    await ctx.manager._async_close(session.id)
    return CommandOutput(f"closed {shown(session.name)}")


@command
@magic_arguments("session pause")
@argument("name", nargs="?", help="a session (default: the current one)")
@argument("--freeze", action="store_true", help="stop it in place (memory kept)")
async def pause(ctx: CommandContext, args: Any) -> CommandOutput:
    """Pause a session: variables to the store and the sandbox exits (--freeze: SIGSTOP)."""
    session = await _target(ctx, args.name, "pause")
    out = await session.pause("freeze" if args.freeze else "snapshot")
    name = shown(session.name)
    if out.get("already"):
        return CommandOutput(f"{name} is already {out['status']}", data=out)
    lines = [f"{out['status']} {name} in {out['timing']['total']:.2f} s; "
             "`%session resume` or the next cell run in it brings it back"]
    lines += not_saved(out.get("skipped", {}), out.get("inexact"))
    return CommandOutput("\n".join(lines), data=out)


def not_saved(skipped: dict[str, str], inexact: dict[str, str] | None = None) -> list[str]:
    """What a pause could not save, for the person who paused: a line for each variable that
    failed to pickle, and one line for all the widgets and display objects, which no
    notebook can pickle (a line each for them was noise on every pause of a notebook with
    a slider). A resume replays the cells that made either kind. Then a line for each
    variable saved, but not exactly (``inexact``: sharing that could not be kept)."""
    from .snapshot import LIVE_OBJECT

    lines = [f"not saved: {shown(n)}: {shown(why)} (a resume replays the cells that made it)"
             for n, why in skipped.items() if why != LIVE_OBJECT]
    live = [shown(n) for n, why in skipped.items() if why == LIVE_OBJECT]
    if live:
        names = ", ".join(live[:6]) + (f" and {len(live) - 6} more" if len(live) > 6 else "")
        lines.append(f"not saved: {names}: widgets and display objects live in the kernel "
                     "only (no notebook can pickle them); a resume replays the cells that "
                     "made them")
    lines += [f"saved, but not exactly: {shown(n)}: {shown(why)}"
              for n, why in (inexact or {}).items()]
    return lines


@command
@magic_arguments("session resume")
@argument("name", nargs="?", help="a session (default: the current one)")
@argument("--checkpoint", type=int, default=None, help="resume from this checkpoint")
async def resume(ctx: CommandContext, args: Any) -> CommandOutput:
    """Resume a paused or frozen session (running a cell does it too)."""
    report = await (await _target(ctx, args.name, "resume")).resume(args.checkpoint)
    return CommandOutput(report_text(report), data=report.__dict__)


@command
@magic_arguments("session timeout")
@argument("seconds", type=float, help="the new lease, from now")
@argument("--on-timeout", dest="on_timeout", default=None, choices=["pause", "close"])
@argument("--name", default=None, help="a session (default: the current one)")
async def timeout(ctx: CommandContext, args: Any) -> CommandOutput:
    """Set the lease: SECONDS from now, then pause (or close)."""
    session = await _target(ctx, args.name, "timeout")
    info = session.set_timeout(args.seconds, args.on_timeout)
    when = time.strftime("%H:%M:%S", time.localtime(info["expires_at"]))
    return CommandOutput(f"{shown(session.name)}: lease {info['timeout']:g} s, expires at {when}, "
                         f"then {info['on_timeout']}", data=info)


# -- packages and files -----------------------------------------------------------


@command
@magic_arguments("session install")
@argument("packages", nargs="+", metavar="PKG", help="requirement strings")
async def install(ctx: CommandContext, args: Any) -> CommandOutput:
    """Install packages (uv, outside the sandbox; cached and shared between sessions)."""
    result = await (await ctx.current()).install(args.packages)
    ctx.last_timing = {f"install.{k}": v for k, v in result.timing.items()}
    ctx.last_insights = install_insights(result, commands=True)
    lines = [shown(result.summary()), *(f"insight: {shown(i)}" for i in ctx.last_insights)]
    return CommandOutput("\n".join(lines), data={"timing": result.timing,
                                                  "layers": result.layers})


@command
@magic_arguments("session upload")
@argument("paths", nargs="+", metavar="PATH", help="local files or directories")
@argument("--dest", default=None, help="destination in the work directory (one PATH)")
async def upload(ctx: CommandContext, args: Any) -> CommandOutput:
    """Upload files into the work directory, with progress and dedup figures."""
    import asyncio

    session = await ctx.current()
    if args.dest is not None and len(args.paths) != 1:
        raise CommandError("%session upload: --dest takes exactly one PATH")
    # Every path is checked (and asked about) before a byte of any is read.
    sources = [await ctx.host_paths.source("upload", path) for path in args.paths]
    commit = session.upload_commit()
    left_out: list[str] = []
    for source in sources:
        left_out += source.add_to(commit, args.dest)
    done = ctx.watch_transfer(commit)
    began = time.perf_counter()
    try:
        manifest = await asyncio.to_thread(commit.commit)
    finally:
        if done is not None:
            done()
    seconds = time.perf_counter() - began
    st = manifest["stats"]
    ctx.last_timing = {"upload": seconds, "total": seconds}
    ctx.last_insights = transfer_insights(st, seconds, sum(f["size"] for f in manifest["files"]))
    text = (f"uploaded {len(manifest['files'])} file(s): {format_size(st['bytes_moved'])} "
            f"placed, {format_size(st['bytes_stored'])} newly stored, {st['chunks_reused']} "
            f"chunks reused, {st['files_skipped']} unchanged")
    if left_out:
        more = f" and {len(left_out) - 10} more" if len(left_out) > 10 else ""
        text += (f"\nnot uploaded: {', '.join(shown(p) for p in left_out[:10])}{more} (links, "
                 "hidden names and special files are not taken from a directory; name one "
                 "to be asked about it)")
    return CommandOutput(text, data={"view": "transfer", **commit.get_progress(), "stats": st})


@command
@magic_arguments("session download")
@argument("paths", nargs="+", metavar="PATH", help="paths in the work directory")
@argument("--to", default=".", help="local directory (default: .)")
async def download(ctx: CommandContext, args: Any) -> CommandOutput:
    """Download files from the work directory, verified against their hashes."""
    import asyncio

    session = await ctx.current()
    names = [relative_parts(path, "sandbox path")[-1] for path in args.paths]
    target = await ctx.host_paths.target("download", args.to, names)
    group = session.download_group()
    with target.opened() as where:  # open (by descriptors) until every file is in
        for path in args.paths:
            group.add(path, where)
        done = ctx.watch_transfer(group)
        try:
            results = await asyncio.to_thread(group.finish)
        finally:
            if done is not None:
                done()
    return CommandOutput("\n".join(f"{shown(r['source'])} -> "
                                   f"{shown(target.show(r['dest'], where))} "
                                   f"({format_size(r['size'])}, verified)" for r in results),
                         data={"view": "transfer", **group.get_progress()})


@command
@magic_arguments("session artifacts")
@argument("--tag", default=None, help="only artifacts with this tag")
@argument("--save", type=int, default=None, metavar="ID", help="save this artifact's content")
@argument("--to", default=".", help="the local directory --save writes into (default: .)")
async def artifacts(ctx: CommandContext, args: Any) -> CommandOutput:
    """List what runs produced: changed files and rich outputs (--save ID keeps one)."""
    found = (await ctx.current()).artifacts(tag=args.tag)
    if args.save is not None:
        return await _save_artifact(ctx, [a for a in found if a.id == args.save], args)
    if not found:
        return CommandOutput("no artifacts yet")
    rows = [(str(a.id), a.kind, a.mime, format_size(a.size), a.path or "-",
             ",".join(a.tags) or "-") for a in found]
    return _table(("ID", "KIND", "MIME", "SIZE", "PATH", "TAGS"), rows, numeric=("ID", "SIZE"))


async def _save_artifact(ctx: CommandContext, chosen: list[Any], args: Any) -> CommandOutput:
    """Write an artifact of the current session into ``args.to``, verified."""
    import asyncio

    if not chosen:
        raise CommandError(f"%session artifacts: this session has no artifact {args.save}"
                           + (f" tagged {shown(args.tag)!r}" if args.tag else "")
                           + "; `%session artifacts` lists them")
    artifact = chosen[0]
    target = await ctx.host_paths.target("artifacts", args.to, [artifact.file_name])
    with target.opened() as where:
        # The directory itself: save() names the file in it (file_name) and renames it into
        # place, so an entry of that name that is a link is replaced, never followed.
        written = await asyncio.to_thread(artifact.save, where)
    return CommandOutput(f"saved artifact {artifact.id} to {shown(target.show(written, where))} "
                         f"({format_size(artifact.size)}, verified)")


# -- checkpoints and history ----------------------------------------------------------


@command
@magic_arguments("session checkpoint")
@argument("--name", default=None, help="a label for the checkpoint")
@argument("--list", action="store_true", help="list the checkpoints instead")
async def checkpoint(ctx: CommandContext, args: Any) -> CommandOutput:
    """Save the variables, imports and files now (or --list the checkpoints)."""
    session = await ctx.current()
    items = session.checkpoints() if args.list else [await session.checkpoint(args.name)]
    rows = [(str(c.id), c.kind, c.name or "-", time.strftime("%H:%M:%S",
                                                              time.localtime(c.created)),
             str(len(c.variables)), format_size(c.size), str(c.stats.get("chunks_new", 0)))
            for c in items]
    return _table(("ID", "KIND", "NAME", "TIME", "NAMES", "SIZE", "NEW CHUNKS"), rows,
                  numeric=("ID", "NAMES", "SIZE", "NEW CHUNKS"))


@command
@magic_arguments("session restore")
@argument("checkpoint", help="a checkpoint id or name")
async def restore(ctx: CommandContext, args: Any) -> CommandOutput:
    """Go back to a checkpoint: variables and files."""
    key: Any = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
    report = await (await ctx.current()).restore(key)
    return CommandOutput(report_text(report), data=report.__dict__)


@command
@magic_arguments("session fork")
@argument("name", nargs="?", help="a name for the new session")
@argument("--checkpoint", default=None, help="fork from this checkpoint (default: now)")
@argument("--use", action="store_true", help="make the fork the current session")
async def fork(ctx: CommandContext, args: Any) -> CommandOutput:
    """A new session from a checkpoint of this one; the two are independent."""
    key: Any = args.checkpoint
    if isinstance(key, str) and key.isdigit():
        key = int(key)
    child = await (await ctx.current()).fork(key, args.name)
    _claim(ctx, child)
    if args.use:
        await ctx.use(child)
    return CommandOutput(f"forked into {shown(child.name)} ({child.id})"
                         + ("; it is now current" if args.use else ""), data=child.info())


@command
@magic_arguments("session history")
@argument("-n", type=int, default=20, help="the last N runs (default 20)")
async def history(ctx: CommandContext, args: Any) -> CommandOutput:
    """The recorded runs of the session: count, status, time, first line."""
    runs = (await ctx.current()).history()[-args.n:]
    rows = [(str(h["execution_count"] or ""), h["status"],
             f"{h['timing'].get('total', 0) * 1000:.1f} ms",
             (h["code"].strip().splitlines() or [""])[0][:70]) for h in runs]
    return _table(("N", "STATUS", "TIME", "CODE"), rows, numeric=("N", "TIME"))


# -- visibility -------------------------------------------------------------------


@command
@magic_arguments("session timing")
async def timing(ctx: CommandContext, args: Any) -> CommandOutput:
    """Where the last run's time went, stage by stage."""
    return render_timing(ctx.last_timing)


@command
@magic_arguments("session insights")
async def insights(ctx: CommandContext, args: Any) -> CommandOutput:
    """The last run's bottleneck and what to do about it; idle sessions worth pausing."""
    found = run_insights(ctx.last_timing or {}, commands=True) + list(ctx.last_insights)
    now = time.time()
    for s in _visible(ctx, await ctx.manager._async_list("running")):
        i = s.info()
        idle = now - i["last_activity"]
        if idle > 900:
            name = i["name"]  # (render_insights escapes each insight)
            found.append(f"session {name} has been idle for {idle / 60:.0f} min: "
                         f"`%session pause {name}` frees its memory and keeps its state")
    return render_insights(found)


@command
@magic_arguments("session dashboard")
@argument("--refresh", type=float, default=2.0, help="seconds between refreshes (widget)")
async def dashboard(ctx: CommandContext, args: Any) -> CommandOutput:
    """A live table of sessions with pause, resume, renew and close buttons."""
    status = ["starting", "running", "paused", "frozen", "dead"]
    out = render_sessions([_with_usage(s)
                           for s in _visible(ctx, await ctx.manager._async_list(status))])
    out.data.update(view="dashboard", refresh=args.refresh)
    return out


@command
@magic_arguments("session help")
@argument("command", nargs="?", help="a command")
async def help(ctx: CommandContext, args: Any) -> CommandOutput:  # noqa: A001
    """Show the commands, or one command's usage."""
    return usage(args.command)


# -- rendering ----------------------------------------------------------------------


def _with_usage(session: AsyncSession) -> dict[str, Any]:
    """A session's info plus what the dashboard shows: CPU, memory, files in the work dir."""
    from .workdir import WorkDir

    return session.info() | {"usage": session.usage(),
                             "files": len(WorkDir(session.work_dir).scan(limit=10_000))}


def session_row(i: dict[str, Any], now: float | None = None) -> dict[str, str]:
    """One session as the list, the dashboard and their text fallbacks show it."""
    now = time.time() if now is None else now
    live = i["status"] in ("starting", "running", "frozen")
    return {
        "name": shown(i["name"]), "status": shown(i["status"]), "language": shown(i["language"]),
        "lease": ago(i["expires_at"] - now) if live else "-",
        "cpu": f"{i['usage']['cpu_seconds']:.1f} s" if i.get("usage") else "-",
        "memory": format_size(i["usage"]["memory"]) if i.get("usage") else "-",
        "packages": str(len(i["packages"])), "files": str(i.get("files", "-")),
        "runs": str(i["execution_count"]),
        "last run": ago(now - i["last_activity"]) + " ago",
    }


def render_sessions(infos: list[dict[str, Any]]) -> CommandOutput:
    if not infos:
        return CommandOutput("no sessions; `%session new` creates one",
                             data={"view": "sessions", "sessions": []})
    rows = [session_row(i) for i in infos]
    out = _table(tuple(k.upper() for k in rows[0]), [tuple(r.values()) for r in rows],
                 numeric=("LEASE", "CPU", "MEMORY", "PACKAGES", "FILES", "RUNS", "LAST RUN"))
    out.data = {"view": "sessions", "sessions": infos}
    return out


def render_info(info: dict[str, Any]) -> CommandOutput:
    rows = []
    for key, value in info.items():
        if key in ("created", "last_activity", "expires_at") and value:
            value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        elif key == "limits":
            value = ", ".join(
                f"{k}={format_size(v) if k in ('memory', 'file_size', 'disk') else v}"
                for k, v in value.items()
            )
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        rows.append((shown(key), "-" if value is None else shown(value)))
    text = "\n".join(f"{k + ':':16}{v}" for k, v in rows)
    markup = "<table>" + "".join(
        f"<tr><th style='text-align:left'>{_esc(k)}</th><td style='text-align:left'>{_esc(v)}"
        "</td></tr>" for k, v in rows) + "</table>"
    return CommandOutput(text, markup, data=info)


def render_timing(timing: dict[str, float] | None) -> CommandOutput:
    if not timing:
        return CommandOutput("no cell has run in this session yet", data={"view": "timing"})
    total = timing.get("total") or sum(timing.values())
    lines = []
    for stage, seconds in timing.items():
        share = f"{100 * seconds / total:5.1f}%" if total and stage != "total" else ""
        lines.append(f"{stage:10} {seconds * 1000:10.1f} ms {share}")
    bar, table = timing_html(timing)
    return CommandOutput("\n".join(lines), bar + table,
                         data={"view": "timing", "timing": timing})


_TD = "padding:1px 8px 1px 0;white-space:nowrap;overflow:hidden;text-overflow:ellipsis"


def timing_html(timing: dict[str, float]) -> tuple[str, str]:
    """A run's stages as HTML, for the kernel and the timing widget alike: a bar with a
    segment per stage (its share of the total; time no stage accounts for is left blank),
    and a table in fixed columns (colour, stage, time, share) with the figures
    right-aligned under their headers."""
    total = timing.get("total") or sum(timing.values()) or 1.0
    stages = [(k, v) for k, v in timing.items() if k != "total"]
    bar = ("<div style='display:flex;width:100%;max-width:640px;height:14px;overflow:hidden'>"
           + "".join(f"<div title='{_esc(shown(k))}: {v * 1000:.1f} ms' style='flex:0 0 "
                     f"{max(0.5, 100 * v / total):.1f}%;background:{stage_color(i)}'></div>"
                     for i, (k, v) in enumerate(stages)) + "</div>")
    rows = "".join(
        f"<tr><td style='{_TD}'>"
        + ("" if k == "total" else f"<span style='display:inline-block;width:10px;height:10px;"
                                   f"background:{stage_color(i)}'></span>")
        + f"</td><td style='{_TD};text-align:left' title='{_esc(shown(k))}'>{_esc(shown(k))}"
        f"</td><td style='{_TD};text-align:right'>{v * 1000:.1f} ms</td>"
        f"<td style='{_TD};text-align:right'>{'' if k == 'total' else f'{100 * v / total:.1f}%'}"
        "</td></tr>"
        for i, (k, v) in enumerate([*stages, ("total", total)]))
    table = ("<table style='border-collapse:collapse;table-layout:fixed;line-height:1.5'>"
             "<colgroup><col style='width:18px'><col style='width:180px'>"
             "<col style='width:96px'><col style='width:64px'></colgroup>"
             f"<tr><th style='{_TD}'></th><th style='{_TD};text-align:left'>stage</th>"
             f"<th style='{_TD};text-align:right'>time</th>"
             f"<th style='{_TD};text-align:right'>share</th></tr>"
             f"{rows}</table>")
    return bar, table


def render_insights(found: list[str]) -> CommandOutput:
    """Insights may quote what a sandbox or a package index named: each is shown escaped."""
    found = [shown(i) for i in found]
    if not found:
        return CommandOutput("no insights: no stage dominated the last run",
                             data={"view": "insights", "insights": []})
    return CommandOutput("\n".join(f"insight: {i}" for i in found),
                         "<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in found) + "</ul>",
                         data={"view": "insights", "insights": found})


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]],
           numeric: tuple[str, ...] = ()) -> CommandOutput:
    """A text table and its HTML. A cell is one line, so every cell is escaped here, where
    no caller can forget it: artifact paths, MIME types, labels and code come from sandboxes.
    The columns named in ``numeric`` are right-aligned, the others left-aligned (JupyterLab
    right-aligns every cell of a table otherwise); a cell longer than 24 characters is cut
    with an ellipsis in the HTML, and whole in its title (shown on hover)."""
    rows = [tuple(shown(v) for v in r) for r in rows]
    widths = [max(len(str(r[c])) for r in [head, *rows]) for c in range(len(head))]
    text = "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in [head, *rows])
    align = [f"text-align:{'right' if h in numeric else 'left'};white-space:nowrap"
             for h in head]

    def cell(value: str, style: str) -> str:
        if len(value) <= 24:
            return f"<td style='{style}'>{_esc(value)}</td>"
        return (f"<td style='{style};max-width:16em;overflow:hidden;text-overflow:ellipsis' "
                f"title='{_esc(value)}'>{_esc(value)}</td>")

    markup = ("<table><tr>" + "".join(f"<th style='{a}'>{_esc(h)}</th>"
                                      for h, a in zip(head, align, strict=True)) + "</tr>"
              + "".join("<tr>" + "".join(cell(str(v), a) for v, a in zip(r, align, strict=True))
                        + "</tr>" for r in rows) + "</table>")
    return CommandOutput(text, markup)


def report_text(report: ResumeReport) -> str:
    """A resume's or restore's report as text, each name and reason escaped on its own.

    The names and reasons come from the sandbox (a variable may be called
    ``"x\\nsession closed OK"``); escaping the joined text would keep such a newline.
    """
    return str(dataclasses.replace(
        report, restored=[shown(n) for n in report.restored],
        imports=[shown(n) for n in report.imports],
        replayed={shown(n): cells for n, cells in report.replayed.items()},
        lost={shown(n): shown(why) for n, why in report.lost.items()}))


_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2")


def stage_color(i: int) -> str:
    """The colour of the ``i``-th stage, the same in HTML tables and in the widgets."""
    return _COLORS[i % len(_COLORS)]


def ago(seconds: float) -> str:
    """A duration as the tables show it: 45s, 3m, 2h, 1d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


# -- trust: a session's outputs unfiltered (see frontend_guard) -------------------------


@command
@magic_arguments("session trust")
@argument("name", nargs="?", help="a session (default: the current one)")
async def trust(ctx: CommandContext, args: Any) -> CommandOutput:
    """Let a session's outputs run code in this browser (asks you first); `untrust` ends it.

    The answer is asked of the person at the frontend (``ctx.ask``: the stdin
    channel, which no output, payload or widget of a sandbox can answer); a
    surface that cannot ask refuses.
    """
    from .trust import TRUST_PROMPT, is_trusted, session_dir, set_trusted

    session = await _target(ctx, args.name, "trust")
    name = shown(session.name)
    if is_trusted(session_dir(session)):
        return CommandOutput(f"session {name} is already trusted; `%session untrust` ends it",
                             data={"trusted": True})
    ask = getattr(ctx, "ask", None)
    if ask is None:
        raise CommandError("%session trust: this surface cannot ask you, so it trusts nothing")
    answer = await ask(TRUST_PROMPT.format(name=name))
    if answer.strip().lower() != "yes":
        return CommandOutput(f"session {name} stays untrusted: its outputs are still filtered",
                             data={"trusted": False})
    set_trusted(session_dir(session), True)
    return CommandOutput(f"session {name} is trusted: from its next output on, what it sends "
                         "reaches this browser unfiltered; `%session untrust` ends it",
                         data={"trusted": True})


@command
@magic_arguments("session untrust")
@argument("name", nargs="?", help="a session (default: the current one)")
async def untrust(ctx: CommandContext, args: Any) -> CommandOutput:
    """Filter a trusted session's outputs again (scripts, active types, other widgets)."""
    from .trust import session_dir, set_trusted

    session = await _target(ctx, args.name, "untrust")
    set_trusted(session_dir(session), False)
    return CommandOutput(f"session {shown(session.name)} is not trusted: its outputs are "
                         "filtered from the next one on", data={"trusted": False})
