"""How the sandbox process is started: confined by bubblewrap, or as a plain process.

A launcher turns "run this kernel command for this session" into a
:class:`LaunchPlan`, the argv and environment that the supervisor executes.
Launchers are traitlets ``Configurable``s (like ipyparallel's launchers and
jupyter_client's provisioners) so that what is bound, and how, is
configuration rather than code.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from traitlets import Bool, Int, List, Unicode
from traitlets.config import LoggingConfigurable

from ..paths import SessionLayout
from .identity import Identity
from .mountns import make_stage, staged_path
from .seccomp import (
    SeccompUnavailable,
    bwrap_args,
    describe,
    userns_can_be_disabled,
    write_filter,
)

#: Where the session's directories appear inside a bwrap sandbox.
INSIDE_WORK = "/home/sandbox"
INSIDE_KERNEL = "/run/kernel"
INSIDE_TMP = "/tmp"
INSIDE_LAYERS = "/opt/sandbox-kernel/layers"
INSIDE_SNAPSHOTS = "/run/snapshot"
INSIDE_VIEWS = "/run/views"
LAYERS_ENV = "SANDBOX_KERNEL_LAYERS"
#: Stands in the plan's argv for the descriptor the supervisor opens the filter on.
SECCOMP_FD = "{seccomp_fd}"
SECCOMP_FILE = "seccomp.bpf"
SANDBOX_UID = 1000


@dataclass
class KernelCommand:
    """What to run in the sandbox, and which host directories it needs to read."""

    argv: list[str]
    read_only: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    #: False for kernels that reserve more address space than they use (V8 reserves
    #: gigabytes up front): their memory is bounded by the cgroup alone, not RLIMIT_AS.
    address_space_limit: bool = True


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    isolation: str
    #: The connection file's path and socket prefix as the kernel sees them.
    kernel_connection_file: str
    kernel_socket_prefix: str
    work_dir_inside: str
    #: Where the package layers directory appears to the kernel.
    layers_inside: str
    #: The host uid and gid the sandbox runs as, when the supervisor must drop to them.
    run_as: tuple[int, int] | None = None
    #: Host paths the supervisor stages (see mountns) before it drops to ``run_as``.
    stage: list[str] = field(default_factory=list)
    #: The compiled seccomp filter (host-only), read by bwrap from a descriptor.
    seccomp_file: str | None = None
    #: What confines the kernel's system calls, for ``info()["seccomp"]``.
    seccomp: dict[str, object] = field(default_factory=lambda: {"filter": "off"})


def base_env(home: str, tmp: str, path_dirs: Sequence[str]) -> dict[str, str]:
    """A clean environment: nothing of the host's leaks in."""
    return {
        "PATH": ":".join([*path_dirs, "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": home,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # debugpy's start-up warning, noise in logs
        # Tool state goes to /tmp so it does not show up among the user's files.
        "IPYTHONDIR": f"{tmp}/.ipython",
        "MPLCONFIGDIR": f"{tmp}/.config/matplotlib",
        "XDG_CACHE_HOME": f"{tmp}/.cache",
        "XDG_CONFIG_HOME": f"{tmp}/.config",
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTER_RUNTIME_DIR": f"{tmp}/.jupyter/runtime",
        "JUPYTER_DATA_DIR": f"{tmp}/.jupyter/data",
    }


class SandboxLauncher(LoggingConfigurable):
    """A plain process: no namespaces, only the rlimits and cgroups the supervisor applies."""

    isolation = "process"

    def available(self) -> bool:
        return True

    def layers_path(self, layers_dir: Path) -> str:
        """Where ``layers_dir`` appears inside this kind of sandbox."""
        return str(layers_dir)

    def plan(
        self, layout: SessionLayout, command: KernelCommand, user_env: dict[str, str],
        layers_dir: Path, identity: Identity | None = None,
    ) -> LaunchPlan:
        conn = str(layout.kernel / "kernel.json")
        _offer_snapshots(layout)
        _offer_views(layout)
        env = base_env(str(layout.work), str(layout.tmp), _bin_dirs(command))
        env.update(command.env)
        env.update(user_env)
        return LaunchPlan(
            argv=[a.replace("{connection_file}", conn) for a in command.argv],
            env=env,
            cwd=str(layout.work),
            isolation=self.isolation,
            kernel_connection_file=conn,
            kernel_socket_prefix=str(layout.socket_prefix),
            work_dir_inside=str(layout.work),
            layers_inside=self.layers_path(layers_dir),
        )


class BwrapLauncher(SandboxLauncher):
    """bubblewrap: new user, pid, net, ipc and uts namespaces over a minimal filesystem.

    Only what the kernel needs is bound, read-only: ``/usr`` and its
    top-level links, a handful of files from ``/etc``, and the interpreter's
    prefixes. Never ``/``, the host's home, or the state directory: when the
    host user is root the sandbox's uid maps to root outside, so anything
    bound is readable. The session directory's parts are the only writable
    places; its views directory (store packs shown while a snapshot loads) is
    bound read-only.
    """

    isolation = "bwrap"

    bwrap = Unicode("bwrap", help="The bubblewrap executable.").tag(config=True)
    etc_files = List(
        Unicode(),
        default_value=[
            "/etc/alternatives", "/etc/ca-certificates", "/etc/fonts", "/etc/ld.so.cache",
            "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/mime.types",
            "/etc/nsswitch.conf", "/etc/ssl",
        ],
        help="Host files under /etc bound read-only when they exist.",
    ).tag(config=True)
    extra_read_only = List(
        Unicode(), help="More host paths to bind read-only at the same place."
    ).tag(config=True)
    share_network = Bool(
        False, help="Keep the host's network (off: the sandbox has only its own loopback)."
    ).tag(config=True)
    uid = Int(SANDBOX_UID, help="The user id inside the sandbox.").tag(config=True)
    seccomp = Bool(True, help="Load the seccomp filter (sandbox.seccomp): no nested "
                   "namespaces, io_uring, keyrings, bpf, perf events, userfaultfd, ptrace, "
                   "mounts. Off only to diagnose a program it stops.").tag(config=True)
    hidden = List(
        Unicode(),
        help="Host paths hidden under an empty tmpfs when they fall inside a bound directory "
        "(the manager adds its state directory).",
    ).tag(config=True)

    def available(self) -> bool:
        return _bwrap_works(shutil.which(self.bwrap) or "")

    def layers_path(self, layers_dir: Path) -> str:
        return INSIDE_LAYERS

    def plan(
        self, layout: SessionLayout, command: KernelCommand, user_env: dict[str, str],
        layers_dir: Path, identity: Identity | None = None,
    ) -> LaunchPlan:
        conn = f"{INSIDE_KERNEL}/kernel.json"
        args = self._system_args(layout.etc, network=self.share_network)
        # /tmp lives in memory, charged to the session's memory cgroup: on the host disk
        # the sandbox writes only its work directory and its kernel's sockets. Mounted
        # before the interpreter's binds, which may lie under /tmp and must stay visible.
        args += ["--tmpfs", INSIDE_TMP]
        args += self._read_only_args(command.read_only)
        # Package layers: built by the manager, read-only here, new ones visible at once.
        args += ["--ro-bind", str(layers_dir), INSIDE_LAYERS]
        shm = _offer_snapshots(layout)
        args += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--tmpfs", "/dev/shm",
            *(["--bind", str(shm), INSIDE_SNAPSHOTS] if shm else []),
            "--ro-bind", str(_offer_views(layout)), INSIDE_VIEWS,
            "--bind", str(layout.kernel), INSIDE_KERNEL,
            "--bind", str(layout.work), INSIDE_WORK,
            "--remount-ro", "/",
        ]
        syscalls = self._syscall_args(layout.root)
        args += [*syscalls[0], "--chdir", INSIDE_WORK, "--"]
        env = base_env(INSIDE_WORK, INSIDE_TMP, _bin_dirs(command))
        env.update(command.env)
        env.update(user_env)
        run_as, stage = None, []
        if identity is not None and identity.separate:
            run_as = (identity.uid, identity.gid)
            args, stage = _staged(args)
        return LaunchPlan(
            argv=args + [a.replace("{connection_file}", conn) for a in command.argv],
            env=env,
            cwd="/",
            isolation=self.isolation,
            kernel_connection_file=conn,
            kernel_socket_prefix=f"{INSIDE_KERNEL}/k",
            work_dir_inside=INSIDE_WORK,
            layers_inside=INSIDE_LAYERS,
            run_as=run_as,
            stage=stage,
            seccomp_file=syscalls[1],
            seccomp=syscalls[2],
        )

    def one_shot(self, scratch: Path, command: Sequence[str], read_only: Sequence[str],
                 binds: Sequence[tuple[str, str]], tmp_size: int,
                 identity: Identity | None = None) -> LaunchPlan:
        """A sandbox for one command that writes nothing on the host: no network whatever
        ``share_network`` says, only a size-capped in-memory /tmp writable, ``binds``
        (host path, place inside) read-only. ``scratch``: a host-only directory for its
        identity files and seccomp filter. What it makes, it hands back on its stdout."""
        scratch_etc = scratch / "etc"
        scratch_etc.mkdir(mode=0o755, exist_ok=True)
        args = self._system_args(scratch_etc, network=False)
        args += ["--size", str(tmp_size), "--tmpfs", INSIDE_TMP]
        args += self._read_only_args(read_only)
        for source, inside in binds:
            args += ["--ro-bind", source, inside]
        args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/"]
        syscalls = self._syscall_args(scratch)
        args += [*syscalls[0], "--chdir", INSIDE_TMP, "--"]
        run_as, stage = None, []
        if identity is not None and identity.separate:
            run_as = (identity.uid, identity.gid)
            args, stage = _staged(args)
        return LaunchPlan(argv=[*args, *command], env=base_env(INSIDE_TMP, INSIDE_TMP, []),
                          cwd="/", isolation=self.isolation, kernel_connection_file="",
                          kernel_socket_prefix="", work_dir_inside=INSIDE_TMP,
                          layers_inside="", run_as=run_as, stage=stage,
                          seccomp_file=syscalls[1], seccomp=syscalls[2])

    def _system_args(self, etc: Path, network: bool) -> list[str]:
        """The namespaces, the dropped capabilities, the host's system directories and
        the sandbox's own identity files (written into ``etc``): what every sandbox has."""
        write_etc(etc, self.uid)
        args = [
            shutil.which(self.bwrap) or self.bwrap,
            "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try",
            *([] if network else ["--unshare-net"]),
            "--uid", str(self.uid), "--gid", str(self.uid),
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--hostname", "sandbox",
            "--ro-bind", "/usr", "/usr",
        ]
        args += top_level_binds()
        for path in self.etc_files:
            args += ["--ro-bind-try", path, path]
        for name in ("passwd", "group", "hosts", "hostname"):
            args += ["--ro-bind", str(etc / name), f"/etc/{name}"]
        return args

    def _read_only_args(self, read_only: Sequence[str]) -> list[str]:
        """Binds for the interpreter's (and configured) trees, each once, and empty
        tmpfs over the hidden paths (the state directory) that fall inside them."""
        args, bound = [], []
        for path in _outermost([*read_only, *self.extra_read_only]):
            if not _under(path, ["/usr"]):
                args += ["--ro-bind", path, path]
                bound.append(path)
        for path in self.hidden:
            if _under(path, [*bound, "/usr"]):
                args += ["--tmpfs", path]
        return args

    def _syscall_args(self, directory: Path) -> tuple[list[str], str | None, dict]:
        """bwrap's options for the seccomp filter and nested user namespaces, the filter's
        file (written into ``directory``, host-only), and what is in force. A host without
        libseccomp runs without the filter, loudly, as a host without bubblewrap runs
        without namespaces."""
        bwrap = shutil.which(self.bwrap) or self.bwrap
        no_userns = userns_can_be_disabled(bwrap)
        path = None
        if self.seccomp:
            path = str(directory / SECCOMP_FILE)
            try:
                write_filter(path)
            except SeccompUnavailable as exc:
                self.log.warning("no seccomp filter for this sandbox: %s", exc)
                path = None
        args = bwrap_args(SECCOMP_FD if path else None, disable_userns=no_userns)
        return args, path, describe(filter_on=path is not None, userns_disabled=no_userns)


#: Host trees every user can read by path: bound as they are, not staged.
_PUBLIC = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def _staged(args: list[str]) -> tuple[list[str], list[str]]:
    """The bwrap arguments with every private bind source replaced by its staged copy.

    An unprivileged uid cannot reach the interpreter under /root or the state
    directory by path; the supervisor bind-mounts them into a private staging
    tmpfs first (mountns.stage_and_drop), and bubblewrap binds from there.
    """
    out, stage = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--bind", "--ro-bind", "--ro-bind-try") and i + 2 < len(args):
            source, dest = args[i + 1], args[i + 2]
            if not _under(source, _PUBLIC) and os.path.exists(source):
                out += [arg, staged_path(len(stage)), dest]
                stage.append(source)
            elif arg != "--ro-bind-try" or os.path.exists(source):
                out += [arg, source, dest]
            i += 3
            continue
        out.append(arg)
        i += 1
    if stage:
        make_stage()
    return out, stage


def top_level_binds() -> list[str]:
    """bwrap's arguments for the top-level system directories beside /usr: the same links
    where the host has links (a merged /usr), read-only binds where it has directories."""
    args: list[str] = []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def _offer_views(layout: SessionLayout) -> Path:
    """The session's views directory, marked as reachable (read-only) by its kernel.

    Sandboxes launched before views existed lack the bind and the mark; their
    snapshots are then loaded from copies.
    """
    layout.views.mkdir(mode=0o700, exist_ok=True)
    layout.views_mark.touch()
    return layout.views


def _offer_snapshots(layout: SessionLayout) -> Path | None:
    """The session's shared-memory snapshot directory, marked as reachable by its kernel."""
    shm = layout.make_snapshots()
    if shm is not None:
        layout.snapshots_mark.touch()
    return shm


def write_etc(etc: Path, uid: int) -> None:
    """The identity files the sandbox sees: its own user, nothing of the host's."""
    files = {
        "passwd": f"root:x:0:0:root:/root:/bin/sh\n"
        f"sandbox:x:{uid}:{uid}:sandbox:{INSIDE_WORK}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": f"root:x:0:\nsandbox:x:{uid}:\nnogroup:x:65534:\n",
        "hosts": "127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost ip6-loopback\n",
        "hostname": "sandbox\n",
    }
    for name, text in files.items():
        (etc / name).write_text(text)


def _bin_dirs(command: KernelCommand) -> list[str]:
    return [os.path.dirname(command.argv[0])] if os.path.isabs(command.argv[0]) else []


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _outermost(paths: Sequence[str]) -> list[str]:
    """Drop paths that lie inside another path of the list; bind each tree once."""
    unique = sorted({os.path.normpath(p) for p in paths if p and os.path.exists(p)})
    out: list[str] = []
    for p in unique:
        if not _under(p, out):
            out.append(p)
    return out


@functools.cache
def _bwrap_works(path: str) -> bool:
    """bwrap can be installed and still refused user namespaces (containers, sysctls)."""
    if not path:
        return False
    try:
        result = subprocess.run(
            [path, "--unshare-user", "--unshare-pid", "--unshare-net", "--ro-bind", "/", "/",
             "--", "/bin/true"],
            # The clean environment real launches give bwrap, not this process's
            # (an LD_PRELOAD meant for the client must not decide the answer).
            env={"PATH": os.environ.get("PATH", os.defpath)},
            stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0
