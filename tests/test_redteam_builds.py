"""Red team: a package published only as a source distribution never builds on the host.

A build backend is arbitrary code. uv runs it, as the manager's user, outside the
sandbox, to learn an sdist's metadata (resolution) and to make its wheel
(install). The package here ships such a backend in its own tree
(``backend-path``): importing it writes a marker file on the host. Installs
take wheels only, so the install is refused and the marker never appears.
"""

from __future__ import annotations

import io
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox_kernel.packages import InstallFailed, SourceBuildRefused

from .conftest import make_manager, needs_bwrap

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


def test_opting_in_to_source_builds_is_refused_until_they_are_sandboxed(sdist_manager):
    manager, marker = sdist_manager
    manager.installer.allow_source_builds = True
    refused = _refusal(lambda: manager.installer.install(manager.python, ["skdemo-evil"]))
    assert not marker.exists(), "the sdist's build backend ran on the host"
    assert isinstance(refused, SourceBuildRefused), refused
    assert "not available yet" in str(refused) and "find_links" in str(refused)
