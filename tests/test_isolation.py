"""What a bwrap sandbox must refuse. Each probe also runs a control that proves it could succeed."""

from __future__ import annotations

import json
import os
import secrets
import socket
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from sandbox_kernel.errors import ExecutionTimeout, SessionDead

from .conftest import needs_bwrap, probe

pytestmark = needs_bwrap


def test_cannot_read_a_secret_planted_in_the_host_home(session):
    secret = Path.home() / f".sandbox-kernel-probe-{secrets.token_hex(4)}"
    secret.write_text("top secret")
    try:
        assert secret.read_text() == "top secret"  # the host can
        out = probe(session, f"""
            import os
            try:
                out = open({str(secret)!r}).read()
            except OSError as e:
                out = type(e).__name__
            out = [out, os.path.exists({str(Path.home())!r} + '/.bashrc'),
                   os.path.exists('/etc/shadow'), sorted(os.listdir('/root'))]
        """)
        # Only the interpreter's own prefix is bound from the host's home, nothing else.
        assert out == ["FileNotFoundError", False, False, [".pyenv"]] or (
            not str(Path(os.__file__)).startswith("/root") and out[:3] == [
                "FileNotFoundError", False, False])
    finally:
        secret.unlink()


def test_cannot_reach_a_server_on_the_host_loopback(session):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the host can connect
        for _ in range(50):
            if accepted:
                break
            time.sleep(0.02)
        assert len(accepted) == 1
        out = probe(session, f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
                out = "connected"
            except OSError as e:
                out = type(e).__name__
        """)
        assert out in ("ConnectionRefusedError", "TimeoutError", "OSError")
        assert len(accepted) == 1
        dns = probe(session, """
            import socket
            try:
                socket.getaddrinfo("pypi.org", 443); out = "resolved"
            except OSError as e:
                out = "failed"
        """)
        assert dns == "failed"
    finally:
        server.close()


def test_cannot_see_host_processes(session):
    out = probe(session, """
        import os
        out = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
    """)
    assert len(out) < 10, out  # bwrap's init, the kernel and its helpers
    host = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])]
    assert len(host) > len(out)


def test_cannot_write_outside_the_work_directory(session):
    targets = ["/usr/probe", "/etc/probe", "/probe", "/home/probe", "/run/probe",
               os.path.dirname(os.__file__) + "/probe", str(Path.home() / "probe"),
               str(session.work_dir.parent / "probe")]
    out = probe(session, f"""
        out = {{}}
        for t in {targets!r}:
            try:
                open(t, "w").write("x"); out[t] = "written"
            except OSError as e:
                out[t] = type(e).__name__
        open("inside.txt", "w").write("fine")
    """)
    assert "written" not in out.values(), out
    assert (session.work_dir / "inside.txt").read_text() == "fine"
    for t in targets:
        assert not os.path.exists(t)


def test_environment_is_clean(session, monkeypatch):
    out = probe(session, "import os; out = dict(os.environ)")
    assert out["HOME"] == "/home/sandbox"
    assert out["SANDBOX_KERNEL_SESSION"] == session.id
    for leaked in ("SANDBOX_KERNEL_HOME", "PIP_FIND_LINKS", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST"):
        assert leaked not in out


def test_memory_limit_stops_a_4gib_allocation(manager):
    """The memory cgroup stops it: the kernel is killed and says why, the host keeps its
    memory. (Without a memory cgroup an address-space limit refuses it instead; see
    test_memory_limits.)"""
    s = manager.create(name="small", limits={"memory": "1GiB"})
    if s.info()["enforcement"]["memory"] != "cgroup":
        pytest.skip("no writable memory cgroup here")
    host_before = psutil.virtual_memory().available
    with pytest.raises(SessionDead, match=r"out of memory \(limit 1 GiB\)"):
        s.run("big = bytearray(4 * 1024**3)")  # bytearray() writes every page
    assert s.info()["status"] == "dead"
    assert psutil.virtual_memory().available > host_before - 2 * 1024**3


def test_fork_bomb_is_contained(manager):
    bystander = manager.create(name="bystander")
    s = manager.create(name="bomb", limits={"processes": 32})
    info = s.info()
    assert info["enforcement"]["processes"] == "cgroup"
    cgroup = json.loads((s.work_dir.parent / "supervisor.json").read_text())["cgroups"]["pids"]
    bomb = textwrap.dedent("""
        import os, time
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    """)
    with pytest.raises(ExecutionTimeout):
        s.run(bomb, timeout=3)
    in_group = [int(p) for p in Path(cgroup, "cgroup.procs").read_text().split()]
    assert 10 < len(in_group) <= 32
    assert bystander.run("import os; os.getpid() > 0").result == "True"
    manager.close("bomb")
    assert not [p for p in in_group if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not Path(cgroup).exists()
