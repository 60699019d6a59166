"""Faults (issue 9, first part): a client killed in the middle of a lifecycle change.

Whatever instant the kill lands at, the session must be left running or paused,
never in between, with nothing lost: the next run (which resumes a paused
session) sees every variable.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from sandbox_kernel import SessionManager
from sandbox_kernel.errors import RegistryDamaged, SessionDead, StateDirFull
from sandbox_kernel.transfer import TransferFailed

from .conftest import make_manager, needs_bwrap, short_tmpdir

pytestmark = needs_bwrap

PAUSE = ("from sandbox_kernel import SessionManager\n"
         "SessionManager(isolation='bwrap').get('victim').pause()\n")


def test_client_killed_mid_pause_leaves_the_session_whole(home):
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home)}
    with make_manager(home, isolation="bwrap") as m:
        s = m.create(name="victim")
        assert s.run("import numpy as np\n"
                     "a = np.random.default_rng(0).random(20_000_000)\n"
                     "x = 7\ng = (i for i in range(5))").ok
        expected = s.run("print(x, a.shape, round(float(a[123]), 6))").stdout
        for delay in (0.3, 0.6, 1.0, 1.5):
            client = subprocess.Popen([sys.executable, "-c", PAUSE], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            client.kill()
            client.wait()
            status = m.get_info("victim")["status"]
            assert status in ("running", "paused"), status
            out = m.get("victim").run("print(x, a.shape, round(float(a[123]), 6))")
            assert out.stdout == expected, (delay, status, out.error)
            assert m.get_info("victim")["status"] == "running"
        # What a killed capture left is cleared by the next lifecycle change.
        m.get("victim").checkpoint()
        leftovers = m.get("victim").run(
            "import os\nprint([n for d in ('/run/kernel', '/run/snapshot') "
            "for n in os.listdir(d) if n.startswith('snap-')])")
        assert leftovers.stdout.strip() == "[]", leftovers.stdout


FAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"), Path("libfaketime"))


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_a_wall_clock_jump_neither_ends_a_lease_early_nor_keeps_it_for_ever(home, tmp_path):
    """libfaketime moves the wall clock of a client and the supervisors it starts.

    The client creates a session with a long lease and one with a short lease
    and exits, so only the supervisors enforce them. The clock is set back three
    days: the short lease still runs out in seconds. Then it jumps three days
    ahead: the long lease is not cut. Nothing is lost either way.
    """
    assert FAKETIME.exists(), "libfaketime is installed by scripts/install-system-deps.sh"
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home), "LD_PRELOAD": str(FAKETIME),
           "FAKETIME_TIMESTAMP_FILE": str(clock), "FAKETIME_NO_CACHE": "1",
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    # libfaketime's clock_nanosleep answers EINVAL, so time.sleep fails in the faked client
    # (subprocess's wait loop sleeps when the machine is slow); select's timeout is fine.
    create = ("import select, time\n"
              "time.sleep = lambda seconds: select.select([], [], [], seconds)\n"
              "from sandbox_kernel import SessionManager\n"
              "m = SessionManager(isolation='bwrap')\n"
              "assert m.create(name='long', timeout=600).run('x = 1').ok\n"
              "assert m.create(name='short', timeout=4).run('y = 2').ok\n")
    subprocess.run([sys.executable, "-c", create], env=env, check=True, timeout=120)
    with make_manager(home, isolation="bwrap") as m:
        clock.write_text("-3d\n")
        assert _wait_for(lambda: m.get_info("short")["status"] == "paused", 30), \
            m.get_info("short")
        clock.write_text("+3d\n")
        time.sleep(12)  # two of the supervisor's lease checks
        assert m.get_info("long")["status"] == "running", m.get_info("long")
        assert 540 < m.get_info("long")["expires_at"] - time.time() <= 600
        assert m.get("long").run("print(x)").stdout == "1\n"
        assert m.get("short").run("print(y)").stdout == "2\n"


def test_sandbox_killed_mid_run_is_reported_and_revived_from_its_checkpoint(manager):
    s = manager.create(name="crashy")
    assert s.run("import numpy as np\na = np.arange(1_000_000)\nx = 1").ok
    cp = s.checkpoint("before")
    assert s.run("x += 1\nopen('kept.txt', 'w').write('written before the kill')").ok
    assert not s.run("1/0").ok  # a failed cell is not replayed
    sandbox_pid = json.loads((s.work_dir.parent / "supervisor.json").read_text())["sandbox_pid"]
    killer = threading.Timer(1.0, os.kill, (sandbox_pid, signal.SIGKILL))
    killer.start()
    with pytest.raises(SessionDead) as died:
        s.run("import time\nfor i in range(600):\n    time.sleep(0.1)")
    killer.join()
    message = str(died.value)
    assert "SIGKILL" in message and f"checkpoint {cp.id}" in message and "resume" in message
    info = manager.get_info("crashy")
    assert info["status"] == "dead" and "SIGKILL" in info["reason"]
    assert (s.work_dir / "kept.txt").read_text() == "written before the kill"
    with pytest.raises(SessionDead, match=f"checkpoint {cp.id}"):
        manager.get("crashy").run("x")
    report = manager.get("crashy").resume()
    assert report.checkpoint == cp.id and "a" in report.restored
    assert list(report.replayed.values()) == [[2]], report  # `x += 1`, not the failing cell
    assert not report.lost, report
    assert manager.get_info("crashy")["status"] == "running"
    out = manager.get("crashy").run("print(x, int(a.sum()))")
    assert out.stdout == f"2 {sum(range(1_000_000))}\n", out


def test_a_dead_session_without_checkpoints_says_to_close_it(manager):
    s = manager.create(name="plain")
    with pytest.raises(SessionDead, match="close it"):
        s.run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(SessionDead, match="close it"):
        manager.get("plain").resume()
    assert manager.get_info("plain")["status"] == "dead"


INSTALL = """
from sandbox_kernel import SessionManager
m = SessionManager(isolation="bwrap")
i = m.installer
i.find_links, i.no_index, i.offline, i.cache_dir = [{wheels!r}], True, True, {cache!r}
m.get("pkgs").install([{spec!r}])
"""


def _offline_installer(manager, wheelhouse, home) -> None:
    i = manager.installer
    i.find_links, i.no_index, i.offline = [str(wheelhouse)], True, True
    i.cache_dir = str(home / "uv-cache")


def _kill_when(client: subprocess.Popen, moment, seconds: float = 60) -> None:
    """SIGKILL the client at the first poll where ``moment()`` is true."""
    deadline = time.monotonic() + seconds
    while not moment():
        assert client.poll() is None, "the client finished before the moment to kill it"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    client.kill()
    client.wait()


def test_client_killed_mid_install_leaves_no_half_built_layer(home, wheelhouse):
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home)}
    layers_dir = home / "layers"

    def resolving(client):  # uv is running, no layer is being built yet
        return lambda: any(p.name() == "uv" for p in psutil.Process(client.pid).children())

    def building(client):  # uv is writing a layer
        return lambda: any(layers_dir.glob(".build-*/site-packages/*"))

    with make_manager(home, isolation="bwrap") as m:
        _offline_installer(m, wheelhouse, home)
        assert m.create(name="pkgs").run("x = 1").ok
        for spec, moment in (("skdemo-gamma", resolving), ("skdemo-beta", building)):
            code = INSTALL.format(wheels=str(wheelhouse), cache=str(home / "uv-cache"),
                                  spec=spec)
            client = subprocess.Popen([sys.executable, "-c", code], env=env)
            _kill_when(client, moment(client))
            # What the session records is whole: nothing, or complete layers.
            assert m.registry.find("pkgs")["packages"].get("layers", []) == []
            assert m.get("pkgs").run("print(x)").stdout == "1\n"
            assert not m.get("pkgs").run("import skdemo_beta").ok
            m.installer.gc(m.registry.layers_in_use())  # skips a build an orphaned uv holds
        result = m.get("pkgs").install(["skdemo-beta", "skdemo-gamma"])
        assert m.get("pkgs").run("import skdemo_beta, skdemo_alpha, skdemo_gamma").ok
        assert all((layers_dir / layer / ".complete").exists() for layer in result.layers)
        in_use = m.registry.layers_in_use()
        # Once a killed client's orphaned uv has exited, gc clears what it built.
        assert _wait_for(lambda: m.installer.gc(in_use) == []
                         and not any(layers_dir.glob(".build-*")), 30)
        assert {p.name for p in layers_dir.iterdir() if not p.name.startswith(".")} \
            == set(result.layers)


@pytest.fixture
def small_home():
    """A state directory on a 128 MiB filesystem of its own, which the test fills."""
    mount_point = short_tmpdir("skfull-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mount_point)],
                   check=True)
    try:
        yield mount_point / "h"
    finally:
        # Room first (a failed test may leave the filler): closing writes to the registry.
        (mount_point / "filler").unlink(missing_ok=True)
        with make_manager(mount_point / "h"):
            pass
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        mount_point.rmdir()


def _store_is_whole(home: Path) -> int:
    """Every chunk the store's index names reads back with its hash; how many there are."""
    from sandbox_kernel.store import ContentStore

    store = ContentStore(home / "store")
    with sqlite3.connect(home / "store" / "store.db") as db:
        digests = [d for (d,) in db.execute("SELECT hash FROM chunks")]
    for digest in digests:
        store.read_chunk(digest)
    assert not [p for p in (home / "store" / "packs").iterdir() if p.name.endswith(".tmp")]
    return len(digests)


