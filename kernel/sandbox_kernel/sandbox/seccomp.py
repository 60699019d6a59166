"""The sandbox's seccomp filter: the system calls its code may not make.

bubblewrap's namespaces keep the code away from the host's files, processes and
network, but every system call still reaches the host's kernel. Inside its own
user namespace the code could create a nested one (``unshare -Urm``) and hold
full capabilities there: mount works, and the kernel's namespace-only code
paths open up. io_uring, keyrings, BPF, perf events and userfaultfd are large
attack surfaces that a notebook never needs. This module builds a filter that
refuses them, as a compiled classic-BPF program for ``bwrap --seccomp FD``.

The filter is a deny list over an allow-by-default policy, like Docker's
default profile read the other way round: what ipykernel, numpy, zmq,
multiprocessing and Deno need keeps working without being enumerated, and
what is refused gets ``EPERM`` (the error a missing capability gives, which
programs already handle). ``clone3`` gets ``ENOSYS`` instead: its flags sit
in memory a filter cannot read, and on ``ENOSYS`` glibc falls back to
``clone``, whose flags are a register the filter checks for namespace flags.

bubblewrap loads the filter just before it executes the sandbox's command,
after its own setup (which creates namespaces and mounts), so the filter has
to allow only what the command needs. Only the native architecture is
allowed: a system call made through another ABI (``int 0x80`` on x86_64,
x32, AArch32) kills the process, since the deny list is written for native
numbers and another ABI's numbers would slip past it.

The compiled program is produced by libseccomp (``libseccomp.so.2``) through
``pyseccomp``; both are imported only when a filter is built, so describing
the policy works where they are missing.
"""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

#: System calls refused outright, by why. Names unknown on an architecture are ignored there.
DENIED: dict[str, tuple[str, ...]] = {
    # A nested namespace, above all a user namespace, hands its creator every capability.
    "namespaces": ("unshare", "setns"),
    # Large kernel attack surfaces a notebook has no use for.
    "kernel_surface": (
        "io_uring_setup", "io_uring_enter", "io_uring_register",
        "keyctl", "add_key", "request_key",
        "bpf", "perf_event_open", "userfaultfd",
    ),
    # Reading or writing another process's memory. The pid namespace already hides the
    # host's processes; within the sandbox nothing needs a debugger, and ptrace is a
    # classic route around a seccomp filter.
    "tracing": ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd"),
    # Docker's default profile refuses these: the machine's administration, and the
    # container escapes (mounts, file handles, modules, raw I/O ports).
    "host_admin": (
        "mount", "umount", "umount2", "pivot_root", "chroot",
        "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
        "open_by_handle_at", "name_to_handle_at",
        "swapon", "swapoff", "reboot", "kexec_load", "kexec_file_load",
        "init_module", "finit_module", "delete_module",
        "iopl", "ioperm", "acct", "quotactl", "quotactl_fd", "lookup_dcookie",
        "vhangup", "syslog", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
        "fanotify_init", "nfsservctl",
    ),
    # Obsolete interfaces, kept by the kernel for old binaries and rarely exercised.
    "obsolete": ("uselib", "ustat", "sysfs", "_sysctl", "vm86", "vm86old", "modify_ldt"),
}

#: ``clone`` is refused when its flags ask for any of these (``CLONE_NEWTIME`` cannot be
#: passed to ``clone``: its bit is the exit signal there; ``unshare`` is refused whole).
CLONE_NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

#: ioctls refused on any descriptor: pushing input into a terminal's queue (TIOCSTI),
#: and the Linux console's grab bag (TIOCLINUX), both ways to type into someone else's shell.
DENIED_IOCTLS: dict[str, int] = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}

#: ``personality`` is refused when it would set one of these: the flags the kernel
#: itself clears on a set-uid exec (no address randomisation, readable-implies-executable,
#: the legacy layout, a mapped page zero). The query ``personality(0xffffffff)`` has every
#: bit set and is refused too; nothing a notebook runs asks it.
UNSAFE_PERSONALITY: dict[str, int] = {
    "ADDR_NO_RANDOMIZE": 0x0040000,
    "MMAP_PAGE_ZERO": 0x0100000,
    "ADDR_COMPAT_LAYOUT": 0x0200000,
    "READ_IMPLIES_EXEC": 0x0400000,
}

#: Numbers of system calls added since Linux 5.1, the same on every architecture
#: (asm-generic's unified table): used when an older libseccomp does not know the name.
_UNIFIED_NUMBERS: dict[str, int] = {
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "clone3": 435, "pidfd_getfd": 438, "mount_setattr": 442,
    "quotactl_fd": 443,
}

