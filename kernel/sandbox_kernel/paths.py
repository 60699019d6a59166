"""Where state lives on the host, and how one session's directory is laid out."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir

HOME_ENV = "SANDBOX_KERNEL_HOME"

#: zmq's ipc:// endpoints are unix sockets, whose paths the kernel caps at 107 bytes.
MAX_SOCKET_PATH = 107


def default_home() -> Path:
    """``$SANDBOX_KERNEL_HOME``, else ``sandbox-kernel`` in Jupyter's data directory."""
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path(jupyter_data_dir()) / "sandbox-kernel"


#: Where sessions' snapshot directories live in memory (one per session, bound into it).
#: One per host user (root keeps the name it always had): /dev/shm is shared by every
#: user, and a directory another user made first must not hold our sessions' snapshots.
SHM_ROOT = Path("/dev/shm") / ("sandbox-kernel" if os.geteuid() == 0
                               else f"sandbox-kernel-{os.geteuid()}")


def _own_directory(path: Path) -> bool:
    """True if ``path`` is a directory of ours (not a link) that no one else can write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


@dataclass(frozen=True)
class SessionLayout:
    """The host-side directories of one session; only ``root`` is ever bound into the sandbox.

    ``work`` is the user's files and the kernel's cwd; ``tmp`` backs /tmp
    for unconfined (process) sandboxes; ``kernel`` holds the connection file and the ipc sockets;
    ``etc`` the few generated files the sandbox sees in /etc; ``views`` stored
    packs it may read while it loads a snapshot. The session
    directory also keeps the supervisor's plan, state and logs, which are not
    bound.
    """

    root: Path

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def kernel(self) -> Path:
        return self.root / "kernel"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def views(self) -> Path:
        """Links to stored packs the kernel may map while it loads a snapshot (see
        lifecycle); bound read-only, and empty except during a load."""
        return self.root / "views"

    @property
    def views_mark(self) -> Path:
        """Present when the views directory is bound into the sandbox. Host-only: a mark
        inside a directory the sandbox can write could be a link the host then follows."""
        return self.root / "views.bound"

    @property
    def snapshots_mark(self) -> Path:
        """Present when the shared-memory snapshot directory is bound (host-only too)."""
        return self.root / "snapshots.bound"

    @property
    def connection_file(self) -> Path:
        """The connection info every client uses: host-only (the session root is never
        bound), so the sandbox cannot point clients elsewhere (see endpoints)."""
        return self.root / "client.json"

    @property
    def legacy_connection_file(self) -> Path:
        """Where sessions started before 0.x kept it, in the sandbox-writable kernel
        directory: only its key is still read from there (see endpoints)."""
        return self.kernel / "client.json"

    @property
    def socket_links(self) -> Path:
        """Host-only hard links to the kernel's sockets, verified before each attach."""
        return self.root / "sock"

    @property
    def snapshots(self) -> Path | None:
        """Shared memory for loading snapshots (see lifecycle), if this host has /dev/shm."""
        return SHM_ROOT / self.root.name if SHM_ROOT.parent.is_dir() else None

    def make_snapshots(self) -> Path | None:
        """Create the shared-memory directory; None where there is none to be had."""
        shm = self.snapshots
        if shm is None:
            return None
        try:
            SHM_ROOT.mkdir(mode=0o711, exist_ok=True)
            shm.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            return None
        if not _own_directory(SHM_ROOT):  # (then only we make and hand over what is in it)
            return None  # made by another user first: snapshots go through the disk
        return shm

    @property
    def socket_prefix(self) -> Path:
        return self.kernel / "k"

    def make(self) -> None:
        for d in (self.root, self.work, self.tmp, self.kernel, self.etc, self.views):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
