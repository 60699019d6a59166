"""Red team: the host kernel's surface a sandbox can reach (security issue 15, hole 4).

Without a seccomp filter, code in a sandbox could create a nested user namespace
(``unshare -Urm``), hold every capability there and mount, and reach io_uring,
keyrings, BPF, perf events and userfaultfd. These tests run real bubblewrap, set
up as the launcher sets it up, with the filter of ``sandbox_kernel.sandbox.seccomp``
on a descriptor and ``--disable-userns``, and probe each hole from inside.

Every probe makes the real system call with arguments chosen so that the host's
kernel, when reached, answers something other than ``EPERM`` (``EINVAL``,
``EBADF``, ``EFAULT``, ``ESRCH`` or success), while the filter answers ``EPERM``
before the kernel looks. Each probe is also run without the filter, to show it
does reach the kernel there: a probe that fails either way would prove nothing.
The filter must also leave ordinary work alone: threads, fork, subprocesses,
multiprocessing, loopback sockets, numpy, a real ipykernel and Deno.

A BPF interpreter checks the compiled program itself, for every refused call
(many of which, like ``kexec_load``, a capability check refuses first anyway).
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel.sandbox import seccomp
from sandbox_kernel.sandbox.launcher import top_level_binds

from .conftest import needs_bwrap

pyseccomp = pytest.importorskip("pyseccomp")

NATIVE = platform.machine()
VENV = Path(sys.prefix)
DENO = shutil.which("deno", path=str(VENV / "bin"))


# --- the sandbox, as the launcher builds it ---------------------------------------------

def bwrap_argv(filter_fd: int | None, disable_userns: bool = False) -> list[str]:
    """bubblewrap's arguments as in ``BwrapLauncher.plan``, with the interpreter's prefixes
    bound read-only; with the filter (and ``--disable-userns``) when ``filter_fd`` is given."""
    args = [
        shutil.which("bwrap") or "bwrap",
        "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--unshare-net",
        "--uid", "1000", "--gid", "1000",
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--ro-bind", "/usr", "/usr", *top_level_binds(),
    ]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--tmpfs", "/tmp"]
    for prefix in sorted({sys.base_prefix, sys.prefix}):
        if not prefix.startswith("/usr/"):
            args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm", "--chdir", "/tmp"]
    if filter_fd is not None:
        disable = seccomp.userns_can_be_disabled(args[0])
        args += seccomp.bwrap_args(filter_fd, disable_userns=disable)
    elif disable_userns:
        args += ["--disable-userns"]
    return [*args, "--"]


@pytest.fixture(scope="module")
def filter_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seccomp") / "filter.bpf"
    seccomp.write_filter(path)
    return path


def sandboxed(filter_file: Path | None, argv: list[str], timeout: float = 120,
              env: dict[str, str] | None = None,
              disable_userns: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the sandbox; under the filter when ``filter_file`` is given."""
    fd = os.open(filter_file, os.O_RDONLY) if filter_file else None
    try:
        return subprocess.run(
            [*bwrap_argv(fd, disable_userns), *argv],
            pass_fds=() if fd is None else (fd,), capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
            env={"PATH": f"{VENV}/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
                 "LANG": "C.UTF-8", "JUPYTER_RUNTIME_DIR": "/tmp/rt", "IPYTHONDIR": "/tmp/ip",
                 "JUPYTER_PLATFORM_DIRS": "1", **(env or {})},
        )
    finally:
        if fd is not None:
            os.close(fd)


def python_in_sandbox(filter_file: Path | None, code: str, *args: str,
                      timeout: float = 120) -> str:
    """Run ``code`` with the environment's interpreter in the sandbox; its standard output."""
    result = sandboxed(filter_file, [sys.executable, "-c", textwrap.dedent(code), *args], timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# --- the probes: each makes one refused call, in a child of its own ---------------------

def _numbers() -> dict[str, int]:
    native = {name: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) for name in (
        "unshare", "setns", "clone", "clone3", "io_uring_setup", "io_uring_enter",
        "io_uring_register", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
        "userfaultfd", "ptrace", "process_vm_readv", "pidfd_getfd", "mount", "umount2",
        "chroot", "open_tree", "name_to_handle_at", "personality", "ioctl", "getpid")}
    if NATIVE == "x86_64":
        native["i386_unshare"] = pyseccomp.resolve_syscall(pyseccomp.Arch.X86, "unshare")
    return native


