"""Per-session control groups: the limits rlimits cannot give.

RLIMIT_NPROC counts processes per real user, and the kernel exempts uid 0,
which is what a sandbox started by root maps to outside its user namespace;
so the only process limit that holds for root is a ``pids`` cgroup. The
memory cgroup bounds the memory all the sandbox's processes use together,
which is what a memory limit means; RLIMIT_AS would bound each process's
address space, which libraries reserve far beyond what they use. Both cgroup
v1 (one hierarchy per controller) and v2 (one unified hierarchy) are handled;
where neither is writable the caller falls back to rlimits and says so.
Standard library only: the supervisor imports this module without
site-packages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

_CONTROLLERS = ("pids", "memory")


@dataclass
class Cgroups:
    """The directories of one session's cgroups, keyed by controller."""

    dirs: dict[str, str] = field(default_factory=dict)
    version: int = 0

    @classmethod
    def create(cls, name: str, memory: int | None, processes: int | None) -> Cgroups:
        """Create ``name`` under this process's own cgroups, with what is writable."""
        groups = cls()
        for controller, base, version in _writable_bases():
            if controller in groups.dirs:
                continue
            path = os.path.join(base, name)
            try:
                os.makedirs(path, exist_ok=True)
                if controller == "pids" and processes:
                    _write(path, "pids.max", processes)
                if controller == "memory" and memory:
                    if version == 1:
                        _write(path, "memory.limit_in_bytes", memory)
                        with contextlib.suppress(OSError):
                            _write(path, "memory.memsw.limit_in_bytes", memory)
                    else:
                        _write(path, "memory.max", memory)
                        with contextlib.suppress(OSError):
                            _write(path, "memory.swap.max", 0)
            except OSError:
                if path not in groups.dirs.values():
                    with contextlib.suppress(OSError):
                        os.rmdir(path)
                continue
            groups.dirs[controller] = path
            groups.version = version
        return groups

    def add(self, pid: int) -> None:
        for path in set(self.dirs.values()):
            _write(path, "cgroup.procs", pid)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in set(self.dirs.values()):
            with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs")) as f:
                found.update(int(line) for line in f if line.strip())
        return found

    def oom_killed(self) -> bool:
        """True when the memory controller killed a process of this group."""
        path = self.dirs.get("memory")
        if not path:
            return False
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            with open(os.path.join(path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
        except OSError:
            pass
        return False

    def kill(self, deadline: float = 5.0) -> None:
        """SIGKILL every process in the groups, until none is left or the deadline passes."""
        for path in set(self.dirs.values()):
            with contextlib.suppress(OSError):
                _write(path, "cgroup.kill", 1)  # v2, Linux >= 5.14: atomic
        end = time.monotonic() + deadline
        while (pids := self.pids()) and time.monotonic() < end:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill()
        for path in set(self.dirs.values()):
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _write(directory: str, name: str, value: object) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(str(value))


def _writable_bases() -> list[tuple[str, str, int]]:
    """(controller, directory of this process's cgroup, version) for usable controllers."""
    own: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    own[c] = path
    except OSError:
        return []
    found = []
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return []
    for _dev, mountpoint, fstype, options, *_ in mounts:
        if fstype == "cgroup":
            for controller in _CONTROLLERS:
                if controller in options.split(",") and controller in own:
                    base = mountpoint + own[controller]
                    if os.access(base, os.W_OK):
                        found.append((controller, base, 1))
        elif fstype == "cgroup2" and "" in own:
            base = mountpoint + own[""]
            try:
                with open(os.path.join(mountpoint, "cgroup.controllers")) as f:
                    available = f.read().split()
            except OSError:
                continue
            for controller in _CONTROLLERS:
                if controller in available and os.access(base, os.W_OK):
                    with contextlib.suppress(OSError):
                        _write(base, "cgroup.subtree_control", f"+{controller}")
                    found.append((controller, base, 2))
    return found
