"""Red team, the trust boundary (issue 15): what the sandbox writes must never steer the host.

Each probe is written as an attacker inside an ordinary session would: forged
snapshot reports naming host files (by ``..`` and through symlinked
components) for pause, checkpoint and a lease-expiry pause with no client
alive; replaced kernel sockets and a rewritten connection file; marks and
connection files in sandbox-writable directories swapped for links to host
paths; host-wide ``/proc/sys`` settings; and the host uid the sandbox runs
as. Each test fails if its probe succeeds.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from sandbox_kernel import SessionManager
from sandbox_kernel.errors import SandboxError
from sandbox_kernel.sandbox import supervisor

from .conftest import make_manager, needs_bwrap, short_tmpdir

pytestmark = needs_bwrap

#: Code that shadows ``exec`` in the notebook's namespace, as the host's capture request
#: looks it up there, and answers a capture with a forged report naming ``TARGET``.
FORGE = """
import builtins, json, os
def exec(code, g=None, l=None):
    req = (g or {}).get('REQUEST')
    if not isinstance(req, dict) or req.get('op') != 'capture':
        return builtins.exec(code, g, l)
    d = req['dir']
    if MODE == 'symlink':
        os.symlink(os.path.dirname(TARGET), os.path.join(d, 'x'))
        name = 'x/' + os.path.basename(TARGET)
    else:
        name = '../' * 12 + TARGET.lstrip('/')
    report = {'variables': {'stolen': {'files': [name], 'type': 'builtins.bytes',
                                       'size': 1, 'pickler': 'pickle'}},
              'imports': {}, 'skipped': {}, 'execution_count': 2, 'python': '3'}
    with open(os.path.join(d, '.report.tmp'), 'w') as f:
        f.write(json.dumps(report))
    os.replace(os.path.join(d, '.report.tmp'), os.path.join(d, 'report.json'))
"""


def _victim() -> Path:
    target = short_tmpdir("skv-") / "secret.txt"
    target.write_text("host secret")
    target.parent.chmod(0o700)
    return target


def _forge(session, target: Path, mode: str) -> None:
    r = session.run(f"keep = 41\nTARGET = {str(target)!r}\nMODE = {mode!r}\n{FORGE}")
    assert r.ok, r.error


def _stolen_anywhere(manager: SessionManager) -> bool:
    for row in manager.registry.sessions(status=["running", "paused", "frozen", "dead"]):
        for cp in manager.registry.checkpoints(row["id"]):
            if "stolen" in cp["manifest"]["variables"]:
                return True
    return False


@pytest.mark.parametrize("op", ["pause", "checkpoint"])
@pytest.mark.parametrize("mode", ["dotdot", "symlink"])
def test_a_forged_capture_report_reads_and_deletes_no_host_file(manager, op, mode):
    target = _victim()
    s = manager.create(name=f"forger-{op}-{mode}")
    _forge(s, target, mode)
    with pytest.raises(SandboxError, match="report is not valid"):
        getattr(s, op)()
    assert target.read_text() == "host secret", "the host file was changed or deleted"
    assert not _stolen_anywhere(manager), "a host file went into a checkpoint"
    # The session keeps running with its state: the failed capture lost nothing.
    assert s.info()["status"] == "running"
    assert s.run("print(keep)").stdout.strip() == "41"


def test_a_forged_report_at_lease_expiry_with_no_client_alive(home):
    """The supervisor's expiry helper pauses with nobody attached: the same forgery."""
    target = _victim()
    with make_manager(home, isolation="bwrap") as m:
        s = m.create(name="expiring", timeout=600)
        _forge(s, target, "dotdot")
        s.set_timeout(1)
        deadline = time.monotonic() + 60
        log = Path(s.info()["work_dir"]).parent / "supervisor.log"
        while time.monotonic() < deadline:
            if log.exists() and "report is not valid" in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the expiry helper never tried the pause: " +
                        (log.read_text(errors="replace") if log.exists() else "no log"))
        assert target.read_text() == "host secret"
        assert not _stolen_anywhere(m)
        assert m.get("expiring").info()["status"] == "running"


