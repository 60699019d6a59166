"""The ``%session`` commands, shared by the sandbox kernel and the IPython extension.

A command takes the text after ``%session`` and returns :class:`CommandOutput`
(plain text, optionally HTML) so that each surface decides how to show it.
Errors are :class:`CommandError`, shown as one line.
"""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import SandboxError
from .limits import format_size


class CommandError(SandboxError):
    """A %session command was misused; the message says how to use it."""


@dataclass
class CommandOutput:
    text: str
    html: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CommandError(f"%session {self.prog}: {message}; see `%session help {self.prog}`")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parsers: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = _Parser(prog=name, description=help, add_help=False)
        parsers[name] = p
        return p

    add("info", "Show this notebook's session: id, status, isolation, limits, work directory.")
    add("timing", "Show where the last cell's time went, stage by stage.")
    install = add("install", "Install packages into the session (uv, outside the sandbox; "
                  "cached and shared by every session that needs the same set).")
    install.add_argument("packages", nargs="+", metavar="PKG", help="requirement strings")
    new = add("new", "Start a fresh session for this notebook; the old one is left to its lease.")
    new.add_argument("name", nargs="?", help="a name for the new session")
    help_ = add("help", "Show the commands, or one command's usage.")
    help_.add_argument("command", nargs="?")
    return parsers


PARSERS = _parsers()


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


class SessionCommands:
    """Runs commands against whatever supplies the current session and its last timing."""

    def __init__(
        self,
        info: Callable[[], dict[str, Any]],
        last_timing: Callable[[], dict[str, float] | None],
        new_session: Callable[[str | None], Awaitable[dict[str, Any]]],
        install: Callable[[list[str]], Awaitable[Any]] | None = None,
    ):
        self._info = info
        self._last_timing = last_timing
        self._new_session = new_session
        self._install = install

    async def run(self, line: str) -> CommandOutput:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise CommandError(f"%session: cannot parse {line!r}: {exc}") from None
        if not words:
            return self.help(None)
        name, rest = words[0], words[1:]
        parser = PARSERS.get(name)
        if parser is None:
            raise CommandError(
                f"%session: unknown command {name!r}; commands: {', '.join(PARSERS)}"
            )
        args = parser.parse_args(rest)
        if name == "help":
            return self.help(args.command)
        if name == "info":
            return render_info(self._info())
        if name == "timing":
            return render_timing(self._last_timing())
        if name == "install":
            if self._install is None:
                raise CommandError("%session install: not available here")
            result = await self._install(args.packages)
            lines = [result.summary(), *(f"insight: {i}" for i in result.insights)]
            return CommandOutput("\n".join(lines), data={"timing": result.timing,
                                                          "layers": result.layers})
        if name == "new":
            info = await self._new_session(args.name)
            return CommandOutput(
                f"new session {info['name']} ({info['id']}) is starting; "
                "variables of the previous session are not carried over",
                data=info,
            )
        raise AssertionError(name)

    def help(self, command: str | None) -> CommandOutput:
        if command is None:
            lines = ["%session COMMAND [ARGS]", ""]
            lines += [f"  {n:8} {p.description}" for n, p in PARSERS.items()]
            return CommandOutput("\n".join(lines))
        parser = PARSERS.get(command)
        if parser is None:
            raise CommandError(f"%session help: no command {command!r}")
        return CommandOutput(parser.format_help().replace("usage: ", "usage: %session ", 1))


def render_info(info: dict[str, Any]) -> CommandOutput:
    rows = []
    for key, value in info.items():
        if key in ("created", "last_activity") and value:
            value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        elif key == "limits":
            value = ", ".join(
                f"{k}={format_size(v) if k in ('memory', 'file_size') else v}"
                for k, v in value.items()
            )
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        rows.append((key, "-" if value is None else str(value)))
    text = "\n".join(f"{k + ':':16}{v}" for k, v in rows)
    html = "<table>" + "".join(
        f"<tr><th style='text-align:left'>{_esc(k)}</th><td style='text-align:left'>{_esc(v)}"
        "</td></tr>" for k, v in rows) + "</table>"
    return CommandOutput(text, html, data=info)


def render_timing(timing: dict[str, float] | None) -> CommandOutput:
    if not timing:
        return CommandOutput("no cell has run in this session yet")
    total = timing.get("total") or sum(timing.values())
    lines = []
    for stage, seconds in timing.items():
        share = f"{100 * seconds / total:5.1f}%" if total and stage != "total" else ""
        lines.append(f"{stage:10} {seconds * 1000:10.1f} ms {share}")
    return CommandOutput("\n".join(lines), data=dict(timing))


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
