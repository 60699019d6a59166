"""Red team: a package published only as a source distribution never builds on the host.

A build backend is arbitrary code. uv runs it, as the manager's user, outside the
sandbox, to learn an sdist's metadata (resolution) and to make its wheel
(install). The package here ships such a backend in its own tree
(``backend-path``): importing it writes a marker file on the host. Installs
take wheels only, so the install is refused and the marker never appears.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.version import Version

from sandbox_kernel.packages import InstallFailed, SourceBuildRefused
from sandbox_kernel.sandbox.launcher import BwrapLauncher
from sandbox_kernel.sdists import SdistCandidate
from sandbox_kernel.source_builds import SourceBuilder, SourceBuildFailed

from .conftest import make_manager, needs_bwrap
from .wheels import build_wheel

_BACKEND = """
import os, pathlib, zipfile
pathlib.Path({marker!r}).write_text("the build backend ran on the host\\n")
NAME, MODULE, VERSION = {name!r}, {module!r}, {version!r}

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    # A working wheel: on the host, the attack would have succeeded silently.
    info = f"{{MODULE}}-{{VERSION}}.dist-info"
    files = {{
        f"{{MODULE}}/__init__.py": "",
        f"{{info}}/METADATA": f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n",
        f"{{info}}/WHEEL": "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }}
    files[f"{{info}}/RECORD"] = "".join(f"{{p}},,\\n" for p in [*files, f"{{info}}/RECORD"])
    wheel = f"{{MODULE}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel
"""


def _sdist(directory: Path, name: str, version: str, marker: Path) -> Path:
    """``name-version.tar.gz`` whose in-tree backend writes ``marker`` when imported."""
    module = name.replace("-", "_")
    root = f"{module}-{version}"
    files = {
        "pyproject.toml": textwrap.dedent(f"""\
            [build-system]
            requires = []
            build-backend = "evil_backend"
            backend-path = ["."]

            [project]
            name = "{name}"
            version = "{version}"
            """),
        "evil_backend.py": _BACKEND.format(marker=str(marker), name=name, module=module,
                                           version=version),
        f"{module}/__init__.py": "",
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    }
    return _tar(directory, root, files)


def _tar(directory: Path, root: str, files: dict[str, str]) -> Path:
    """``root.tar.gz`` in ``directory``, holding ``files`` (relative path: text) under ``root/``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{root}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _refusal(attempt: Callable[[], object]) -> InstallFailed | None:
    """The error ``attempt`` raised, or None if it succeeded (checked after the marker)."""
    try:
        attempt()
    except InstallFailed as exc:
        return exc
    return None


@pytest.fixture
def sdist_manager(home, wheelhouse, tmp_path):
    """A manager whose only index is a directory holding the wheels and one evil sdist."""
    links = tmp_path / "links"
    marker = tmp_path / "backend-ran"
    _sdist(links, "skdemo-evil", "1.0", marker)
    with make_manager(home, isolation="bwrap") as m:
        inst = m.installer
        inst.find_links = [str(links), str(wheelhouse)]
        inst.no_index = True
        inst.offline = True
        inst.cache_dir = str(home / "uv-cache")
        yield m, marker


@needs_bwrap
def test_an_sdist_only_package_is_refused_and_its_backend_never_runs(sdist_manager):
    manager, marker = sdist_manager
    s = manager.create(name="builds")
    s.run("kept = 41")
    refused = _refusal(lambda: s.install(["skdemo-evil"]))
    assert not marker.exists(), "the sdist's build backend ran on the host"
    assert isinstance(refused, SourceBuildRefused), refused
    message = str(refused)
    assert "skdemo-evil has no wheel for this Python and platform" in message
    assert "source distributions are refused" in message
    # Nothing changed for the session; wheels still install.
    assert s.info()["packages"] == []
    assert s.install(["skdemo-gamma"]).new_packages == {"skdemo-gamma": "1.0"}
    assert s.run("import skdemo_gamma; kept + 1").result == "42"


@needs_bwrap
def test_create_with_an_sdist_only_package_is_refused(sdist_manager):
    manager, marker = sdist_manager
    refused = _refusal(lambda: manager.create(name="at-create",
                                              packages=["skdemo-beta", "skdemo-evil"]))
    assert not marker.exists(), "the sdist's build backend ran on the host"
    assert isinstance(refused, SourceBuildRefused) and "skdemo-evil" in str(refused), refused


#: A backend that, once opted in to, runs in the build sandbox: it tries what an attacker
#: would from there and records what happened in the module it builds, for the test to read.
_PROBING_BACKEND = """
import ctypes, json, os, pathlib, socket, zipfile
NAME, MODULE, VERSION, MARKER = {name!r}, {module!r}, {version!r}, {marker!r}
MODE = {mode!r}
PROBES = {{}}
def _probe(key, action):
    try:
        PROBES[key] = action() or "done"
    except OSError as exc:
        PROBES[key] = type(exc).__name__
_probe("marker", lambda: pathlib.Path(MARKER).write_text("the build backend ran on the host\\n"))
_probe("network", lambda: socket.create_connection(("10.0.2.2", 80), timeout=2).close())
_probe("sdist_write", lambda: open("/run/build/source.tar.gz", "ab").close())
_probe("userns", lambda: os.strerror(ctypes.get_errno())
       if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) else "created")
# Host root's files look like our own only when we are host root (bwrap maps our uid to
# the uid that started it); otherwise they belong to the overflow uid.
PROBES["host_root_is_me"] = os.stat("/run/build/source.tar.gz").st_uid == os.getuid()

def get_requires_for_build_wheel(config_settings=None):
    return []

def _wheel(directory, name, files_extra=()):
    module = name.replace("-", "_")
    info = f"{{module}}-{{VERSION}}.dist-info"
    files = {{
        f"{{module}}/__init__.py": "PROBES = " + repr(PROBES) + "\\n",
        f"{{info}}/METADATA": f"Metadata-Version: 2.1\\nName: {{name}}\\nVersion: {{VERSION}}\\n",
        f"{{info}}/WHEEL": "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
        **dict(files_extra),
    }}
    files[f"{{info}}/RECORD"] = "".join(f"{{p}},,\\n" for p in [*files, f"{{info}}/RECORD"])
    wheel = f"{{module}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(directory, wheel), "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    if MODE == "other-project":
        return _wheel(wheel_directory, "skdemo-other")
    if MODE == "slip":
        return _wheel(wheel_directory, NAME, [("../../../etc/skdemo-slipped", "x")])
    if MODE == "hang":
        import time
        while True:
            time.sleep(1)
    if MODE == "forge-channel":
        # Find the driver's channel to the host (a pipe it holds) and speak first.
        made = _wheel(wheel_directory, "skdemo-other")
        data = open(os.path.join(wheel_directory, made), "rb").read()
        os.remove(os.path.join(wheel_directory, made))
        header = json.dumps({{"wheel": made, "size": len(data)}}).encode() + b"\\n"
        pid = os.getppid()
        while pid > 1:
            for fd in os.listdir(f"/proc/{{pid}}/fd"):
                if os.readlink(f"/proc/{{pid}}/fd/{{fd}}").startswith("pipe:") and int(fd) > 2:
                    try:
                        with open(f"/proc/{{pid}}/fd/{{fd}}", "wb") as channel:
                            channel.write(header + data)
                        PROBES["forged"] = pid
                    except OSError as exc:
                        PROBES.setdefault("forge_errors", []).append(f"{{pid}}/{{fd}}: {{exc}}")
            pid = int(open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[1])
    return _wheel(wheel_directory, NAME)
"""


def _probing_sdist(directory: Path, name: str, marker: Path, mode: str = "honest",
                   backend: str | None = None) -> Path:
    """An sdist whose in-tree backend probes its sandbox (and misbehaves as ``mode`` says);
    with ``backend``, it names that installed package as its backend instead."""
    module = name.replace("-", "_")
    root = f"{module}-1.0"
    files = {
        "pyproject.toml": textwrap.dedent(f"""\
            [build-system]
            requires = {[backend] if backend else []!r}
            build-backend = "{backend.replace('-', '_') if backend else 'probing_backend'}"
            """) + ("" if backend else 'backend-path = ["."]\n'),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
    }
    if not backend:
        files["probing_backend.py"] = _PROBING_BACKEND.format(
            name=name, module=module, version="1.0", marker=str(marker), mode=mode)
    return _tar(directory, root, files)


@pytest.fixture
def builds_manager(sdist_manager, tmp_path):
    """The same manager, opted in to source builds, with the probing sdists beside."""
    manager, marker = sdist_manager
    links = Path(manager.installer.find_links[0])
    for mode in ("honest", "other-project", "slip", "hang", "forge-channel"):
        _probing_sdist(links, f"skdemo-probe-{mode}", marker, mode)
    manager.installer.allow_source_builds = True
    return manager, marker


@needs_bwrap
def test_an_opted_in_build_runs_in_a_sandbox_with_no_way_out(builds_manager):
    manager, marker = builds_manager
    s = manager.create(name="built")
    result = s.install(["skdemo-probe-honest"])
    assert result.built_from_source == ["skdemo-probe-honest"]
    assert result.new_packages == {"skdemo-probe-honest": "1.0"}
    assert "build" in result.timing
    ran = s.run("import skdemo_probe_honest\nskdemo_probe_honest.PROBES")
    assert ran.error is None, ran.error
    probes = ast.literal_eval(ran.result)
    assert not marker.exists(), "the build backend wrote on the host"
    assert probes["marker"] != "done" and probes["sdist_write"] != "done", probes
    assert probes["network"] != "done", probes  # no route: its own empty network namespace
    assert probes["userns"] != "created", probes
    if os.geteuid() == 0:  # (an ordinary user's builds run as that user, as its sessions do)
        assert probes["host_root_is_me"] is False, probes  # never the host's root
    # Built once: a second session takes the built wheel (a layer), with no build.
    again = manager.create(name="built-again").install(["skdemo-probe-honest"])
    assert again.built_from_source == [] and again.new_packages == {"skdemo-probe-honest": "1.0"}


@needs_bwrap
def test_declared_build_requirements_come_as_wheels_into_the_build(builds_manager, wheelhouse):
    """``requires = ["skdemo-backend"]``: the host installs that backend's wheel (uv,
    wheels only) for the build, which imports it from there; the session never sees it."""
    manager, marker = builds_manager
    links = Path(manager.installer.find_links[0])
    build_wheel(links, "skdemo-backend", "1.0", body=_PROBING_BACKEND.format(
        name="skdemo-probe-needs", module="skdemo_probe_needs", version="1.0",
        marker=str(marker), mode="honest"))
    _probing_sdist(links, "skdemo-probe-needs", marker, backend="skdemo-backend")
    s = manager.create(name="needs")
    result = s.install(["skdemo-probe-needs"])
    assert result.built_from_source == ["skdemo-probe-needs"]
    assert result.new_packages == {"skdemo-probe-needs": "1.0"}  # not the build's backend
    ran = s.run("import skdemo_probe_needs\nskdemo_probe_needs.PROBES['network']")
    assert ran.error is None and ran.result != "'done'", ran
    assert not marker.exists()


@needs_bwrap
@pytest.mark.parametrize("mode, message", [
    ("other-project", "made a wheel of skdemo-other 1.0, not of skdemo-probe-other-project"),
    ("slip", "a path outside it; refused"),
    ("hang", "took longer than 4 s (SourceBuilder.timeout)"),
])
def test_what_a_build_sends_back_is_checked_before_anything_is_installed(
        builds_manager, mode, message):
    manager, marker = builds_manager
    manager.installer.builder.timeout = 4.0
    before = sorted(p.name for p in manager.installer.layers_dir.iterdir())
    refused = _refusal(lambda: manager.installer.install(manager.python,
                                                         [f"skdemo-probe-{mode}"]))
    assert isinstance(refused, InstallFailed), refused
    assert message in str(refused), refused
    assert sorted(p.name for p in manager.installer.layers_dir.iterdir()) == before
    built = manager.installer.builder.built_dir
    assert not any(built.iterdir()) if built.exists() else True
    assert not Path("/etc/skdemo-slipped").exists()
    # Nothing of the build is left: no scratch directory, no process of its uid.
    assert not any((Path(manager.home) / "builds").iterdir())
    assert not marker.exists()


def test_source_builds_stay_off_unless_opted_in(sdist_manager):
    manager, marker = sdist_manager
    assert manager.installer.allow_source_builds is False  # the default
    refused = _refusal(lambda: manager.installer.install(manager.python, ["skdemo-evil"]))
    assert isinstance(refused, SourceBuildRefused), refused
    assert "PackageInstaller.allow_source_builds = True" in str(refused)
    assert not marker.exists()


@needs_bwrap
def test_a_backend_cannot_speak_on_the_channel_back_to_the_host(builds_manager):
    """The backend looks for the driver's pipe to the host through /proc and writes a
    wheel of another project there first. The kernel refuses it the driver's descriptors
    (it is a user of the sandbox's nested namespace); and had it got through, the host
    would have refused that wheel by its name (the other-project probe above)."""
    manager, _ = builds_manager
    try:
        result = manager.installer.install(manager.python, ["skdemo-probe-forge-channel"])
    except InstallFailed as refused:
        assert "made a wheel of skdemo-other" in str(refused), refused
        return
    assert result.new_packages == {"skdemo-probe-forge-channel": "1.0"}
    layer = manager.installer.layer_path(result.layers[-1]) / "site-packages"
    assert not list(layer.glob("skdemo_other*"))
    probes = (layer / "skdemo_probe_forge_channel" / "__init__.py").read_text()
    assert "'forged'" not in probes and "Permission denied" in probes, probes


@pytest.mark.parametrize("sent, message", [
    (b"no header at all", "sent back no valid header"),
    (b'{"wheel": "skdemo_probe_honest-1.0-py3-none-any.whl", "size": 5, "x": 1}\n12345',
     "sent back no valid header"),
    (b'{"wheel": "skdemo_probe_honest-1.0-py3-none-any.whl", "size": 99}\n12345',
     "sent 5 bytes for a wheel of 99"),
    (b'{"wheel": "../skdemo_probe_honest-1.0-py3-none-any.whl", "size": 1}\nx',
     "which is not a wheel file name"),
    (b'{"wheel": "skdemo_probe_honest-1.0-py3-none-any.whl\\u001b[2J", "size": 1}\nx',
     "\\x1b[2J"),
    (b'{"wheel": "skdemo_probe_honest-1.0-py3-none-any.whl", "size": 5}\n12345',
     "is not a zip file"),
])
def test_forged_build_output_is_refused_and_nothing_is_filed(tmp_path, sent, message):
    """What a build sends back, forged byte by byte: each is refused with a message that
    shows the sandbox's words escaped, and nothing lands among the built wheels."""
    (tmp_path / "home").mkdir()
    builder = SourceBuilder(tmp_path / "home", BwrapLauncher())
    candidate = SdistCandidate("skdemo-probe-honest", Version("1.0"),
                               "skdemo_probe_honest-1.0.tar.gz", "unused")
    output = tmp_path / "wheel.out"
    output.write_bytes(sent)
    with pytest.raises(SourceBuildFailed) as refused:
        builder._file_wheel(output, candidate)
    assert message in str(refused.value)
    assert "\x1b" not in str(refused.value)
    assert not builder.built_dir.exists() or not any(builder.built_dir.iterdir())


@pytest.fixture
def simple_index(tmp_path):
    """A PEP 503 index served over HTTP by a real server process on loopback."""
    root = tmp_path / "index"
    (root / "simple").mkdir(parents=True)
    server = subprocess.Popen(
        # -u: its "Serving HTTP on ... port N" line must come through the pipe at once.
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
         "--directory", str(root)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N ..."
        port = int(line.split(" port ")[1].split()[0])
        yield root, f"http://127.0.0.1:{port}/simple/"
    finally:
        server.kill()
        server.wait()


def _publish(root: Path, sdist: Path, digest: str | None = None) -> None:
    """List ``sdist`` on its project's page, with its sha256 (or ``digest``) in the link."""
    project = sdist.name.rsplit("-", 1)[0].replace("_", "-")
    page = root / "simple" / project
    page.mkdir(parents=True, exist_ok=True)
    files = root / "files"
    files.mkdir(exist_ok=True)
    shutil.copy(sdist, files / sdist.name)
    digest = digest or hashlib.sha256(sdist.read_bytes()).hexdigest()
    (page / "index.html").write_text(
        f'<html><body><a href="../../files/{sdist.name}#sha256={digest}">{sdist.name}</a>'
        "</body></html>\n")


@needs_bwrap
def test_an_sdist_from_an_index_is_fetched_checked_and_built(builds_manager, simple_index,
                                                             tmp_path):
    manager, marker = builds_manager
    root, url = simple_index
    made = _probing_sdist(tmp_path / "made", "skdemo-probe-indexed", marker)
    _publish(root, made)
    forged = _probing_sdist(tmp_path / "made", "skdemo-probe-forged", marker)
    _publish(root, forged, digest="0" * 64)
    inst = manager.installer
    inst.find_links = [f for f in inst.find_links if "links" not in f]  # the wheels only
    inst.index_url, inst.no_index, inst.offline = url, False, False
    result = inst.install(manager.python, ["skdemo-probe-indexed"])
    assert result.built_from_source == ["skdemo-probe-indexed"]
    refused = _refusal(lambda: inst.install(manager.python, ["skdemo-probe-forged"]))
    assert isinstance(refused, InstallFailed) and "does not match the index's digest" in str(
        refused), refused
    assert not marker.exists()