def test_replaced_kernel_sockets_and_connection_file_do_not_redirect_clients(home):
    """The sandbox points its shell socket at a host unix socket and rewrites the old
    connection file to TCP: a new client must connect to neither."""
    listen_dir = short_tmpdir("skl-")
    unix_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_listener.bind(str(listen_dir / "trap.sock"))
    unix_listener.listen(8)
    unix_listener.settimeout(0.5)
    tcp_listener = socket.create_server(("127.0.0.1", 0))
    tcp_listener.settimeout(0.5)
    port = tcp_listener.getsockname()[1]
    with make_manager(home, isolation="bwrap") as m:
        s = m.create(name="redirector")
        r = s.run(textwrap.dedent(f"""
            import json, os
            os.rename('/run/kernel/k-1', '/run/kernel/k-1.real')
            os.symlink({str(listen_dir / 'trap.sock')!r}, '/run/kernel/k-1')
            key = json.load(open('/run/kernel/kernel.json'))['key']
            json.dump({{'transport': 'tcp', 'ip': '127.0.0.1', 'key': key,
                        'signature_scheme': 'hmac-sha256', 'shell_port': {port},
                        'iopub_port': {port}, 'stdin_port': {port}, 'control_port': {port},
                        'hb_port': {port}}}, open('/run/kernel/client.json', 'w'))
            print('planted')
        """))
        assert r.ok and "planted" in r.stdout, r.error
        with make_manager(home, isolation="bwrap") as other, \
                pytest.raises(SandboxError, match="symlink"):
            other.get("redirector").run("1 + 1")
        for listener in (unix_listener, tcp_listener):
            with pytest.raises(TimeoutError):
                listener.accept()
    unix_listener.close()
    tcp_listener.close()


@pytest.mark.parametrize("planted", ["/run/snapshot/.bound", "/run/kernel/kernel.json"])
def test_links_planted_where_the_host_writes_on_resume_are_not_followed(manager, planted):
    """The host used to touch a mark in the snapshot directory and write the kernel's
    connection file in the kernel directory, by path, at every launch."""
    target = short_tmpdir("skp-") / "created-by-host"
    s = manager.create(name="planter")
    r = s.run(textwrap.dedent(f"""
        import os
        if os.path.lexists({planted!r}):
            os.remove({planted!r})
        if os.path.isdir(os.path.dirname({planted!r})):  # no /run/snapshot without /dev/shm
            os.symlink({str(target)!r}, {planted!r})
        x = 5
    """))
    assert r.ok, r.error
    s.pause()
    assert s.run("print(x)").stdout.strip() == "5"
    assert not target.exists(), "the host followed a link the sandbox planted"


def test_proc_sys_is_not_writable_and_the_sandbox_is_not_host_root(manager):
    a = manager.create(name="uid-a")
    b = manager.create(name="uid-b")
    r = a.run(textwrap.dedent("""
        import os, errno
        for path in ('/proc/sys/kernel/core_pattern', '/proc/sys/kernel/hostname',
                     '/proc/sys/vm/drop_caches'):
            try:
                os.close(os.open(path, os.O_WRONLY))
                print('WRITABLE', path)
            except OSError as e:
                print('refused', path, errno.errorcode[e.errno])
        open('made-here', 'w').write('x')
    """))
    assert r.ok, r.error
    assert "WRITABLE" not in r.stdout, r.stdout
    assert r.stdout.count("refused") == 3
    users = []
    for s in (a, b):
        info = s.info()
        state = json.loads((Path(info["work_dir"]).parent / supervisor.STATE_FILE).read_text())
        top = psutil.Process(state["sandbox_pid"])
        uids = {p.uids().real for p in [top, *top.children(recursive=True)]}
        assert 0 not in uids, "a sandbox process runs as host root"
        assert uids == {info["user"]["uid"]}
        users.append(info["user"]["uid"])
        if os.geteuid() == 0:
            assert info["user"]["separate"] is True
        else:
            assert info["user"]["uid"] == os.getuid()
    made = Path(a.info()["work_dir"]) / "made-here"
    assert made.stat().st_uid == users[0]
    if os.geteuid() == 0:
        assert users[0] != users[1], "two sessions share a host uid"
        # What the host puts in the work directory belongs to the sandbox's user too.
        (Path(a.info()["work_dir"]).parent / "up.txt").write_text("u")
        a.upload(str(Path(a.info()["work_dir"]).parent / "up.txt"))
        r = a.run("open('up.txt', 'a').write('more'); print(open('up.txt').read())")
        assert r.ok and r.stdout.strip() == "umore", r.error


