"""Run one command in a one-shot sandbox and take back what it prints, bounded.

Sessions have a supervisor that lives as long as they do; a package build is
one command that ends. It still gets everything a session's sandbox gets (a
host uid of its own when the manager is root, the seccomp filter, cgroup
limits, no network) and one thing less: no writable host directory at all.
What it makes comes back on its stdout, read by the host up to a cap into a
file the host opened; its stderr is kept as a bounded tail for the error
message. Both are the sandbox's words, hostile input to whoever reads them.

The part that gives up root runs in a fresh ``python -I -S`` process (the
``main`` below, which then becomes bubblewrap), never between fork and exec
of the manager's own process, which may have threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox_kernel.limits import address_space_limit
from sandbox_kernel.sandbox.cgroups import Cgroups
from sandbox_kernel.sandbox.mountns import stage_and_drop

#: Starts ``main`` with the standard library alone, as the supervisor is started.
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from sandbox_kernel.sandbox.confined_run import main; sys.exit(main(sys.argv[2:]))")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_TAIL = 64 * 1024
_READ = 256 * 1024


@dataclass
class ConfinedResult:
    """How the command ended, and what it said."""

    returncode: int | None
    #: Bytes written to the stdout file (at most the cap; see ``overflowed``).
    stdout_bytes: int
    #: The stdout was cut at the cap: the command wrote more than it may.
    overflowed: bool
    timed_out: bool
    out_of_memory: bool
    #: The last bytes of its stderr, undecoded (the caller escapes them).
    stderr_tail: bytes


def run_confined(plan: dict, stdout_path: Path, stdout_cap: int, timeout: float,
                 memory: int | None, processes: int | None, name: str) -> ConfinedResult:
    """Run ``plan`` (a one-shot LaunchPlan as a dict, plus ``run_as`` and ``stage``) with
    its stdout into ``stdout_path`` (created here, never followed), killing it, its
    processes and its cgroups at the first of: ``timeout``, the stdout passing
    ``stdout_cap``, or its end."""
    cgroups = Cgroups.create(name, memory=memory, processes=processes)
    # Where a controller is not writable (a manager run by an ordinary user, many
    # containers), rlimits stand in for it, as the supervisor's do for a session's.
    rlimits = {}
    if memory and "memory" not in cgroups.dirs:
        rlimits["RLIMIT_AS"] = address_space_limit(memory)
    if processes and "pids" not in cgroups.dirs:
        rlimits["RLIMIT_NPROC"] = processes
    plan_path = stdout_path.with_name(stdout_path.name + ".plan.json")
    fd = os.open(plan_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({**plan, "cgroups": cgroups.dirs, "rlimits": rlimits}, f)
    out_fd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT, _PACKAGE_ROOT, str(plan_path)],
            env=plan["env"], cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True)
        written, overflowed, timed_out, tail = _pump(proc, out_fd, stdout_cap,
                                                     time.monotonic() + timeout)
        if overflowed or timed_out:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
        oom = cgroups.oom_killed()
    finally:
        os.close(out_fd)
        if proc is not None and proc.poll() is None:  # interrupted while it ran
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        cgroups.kill()  # what it left behind (bwrap's pid namespace ends with it anyway)
        cgroups.remove()
        plan_path.unlink(missing_ok=True)
    return ConfinedResult(returncode, written, overflowed, timed_out, oom, tail)


def _pump(proc: subprocess.Popen[bytes], out_fd: int, cap: int,
          deadline: float) -> tuple[int, bool, bool, bytes]:
    """Copy stdout into ``out_fd`` (up to ``cap``) and keep stderr's tail, until both
    close or the deadline passes."""
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
    written, tail = 0, b""
    while streams:
        left = deadline - time.monotonic()
        if left <= 0:
            return written, False, True, tail
        for fd in select.select(list(streams), [], [], left)[0]:
            data = os.read(fd, _READ)
            if not data:
                del streams[fd]
            elif streams[fd] == "err":
                tail = (tail + data)[-_TAIL:]
            else:
                if written + len(data) > cap:
                    return written, True, False, tail
                os.write(out_fd, data)
                written += len(data)
    return written, False, False, tail


def main(argv: list[str]) -> int:
    """In the fresh process: join the cgroups, set the rlimits, open the filter, stage the
    private binds and drop to the sandbox's uid, then become bubblewrap."""
    plan = json.loads(Path(argv[0]).read_text())
    for directory in plan["cgroups"].values():
        with open(os.path.join(directory, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for limit, value in plan.get("rlimits", {}).items():
        resource.setrlimit(getattr(resource, limit), (value, value))
    file_size = plan.get("file_size")
    if file_size:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    args = plan["argv"]
    if plan.get("seccomp_file"):  # opened as root: bwrap reads it after the drop
        fd = os.open(plan["seccomp_file"], os.O_RDONLY)
        os.set_inheritable(fd, True)
        args = [str(fd) if a == "{seccomp_fd}" else a for a in args]
    run_as = plan.get("run_as")
    if run_as:
        stage_and_drop(plan.get("stage", []), run_as[0], run_as[1])
    os.execve(args[0], args, plan["env"])
    return 127  # pragma: no cover - execve does not return