_PROBE_RUNNER = r"""
import ctypes, errno, json, mmap, os, signal, subprocess, sys

NR = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(name, *args):
    '''The raw system call: "ok" or the errno's name.'''
    conv = [ctypes.c_char_p(a) if isinstance(a, bytes) else ctypes.c_long(a or 0) for a in args]
    result = libc.syscall(ctypes.c_long(NR[name] if isinstance(name, str) else name), *conv)
    return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]

def unshare_then_mount():
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs none /tmp"],
                       capture_output=True, text=True)
    return "ok" if r.returncode == 0 else (
        "EPERM" if "Operation not permitted" in r.stderr else "failed: " + r.stderr)

def unshare_user():
    '''os.unshare (Python 3.12 on), else glibc's unshare.'''
    if hasattr(os, "unshare"):
        try:
            os.unshare(os.CLONE_NEWUSER)
            return "ok"
        except OSError as e:
            return errno.errorcode[e.errno]
    return "ok" if libc.unshare(0x10000000) == 0 else errno.errorcode[ctypes.get_errno()]

def int80_unshare():
    '''unshare(CLONE_NEWUSER) through the 32-bit ABI: push rbx; mov eax, nr;
    mov ebx, CLONE_NEWUSER; int 0x80; pop rbx; ret.'''
    code = (b"\x53\xb8" + NR["i386_unshare"].to_bytes(4, "little")
            + b"\xbb\x00\x00\x00\x10\xcd\x80\x5b\xc3")
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    result = ctypes.CFUNCTYPE(ctypes.c_int)(address)()
    return "ok" if result >= 0 else errno.errorcode[-result]

SIGHAND = 0x00000800  # without CLONE_VM: EINVAL from the kernel before any namespace check
NOWHERE = 0x3FFFFFFF  # a pid that does not exist
PROBES = {
    "unshare -Urm, then mount": unshare_then_mount,
    "unshare(CLONE_NEWUSER)": unshare_user,
    "setns": lambda: call("setns", -1, 0),
    **{f"clone({flag})": (lambda bit=bit: call("clone", bit | SIGHAND, 0, 0, 0, 0))
       for flag, bit in [("CLONE_NEWNS", 0x20000), ("CLONE_NEWCGROUP", 0x02000000),
                         ("CLONE_NEWUTS", 0x04000000), ("CLONE_NEWIPC", 0x08000000),
                         ("CLONE_NEWUSER", 0x10000000), ("CLONE_NEWPID", 0x20000000),
                         ("CLONE_NEWNET", 0x40000000)]},
    "clone3": lambda: call("clone3", 0, 0),
    "io_uring_setup": lambda: call("io_uring_setup", 0, 0),
    "io_uring_enter": lambda: call("io_uring_enter", -1, 0, 0, 0, 0, 0),
    "io_uring_register": lambda: call("io_uring_register", -1, 0, 0, 0),
    "keyctl": lambda: call("keyctl", 0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "add_key": lambda: call("add_key", b"user", b"probe", b"x", 1, -2),
    "request_key": lambda: call("request_key", b"user", b"no-such-key", 0, 0),
    "bpf": lambda: call("bpf", 9999, 0, 0),
    "perf_event_open": lambda: call("perf_event_open", 0, 0, -1, -1, 0),
    "userfaultfd": lambda: call("userfaultfd", 1 | 0x40000000),  # USER_MODE_ONLY | bad flag
    "ptrace": lambda: call("ptrace", 16, NOWHERE, 0, 0),  # PTRACE_ATTACH
    "process_vm_readv": lambda: call("process_vm_readv", NOWHERE, 0, 0, 0, 0, 1),
    "pidfd_getfd": lambda: call("pidfd_getfd", -1, 0, 0),
    "mount": lambda: call("mount", 1, b"/tmp", b"tmpfs", 0, 0),  # 1: a bad pointer, EFAULT
    "umount2": lambda: call("umount2", b"/tmp", 0xFFFF),
    "chroot": lambda: call("chroot", b"/no/such/dir"),
    "open_tree": lambda: call("open_tree", -1, b"", 0xFFFFFFFF),
    "name_to_handle_at": lambda: call("name_to_handle_at", -1, b"", 0, 0, 0xFFFF),
    "personality(ADDR_NO_RANDOMIZE)": lambda: call("personality", 0x0040000),
    "ioctl(TIOCSTI)": lambda: call("ioctl", 0, 0x5412, b"x"),
    "ioctl(TIOCSTI, high bits set)": lambda: call("ioctl", 0, (1 << 32) | 0x5412, b"x"),
}
if "i386_unshare" in NR:
    PROBES["int 0x80 unshare(CLONE_NEWUSER)"] = int80_unshare
    PROBES["x32 getpid"] = lambda: call(0x40000000 | NR["getpid"])

verdicts = {}
for name, probe in PROBES.items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # never returns: a probe's exception must not run the loop on in the child
        try:
            os.close(r)
            os.write(w, probe().encode())
        except BaseException as e:
            os.write(w, f"error: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        verdict = pipe.read()
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        verdict = "killed:" + signal.Signals(os.WTERMSIG(status)).name
    verdicts[name] = verdict
print(json.dumps(verdicts))
"""