# Only the low 32 bits of an `unsigned int` argument reach the kernel: comparing all 64
# would let a caller slip past with garbage in the high half (a known bypass of such filters).
_LOW32 = 0xFFFFFFFF


class SeccompUnavailable(RuntimeError):
    """libseccomp (Debian's ``libseccomp2``) or its ``pyseccomp`` bindings are missing."""


def denied_syscalls() -> list[str]:
    """Every system call the filter refuses whatever its arguments, sorted."""
    return sorted({name for names in DENIED.values() for name in names} | {"clone3"})


#: Socket families that reach past the network namespace: vsock talks to the hypervisor
#: and other guests whatever namespace the socket is made in.
DENIED_SOCKET_FAMILIES = {"AF_VSOCK": 40}


@functools.cache
def build_filter() -> bytes:
    """The compiled filter (``struct sock_filter`` array) for the running machine's architecture."""
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError) as e:  # pyseccomp raises RuntimeError without libseccomp
        raise SeccompUnavailable(f"cannot build the seccomp filter: {e}") from e
    flt = sc.SyscallFilter(defaction=sc.ALLOW)
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    deny = sc.ERRNO(errno.EPERM)
    for names in DENIED.values():
        for name in names:
            flt.add_rule(deny, _number(sc, name))
    flt.add_rule(sc.ERRNO(errno.ENOSYS), _number(sc, "clone3"))
    for bit in CLONE_NAMESPACE_FLAGS.values():
        flt.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    for request in DENIED_IOCTLS.values():
        flt.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, _LOW32, request))
    for bit in UNSAFE_PERSONALITY.values():
        flt.add_rule(deny, "personality", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    for family in DENIED_SOCKET_FAMILIES.values():
        flt.add_rule(deny, "socket", sc.Arg(0, sc.EQ, family))
    with tempfile.TemporaryFile() as out:
        flt.export_bpf(out)
        out.seek(0)
        return out.read()


def _number(sc: ModuleType, name: str) -> int:
    """The native number of ``name``, or libseccomp's negative pseudo-number where this
    architecture lacks it (the rule is then dropped); a name libseccomp does not know
    falls back to the unified table rather than leaving the call open."""
    number = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if number == -1:  # __NR_SCMP_ERROR: this libseccomp predates the call
        if name not in _UNIFIED_NUMBERS:
            raise SeccompUnavailable(f"libseccomp does not know the system call {name!r}")
        return _UNIFIED_NUMBERS[name]
    return number


def write_filter(path: str | os.PathLike[str]) -> None:
    """Write the compiled filter to ``path`` (mode 0600), atomically: a sandbox starting
    meanwhile reads either the whole previous filter or the whole new one, never a prefix
    (a truncated program would be refused by bwrap, or worse, read short)."""
    data = build_filter()
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".seccomp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.cache
def userns_can_be_disabled(bwrap: str) -> bool:
    """Whether this bubblewrap has ``--disable-userns`` (0.8.0 and later) and it works here.

    It caps the sandbox's user namespaces so none can be created inside, a second wall
    behind the filter's refusal of ``unshare`` and ``clone(CLONE_NEWUSER)``.
    """
    try:
        result = subprocess.run(
            [bwrap, "--unshare-user", "--disable-userns", "--assert-userns-disabled",
             "--ro-bind", "/", "/", "--", "/bin/true"],
            env={"PATH": os.defpath}, stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def bwrap_args(filter_fd: int | str | None, *, disable_userns: bool) -> list[str]:
    """bubblewrap's options for the filter read from ``filter_fd`` (open in bwrap, at its
    start; None: no filter) and, where supported, for disabling nested user namespaces.
    Anywhere among the options before ``--``; ``--disable-userns`` needs ``--unshare-user``."""
    return [*(["--disable-userns"] if disable_userns else []),
            *(["--seccomp", str(filter_fd)] if filter_fd is not None else [])]


def describe(*, filter_on: bool, userns_disabled: bool) -> dict[str, object]:
    """What is in force, for ``info()["seccomp"]``: said plainly, including when nothing is."""
    if not filter_on:
        return {"filter": "off", "userns": "disabled" if userns_disabled else "allowed"}
    return {
        "filter": "on",
        "action": "EPERM (clone3: ENOSYS, so glibc falls back to clone)",
        "denied": denied_syscalls(),
        "clone_flags_denied": sorted(CLONE_NAMESPACE_FLAGS),
        "ioctls_denied": sorted(DENIED_IOCTLS),
        "personality_denied": sorted(UNSAFE_PERSONALITY),
        "socket_families_denied": sorted(DENIED_SOCKET_FAMILIES),
        "foreign_abi": "killed (only the native architecture's system calls are allowed)",
        "userns": "disabled" if userns_disabled else "refused by the filter only",
    }
