"""Errors a user can act on.

Every message says what went wrong and what to do next, because these texts
are what the CLI, the magics and the kernel show as one line.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path


class SandboxError(Exception):
    """Base of every error raised on purpose by sandbox-kernel."""


class SessionNotFound(SandboxError, LookupError):
    """No session has that id or name."""

    def __init__(self, key: str):
        super().__init__(
            f"no session with id or name {key!r}; `sandbox-kernel list` shows the sessions"
        )
        self.key = key


class SessionClosed(SandboxError):
    """The session was closed; it cannot run code any more."""

    def __init__(self, key: str):
        super().__init__(f"session {key!r} is closed; create a new one")
        self.key = key


class SessionDead(SandboxError):
    """The sandbox process ended without being asked to."""

    def __init__(self, key: str, reason: str | None, checkpoint: int | None = None):
        if checkpoint is None:
            then = (f"restart() starts it again with no variables and its files kept, or "
                    f"close it with `sandbox-kernel close {key}` and create a new session")
        else:
            then = (f"resume() (`sandbox-kernel resume {key}`) starts it again from its "
                    f"checkpoint {checkpoint} and replays the cells run since, or close it "
                    f"with `sandbox-kernel close {key}`")
        super().__init__(f"session {key!r} is dead ({reason or 'reason unknown'}); {then}")
        self.key = key
        self.reason = reason
        self.checkpoint = checkpoint


class InvalidArgument(SandboxError, ValueError):
    """A name, limit, environment variable or other argument is not acceptable."""


class NameTaken(InvalidArgument):
    """Another live session already has that name."""

    def __init__(self, name: str):
        super().__init__(
            f"a session named {name!r} already exists; attach to it with get({name!r}) "
            "or choose another name"
        )
        self.name = name


class StartFailed(SandboxError):
    """The sandbox or its kernel could not be started."""


class ConnectionDropped(SandboxError):
    """ZeroMQ dropped the connection to a kernel that still runs (a message over the limit)."""


class ExecutionTimeout(SandboxError, TimeoutError):
    """A run took longer than its timeout; the kernel was interrupted."""


class SessionBusy(SandboxError):
    """A lifecycle change (pause, freeze, checkpoint) waited too long for a running cell."""


class TooManySessions(SandboxError):
    """``max_sessions`` live sessions exist already."""


class SnapshotDamaged(SandboxError):
    """A checkpoint's stored state is missing or corrupt."""


class RegistryDamaged(SandboxError):
    """The registry database fails SQLite's own check; nothing is changed in it."""

    def __init__(self, path: str | Path, detail: str):
        detail = " ".join(detail.replace("*", "").split())
        super().__init__(
            f"the registry {path} is damaged ({detail}); nothing was changed in it. Stop the "
            f"processes using it, keep a copy, and repair it with "
            f"`sqlite3 {path} '.recover' | sqlite3 {path}.recovered` (then move that into "
            "place), or start afresh in another SANDBOX_KERNEL_HOME")
        self.path = str(path)


class StateDirFull(SandboxError, OSError):
    """The filesystem of the state directory has no room for what had to be written."""

    def __init__(self, home: str | Path, what: str):
        try:
            free = f"{shutil.disk_usage(home).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        super().__init__(
            f"no space left in the state directory {home} ({free}): {what}; nothing "
            "half-written was kept. Free space there (`sandbox-kernel gc` removes unused "
            "package layers and stored data) and try again")
        self.home = str(home)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError or SQLite error that means the disk (or a quota) is full."""
    if isinstance(exc, StateDirFull):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.OperationalError):
        return (getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                or "disk is full" in str(exc))
    return False
