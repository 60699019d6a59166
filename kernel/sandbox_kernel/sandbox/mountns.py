"""The supervisor's last steps as root: show the sandbox its directories, then stop being root.

A sandbox runs as an unprivileged host uid, and bubblewrap run by that uid
must be able to reach every directory it binds. Many cannot be reached by
path: the interpreter may live under ``/root`` (a pyenv), the state
directory too, and making them traversable would open them to every user.
So, between fork and exec, the supervisor's child (still root) enters a
mount namespace of its own, mounts a small tmpfs on a root-owned mount point
and bind-mounts each directory there under a number; then it drops to the
sandbox's uid and executes bubblewrap, whose binds name those numbers. The
host's mounts are untouched (the namespace is private), and the uid gets no
way to the originals: the staged copies are what bubblewrap binds, read-only
where the launcher says so.

Standard library only (ctypes for mount(2) and unshare(2)): the supervisor
runs as ``python -I -S``.
"""

from __future__ import annotations

import ctypes
import os
import stat

#: The mount point of the staging tmpfs: made by root, mode 0755, empty on the host.
STAGE = "/run/sandbox-kernel/binds"

_CLONE_NEWNS = 0x00020000
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_NOSUID = 2
_MS_NODEV = 4


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def make_stage() -> str:
    """The mount point, made root-owned and not writable by others (refused otherwise)."""
    os.makedirs(STAGE, mode=0o755, exist_ok=True)
    for path in (os.path.dirname(STAGE), STAGE):
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise OSError(f"{path} must be a root-owned directory that only root can write")
    return STAGE


def staged_path(index: int) -> str:
    """Where the ``index``-th staged source appears to bubblewrap."""
    return f"{STAGE}/{index}"


def stage_and_drop(sources: list[str], uid: int, gid: int) -> None:
    """In the child, before exec: private mounts, the sources staged, root given up."""
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "making mounts private")
    _check(libc.mount(b"tmpfs", STAGE.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                      b"mode=0755,size=1m"), f"mounting a tmpfs on {STAGE}")
    for index, source in enumerate(sources):
        target = staged_path(index)
        if os.path.isdir(source):
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        _check(libc.mount(source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None),
               f"staging {source}")
    drop(uid, gid)


def drop(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good: no supplementary groups, real and saved ids too."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:  # pragma: no cover - the kernel refused
        raise OSError("could not drop to the sandbox's uid")