def test_flooding_the_kernel_log_stays_within_its_cap(manager):
    """The kernel's stdout and stderr land in the host's state directory: 12 MiB written
    at the C level keep at most the cap (4 MiB) there, with the newest lines."""
    s = manager.create(name="flooder")
    r = s.run("import os\nfor i in range(3000):\n    os.write(2, b'x' * 4095 + b'\\n')\n"
              "os.write(2, b'the newest line\\n')")
    assert r.ok, r.error
    session_dir = Path(s.info()["work_dir"]).parent
    logs = [session_dir / "kernel.log", session_dir / "kernel.log.1"]
    deadline = time.monotonic() + 10
    while b"the newest line" not in logs[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"the newest line" in logs[0].read_bytes()
    assert sum(p.stat().st_size for p in logs if p.exists()) <= 4 << 20


def test_the_kernel_runs_under_the_seccomp_filter_with_no_nested_namespaces(manager):
    """info() says what confines the system calls, and it is in force in the kernel."""
    s = manager.create(name="filtered")
    info = s.info()["seccomp"]
    assert info["filter"] == "on", info
    assert "unshare" in info["denied"] and "io_uring_setup" in info["denied"]
    r = s.run(textwrap.dedent("""
        import ctypes, errno, subprocess
        status = dict(l.split(':\t', 1) for l in open('/proc/self/status').read().splitlines()
                      if ':\t' in l)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(0x10000000)  # CLONE_NEWUSER
        nested = errno.errorcode.get(ctypes.get_errno())
        uring = libc.syscall(425, 1, 0)  # io_uring_setup
        uring_errno = errno.errorcode.get(ctypes.get_errno())
        print(status['Seccomp'].strip(), nested, uring, uring_errno)
    """))
    assert r.ok, r.error
    assert r.stdout.split() == ["2", "EPERM", "-1", "EPERM"], r.stdout


def test_the_kernel_log_counts_against_the_disk_limit(manager):
    """What the kernel writes to its log is the session's disk, like its files."""
    from sandbox_kernel.transfer import QuotaExceeded

    s = manager.create(name="log-quota", limits={"disk": "4MiB"})
    r = s.run("import os\nfor i in range(700):\n    os.write(2, b'y' * 4095 + b'\\n')")
    assert r.ok, r.error
    session_dir = Path(s.info()["work_dir"]).parent
    deadline = time.monotonic() + 10
    while (session_dir / "kernel.log").stat().st_size < 2 << 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    upload = short_tmpdir("sku-") / "two.bin"
    upload.write_bytes(os.urandom(2 << 20))
    with pytest.raises(QuotaExceeded, match="kernel log"):
        s.upload(str(upload))


def test_a_forged_load_report_at_restore_is_refused(manager):
    """The restore's report may name only what the host asked to load."""
    s = manager.create(name="restorer")
    assert s.run("keep = 7").ok
    cp = s.checkpoint()
    r = s.run(textwrap.dedent("""
        import builtins, json, os
        def exec(code, g=None, l=None):
            req = (g or {}).get('REQUEST')
            if not isinstance(req, dict) or req.get('op') not in ('restore', 'load'):
                return builtins.exec(code, g, l)
            report = {'restored': ['keep', 'never_asked_for'], 'imports': [],
                      'failed': {'keep\\nrestore complete': 'x'}}
            with open(os.path.join(req['dir'], 'report.json'), 'w') as f:
                f.write(json.dumps(report))
    """))
    assert r.ok, r.error
    with pytest.raises(SandboxError, match="report is not valid"):
        s.restore(cp)


@pytest.mark.skipif(os.geteuid() != 0, reason="uid claims are made by a root manager only")
def test_gc_frees_the_uid_claims_of_deleted_state_directories(manager):
    from sandbox_kernel.sandbox import identity

    s = manager.create(name="claimer")
    uid = s.info()["user"]["uid"]
    live = identity.CLAIMS / str(uid)
    stale = identity.CLAIMS / str(identity.UID_BASE + identity.UID_COUNT - 1)
    stale.write_text(json.dumps({"session_dir": "/nonexistent/sessions/x", "session": "x"}))
    manager.gc()
    assert live.exists() and not stale.exists()
    manager.close("claimer")
    assert not live.exists(), "a closed session keeps its uid"


def test_a_deep_directory_chain_does_not_break_close_or_gc(manager):
    """shutil.rmtree recursed: 1,500 nested directories raised RecursionError out of
    close() (after the uid was released) and out of every later gc()."""
    s = manager.create(name="deep")
    r = s.run("import os\nfor _ in range(1500):\n    os.mkdir('d'); os.chdir('d')\n"
              "os.chdir('/home/sandbox')")
    assert r.ok, r.error
    session_dir = Path(s.info()["work_dir"]).parent
    manager.close("deep")
    assert not session_dir.exists()
    manager.gc()


def test_a_report_naming_files_never_written_is_refused(manager):
    s = manager.create(name="phantom")
    r = s.run(textwrap.dedent("""
        import builtins, json, os
        keep = 3
        def exec(code, g=None, l=None):
            req = (g or {}).get('REQUEST')
            if not isinstance(req, dict) or req.get('op') != 'capture':
                return builtins.exec(code, g, l)
            files = [f'v{i}.pkl' for i in range(1000)]
            report = {'variables': {f'x{i}': {'files': [f], 'type': 't', 'size': 1,
                                              'pickler': 'pickle'} for i, f in enumerate(files)},
                      'imports': {}, 'skipped': {}, 'execution_count': 2}
            with open(os.path.join(req['dir'], 'report.json'), 'w') as f:
                f.write(json.dumps(report))
    """))
    assert r.ok, r.error
    with pytest.raises(SandboxError, match="did not write"):
        s.pause()
    assert s.run("print(keep)").stdout.strip() == "3"


#: Forged groups (issue 18): the capture report's ``groups``, ``group`` and ``inexact``.
_GROUP = {"files": ["g1.pkl"], "type": "t", "size": 1, "pickler": "pickle", "group": "g1"}
FORGED_GROUPS = {
    # One variable named twice in its group: it would be loaded (and stored) twice over.
    "a name twice": ({"x": _GROUP, "y": _GROUP}, {"g1": ["x", "y", "x"]}, "twice"),
    # A variable in two groups.
    "two groups": ({"x": _GROUP, "y": _GROUP, "z": {**_GROUP, "files": ["g2.pkl"],
                                                   "group": "g2"}},
                   {"g1": ["x", "y"], "g2": ["x", "z"]}, "twice"),
    # A group's file the capture did not write: the host must not store anything for it.
    "a file never written": ({"x": _GROUP, "y": _GROUP}, {"g1": ["x", "y"]}, "did not write"),
    # A member pointing at another group's files, and a group named outside the grammar.
    "files of another group": ({"x": _GROUP, "y": {**_GROUP, "files": ["g7.pkl"]}},
                               {"g1": ["x", "y"]}, "not those of its group"),
    "a group named by path": ({"x": {**_GROUP, "group": "../g1"}}, {"../g1": ["x", "x"]},
                              "not those of its group"),
    "a host path as the file": ({"x": {**_GROUP, "files": ["../../g1.pkl"]}},
                                {"g1": ["x", "y"]}, "not vN.pkl or gN.pkl"),
    # "Saved, but not exactly" for a name it did not save, or that is no Python name.
    "inexact, never saved": ({"x": _GROUP, "y": _GROUP}, {"g1": ["x", "y"],
                             "inexact": {"ghost": "x"}}, "does not save it"),
    "inexact, not a name": ({"x": _GROUP, "y": _GROUP}, {"g1": ["x", "y"],
                            "inexact": {"x\nrestored all": "x"}}, "not a Python name"),
}


@pytest.mark.parametrize("forgery", list(FORGED_GROUPS))
def test_a_forged_group_in_a_capture_report_is_refused(manager, forgery):
    variables, groups, why = FORGED_GROUPS[forgery]
    groups = dict(groups)
    inexact = groups.pop("inexact", {})
    s = manager.create(name="grouper")
    r = s.run(textwrap.dedent(f"""
        import builtins, json, os
        keep = 5
        def exec(code, g=None, l=None):
            req = (g or {{}}).get('REQUEST')
            if not isinstance(req, dict) or req.get('op') != 'capture':
                return builtins.exec(code, g, l)
            report = {{'variables': {variables!r}, 'groups': {groups!r}, 'imports': {{}},
                       'skipped': {{}}, 'inexact': {inexact!r}, 'execution_count': 2}}
            with open(os.path.join(req['dir'], 'report.json'), 'w') as f:
                f.write(json.dumps(report))
    """))
    assert r.ok, r.error
    with pytest.raises(SandboxError, match=why):
        s.pause()
    assert s.run("print(keep)").stdout.strip() == "5"
    assert s.info()["status"] == "running"


def test_a_capture_that_never_ends_is_interrupted_after_the_snapshot_timeout(manager):
    manager.snapshot_timeout = 2.0
    s = manager.create(name="sleeper")
    r = s.run(textwrap.dedent("""
        import builtins, time
        keep = 4
        def exec(code, g=None, l=None):
            req = (g or {}).get('REQUEST')
            if isinstance(req, dict) and req.get('op') == 'capture':
                time.sleep(3600)
            return builtins.exec(code, g, l)
    """))
    assert r.ok, r.error
    started = time.monotonic()
    with pytest.raises(SandboxError, match="snapshot_timeout"):
        s.pause()
    assert time.monotonic() - started < 60
    assert s.info()["status"] == "running"
    assert s.run("print(keep)").stdout.strip() == "4"
