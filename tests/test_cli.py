"""The sandbox-kernel command, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("sandbox-kernel"))


@pytest.fixture
def cli(home):
    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home)}
        return subprocess.run([CLI, *args], env=env, capture_output=True, text=True,
                              input=stdin, timeout=120)
    return run


def test_create_run_list_info_close(cli):
    assert cli("list").stdout.startswith("no sessions")
    created = cli("create", "work", "--tag", "demo")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created work (")
    run = cli("run", "work", "import sys; x = 20; print('out'); print('err', file=sys.stderr); x*2")
    assert run.returncode == 0
    assert run.stdout == "out\n40\n"
    assert run.stderr == "err\n"
    from_stdin = cli("run", "work", "-f", "-", stdin="print(x + 1)\n")
    assert from_stdin.stdout == "21\n"
    listed = cli("list")
    assert "work" in listed.stdout and "running" in listed.stdout and "bwrap" in listed.stdout
    as_json = json.loads(cli("list", "--json").stdout)
    assert [s["name"] for s in as_json] == ["work"]
    assert as_json[0]["tags"] == ["demo"]
    info = json.loads(cli("info", "work", "--json").stdout)
    assert info["status"] == "running" and info["execution_count"] == 2
    assert "status:" in cli("info", "work").stdout
    assert cli("close", "work").stdout == "closed work\n"
    assert json.loads(cli("info", "work", "--json").stdout)["status"] == "closed"


def test_list_shows_sessions_not_closed_unless_asked_for_all(cli):
    """Closed sessions stay in the registry for their history; `list` leaves them out."""
    assert cli("create", "kept").returncode == 0
    assert cli("create", "gone").returncode == 0
    assert cli("close", "gone").returncode == 0
    names = [s["name"] for s in json.loads(cli("list", "--json").stdout)]
    assert names == ["kept"]
    listed = cli("list").stdout
    assert "kept" in listed and "gone" not in listed and "closed" not in listed
    everything = cli("list", "--all")
    assert "gone" in everything.stdout and "closed" in everything.stdout, everything.stderr
    assert [s["name"] for s in json.loads(cli("list", "--all", "--json").stdout)] == [
        "kept", "gone"]
    assert "closed ones too" in cli("list", "--help").stdout
    cli("close", "kept")


def test_run_from_a_file_and_errors_exit_nonzero(cli, tmp_path):
    assert cli("create", "f").returncode == 0
    script = tmp_path / "cell.py"
    script.write_text("def g():\n    raise KeyError('missing')\ng()\n")
    failed = cli("run", "f", "-f", str(script))
    assert failed.returncode == 1
    assert "KeyError" in failed.stderr and "missing" in failed.stderr
    assert "\x1b[" not in failed.stderr  # no colour codes when not a terminal
    cli("close", "f")


@pytest.mark.parametrize("args, message", [
    (("info", "ghost"), "no session with id or name 'ghost'"),
    (("run", "ghost", "1"), "no session with id or name 'ghost'"),
    (("close", "ghost"), "no session with id or name 'ghost'"),
    (("run", "only-name"), "usage: sandbox-kernel run NAME CODE"),
    (("create", "bad name"), "invalid session name"),
    (("run", "x", "-f", "/nonexistent/file.py"), "cannot read /nonexistent/file.py"),
])
def test_errors_are_one_line(cli, args, message):
    result = cli(*args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sandbox-kernel: error: ")
    assert message in lines[0]


def test_lifecycle_commands(cli):
    assert cli("create", "life", "--timeout", "900").returncode == 0
    assert cli("run", "life", "import numpy as np; a = np.arange(5); g = (i for i in range(3))"
               ).returncode == 0
    cp = cli("checkpoint", "life", "--name", "start")
    assert cp.returncode == 0 and "start" in cp.stdout, cp.stderr
    paused = cli("pause", "life")
    assert paused.returncode == 0 and paused.stdout.startswith("paused life"), paused.stderr
    assert "not saved: g" in paused.stdout
    assert "paused" in cli("list").stdout
    resumed = cli("resume", "life")
    assert "rebuilt g by replaying cells [1]" in resumed.stdout, resumed.stdout
    assert cli("run", "life", "print(a.sum(), next(g))").stdout == "10 0\n"
    listed = cli("checkpoint", "life", "--list").stdout.splitlines()
    assert [line.split()[1] for line in listed] == ["checkpoint", "pause"]
    assert cli("run", "life", "a = 0").returncode == 0
    assert "restored" in cli("restore", "life", "start").stdout
    assert cli("run", "life", "print(a.sum())").stdout == "10\n"
    history = cli("history", "life").stdout
    assert "[1] ok" in history and "a = 0" in history
    forked = cli("fork", "life", "life2")
    assert forked.returncode == 0 and "into life2" in forked.stdout
    assert cli("run", "life2", "print(a.sum())").stdout == "10\n"
    timeout = cli("timeout", "life", "60", "--on-timeout", "close")
    assert "lease 60 s" in timeout.stdout and "then close" in timeout.stdout
    frozen = cli("pause", "life", "--freeze")
    assert frozen.stdout.startswith("frozen life")
    bad = cli("restore", "life", "nope")
    assert bad.returncode == 1 and "no checkpoint 'nope'" in bad.stderr