#: What the filter answers: EPERM, except ENOSYS for clone3 (glibc then falls back to
#: clone) and death for a system call through a foreign ABI.
REFUSED = {"clone3": "ENOSYS", "int 0x80 unshare(CLONE_NEWUSER)": "killed:SIGSYS",
           "x32 getpid": "killed:SIGSYS"}
#: Probes a host's own policy may already refuse with EPERM (a sysctl, an older kernel,
#: AppArmor's restriction of user namespaces): there the control shows nothing.
HOST_POLICY = {"unshare -Urm, then mount", "unshare(CLONE_NEWUSER)", "bpf", "userfaultfd",
               "io_uring_setup", "io_uring_enter", "io_uring_register"}
PROBE_NAMES = [
    "unshare -Urm, then mount", "unshare(CLONE_NEWUSER)", "setns",
    *(f"clone({f})" for f in ("CLONE_NEWNS", "CLONE_NEWCGROUP", "CLONE_NEWUTS", "CLONE_NEWIPC",
                              "CLONE_NEWUSER", "CLONE_NEWPID", "CLONE_NEWNET")),
    "clone3", "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key",
    "request_key", "bpf", "perf_event_open", "userfaultfd", "ptrace", "process_vm_readv",
    "pidfd_getfd", "mount", "umount2", "chroot", "open_tree", "name_to_handle_at",
    "personality(ADDR_NO_RANDOMIZE)", "ioctl(TIOCSTI)", "ioctl(TIOCSTI, high bits set)",
    "int 0x80 unshare(CLONE_NEWUSER)", "x32 getpid",
]


def _run_probes(filter_file: Path | None) -> dict[str, str]:
    out = python_in_sandbox(filter_file, _PROBE_RUNNER, json.dumps(_numbers()))
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def filtered_verdicts(filter_file: Path) -> dict[str, str]:
    return _run_probes(filter_file)


@pytest.fixture(scope="module")
def unfiltered_verdicts() -> dict[str, str]:
    return _run_probes(None)


def _skip_foreign(name: str) -> None:
    if name in ("int 0x80 unshare(CLONE_NEWUSER)", "x32 getpid") and NATIVE != "x86_64":
        pytest.skip("a foreign-ABI probe written for x86_64")


@needs_bwrap
@pytest.mark.parametrize("name", PROBE_NAMES)
def test_the_filter_refuses(name: str, filtered_verdicts: dict[str, str]) -> None:
    _skip_foreign(name)
    if name.startswith("int 0x80") and filtered_verdicts[name] == "killed:SIGSEGV":
        pytest.skip("this kernel has no 32-bit ABI (IA32 emulation off): nothing to get past")
    assert filtered_verdicts[name] == REFUSED.get(name, "EPERM")


@needs_bwrap
@pytest.mark.parametrize("name", PROBE_NAMES)
def test_without_the_filter_the_probe_reaches_the_kernel(
        name: str, filtered_verdicts: dict[str, str], unfiltered_verdicts: dict[str, str]) -> None:
    _skip_foreign(name)
    got = unfiltered_verdicts[name]
    if got == filtered_verdicts[name] and name in HOST_POLICY:
        pytest.skip(f"this host refuses {name} by itself ({got}): the control shows nothing")
    assert got != filtered_verdicts[name], f"{name}: {got} with and without the filter"


