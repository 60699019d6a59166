"""Red team, a review of two features: opt-in source builds and notebook rename following.

Each probe is an attack that worked before its fix: the source-build ones through real
bubblewrap builds (``SourceBuilder`` and the installer, with sdists and wheels made
here), the rename ones through a real Jupyter Server, its REST API as JupyterLab calls
it, and the sandbox kernels it starts.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from sandbox_kernel.packages import InstallFailed
from sandbox_kernel.registry import Registry
from sandbox_kernel.sandbox import confined_run
from sandbox_kernel.sandbox.cgroups import Cgroups
from sandbox_kernel.sandbox.launcher import BwrapLauncher
from sandbox_kernel.sdists import SdistCandidate
from sandbox_kernel.source_builds import SourceBuilder

from .conftest import make_manager, needs_bwrap, short_tmpdir
from .jupyter_server import jupyter_process
from .test_browser import _notebook
from .test_notebook_rename import Server
from .wheels import build_wheel

# -- source builds: the sdist, read on the host -------------------------------------


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """A tar header block for ``name`` declaring ``size`` (base-256, so it may be huge or
    negative, as tarfile reads it)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT)[-512:])
    field = size if size >= 0 else 256 ** 11 + size
    block[124:136] = bytes([0o200 if size >= 0 else 0o377]) + field.to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _gzip(*parts: bytes | tuple[bytes, int]) -> bytes:
    """A .tar.gz of ``parts`` (bytes, or (bytes, times) repeated): one gzip member per
    part, compressed once and repeated, so gigabytes of zeros cost a few megabytes."""
    out = b""
    for part in parts:
        data, times = part if isinstance(part, tuple) else (part, 1)
        out += gzip.compress(data, compresslevel=9, mtime=0) * times
    return out


_ZEROS = b"\0" * (64 << 20)
_PYPROJECT = b'[build-system]\nrequires = ["skdemo-x"]\n'
_END = _header("skdemo_bomb-1.0/pyproject.toml", len(_PYPROJECT)) + \
    _PYPROJECT.ljust(512, b"\0") + b"\0" * 1024


def _long_name() -> bytes:
    """A GNU long-name record of 512 MiB: tarfile reads it whole into memory."""
    return _gzip(_header("././@LongLink", 512 << 20, tarfile.GNUTYPE_LONGNAME),
                 (_ZEROS, 8), _END)


def _backwards() -> bytes:
    """A member whose negative size sends tarfile back to the 64 MiB member before it:
    each turn decompresses it again, for as many turns as members are allowed."""
    big_at, big = 512, 64 << 20
    back_at = big_at + 512 + big
    return _gzip(_header("skdemo_bomb-1.0/a", 0), _header("skdemo_bomb-1.0/big", big),
                 _ZEROS, _header("skdemo_bomb-1.0/back", -(back_at + 512 - big_at)),
                 b"\0" * 1024)


def _deep() -> bytes:
    """pyproject.toml after 3 GiB of zeros (3 MB compressed): skipping them decompresses
    them, on the host, though no build could unpack them into its 2 GiB /tmp."""
    return _gzip(_header("skdemo_bomb-1.0/zeros", 3 << 30), (_ZEROS, 48), _END)


_READ_ON_HOST = """
import json, sys
from pathlib import Path
from packaging.requirements import Requirement
from packaging.version import Version
from sandbox_kernel.sandbox.launcher import BwrapLauncher
from sandbox_kernel.sdists import SdistCandidate
from sandbox_kernel.source_builds import SourceBuilder
home, sdist = Path(sys.argv[1]), Path(sys.argv[2])
builder = SourceBuilder(home, BwrapLauncher())
candidate = SdistCandidate("skdemo-bomb", Version("1.0"), sdist.name, str(sdist))
try:
    builder.build(sys.executable, Requirement("skdemo-bomb"), candidate,
                  lambda needs, directory: print("INSTALL", needs, flush=True))
    outcome = "built"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"
# VmHWM, not ru_maxrss: ru_maxrss carries over the pytest process this one was forked
# from (its whole suite's memory), VmHWM is this program's own peak since exec.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
           if line.startswith("VmHWM:"))
print(json.dumps({"outcome": outcome, "peak_mib": hwm // 1024}))
"""


