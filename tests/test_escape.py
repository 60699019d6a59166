"""Escape probes from inside a session (issue 9, first part): each test fails if its probe succeeds.

They complement ``test_isolation.py`` (host home, host loopback, host processes,
writes outside the work directory, environment, memory, fork bomb) with the
state directory, other sessions, DNS, raw sockets, mounts, ptrace, rlimits,
inherited descriptors, signals to host processes and links out of the work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import psutil

from sandbox_kernel.errors import SessionDead

from .conftest import needs_bwrap, probe

pytestmark = needs_bwrap


def test_cannot_see_the_registry_other_sessions_or_their_kernel_keys(manager):
    victim = manager.create(name="victim")
    attacker = manager.create(name="attacker")
    home = Path(manager.home)
    victim_dir = Path(victim.info()["work_dir"]).parent
    key = json.loads((victim_dir / "client.json").read_text())["key"]
    (victim.work_dir / "private.txt").write_text("victim's data")
    paths = [str(home / "registry.db"), str(victim_dir / "client.json"),
             str(victim.work_dir / "private.txt"), str(home / "store"), str(home / "sessions")]
    out = probe(attacker, f"""
        import os, glob
        seen = {{p: os.path.exists(p) for p in {paths!r}}}
        found = []
        for root in ('/', '/run', '/tmp', '/home', '/opt', '/dev/shm', '/run/snapshot'):
            try:
                found += [os.path.join(root, n) for n in os.listdir(root)]
            except OSError:
                pass
        text = ''
        for path in glob.glob('/run/**', recursive=True):
            try:
                if os.path.isfile(path):
                    text += open(path, errors='replace').read()
            except OSError:
                pass
        out = [seen, {key!r} in text, [f for f in found if {victim.id!r} in f]]
    """)
    seen, key_leaked, victim_paths = out
    assert not any(seen.values()), seen
    assert not key_leaked, "the attacker read the victim's kernel key"
    assert victim_paths == []


def test_no_dns_and_no_raw_sockets(session):
    out = probe(session, """
        import socket
        try:
            socket.getaddrinfo('pypi.org', 443)
            dns = 'resolved'
        except OSError as e:
            dns = type(e).__name__
        try:
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            raw = 'opened'
        except OSError as e:
            raw = e.errno
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            packet = 'opened'
        except OSError as e:
            packet = e.errno
        ifaces = [name for _, name in socket.if_nameindex()]
        out = [dns, raw, packet, ifaces]
    """)
    dns, raw, packet, ifaces = out
    assert dns == "gaierror"
    assert raw != "opened" and packet != "opened"
    assert ifaces == ["lo"]


def test_cannot_mount_ptrace_or_raise_limits(session):
    host_pids = [os.getpid(), session.info()["pid"]]  # this test and the supervisor
    out = probe(session, f"""
        import ctypes, ctypes.util, os, resource
        libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
        rc = libc.mount(b'none', b'/home/sandbox', b'tmpfs', 0, None)
        mount = [rc, ctypes.get_errno()]
        PTRACE_ATTACH = 16
        ptrace = []
        for pid in {host_pids!r}:  # host processes: not even visible from the sandbox
            rc = libc.ptrace(PTRACE_ATTACH, pid, None, None)
            ptrace.append([rc, ctypes.get_errno()])
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard + 1, hard + 1))
            raised = 'raised'
        except (ValueError, OSError) as e:
            raised = type(e).__name__
        caps = [ln for ln in open('/proc/self/status') if ln.startswith('CapEff')]
        out = [mount, ptrace, raised, caps[0].split()[1]]
    """)
    mount, ptrace, raised, cap_eff = out
    assert mount[0] == -1 and mount[1] == 1  # EPERM
    # EPERM: the seccomp filter refuses ptrace outright (ESRCH before it: host processes
    # are not in the sandbox's pid space).
    assert ptrace == [[-1, 1], [-1, 1]]
    assert raised in ("ValueError", "PermissionError")
    assert int(cap_eff, 16) == 0


def test_no_host_descriptor_is_inherited(session, manager):
    out = probe(session, """
        import os
        targets = []
        for fd in os.listdir('/proc/self/fd'):
            try:
                targets.append(os.readlink(f'/proc/self/fd/{fd}'))
            except OSError:
                pass
        out = targets
    """)
    leaked = [t for t in out if str(manager.home) in t or "registry" in t or ".db" in t]
    assert leaked == []
    assert all(t.startswith(("/", "socket:", "pipe:", "anon_inode:")) for t in out)


def test_links_in_the_work_directory_leak_nothing_through_artifacts(session, tmp_path):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host secret")
    link = session.work_dir / "innocent.txt"
    r = session.run(textwrap.dedent(f"""
        import os
        for name, target in [('innocent.txt', {str(secret)!r}), ('passwd', '/etc/passwd')]:
            if os.path.lexists(name):
                os.unlink(name)
            os.symlink(target, name)
        try:
            os.link('/etc/hostname', 'hard')
        except OSError as e:
            print('hardlink', e.errno)
    """))
    assert r.ok, r.error
    assert os.path.islink(link)
    time.sleep(0.5)  # the recorder runs after the cell
    for artifact in session.artifacts():
        assert b"host secret" not in artifact.read()
        assert artifact.path not in ("innocent.txt", "passwd")


def test_a_fifo_in_the_work_directory_cannot_block_the_host(session, tmp_path):
    r = session.run("import os\nos.path.exists('trap') or os.mkfifo('trap')")
    assert r.ok, r.error
    outcome: list = []

    def download() -> None:
        try:
            session.download("trap", tmp_path)
            outcome.append("downloaded")
        except Exception as exc:  # noqa: BLE001 - the refusal is what we expect
            outcome.append(str(exc))

    worker = threading.Thread(target=download, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the host blocked opening a FIFO the sandbox made"
    assert "not a regular file" in outcome[0], outcome


def test_cannot_signal_host_processes(manager):
    host = subprocess.Popen(["sleep", "300"])
    try:
        s = manager.create(name="signaller")
        out = probe(s, f"""
            import os, signal
            out = []
            for pid in ({host.pid}, 1, {os.getpid()}):
                try:
                    os.kill(pid, signal.SIGKILL if pid != 1 else 0)
                    out.append([pid, "sent"])
                except OSError as exc:
                    out.append([pid, type(exc).__name__])
        """)
        # Host pids (large numbers here) do not exist in the sandbox's pid namespace.
        assert host.pid > 100 and os.getpid() > 100
        assert out[0] == [host.pid, "ProcessLookupError"], out
        assert out[2] == [os.getpid(), "ProcessLookupError"], out
        with contextlib.suppress(SessionDead):  # signal everything it can see, itself included
            s.run("import os, signal; os.kill(-1, signal.SIGKILL)")
        assert host.poll() is None  # the host's process lived through it
        assert psutil.pid_exists(os.getpid())
    finally:
        host.kill()
        host.wait()
