"""Bad input and dying sandboxes: clear errors, a consistent registry, other sessions unharmed."""

from __future__ import annotations

import os
import stat
import time

import pytest

from sandbox_kernel import SessionManager
from sandbox_kernel.errors import (
    InvalidArgument,
    NameTaken,
    SessionClosed,
    SessionDead,
    SessionNotFound,
    StartFailed,
)
from sandbox_kernel.limits import parse_size, validate_limits

from .conftest import make_manager


def test_unknown_and_closed_sessions(manager):
    with pytest.raises(SessionNotFound, match="no session with id or name 'ghost'"):
        manager.get("ghost")
    with pytest.raises(SessionNotFound):
        manager.close("ghost")
    s = manager.create(name="short-lived")
    manager.close("short-lived")
    with pytest.raises(SessionClosed, match="closed"):
        manager.get("short-lived")
    with pytest.raises(SessionClosed):
        s.run("1")
    with pytest.raises(SessionClosed):
        manager.close("short-lived")
    assert not s.work_dir.exists()
    assert manager.get_info("short-lived")["status"] == "closed"


def test_a_closed_name_can_be_reused(manager):
    manager.close(manager.create(name="again").id)
    s = manager.create(name="again")
    assert manager.get("again").id == s.id


@pytest.mark.parametrize("name", ["", "-lead", "has space", "a/b", "../up", "x" * 65, "nul\0",
                                  "ünï", 5])
def test_invalid_names(manager, name):
    with pytest.raises(InvalidArgument, match="invalid session name"):
        manager.create(name=name)
    assert manager.list() == []


def test_duplicate_name(manager):
    first = manager.create(name="twin")
    with pytest.raises(NameTaken, match="already exists"):
        manager.create(name="twin")
    assert [s.id for s in manager.list()] == [first.id]
    assert first.run("'unaffected'").ok


@pytest.mark.parametrize("limits, message", [
    ({"memory": -1}, "below the minimum"),
    ({"memory": "1MiB"}, "below the minimum"),
    ({"memory": "1PiB"}, "not a size"),
    ({"memory": "10TiB"}, "above the maximum"),
    ({"processes": 0}, "below the minimum"),
    ({"processes": 10**9}, "above the maximum"),
    ({"processes": "many"}, "whole number"),
    ({"open_files": True}, "whole number"),
    ({"cpus": 2}, "unknown limit 'cpus'"),
    ("1GiB", "must be a dict"),
])
def test_bad_limits(manager, limits, message):
    with pytest.raises(InvalidArgument, match=message):
        manager.create(limits=limits)
    assert manager.list() == []


def test_sizes():
    assert parse_size("1GiB") == 1024**3
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size(4096) == 4096
    assert validate_limits({"memory": "512MiB"})["memory"] == 512 * 1024**2


def test_bad_env_tags_timeout_language(manager):
    with pytest.raises(InvalidArgument, match="environment variable name"):
        manager.create(env={"BAD-NAME": "x"})
    with pytest.raises(InvalidArgument, match="NUL"):
        manager.create(env={"OK": "a\0b"})
    with pytest.raises(InvalidArgument, match="invalid tag"):
        manager.create(tags=["no spaces"])
    with pytest.raises(InvalidArgument, match="positive"):
        manager.create(timeout=-5)
    with pytest.raises(InvalidArgument, match="unknown language 'cobol'"):
        manager.create(language="cobol")
    assert manager.list() == []


def test_os_exit_marks_the_session_dead_with_its_code(manager):
    bystander = manager.create(name="bystander")
    s = manager.create(name="exits")
    with pytest.raises(SessionDead, match="exited with code 3"):
        s.run("import os; os._exit(3)")
    info = s.info()
    assert info["status"] == "dead"
    assert "exited with code 3" in info["reason"]
    with pytest.raises(SessionDead, match="close it"):
        s.run("1")
    with pytest.raises(SessionDead):
        manager.get("exits").run("1")
    assert bystander.run("'fine'").result == "'fine'"
    manager.close("exits")
    assert manager.get_info("exits")["status"] == "closed"


def test_segfault_is_reported_with_the_signal(manager):
    s = manager.create(name="segv")
    with pytest.raises(SessionDead, match="SIGSEGV"):
        s.run("import ctypes; ctypes.string_at(0)")
    assert "SIGSEGV" in s.info()["reason"]
    assert not list(s.work_dir.glob("core*"))


def test_sandbox_killed_from_outside_is_dead_not_a_hang(manager):
    s = manager.create(name="victim")
    sandbox_pid = __import__("json").loads(
        (s.work_dir.parent / "supervisor.json").read_text())["sandbox_pid"]
    os.kill(sandbox_pid, 9)
    deadline = time.monotonic() + 10
    while s.info()["status"] != "dead" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.info()["status"] == "dead"
    assert "SIGKILL" in s.info()["reason"]


def test_supervisor_killed_marks_dead(manager):
    s = manager.create(name="orphan")
    os.kill(s.info()["pid"], 9)
    deadline = time.monotonic() + 10
    while s.info()["status"] != "dead" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "supervisor" in s.info()["reason"]
    with pytest.raises(SessionDead):
        s.run("1")


def _fake_python(tmp_path, body: str) -> str:
    script = tmp_path / "python"
    # Answers the manager's prefix probe (`python -c ...`) like a real interpreter would.
    probe = 'case "$2" in *sys.prefix*) echo \'["/usr", "/usr", "/usr"]\'; exit 0;; esac'
    script.write_text(f"#!/bin/sh\n{probe}\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_kernel_that_never_starts_fails_within_the_timeout(home, tmp_path):
    fake = _fake_python(tmp_path, "exec sleep 600")
    with make_manager(home, isolation="process", python=fake, start_timeout=3) as m:
        t = time.monotonic()
        with pytest.raises(StartFailed, match="did not answer within 3 s"):
            m.create(name="stuck")
        assert time.monotonic() - t < 20
        info = m.get_info("stuck")
        assert info["status"] == "dead"
        assert "did not answer" in info["reason"]


def test_kernel_that_exits_at_start_says_why(home, tmp_path):
    fake = _fake_python(tmp_path, "echo 'ModuleNotFoundError: no ipykernel here' >&2; exit 1")
    with make_manager(home, isolation="process", python=fake) as m:
        t = time.monotonic()
        with pytest.raises(StartFailed, match="exited with code 1.*no ipykernel here"):
            m.create(name="broken")
        assert time.monotonic() - t < 20
        assert m.get_info("broken")["status"] == "dead"


def test_process_isolation_fallback(home):
    with make_manager(home, isolation="process") as m:
        s = m.create(name="plain")
        info = s.info()
        assert info["isolation"] == "process"
        assert s.run("import os; os.getcwd()").result == repr(str(s.work_dir))
        assert s.run("x = 2; x * 21").result == "42"


def test_missing_bwrap_falls_back_loudly(home):
    with make_manager(home) as m:
        m.bwrap_launcher.bwrap = "/nonexistent/bwrap"
        with pytest.warns(RuntimeWarning, match="NOT isolated"):
            s = m.create(name="fallback")
        assert s.info()["isolation"] == "process"
    with make_manager(home, isolation="bwrap") as strict:
        strict.bwrap_launcher.bwrap = "/nonexistent/bwrap"
        with pytest.raises(StartFailed, match="bubblewrap"):
            strict.create(name="strict")


def test_state_dir_too_deep_for_sockets(tmp_path):
    deep = tmp_path / ("d" * 90)
    m = SessionManager(home=str(deep))
    with pytest.raises(InvalidArgument, match="too deep for unix sockets"):
        m.create()