@needs_bwrap
def test_disable_userns_alone_stops_a_nested_user_namespace() -> None:
    """``--disable-userns`` is a second wall behind the filter: without any filter, the
    kernel's own limit (one user namespace, the one bwrap runs the command in) refuses."""
    bwrap = shutil.which("bwrap") or "bwrap"
    if not seccomp.userns_can_be_disabled(bwrap):
        pytest.skip("this bubblewrap has no --disable-userns (before 0.8.0)")
    result = sandboxed(None, ["unshare", "-U", "true"], disable_userns=True)
    assert result.returncode != 0
    assert "No space left on device" in result.stderr  # ENOSPC: the namespace limit


# --- what must keep working under the filter --------------------------------------------

@needs_bwrap
def test_threads_fork_subprocess_and_multiprocessing_work(filter_file: Path) -> None:
    out = python_in_sandbox(filter_file, """
        import concurrent.futures, multiprocessing, os, subprocess
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            threads = sum(pool.map(abs, range(-10, 0)))
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        forked = os.WEXITSTATUS(os.waitpid(pid, 0)[1])
        shell = subprocess.run(["sh", "-c", "echo $((6*7))"], capture_output=True,
                               text=True, check=True).stdout.strip()
        pools = {}
        for method in ("fork", "spawn", "forkserver"):  # abs: -c defines nothing to import
            with multiprocessing.get_context(method).Pool(2) as pool:
                pools[method] = sum(pool.map(abs, range(-10, 0)))
        print(threads, forked, shell, pools)
    """)
    assert out.strip() == "55 7 42 {'fork': 55, 'spawn': 55, 'forkserver': 55}"


@needs_bwrap
def test_loopback_sockets_and_asyncio_work(filter_file: Path) -> None:
    out = python_in_sandbox(filter_file, """
        import asyncio, socket
        async def main():
            async def echo(reader, writer):
                writer.write(await reader.readline())
                await writer.drain()
                writer.close()
            server = await asyncio.start_server(echo, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"tcp\\n")
            line = await reader.readline()
            writer.close()
            server.close()
            return line.decode().strip()
        a, b = socket.socketpair()
        a.sendall(b"unix")
        print(asyncio.run(main()), b.recv(4).decode())
    """)
    assert out.strip() == "tcp unix"


@needs_bwrap
def test_numpy_with_its_blas_threads_works(filter_file: Path) -> None:
    pytest.importorskip("numpy")
    out = python_in_sandbox(filter_file, """
        import numpy as np
        a = np.arange(250_000, dtype=np.float64).reshape(500, 500) / 1e5
        print(round(float((a @ a.T).trace()), 3) == round(float((a * a).sum()), 3))
    """)
    assert out.strip() == "True"


@needs_bwrap
def test_a_real_ipykernel_starts_and_runs_a_cell(filter_file: Path) -> None:
    """zmq, ipykernel's threads and jupyter_client, all under the filter, inside the sandbox."""
    out = python_in_sandbox(filter_file, """
        from jupyter_client.manager import start_new_kernel
        km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
        try:
            reply = kc.execute_interactive("import os; print(6 * 7, os.getpid() > 1)", timeout=60)
            print(reply["content"]["status"])
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    """, timeout=180)
    assert out.split() == ["42", "True", "ok"]


@needs_bwrap
@pytest.mark.skipif(DENO is None, reason="no deno in the environment")
def test_deno_runs(filter_file: Path) -> None:
    result = sandboxed(filter_file, [DENO, "eval", "console.log(6 * 7)"],
                       env={"DENO_DIR": "/tmp/deno", "DENO_NO_UPDATE_CHECK": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "42"


# --- the compiled program itself ----------------------------------------------------------

SECCOMP_DATA = struct.Struct("=iIQ6Q")  # nr, arch, instruction_pointer, args[6]
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
I386 = 0x40000003


def run_bpf(program: bytes, nr: int, args: tuple[int, ...] = (), arch: int | None = None) -> int:
    """Evaluate a classic-BPF seccomp program as the kernel would; the action it returns."""
    data = SECCOMP_DATA.pack(nr, AUDIT_ARCH[NATIVE] if arch is None else arch, 0,
                             *(list(args) + [0] * 6)[:6])
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc, x, mem, pc = 0, 0, [0] * 16, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x00:  # ld #k
            acc = k
        elif code == 0x60:  # ld M[k]
            acc = mem[k]
        elif code == 0x02:  # st M[k]
            mem[k] = acc
        elif code == 0x87:  # txa
            acc = x
        elif code == 0x07:  # tax
            x = acc
        elif code == 0x54:  # and #k
            acc &= k
        elif code == 0x05:  # ja
            pc += k
        elif cls == 0x05:
            test = {0x10: acc == k, 0x20: acc > k, 0x30: acc >= k, 0x40: bool(acc & k)}
            pc += jt if test[code & 0xF0] else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"opcode {code:#x} not interpreted")


ALLOW, KILL_PROCESS = 0x7FFF0000, 0x80000000
EPERM, ENOSYS = 0x50000 | errno.EPERM, 0x50000 | errno.ENOSYS


@pytest.fixture(scope="module")
def program() -> bytes:
    if NATIVE not in AUDIT_ARCH:
        pytest.skip(f"no audit arch known here for {NATIVE}")
    return seccomp.build_filter()


def _nr(name: str) -> int:
    return pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)


