"""The watchdog that lives next to each sandbox.

Sessions persist without a daemon: the manager starts one supervisor per
session, fully detached (double fork, own session), and returns. The
supervisor puts the sandbox into its cgroups and rlimits, starts it, and
waits. When the sandbox ends without being asked to, the supervisor records
why (exit code, signal, out-of-memory kill) in the registry, so no client
ever waits on a kernel that is gone. When asked to stop (SIGTERM) it kills
the whole sandbox, process group and cgroups included, and cleans up.

It runs as ``python -I -S`` with only the standard library, so that it
starts in a few milliseconds and never depends on the environment the user
code can change.
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
from pathlib import Path
from typing import Any

from sandbox_kernel.limits import address_space_limit
from sandbox_kernel.registry import Registry, lease_left
from sandbox_kernel.sandbox.cgroups import Cgroups
from sandbox_kernel.sandbox.kernel_log import DEFAULT_CAP, CappedLog
from sandbox_kernel.sandbox.mountns import stage_and_drop

PLAN_FILE = "launch.json"
STATE_FILE = "supervisor.json"
EXIT_FILE = "exit.json"
KERNEL_LOG = "kernel.log"
TICK_SECONDS = 5.0

#: The memory limit is not among them: see Supervisor._confine.
_RLIMITS = {
    "file_size": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
    "processes": resource.RLIMIT_NPROC,
}


def write_json_atomic(path: Path, data: Any) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def exit_signal(returncode: int, via_bwrap: bool) -> int | None:
    """The signal that ended the sandbox's kernel, if one did."""
    if returncode < 0:
        return -returncode
    if via_bwrap and returncode > 128:
        return returncode - 128  # bwrap reports a signalled child as 128+signal
    return None


def describe_exit(returncode: int, via_bwrap: bool, oom: bool, memory: int | None) -> str:
    """Say in words how the sandbox ended, as users will read it (a notebook shows it as
    the reason its cell ended, so it names the limit that was reached)."""
    if oom:
        limit = f" (limit {_size(memory)})" if memory else ""
        return f"the session's kernel was killed: out of memory{limit}"
    signum = exit_signal(returncode, via_bwrap)
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"the session's kernel was killed by {name}"
    return f"the session's kernel exited with code {returncode}"


