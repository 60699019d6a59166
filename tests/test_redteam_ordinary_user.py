"""The red-team probes again, with the manager run by an ordinary user (issue 15).

The suite runs as root here (and in CI); a manager run by an ordinary user
takes other paths (no uid of the session's own, no staging, no cgroups). So
this test makes an unprivileged system user and runs every red-team module
as that user, in a pytest of their own. The interpreter may live
under a directory that user cannot enter (a pyenv under ``/root``): for the
length of the run, such directories on the way to it and to this checkout
get the search bit for others (not read), and get their old mode back after.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, needs_bwrap, short_tmpdir

pytestmark = [
    needs_bwrap,
    pytest.mark.skipif(os.geteuid() != 0, reason="already an ordinary user: the red-team "
                       "modules run as this user themselves"),
]

USER = "sandbox-kernel-test"
#: The skip reason of the red-team tests that only concern a root manager.
ROOT_ONLY = "made by a root manager only"
_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


def _tool(name: str) -> str:
    found = shutil.which(name, path=_SBIN)
    assert found, f"{name} is missing (Debian's passwd and util-linux packages have it)"
    return found


def _user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run([_tool("useradd"), "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", USER], check=True, capture_output=True)
        return pwd.getpwnam(USER)


def _closed_ancestors(paths: list[Path]) -> dict[Path, int]:
    """Directories on the way to ``paths`` that others cannot search, with their modes."""
    closed = {}
    for path in paths:
        for parent in [path, *path.parents]:
            st = parent.stat()
            if parent.is_dir() and not st.st_mode & 0o001:
                closed[parent] = st.st_mode & 0o7777
    return closed


def _red_team() -> list[str]:
    """Every red-team module but this one."""
    here = Path(__file__).name
    return sorted(str(p) for p in (ROOT / "tests").glob("test_redteam_*.py") if p.name != here)


@pytest.mark.timeout(900)  # every red-team module again, as another user
def test_the_red_team_probes_pass_for_a_manager_run_by_an_ordinary_user():
    user = _user()
    home = short_tmpdir("sku-")
    os.chown(home, user.pw_uid, user.pw_gid)
    interpreter = Path(os.path.realpath(sys.executable))
    closed = _closed_ancestors([interpreter.parent, ROOT])
    try:
        for path, mode in closed.items():
            path.chmod(mode | 0o001)
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
               "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "CI": os.environ.get("CI", "")}
        run = subprocess.run(
            [_tool("runuser"), "-u", USER, "--", sys.executable, "-m", "pytest", "-q",
             "-p", "no:cacheprovider", "-o", "addopts=-rfEs", *_red_team()],
            cwd=home, env=env, capture_output=True, text=True, timeout=840)
    finally:
        for path, mode in closed.items():
            path.chmod(mode)
        shutil.rmtree(home, ignore_errors=True)
    tail = (run.stdout + run.stderr)[-12000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout, tail
    # The only skips allowed are of what a root manager alone does.
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all(ROOT_ONLY in line for line in skips), "\n".join(skips)