def _denied_here() -> Iterator[str]:
    """The refused calls this architecture has (libseccomp gives the others negative numbers)."""
    return (name for name in seccomp.denied_syscalls() if _nr(name) >= 0)


def test_every_denied_call_is_refused_in_the_program(program: bytes) -> None:
    for name in _denied_here():
        assert run_bpf(program, _nr(name)) == (ENOSYS if name == "clone3" else EPERM), name


def test_ordinary_calls_are_allowed_in_the_program(program: bytes) -> None:
    ordinary = ["read", "write", "openat", "close", "mmap", "munmap", "futex", "epoll_pwait",
                "socket", "connect", "execve", "wait4", "exit_group", "kill", "getrandom",
                "prctl", "madvise", "memfd_create", "pidfd_open", "rseq"]
    for name in ordinary:
        assert run_bpf(program, _nr(name)) == ALLOW, name
    clone = _nr("clone")
    thread = 0x3D0F00  # glibc's pthread_create: VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|TIDs
    assert run_bpf(program, clone, (thread,)) == ALLOW
    assert run_bpf(program, clone, (0x01200011,)) == ALLOW  # fork(): CHILD_*TID | SIGCHLD
    assert run_bpf(program, _nr("ioctl"), (1, 0x5401)) == ALLOW  # TCGETS
    assert run_bpf(program, _nr("personality"), (0,)) == ALLOW


def test_namespace_flags_ioctls_and_personality_are_refused_in_the_program(
        program: bytes) -> None:
    for bit in seccomp.CLONE_NAMESPACE_FLAGS.values():
        assert run_bpf(program, _nr("clone"), (bit | 0x11,)) == EPERM, hex(bit)
        assert run_bpf(program, _nr("clone"), ((0xFFFF << 32) | bit,)) == EPERM, hex(bit)
    for request in seccomp.DENIED_IOCTLS.values():
        for high in (0, 1 << 32, 0xFFFFFFFF << 32):
            assert run_bpf(program, _nr("ioctl"), (0, high | request)) == EPERM, hex(request)
    for bit in seccomp.UNSAFE_PERSONALITY.values():
        assert run_bpf(program, _nr("personality"), (bit,)) == EPERM, hex(bit)


def test_foreign_abis_are_killed_in_the_program(program: bytes) -> None:
    assert run_bpf(program, 20, arch=I386) == KILL_PROCESS  # i386 getpid via int 0x80
    if NATIVE == "x86_64":
        assert run_bpf(program, 0x40000000 | 39) == KILL_PROCESS  # x32 getpid


def test_the_filter_is_written_whole_and_private(tmp_path: Path) -> None:
    path = tmp_path / "filter.bpf"
    path.write_bytes(b"stale")
    seccomp.write_filter(path)
    assert path.read_bytes() == seccomp.build_filter()
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) % 8 == 0
    assert [p.name for p in tmp_path.iterdir()] == ["filter.bpf"]


def test_describe_says_what_is_in_force() -> None:
    on = seccomp.describe(filter_on=True, userns_disabled=True)
    assert on["filter"] == "on" and on["userns"] == "disabled"
    assert {"unshare", "io_uring_setup", "keyctl", "bpf", "ptrace", "mount"} <= set(on["denied"])
    assert seccomp.describe(filter_on=False, userns_disabled=False) == {
        "filter": "off", "userns": "allowed"}
    json.dumps(on)
