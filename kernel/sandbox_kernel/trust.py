"""Whether a session is trusted: its outputs reach the browser as they are.

An untrusted session's outputs, widgets and payloads pass the output policy
(see ``frontend_guard``). A person can lift that for one session with
``%session trust``, which asks them in the frontend first; nothing a session
sends can set it. The flag is a mark in the session's host-only directory
(the sandbox never sees that directory, so the sandbox cannot make the mark),
so every process that reaches the session agrees on it without a registry
column, and it goes away with the session. A fork or a replay is a new
session and starts untrusted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRUSTED_MARK = "trusted"


def mark_path(session_dir: str | os.PathLike[str]) -> Path:
    return Path(session_dir) / TRUSTED_MARK


def is_trusted(session_dir: str | os.PathLike[str]) -> bool:
    return os.path.exists(mark_path(session_dir))


def set_trusted(session_dir: str | os.PathLike[str], on: bool) -> None:
    """Trust (or stop trusting) the session whose host-only directory is ``session_dir``.

    The caller has asked the person first; this only records the answer.
    """
    mark = mark_path(session_dir)
    if on:
        fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{time.time():.0f}\n".encode())
        finally:
            os.close(fd)
    else:
        mark.unlink(missing_ok=True)


def session_dir(session: Any) -> str:
    """The host-only directory of an AsyncSession or Session."""
    inner = getattr(session, "async_session", session)
    return inner._row["session_dir"]


class TrustFlag:
    """A session's trust, read at most once per ``ttl`` seconds (and after ``expire``).

    The relay consults it only for messages the policy would change, so a cell
    whose output is plain text never reads it; ``%session untrust`` elsewhere
    applies here by the next cell, or within ``ttl`` for widget traffic.
    """

    def __init__(self, read: Callable[[], bool], ttl: float = 1.0) -> None:
        self._read = read
        self._ttl = ttl
        self._value = False
        self._until = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now >= self._until:
            try:
                self._value = self._read()
            except OSError:
                self._value = False
            self._until = now + self._ttl
        return self._value

    def expire(self) -> None:
        self._until = 0.0


TRUST_PROMPT = (
    "Trust session {name}? Its outputs would reach this browser unfiltered: JavaScript, "
    "HTML with scripts and widgets of any module run as code in this page, with your "
    "rights in Jupyter (they can start kernels on the host and read its files). "
    "Only do this for code you trust. Type yes to trust it: "
)
