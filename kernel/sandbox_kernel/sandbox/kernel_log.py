"""The kernel's output log, with a cap: a sandbox cannot fill the host's disk through it.

The kernel's stdout and stderr (tracebacks of a crash, warnings, whatever
the user's code prints at the C level) are worth keeping for a look after a
failure, but they are written by the sandbox and land in the host's state
directory, beside the registry and the store. So they go through a pipe to
the supervisor, which keeps the newest ``cap`` bytes at most: the current
file and the one before it, each at most half the cap. Standard library
only: the supervisor runs it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: Default cap on the kernel log, both files together.
DEFAULT_CAP = 4 << 20


class CappedLog:
    def __init__(self, path: Path, cap: int = DEFAULT_CAP):
        self.path = path
        self.previous = path.with_name(path.name + ".1")
        self.half = max(4096, cap // 2)
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        """Append ``data``; past half the cap, the file becomes the previous one."""
        while data:
            room = self.half - self._size
            if room <= 0:
                self._rotate()
                continue
            part, data = data[:room], data[room:]
            os.write(self._fd, part)
            self._size += len(part)

    def _rotate(self) -> None:
        os.close(self._fd)
        os.replace(self.path, self.previous)
        self._fd = self._open()
        self._size = 0

    def drain(self, fd: int) -> bool:
        """Copy what the pipe ``fd`` has now; False once the writers have all closed it."""
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.write(data)
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def log_size(session_dir: Path, name: str) -> int:
    """Bytes the kernel log takes on disk, both files (for the session's disk usage)."""
    total = 0
    for path in (session_dir / name, session_dir / f"{name}.1"):
        with contextlib.suppress(OSError):
            total += os.lstat(path).st_size
    return total