@needs_bwrap  # (builds refuse to start without it, before reading anything)
@pytest.mark.parametrize("make", [_long_name, _backwards, _deep])
def test_a_hostile_sdist_is_refused_before_it_costs_the_host_memory_or_time(tmp_path, make):
    """The host reads one file of the sdist (its pyproject.toml) before any sandbox
    exists. tarfile read a long-name record whole into the host's memory (a 2 GiB one in a
    2 MB sdist: 4 GiB resident); a 64 kB sdist whose member points backwards had it
    decompress the same 64 MiB again for each of up to 100,000 members (over 60 s here,
    hours in all); pyproject.toml behind gigabytes of zeros cost 2.5 s per MB of sdist.
    Each must be refused at once, in little memory, with nothing installed for it."""
    sdist = tmp_path / "skdemo_bomb-1.0.tar.gz"
    sdist.write_bytes(make())
    (tmp_path / "home").mkdir()
    try:
        run = subprocess.run([sys.executable, "-c", _READ_ON_HOST, str(tmp_path / "home"),
                              str(sdist)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {make.__name__}'s sdist on the host took over 60 s")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert "INSTALL" not in run.stdout, run.stdout
    assert report["outcome"].startswith("SdistUnavailable: skdemo_bomb-1.0.tar.gz is "
                                        "refused before any of it runs"), report
    assert report["peak_mib"] < 400, report  # (a hang is caught by the 60 s above)


# -- source builds: what the build reaches ------------------------------------------

#: An in-tree build backend that runs ``PROBE`` (which fills ``R``) in the build sandbox
#: and builds a wheel whose module holds ``R``, for the test to read.
_BACKEND = """
import os, zipfile
NAME, VERSION = {name!r}, "1.0"
R = {{}}
def _try(key, action):
    try:
        R[key] = action()
    except Exception as exc:
        R[key] = type(exc).__name__ + ": " + str(exc)[:200]
{probe}
def get_requires_for_build_wheel(config_settings=None):
    return []
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    module = NAME.replace("-", "_")
    info = f"{{module}}-{{VERSION}}.dist-info"
    files = {{f"{{module}}/__init__.py": "R = " + repr(R) + "\\n",
             f"{{info}}/METADATA": f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: 1.0\\n",
             f"{{info}}/WHEEL": "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\n"
                                "Tag: py3-none-any\\n"}}
    files[f"{{info}}/RECORD"] = "".join(f"{{p}},,\\n" for p in [*files, f"{{info}}/RECORD"])
    wheel = f"{{module}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel
"""


def _probing_sdist(directory: Path, name: str, probe: str, requires: list[str]) -> Path:
    """``name-1.0.tar.gz`` whose in-tree backend runs ``probe`` in the build sandbox."""
    root = f"{name.replace('-', '_')}-1.0"
    files = {
        "pyproject.toml": f"[build-system]\nrequires = {json.dumps(requires)}\n"
                          'build-backend = "probing"\nbackend-path = ["."]\n',
        "probing.py": _BACKEND.format(name=name, probe=textwrap.dedent(probe)),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{root}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for rel, text in files.items():
            info = tarfile.TarInfo(f"{root}/{rel}")
            info.size = len(text.encode())
            tf.addfile(info, io.BytesIO(text.encode()))
    return path


def _probes(wheel: Path, name: str) -> dict:
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(f"{name.replace('-', '_')}/__init__.py").decode()
    return ast.literal_eval(text.split("=", 1)[1].strip())


class _NoCgroups(Cgroups):
    """A host where no cgroup is writable: a manager run by an ordinary user, most
    containers (there, the real ``Cgroups.create`` finds nothing either)."""

    @classmethod
    def create(cls, name: str, memory: int | None, processes: int | None) -> Cgroups:
        return cls()


_LIMITS_PROBE = """
import resource
_try("as", lambda: resource.getrlimit(resource.RLIMIT_AS)[0])
_try("nproc", lambda: resource.getrlimit(resource.RLIMIT_NPROC)[0])
_try("reserve_8g", lambda: len(bytearray(8 << 30)) and "reserved")  # pages untouched
def _fill(directory, files, size):
    for i in range(files):
        with open(os.path.join(directory, f"fill-{i}"), "wb") as f:
            f.write(b"x" * size)
    return "filled"
_try("dev", lambda: _fill("/dev", 1, 1 << 20))
_try("dev_shm", lambda: _fill("/dev/shm", 3, 40 << 20))
for directory in ("/dev", "/dev/shm"):
    for i in range(3):
        try:
            os.remove(os.path.join(directory, f"fill-{i}"))
        except OSError:
            pass
"""


@needs_bwrap
def test_a_build_is_bounded_where_no_cgroup_is(tmp_path, monkeypatch):
    """Without a writable cgroup (an ordinary user's manager) a build had no memory and no
    process limit at all (sessions fall back to RLIMIT_AS and RLIMIT_NPROC), and its
    /dev and /dev/shm were writable tmpfs of half the host's memory, beside the
    capped /tmp: memory a build could fill with files, which no RLIMIT_AS bounds."""
    monkeypatch.setattr(confined_run, "Cgroups", _NoCgroups)
    sdist = _probing_sdist(tmp_path / "src", "skdemo-limits", _LIMITS_PROBE, [])
    (tmp_path / "home").mkdir()
    builder = SourceBuilder(tmp_path / "home", BwrapLauncher(), memory=1 << 30,
                            processes=200, timeout=120)
    candidate = SdistCandidate("skdemo-limits", Version("1.0"), sdist.name, str(sdist))
    wheel = builder.build(sys.executable, Requirement("skdemo-limits"), candidate,
                          lambda needs, directory: None)
    found = _probes(wheel, "skdemo-limits")
    assert 0 < found["as"] < 64 << 30 and found["reserve_8g"].startswith("MemoryError"), found
    assert 0 < found["nproc"] <= 200, found
    assert "Read-only file system" in found["dev"], found
    assert "No space left on device" in found["dev_shm"], found


_CWD_PROBE = """
def _steal():
    import skdemo_secret
    return skdemo_secret.SECRET
_try("stolen", _steal)
"""


@needs_bwrap
def test_a_build_requirement_named_like_a_file_takes_nothing_from_the_hosts_cwd(
        tmp_path, wheelhouse, monkeypatch):
    """``requires = ["skdemo_secret-1.0-py3-none-any.whl"]`` is a valid project name to
    ``packaging``; uv took it for a file in its working directory, the manager's (a
    kernel's is its notebook's folder), and installed that host file into the build's
    requirements, where the backend read it and could ship it in the wheel."""
    cwd = tmp_path / "notebooks"
    build_wheel(cwd, "skdemo-secret", "1.0", body="SECRET = 'a wheel in the host cwd'\n")
    monkeypatch.chdir(cwd)
    links = tmp_path / "links"
    _probing_sdist(links, "skdemo-cwd", _CWD_PROBE, ["skdemo_secret-1.0-py3-none-any.whl"])
    home = short_tmpdir("skrb-")
    with make_manager(home, isolation="bwrap") as manager:
        inst = manager.installer
        inst.find_links, inst.no_index, inst.offline = [str(links), str(wheelhouse)], True, True
        inst.cache_dir, inst.allow_source_builds = str(home / "uv-cache"), True
        try:
            inst.install(manager.python, ["skdemo-cwd"])
        except InstallFailed as exc:
            assert "skdemo-secret-1-0-py3-none-any-whl" in str(exc), exc
        for where in (inst.layers_dir, inst.builder.built_dir):
            for path in where.rglob("*"):
                if path.is_file():
                    assert b"a wheel in the host cwd" not in path.read_bytes(), path


_KILLED_BUILD = """
import sys
from pathlib import Path
from packaging.requirements import Requirement
from packaging.version import Version
from sandbox_kernel.sandbox.launcher import BwrapLauncher
from sandbox_kernel.sdists import SdistCandidate
from sandbox_kernel.source_builds import SourceBuilder
home, sdist = Path(sys.argv[1]), Path(sys.argv[2])
SourceBuilder(home, BwrapLauncher(), timeout=600).build(
    sys.executable, Requirement("skdemo-hangs"),
    SdistCandidate("skdemo-hangs", Version("1.0"), sdist.name, str(sdist)),
    lambda needs, directory: None)
"""


def _claims_of(directory: Path) -> list[Path]:
    from sandbox_kernel.sandbox.identity import CLAIMS

    if os.geteuid() != 0:
        return []  # (an ordinary user's builds run as that user: no claims, root-only)
    return [c for c in CLAIMS.iterdir() if str(directory) in c.read_text(errors="replace")]


@needs_bwrap
def test_what_a_killed_managers_build_left_is_cleared_by_the_next_build(tmp_path):
    """The manager is killed mid-build (bubblewrap's --die-with-parent ends the build's
    processes): its scratch directory (the sdist, the build requirements, what the wheel
    had sent) stayed in the state directory for good, and so did its uid's claim, since
    a claim is stale only once its directory is gone. The next build clears them."""
    home = tmp_path / "home"
    home.mkdir()
    hangs = _probing_sdist(tmp_path / "src", "skdemo-hangs", "import time\nwhile True:\n"
                           "    time.sleep(1)\n", [])
    manager = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(home), str(hangs)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(home.glob("builds/build-*/wheel.out")) and time.monotonic() < deadline:
            time.sleep(0.1)
        (left,) = home.glob("builds/build-*")
    finally:
        manager.kill()
        manager.wait()
    claimed = _claims_of(left)
    assert left.exists() and (claimed or os.geteuid() != 0)
    sdist = _probing_sdist(tmp_path / "src", "skdemo-next", "", [])
    SourceBuilder(home, BwrapLauncher(), timeout=120).build(
        sys.executable, Requirement("skdemo-next"),
        SdistCandidate("skdemo-next", Version("1.0"), sdist.name, str(sdist)),
        lambda needs, directory: None)
    assert not left.exists(), "the killed build's scratch directory is still there"
    assert not any(c.exists() for c in claimed), "the killed build's uid is still claimed"


# -- notebook renames ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(kernel_home) -> Iterator[Server]:
    with jupyter_process("jupyter_server", short_tmpdir("skrv-")) as proc:
        yield Server(proc["base"], proc["token"], proc["root"], proc["runtime"])


def _bound(kernel_home: Path, server: Server, path: str) -> str | None:
    """The name of the session the registry binds to the notebook at ``path``."""
    registry = Registry(kernel_home / "registry.db")
    try:
        found = registry.bound(f"notebook:{server.root / path}")
        return registry.session(found)["name"] if found else None
    finally:
        registry.close()


def _settled(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait until ``check()`` holds or ``timeout`` passes: the extension follows a rename
    after the server has answered it (events reach their listeners as tasks)."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)


def _server_paths(server: Server) -> list[str]:
    return [s["path"] for s in server.call("GET", "/api/sessions")]


def _shut_down(server: Server, *sessions: dict) -> None:
    for session in {s["id"]: s for s in sessions}.values():
        with contextlib.suppress(OSError):
            server.shut_down(session)


def _said(reply: dict) -> str:
    return reply.get("stream", "") + reply.get("display", "") + reply.get("result", "")


@needs_bwrap
def test_a_new_notebook_at_a_renamed_notebooks_old_path_gets_a_kernel_of_its_own(server):
    """A notebook whose kernel runs with no document open (a closed tab keeps its kernel,
    or another client renamed it) is renamed; JupyterLab then makes a new notebook under
    the freed name and looks for a running session by its path. The server still had the
    old notebook's session at that path, so the new notebook got the old notebook's kernel
    and ran in its sandbox session: its variables, and anything its code left there."""
    _notebook(server.root / "Untitled.ipynb", [])
    first = server.open("Untitled.ipynb")
    assert server.run(first, "planted = 'the old notebook'") == {}
    server.call("PATCH", "/api/contents/Untitled.ipynb", {"path": "kept.ipynb"})
    _settled(lambda: "Untitled.ipynb" not in _server_paths(server))
    _notebook(server.root / "Untitled.ipynb", [])
    fresh = server.open("Untitled.ipynb")
    try:
        assert fresh["kernel"]["id"] != first["kernel"]["id"], \
            "the new notebook was given the renamed notebook's running kernel"
        assert server.run(fresh, "planted").get("error") == "NameError"
        # The renamed notebook, opened again, is still its running kernel and session.
        again = server.open("kept.ipynb")
        assert again["kernel"]["id"] == first["kernel"]["id"], again
        assert server.run(again, "planted")["result"] == "'the old notebook'"
    finally:
        _shut_down(server, fresh, first)


@needs_bwrap
def test_a_kernel_that_lived_through_a_rename_there_and_back_keeps_its_own_notebook(
        server, kernel_home):
    """``p -> q`` and back ``q -> p`` while p's kernel runs: that kernel followed the first
    rename and stopped at the second (its walk refused to visit p twice), so it took itself
    for q. The next notebook made at q had its session in that kernel's scope: a
    ``%session use`` away from its variables."""
    _notebook(server.root / "there.ipynb", [])
    first = server.open("there.ipynb")
    assert server.run(first, "mine = 1") == {}
    server.rename(first, "there.ipynb", "back.ipynb")
    _settled(lambda: _bound(kernel_home, server, "back.ipynb") is not None)
    server.rename(first, "back.ipynb", "there.ipynb")
    _settled(lambda: _bound(kernel_home, server, "there.ipynb") is not None)
    _notebook(server.root / "back.ipynb", [])
    other = server.open("back.ipynb")
    try:
        assert other["kernel"]["id"] != first["kernel"]["id"]
        assert server.run(other, "theirs = 'secret of back.ipynb'") == {}
        theirs = _bound(kernel_home, server, "back.ipynb")
        assert theirs and theirs != _bound(kernel_home, server, "there.ipynb")
        listed = _said(server.run(first, "%session list"))
        assert theirs not in listed, listed
        server.run(first, f"%session use {theirs}")
        assert server.run(first, "theirs").get("error") == "NameError"
        # Its own session is still its own: listed, and its variables there.
        assert _bound(kernel_home, server, "there.ipynb") in listed, listed
        assert server.run(first, "mine")["result"] == "1"
    finally:
        _shut_down(server, other, first)


@needs_bwrap
def test_a_notebook_renamed_onto_a_deleted_notebooks_path_shares_nothing_with_it(
        server, kernel_home):
    """A notebook is deleted while its kernel runs (deleting a file stops no kernel);
    another is renamed to its path. The move dropped the deleted notebook's binding and
    kept its sessions' owner, so the still-running kernel of the deleted notebook saw the
    moved notebook's session as its own (``%session use`` it and read its variables), and
    the moved notebook was handed the deleted one's sessions."""
    _notebook(server.root / "gone.ipynb", [])
    gone = server.open("gone.ipynb")
    assert server.run(gone, "old = 'the deleted notebook'") == {}
    old_session = _bound(kernel_home, server, "gone.ipynb")
    _notebook(server.root / "mover.ipynb", [])
    mover = server.open("mover.ipynb")
    assert server.run(mover, "moved = 'secret of the moved notebook'") == {}
    server.call("DELETE", "/api/contents/gone.ipynb")
    server.rename(mover, "mover.ipynb", "gone.ipynb")
    _settled(lambda: _bound(kernel_home, server, "mover.ipynb") is None)
    try:
        moved_session = _bound(kernel_home, server, "gone.ipynb")
        assert moved_session and moved_session != old_session
        # The deleted notebook's kernel: its own session, not the moved notebook's.
        listed = _said(server.run(gone, "%session list"))
        assert moved_session not in listed, listed
        server.run(gone, f"%session use {moved_session}")
        assert server.run(gone, "moved").get("error") == "NameError"
        assert server.run(gone, "old")["result"] == "'the deleted notebook'"
        # The moved notebook: its own session, not the deleted notebook's.
        listed = _said(server.run(mover, "%session list"))
        assert old_session not in listed, listed
        server.run(mover, f"%session use {old_session}")
        assert server.run(mover, "old").get("error") == "NameError"
        assert server.run(mover, "moved")["result"] == "'secret of the moved notebook'"
    finally:
        _shut_down(server, mover, gone)


@needs_bwrap
def test_a_deleted_notebooks_kernel_restarted_after_another_took_its_path_keeps_its_own(
        server, kernel_home):
    """The deleted notebook's server session keeps the old path, so its kernel, restarted
    (from the running-kernels list, or after a crash), starts with that path, now the
    moved notebook's, and the kernel takes the path's session over its connection
    file's: it runs in the moved notebook's session."""
    _notebook(server.root / "left.ipynb", [])
    left = server.open("left.ipynb")
    assert server.run(left, "old = 'the deleted notebook'") == {}
    _notebook(server.root / "came.ipynb", [])
    came = server.open("came.ipynb")
    assert server.run(came, "moved = 'secret of the moved notebook'") == {}
    server.call("DELETE", "/api/contents/left.ipynb")
    server.rename(came, "came.ipynb", "left.ipynb")
    _settled(lambda: _bound(kernel_home, server, "came.ipynb") is None)
    try:
        server.call("POST", f"/api/kernels/{left['kernel']['id']}/restart")
        assert server.run(left, "moved").get("error") == "NameError"
    finally:
        _shut_down(server, came, left)


#: A notebook's cell: a wheel of skdemo-alpha 9.0 and a uv.toml naming this folder as a
#: place to find packages, written in its work directory for `%session download`.
_PLANT = """
import zipfile
info = "skdemo_alpha-9.0.dist-info"
files = {"skdemo_alpha/__init__.py": "VERSION = 'planted by another notebook'\\n",
         f"{info}/METADATA": "Metadata-Version: 2.1\\nName: skdemo-alpha\\nVersion: 9.0\\n",
         f"{info}/WHEEL": "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}
files[f"{info}/RECORD"] = "".join(f"{p},,\\n" for p in [*files, f"{info}/RECORD"])
with zipfile.ZipFile("skdemo_alpha-9.0-py3-none-any.whl", "w") as zf:
    for path, text in files.items():
        zf.writestr(path, text)
open("uv.toml", "w").write('[pip]\\nfind-links = ["."]\\n')
"""


@needs_bwrap
def test_a_notebook_cannot_configure_the_uv_that_installs_for_other_notebooks(
        kernel_home, wheelhouse, monkeypatch):
    """uv reads uv.toml (and pyproject.toml's [tool.uv]) from its working directory and
    its parents; the installer's uv runs in the kernel's, the notebook's folder, where the
    notebook's own `%session download` writes (neither name is hidden, so nothing asks).
    A notebook planted a uv.toml and a wheel there: the next notebook in that folder to
    install skdemo-alpha got the planted code in its session, and through the shared
    resolution and layer caches so did a notebook in another folder."""
    monkeypatch.setenv("SANDBOX_KERNEL_FIND_LINKS", str(wheelhouse))
    monkeypatch.setenv("SANDBOX_KERNEL_NO_INDEX", "1")
    monkeypatch.setenv("SANDBOX_KERNEL_OFFLINE", "1")
    # uv's cache in a directory of the test's: the ordinary test user's home is not writable.
    monkeypatch.setenv("SANDBOX_KERNEL_UV_CACHE_DIR", str(kernel_home / "uv-cache"))
    with jupyter_process("jupyter_server", short_tmpdir("skrv-")) as proc:
        server = Server(proc["base"], proc["token"], proc["root"], proc["runtime"])
        for path in ("shared/planter.ipynb", "shared/neighbour.ipynb", "elsewhere/far.ipynb"):
            (server.root / path).parent.mkdir(exist_ok=True)
            _notebook(server.root / path, [])
        planter = server.open("shared/planter.ipynb")
        neighbour = far = planter
        try:
            assert server.run(planter, _PLANT).get("error") is None
            server.run(planter, "%session download uv.toml skdemo_alpha-9.0-py3-none-any.whl")
            assert (server.root / "shared" / "uv.toml").exists()  # what a notebook may do
            neighbour = server.open("shared/neighbour.ipynb")
            far = server.open("elsewhere/far.ipynb")
            for victim in (neighbour, far):
                installed = server.run(victim, "%session install skdemo-alpha")
                got = server.run(victim, "import skdemo_alpha; skdemo_alpha.VERSION")
                assert got.get("result") == "'2.0'", (got, installed)
        finally:
            _shut_down(server, planter, neighbour, far)