def _size(n: int) -> str:
    """512 MiB, 1.5 GiB: a limit as it was most likely written."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value.is_integer() else f"{value:.1f} {unit}"
    return f"{n} B"


def _last_log_line(session_dir: Path) -> str:
    """The log's last non-empty line, escaped: the sandbox wrote it, and it becomes the
    session's reason, which every client prints. Lines end at newlines only, so a
    carriage return meant to overwrite the line shows as ``\\r`` instead of cutting it."""
    from sandbox_kernel.shown import shown  # stdlib only; needed once a kernel has died

    try:
        with open(session_dir / KERNEL_LOG, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").split("\n")]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return shown(lines[-1], limit=300) if lines else ""


class Supervisor:
    def __init__(self, session_dir: Path):
        self.session_dir = session_dir
        self.plan = json.loads((session_dir / PLAN_FILE).read_text())
        self.limits: dict[str, int] = self.plan["limits"]
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None
        self.cgroups = Cgroups()
        #: RLIMIT_AS, set only where no memory cgroup bounds the memory (see _confine).
        self.address_space: int | None = None
        self.registry: Registry | None = None
        self.expiry: subprocess.Popen[bytes] | None = None
        self.expiry_started = float("-inf")
        self.log: CappedLog | None = None
        self.log_pipe: int | None = None

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        enforcement = self._confine()
        # The kernel writes into a pipe; we keep its newest output, capped (see kernel_log).
        self.log = CappedLog(self.session_dir / KERNEL_LOG, self.plan.get("log_cap", DEFAULT_CAP))
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_end, False)
        self.log_pipe = read_end
        argv, keep = self.plan["argv"], ()
        if self.plan.get("seccomp_file"):  # opened as root: bwrap reads it after the drop
            keep = (os.open(self.plan["seccomp_file"], os.O_RDONLY | os.O_CLOEXEC),)
            argv = [str(keep[0]) if a == "{seccomp_fd}" else a for a in argv]
        self.child = subprocess.Popen(
            argv,
            env=self.plan["env"],
            cwd=self.plan["cwd"],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=write_end,
            start_new_session=True,
            preexec_fn=self._enter_limits,
            pass_fds=keep,
        )
        os.close(write_end)
        for fd in keep:
            os.close(fd)
        write_json_atomic(
            self.session_dir / STATE_FILE,
            {
                "pid": os.getpid(),
                "sandbox_pid": self.child.pid,
                "enforcement": enforcement,
                "seccomp": self.plan.get("seccomp", {"filter": "off"}),
                "cgroups": self.cgroups.dirs,
            },
        )
        self._wait()
        returncode = self.child.wait()
        self._drain_log()
        oom = self.cgroups.oom_killed()
        reason = describe_exit(returncode, self.plan["bwrap"], oom, self.limits.get("memory"))
        # A kernel killed by SIGKILL wrote no dying words: its log's last line is older
        # (ipykernel's start-up banner) and would only mislead.
        killed = exit_signal(returncode, self.plan["bwrap"]) == signal.SIGKILL
        if returncode not in (0,) and not oom and not killed and not self.stopping:
            hint = _last_log_line(self.session_dir)
            if hint:
                reason += f"; its log ends: {hint}"
        write_json_atomic(
            self.session_dir / EXIT_FILE,
            {"returncode": returncode, "reason": reason, "stopped": self.stopping,
             "time": time.time()},
        )
        if not self.stopping:
            with contextlib.suppress(Exception):
                Registry(self.plan["registry"]).transition(
                    self.plan["session_id"], "dead",
                    allowed_from=("starting", "running", "frozen"), reason=reason,
                )
        self._kill_group()
        self.cgroups.remove()
        return 0

    def _confine(self) -> dict[str, str]:
        """Create the cgroups; say, per limit, what enforces it.

        The memory limit is the memory cgroup's alone where there is one: it counts
        the memory the sandbox's processes use, and past the limit the kernel's
        out-of-memory killer ends the kernel, which ``run`` then reports. RLIMIT_AS
        would count address space instead, which libraries reserve far beyond what
        they use (see limits.address_space_limit). Where there is no memory cgroup,
        an address-space limit well above the memory limit stops runaway
        allocations, and the enforcement says that this is all that bounds memory.
        """
        if self.plan.get("cgroups", True):
            self.cgroups = Cgroups.create(
                f"sandbox-kernel-{self.plan['session_id']}",
                memory=self.limits.get("memory"),
                processes=self.limits.get("processes"),
            )
        has = self.cgroups.dirs
        root = os.getuid() == 0 and not self.plan.get("run_as")
        memory = self.limits.get("memory")
        if "memory" in has:
            memory_by = "cgroup"
        elif not memory:
            memory_by = "none (no memory limit was set)"
        elif not self.plan.get("address_space_limit", True):
            memory_by = ("none (no memory cgroup, and the kernel's V8 reserves more address "
                         "space than RLIMIT_AS would allow)")
        else:
            self.address_space = address_space_limit(memory)
            memory_by = (f"rlimit: address space at most {_size(self.address_space)} "
                         f"(RLIMIT_AS; no memory cgroup here, so the {_size(memory)} limit "
                         "itself is not enforced)")
        return {
            "memory": memory_by,
            "processes": "cgroup" if "pids" in has else (
                "none (RLIMIT_NPROC does not bind root)" if root else "rlimit"
            ),
            "file_size": "rlimit",
            "open_files": "rlimit",
        }

    def _enter_limits(self) -> None:
        """Runs in the child between fork and exec: join the cgroups, set rlimits."""
        self.cgroups.add(os.getpid())
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files in the work dir
        for name, which in _RLIMITS.items():
            value = self.limits.get(name)
            if value is None or (name == "processes" and "pids" in self.cgroups.dirs):
                continue
            resource.setrlimit(which, (value, value))
        if self.address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self.address_space, self.address_space))
        run_as = self.plan.get("run_as")
        if run_as:  # last: staging needs root, and nothing after it may keep root
            stage_and_drop(self.plan.get("stage", []), run_as[0], run_as[1])

    def _wait(self) -> None:
        assert self.child is not None
        pidfd = os.pidfd_open(self.child.pid)
        next_check = time.monotonic() + TICK_SECONDS
        try:
            while True:
                watched = [pidfd] if self.log_pipe is None else [pidfd, self.log_pipe]
                wait = max(0.0, next_check - time.monotonic())
                ready = select.select(watched, [], [], wait)[0]
                if pidfd in ready:
                    return
                if (self.log_pipe in ready and self.log is not None
                        and not self.log.drain(self.log_pipe)):
                    os.close(self.log_pipe)
                    self.log_pipe = None
                if time.monotonic() >= next_check:
                    try:
                        tick = self._check_lease()
                    except Exception:  # the registry may be busy: next tick
                        tick = TICK_SECONDS
                    next_check = time.monotonic() + tick
        finally:
            os.close(pidfd)

    def _drain_log(self) -> None:
        """What the kernel wrote last (its dying words), then the log is closed."""
        if self.log is None:
            return
        if self.log_pipe is not None:
            # Bounded: a process the kernel left behind may still be writing.
            for _ in range(64):
                if not select.select([self.log_pipe], [], [], 0)[0]:
                    break
                with contextlib.suppress(OSError):
                    if not self.log.drain(self.log_pipe):
                        break
            os.close(self.log_pipe)
            self.log_pipe = None
        self.log.close()

    def _check_lease(self) -> float:
        """Enforce the lease with no client alive: past expiry, start the expiry helper.

        The helper (``python -m sandbox_kernel.lease``) pauses or closes the
        session as its ``on_timeout`` says; pausing needs the full environment
        (the store, jupyter_client), which this stdlib-only process does not load.
        A helper that fails is retried a minute later. Returns the seconds until
        the next check: a few, fewer for short leases (tests, agents).
        """
        if self.registry is None:
            self.registry = Registry(self.plan["registry"])
        row = self.registry.session(self.plan["session_id"])
        if row is None:
            return TICK_SECONDS
        tick = max(0.5, min(TICK_SECONDS, row["timeout"] / 4))
        if self.expiry is not None and self.expiry.poll() is None:
            return tick
        if row["status"] not in ("running", "frozen"):
            return tick
        now = time.monotonic()
        if lease_left(row) > 0 or now - self.expiry_started < 60:
            return tick
        self.expiry_started = now
        log = open(self.session_dir / "supervisor.log", "ab")  # noqa: SIM115 - the child's
        self.expiry = subprocess.Popen(
            self.plan["on_expiry"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True, close_fds=True,
        )
        log.close()
        return tick

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        self._kill_group()

    def _kill_group(self) -> None:
        if self.child is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.child.pid, signal.SIGKILL)
        self.cgroups.kill()


def daemonize(session_dir: Path) -> None:
    """Fork; the parent prints the child's pid and exits, so nobody has to reap us."""
    pid = os.fork()
    if pid:
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()
        os._exit(0)
    os.setsid()
    log = os.open(session_dir / "supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def main(argv: list[str]) -> int:
    session_dir = Path(argv[0])
    daemonize(session_dir)
    try:
        return Supervisor(session_dir).run()
    except Exception as exc:  # the manager reads this file to explain the failure
        import traceback

        traceback.print_exc()
        write_json_atomic(
            session_dir / EXIT_FILE,
            {"returncode": None, "reason": f"the supervisor failed: {exc}", "stopped": False,
             "time": time.time()},
        )
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
