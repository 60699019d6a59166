"""Fixtures: real session managers over real sandboxes, in throwaway state directories."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel import SessionManager
from sandbox_kernel.errors import SandboxError
from sandbox_kernel.packages import wait_for_compilers

ROOT = Path(__file__).resolve().parent.parent
# The tests use the kernelspec shipped in this tree, whatever is installed elsewhere.
os.environ["JUPYTER_PATH"] = os.pathsep.join(
    [str(ROOT / "share" / "jupyter"), *filter(None, [os.environ.get("JUPYTER_PATH")])])


_SHORT_TMPDIRS: list[Path] = []


def short_tmpdir(prefix: str) -> Path:
    """State dirs hold unix sockets (107-byte paths): keep them short, under /tmp.
    Removed when the test run ends (see ``_remove_short_tmpdirs``)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    _SHORT_TMPDIRS.append(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _remove_short_tmpdirs() -> Iterator[None]:
    """Torn down after every other fixture, once their sessions are closed."""
    yield
    for path in _SHORT_TMPDIRS:
        shutil.rmtree(path, ignore_errors=True)


def bwrap_works() -> bool:
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return False
    return subprocess.run(
        [bwrap, "--unshare-user", "--unshare-net", "--ro-bind", "/", "/", "true"],
        capture_output=True,
    ).returncode == 0


needs_bwrap = pytest.mark.skipif(
    not bwrap_works() and not os.environ.get("CI"),
    reason="bubblewrap cannot create namespaces here (in CI this is a failure, not a skip)",
)


@contextlib.contextmanager
def make_manager(home: Path, **config) -> Iterator[SessionManager]:
    manager = SessionManager(home=str(home), **config)
    try:
        yield manager
    finally:
        # Every session, warm-pool sandboxes and paused ones included.
        for row in manager.registry.sessions(
                status=["starting", "running", "frozen", "paused", "dead"]):
            with contextlib.suppress(SandboxError):
                manager.close(row["id"])
        manager.registry.close()
        wait_for_compilers(Path(home) / "layers")  # they would write into a removed home


@pytest.fixture(scope="session")
def wheelhouse() -> Iterator[Path]:
    """Wheels built here, so that installs need no network."""
    from .wheels import build_wheel

    d = short_tmpdir("skw-")
    build_wheel(d, "skdemo-alpha", "1.0")
    build_wheel(d, "skdemo-alpha", "2.0")
    build_wheel(d, "skdemo-beta", "1.0", requires=["skdemo-alpha>=1.0"])
    build_wheel(d, "skdemo-gamma", "1.0")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def home() -> Iterator[Path]:
    path = short_tmpdir("skt-")
    yield path
    if (path / "registry.db").exists():  # sessions made through the CLI or a subprocess
        with make_manager(path):
            pass
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def manager(home: Path) -> Iterator[SessionManager]:
    with make_manager(home, isolation="bwrap") as m:
        yield m


@pytest.fixture(scope="module")
def shared_manager() -> Iterator[SessionManager]:
    path = short_tmpdir("skm-")
    with make_manager(path, isolation="bwrap") as m:
        yield m
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def session(shared_manager: SessionManager):
    """One sandboxed session shared by a module's tests that do not break it."""
    return shared_manager.create(name="shared")


def python_in_subprocess(
    code: str, home: Path, timeout: float = 120
) -> subprocess.CompletedProcess:
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def kernel_home() -> Iterator[Path]:
    """A state directory that kernels started by jupyter_client inherit through the env."""
    path = short_tmpdir("skk-")
    old = os.environ.get("SANDBOX_KERNEL_HOME")
    os.environ["SANDBOX_KERNEL_HOME"] = str(path)
    yield path
    with make_manager(path):
        pass  # closes what the kernels left to their lease
    if old is None:
        del os.environ["SANDBOX_KERNEL_HOME"]
    else:
        os.environ["SANDBOX_KERNEL_HOME"] = old
    shutil.rmtree(path, ignore_errors=True)


def probe(session, code: str) -> Any:
    """Run ``code`` (which sets ``out``) in the sandbox and return ``out``, via JSON."""
    r = session.run(textwrap.dedent(code) + "\nimport json; print(json.dumps(out))")
    assert r.ok, r.error
    return json.loads(r.stdout.strip().splitlines()[-1])