def _registry_is_whole(home: Path) -> None:
    with sqlite3.connect(home / "registry.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_full_disk_under_the_state_directory_refuses_clearly_and_loses_nothing(
        small_home, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(16 * 2**20))  # 32 MiB: the store and the copy
    with make_manager(small_home, isolation="bwrap") as m:
        s = m.create(name="full")
        assert s.run("import numpy as np\n"
                     "a = np.random.default_rng(0).random(5_000_000)\nx = 5").ok  # 38 MiB
        filler = small_home.parent / "filler"
        filler.write_bytes(b"\0" * 100 * 2**20)  # 28 MiB left: neither fits

        with pytest.raises(TransferFailed, match="no space left"):
            s.upload(big)
        assert os.listdir(s.work_dir) == []  # no part of it, not even a temporary name
        with pytest.raises(StateDirFull, match="pause of session 'full' was not taken"):
            s.pause()
        assert m.get_info("full")["status"] == "running"
        assert s.checkpoints() == []
        assert s.run("print(x, a.size)").stdout == "5 5000000\n"

        with open(filler, "ab") as f, contextlib.suppress(OSError):  # now nothing is left
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        r = s.run("y = x + 1\nprint(y)")  # the cell runs; only its record is refused
        assert r.ok and r.stdout == "6\n"
        assert any("not recorded" in w for w in r.insights), r.insights
        with pytest.raises(StateDirFull, match="state directory"):
            m.create(name="another")
        assert [row["name"] for row in m.registry.sessions()] == ["full"]
        _registry_is_whole(small_home)
        _store_is_whole(small_home)

        filler.unlink()  # space again: everything works, and nothing was lost
        s.upload(big)
        assert (s.work_dir / "big.bin").read_bytes() == big.read_bytes()
        s.pause()
        assert m.get("full").run("print(x, y, a.size)").stdout == "5 6 5000000\n"
        assert _store_is_whole(small_home) > 0
        _registry_is_whole(small_home)


CRASH = """
import json, os
from sandbox_kernel import SessionManager
m = SessionManager(isolation="bwrap")
m.registry._db.execute("PRAGMA wal_autocheckpoint=0")  # everything stays in the log
a = m.create(name="a")
assert a.run("x = 1").ok
a.checkpoint("safe")
b = m.create(name="b")
assert b.run("y = 2").ok
executions = m.registry._db.execute("SELECT count(*) FROM executions").fetchone()[0]
print(json.dumps({"pids": [s.info()["pid"] for s in (a, b)], "executions": executions}))
os._exit(0)  # no close, no checkpoint of the log
"""


def test_a_torn_registry_log_after_a_crash_leaves_a_consistent_registry(home):
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", CRASH], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    before = json.loads(out.stdout)
    for pid in before["pids"]:  # the machine "crashes": every process dies at once
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    wal = home / "registry.db-wal"
    assert _wait_for(lambda: not any(psutil.pid_exists(p) for p in before["pids"]), 10)
    log = bytearray(wal.read_bytes())
    page = int.from_bytes(log[8:12], "big")
    frames = (len(log) - 32) // (24 + page)
    assert frames > 4, frames
    torn = 32 + (frames - 2) * (24 + page) + 24  # the data of the last frames but one
    log[torn:torn + 512] = os.urandom(512)
    wal.write_bytes(log)

    with make_manager(home, isolation="bwrap") as m:
        _registry_is_whole(home)
        with sqlite3.connect(home / "registry.db") as db:
            assert db.execute("SELECT count(*) FROM executions").fetchone()[0] \
                < before["executions"]  # the torn frames' changes are gone, whole
        rows = {s.name: s.info() for s in m.list(status=None)}
        assert rows["a"]["status"] == "dead", rows["a"]
        assert all(i["status"] in ("dead", "starting") for i in rows.values()), rows
        with pytest.raises(SessionDead, match="checkpoint"):
            m.get("a").run("x")
        m.get("a").resume()  # back from the checkpoint that survived
        assert m.get("a").run("print(x)").stdout == "1\n"
        # A session whose row was in the torn frames left a directory nobody names: gc's.
        stray = home / "sessions" / "0123456789ab"
        (stray / "work").mkdir(parents=True)
        (stray / "work" / "data.txt").write_text("lost with its row")
        kept = {p.name for p in (home / "sessions").iterdir()} - {stray.name}
        assert "sessions/0123456789ab" in m.gc()
        assert {p.name for p in (home / "sessions").iterdir()} == kept
        assert m.get("a").run("print(x)").stdout == "1\n"


def test_a_damaged_registry_file_is_refused_with_what_to_do(home):
    with make_manager(home, isolation="bwrap") as m:
        m.create(name="s").run("1")
    db_file = home / "registry.db"
    with sqlite3.connect(db_file) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db_file.read_bytes())
    data[4096 + 8: 4096 + 4096] = os.urandom(4096 - 8)  # page 2: the sessions table's
    db_file.write_bytes(data)
    with pytest.raises(RegistryDamaged, match=r"registry .*registry\.db is damaged.*\.recover"):
        SessionManager(home=str(home)).list()
    assert db_file.read_bytes() == data  # nothing was written into it
    db_file.unlink()  # (its one session was closed before the damage)
