"""Red team (issue 16): a notebook's ``%session`` lines have the notebook's rights only.

The attacker wrote the notebook. Its ``%session`` lines run in the sandbox kernel, a host
process of the host user: before, ``%session upload /any/host/file`` copied a host
secret into the sandbox (where the next line printed it), ``%session download f --to
/any/dir`` wrote a sandbox-made file anywhere on the host, and ``%session list`` /
``use`` / ``close`` reached every other notebook's session. Now host paths are confined
to the notebook's own directory (walked without following links) unless the user allows
one when the kernel asks on stdin, and a notebook sees and acts on its own sessions only.

Real kernels through jupyter_client, each started as Jupyter Server starts one: cwd the
notebook's directory and ``JPY_SESSION_NAME`` its path.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

from sandbox_kernel import SessionManager
from sandbox_kernel.registry import Registry

from .conftest import needs_bwrap, short_tmpdir

pytestmark = needs_bwrap


class Notebook:
    """A sandbox kernel for one notebook in its own directory, and a frontend's client."""

    def __init__(self, root: Path, name: str):
        self.dir = root / name
        self.dir.mkdir()
        self.path = self.dir / f"{name}.ipynb"
        self.km = KernelManager(kernel_name="sandbox-python")
        self.km.start_kernel(env={**os.environ, "JPY_SESSION_NAME": str(self.path)},
                             cwd=str(self.dir))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, answers: list[str] | None = None,
            timeout: float = 90) -> tuple[dict[str, Any], str, list[str]]:
        """Run a cell; answer its input requests with ``answers`` (stdin allowed only then).

        Returns the reply, every text it showed (outputs, errors) and the prompts asked.
        """
        kc = self.kc
        answers = list(answers) if answers is not None else None
        msg_id = kc.execute(code, allow_stdin=answers is not None, stop_on_error=False)
        prompts: list[str] = []
        reply = None
        deadline = time.monotonic() + timeout
        while reply is None and time.monotonic() < deadline:
            if answers is not None:
                try:
                    request = kc.get_stdin_msg(timeout=0.05)
                except queue.Empty:
                    pass
                else:
                    prompts.append(request["content"]["prompt"])
                    kc.input(answers.pop(0) if answers else "")
            try:
                msg = kc.get_shell_msg(timeout=0.05)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                reply = msg["content"]
        assert reply is not None, f"no reply to {code!r}"
        shown: list[str] = []
        while True:
            msg = kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind == "stream":
                shown.append(content["text"])
            elif kind in ("display_data", "execute_result"):
                shown.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                shown.append(content["evalue"])
        return reply, "".join(shown), prompts

    def ok(self, code: str, **kwargs: Any) -> str:
        reply, text, _ = self.run(code, **kwargs)
        assert reply["status"] == "ok", (code, reply.get("evalue"), text)
        return text

    def refused(self, code: str, **kwargs: Any) -> str:
        reply, text, _ = self.run(code, **kwargs)
        assert reply["status"] == "error", (code, text)
        return reply["evalue"]

    def in_sandbox(self, path: str) -> bool:
        text = self.ok(f"import os; print(os.path.exists({path!r}))")
        return text.strip().splitlines()[-1] == "True"

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def place(kernel_home) -> Iterator[Path]:
    """Notebook directories, and a host directory outside all of them with a secret."""
    root = short_tmpdir("sknb-")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    yield root


SECRET = f"host-secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def nb_a(place) -> Iterator[Notebook]:
    nb = Notebook(place, "alpha")
    yield nb
    nb.stop()


@pytest.fixture(scope="module")
def nb_b(place) -> Iterator[Notebook]:
    nb = Notebook(place, "beta")
    yield nb
    nb.stop()


# -- host paths: upload ----------------------------------------------------------------


def test_upload_of_a_host_file_outside_the_notebook_directory_is_refused(nb_a, place):
    secret = place / "outside" / "secret.txt"
    for line in (f"%session upload {secret}", "%session upload ../outside/secret.txt",
                 f"%session upload {secret} --dest secret.txt"):
        # Before: uploaded, and the next line printed the secret.
        reply, text, _ = nb_a.run(f"{line}\nprint(open('secret.txt').read())")
        assert reply["status"] == "error", text
        assert SECRET not in text
        assert "outside this notebook's directory" in reply["evalue"], reply["evalue"]
        assert "could not ask you" in reply["evalue"]  # no stdin: refused, nobody asked
        assert not nb_a.in_sandbox("secret.txt")


def test_a_symlink_in_the_notebook_directory_is_not_followed_out_of_it(nb_a, place):
    (nb_a.dir / "innocent.txt").symlink_to(place / "outside" / "secret.txt")
    (nb_a.dir / "linked").symlink_to(place / "outside", target_is_directory=True)
    evalue = nb_a.refused("%session upload innocent.txt")
    assert "symlink" in evalue and not nb_a.in_sandbox("innocent.txt")
    evalue = nb_a.refused("%session upload linked/secret.txt")
    assert "symlink" in evalue and not nb_a.in_sandbox("secret.txt")


def test_upload_inside_the_notebook_directory_works(nb_a, place):
    (nb_a.dir / "data.csv").write_text("a,b\n1,2\n")
    folder = nb_a.dir / "inputs"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / "x.txt").write_text("x")
    (folder / "leak").symlink_to(place / "outside" / "secret.txt")
    (folder / ".env").write_text("TOKEN=hidden")
    text = nb_a.ok("%session upload data.csv")
    assert "uploaded 1 file(s)" in text
    assert nb_a.ok("print(open('data.csv').read(), end='')") == "a,b\n1,2\n"
    text = nb_a.ok(f"%session upload {nb_a.dir / 'inputs'}")  # absolute, but inside
    assert "uploaded 1 file(s)" in text
    # What a directory holds besides plain files is named, not followed nor taken.
    assert "not uploaded" in text and "inputs/leak" in text and "inputs/.env" in text
    assert nb_a.in_sandbox("inputs/deep/x.txt")
    assert not nb_a.in_sandbox("inputs/leak") and not nb_a.in_sandbox("inputs/.env")


def test_hidden_files_of_the_notebook_directory_need_the_users_yes(nb_a):
    (nb_a.dir / ".env").write_text("API_KEY=hidden")
    evalue = nb_a.refused("%session upload .env")
    assert "hidden" in evalue and not nb_a.in_sandbox(".env")


# -- host paths: download and artifacts --save ------------------------------------------


def test_download_outside_the_notebook_directory_is_refused(nb_a, place):
    nb_a.ok("import os\nos.makedirs('.ssh', exist_ok=True)\n"
            "open('authorized_keys', 'w').write('ssh-ed25519 AAAA attacker')")
    target = place / "outside" / "ssh"
    for where in (str(target), "../outside/ssh"):
        # Before: the sandbox's file was written there.
        evalue = nb_a.refused(f"%session download authorized_keys --to {where}")
        assert "outside this notebook's directory" in evalue, evalue
        assert not target.exists()
    (nb_a.dir / "out-link").symlink_to(place / "outside", target_is_directory=True)
    evalue = nb_a.refused("%session download authorized_keys --to out-link")
    assert "symlink" in evalue
    assert not (place / "outside" / "authorized_keys").exists()
    evalue = nb_a.refused("%session download authorized_keys --to .git/hooks")
    assert "hidden" in evalue and not (nb_a.dir / ".git").exists()


def test_download_into_the_notebook_directory_works(nb_a):
    nb_a.ok("open('result.txt', 'w').write('made in the sandbox')")
    text = nb_a.ok("%session download result.txt --to sub/dir")
    assert (nb_a.dir / "sub" / "dir" / "result.txt").read_text() == "made in the sandbox"
    assert "sub/dir/result.txt" in text and "/proc/" not in text
    nb_a.ok("%session download result.txt")  # the default: the notebook's directory
    assert (nb_a.dir / "result.txt").read_text() == "made in the sandbox"
    # A link the user made where the file goes is replaced, never written through.
    (nb_a.dir / "sub" / "dir" / "result.txt").unlink()
    (nb_a.dir / "sub" / "dir" / "result.txt").symlink_to(nb_a.dir.parent / "outside" / "x")
    nb_a.ok("%session download result.txt --to sub/dir")
    assert not (nb_a.dir.parent / "outside" / "x").exists()
    assert not (nb_a.dir / "sub" / "dir" / "result.txt").is_symlink()


def _artifact_id(nb: Notebook, path: str) -> str:
    table = nb.ok("%session artifacts")
    rows = [line.split() for line in table.splitlines()[1:]]
    return next(r[0] for r in rows if path in r)


def test_artifacts_save_is_confined_like_download(nb_a, place):
    nb_a.ok("open('figure.dat', 'w').write('artifact bytes')")
    aid = _artifact_id(nb_a, "figure.dat")
    evalue = nb_a.refused(f"%session artifacts --save {aid} --to {place / 'outside'}")
    assert "outside this notebook's directory" in evalue, evalue
    assert not (place / "outside" / "figure.dat").exists()
    text = nb_a.ok(f"%session artifacts --save {aid} --to saved")
    assert (nb_a.dir / "saved" / "figure.dat").read_text() == "artifact bytes"
    assert "saved/figure.dat" in text
    # A link of the artifact's name to a directory outside (a cloned repository may ship
    # one) is replaced by the file, not written through.
    (nb_a.dir / "saved" / "figure.dat").unlink()
    (nb_a.dir / "saved" / "figure.dat").symlink_to(place / "outside",
                                                   target_is_directory=True)
    nb_a.ok(f"%session artifacts --save {aid} --to saved")
    assert not (place / "outside" / "figure.dat").exists()
    assert (nb_a.dir / "saved" / "figure.dat").read_text() == "artifact bytes"


# -- the user's own yes or no -----------------------------------------------------------


def test_the_user_can_allow_one_outside_path_when_asked(nb_a, place):
    secret = place / "outside" / "secret.txt"
    reply, text, prompts = nb_a.run(f"%session upload {secret} --dest asked.txt",
                                    answers=["n"])
    assert reply["status"] == "error" and "not allowed" in reply["evalue"]
    assert prompts == [f"allow %session upload to read {secret}, outside this notebook's "
                       "directory? [y/N] "]
    assert not nb_a.in_sandbox("asked.txt")
    reply, text, prompts = nb_a.run(f"%session upload {secret} --dest asked.txt",
                                    answers=["y"])
    assert reply["status"] == "ok", reply
    assert len(prompts) == 1 and nb_a.in_sandbox("asked.txt")
    target = place / "outside" / "allowed"
    nb_a.ok("open('gift.txt', 'w').write('ok')")
    reply, _, prompts = nb_a.run(f"%session download gift.txt --to {target}", answers=["yes"])
    assert reply["status"] == "ok" and "to write into" in prompts[0]
    assert (target / "gift.txt").read_text() == "ok"


# -- sessions: a notebook reaches its own only ---------------------------------------------


def test_a_notebook_cannot_see_or_touch_another_notebooks_session(nb_a, nb_b, kernel_home):
    nb_a.ok("api_key = 'alpha-secret'")
    nb_b.ok("mine = 1")
    registry = Registry(Path(kernel_home) / "registry.db")
    a_id = registry.bound(f"notebook:{nb_a.path}")
    a_name = registry.session(a_id)["name"]
    b_name = registry.session(registry.bound(f"notebook:{nb_b.path}"))["name"]
    listed = nb_b.ok("%session list --all")
    assert b_name in listed and a_name not in listed  # before: every session was listed
    for command in ("use", "info", "close", "pause", "resume"):
        for key in (a_name, a_id):
            evalue = nb_b.refused(f"%session {command} {key}")
            assert evalue == (f"%session {command} {key}: no session {key!r} belongs to this "
                              "notebook; `%session list` shows its sessions"), evalue
    # The same words for a session that does not exist: nothing tells the two apart.
    evalue = nb_b.refused("%session use no-such-session")
    assert evalue == ("%session use no-such-session: no session 'no-such-session' belongs "
                      "to this notebook; `%session list` shows its sessions")
    evalue = nb_b.refused(f"%session timeout 60 --name {a_name}")
    assert "belongs to this notebook" in evalue
    assert SessionManager(home=str(kernel_home)).get_info(a_id)["status"] == "running"
    assert "alpha-secret" not in nb_b.run("api_key")[1]
    assert a_name not in nb_b.ok("%session dashboard")
    # Its own sessions, those it made or forked, it reaches.
    nb_b.ok("%session fork beta-fork")
    nb_b.ok("%session new beta-new")
    listed = nb_b.ok("%session list")
    assert "beta-fork" in listed and "beta-new" in listed and b_name in listed
    nb_b.ok("%session use beta-fork")
    assert nb_b.ok("print(mine)").strip() == "1"
    nb_b.ok(f"%session use {b_name}")
    nb_b.ok("%session close beta-new")
    assert a_name in nb_a.ok("%session list")


def test_schema_6_gives_existing_sessions_their_notebook(tmp_path):
    """Sessions from before ownership belong to the notebook bound to them, and their forks
    to the same notebook; the rest to none (the API and the CLI still reach them)."""
    path = tmp_path / "registry.db"
    Registry(path).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE sessions DROP COLUMN owner")
    db.execute("PRAGMA user_version=5")
    for sid, parent in (("s1", None), ("s2", "s1"), ("s3", "s2"), ("s4", None)):
        db.execute("INSERT INTO sessions (id, name, language, status, created, last_activity, "
                   "isolation, session_dir, connection_file, parent_id) VALUES "
                   "(?, ?, 'python', 'running', 0, 0, 'bwrap', '/x', '/x', ?)",
                   (sid, sid, parent))
    db.execute("INSERT INTO bindings VALUES ('notebook:/n/a.ipynb', 's1', 0)")
    db.commit()
    db.close()
    registry = Registry(path)
    owners = {s: registry.session(s)["owner"] for s in ("s1", "s2", "s3", "s4")}
    assert owners == {"s1": "notebook:/n/a.ipynb", "s2": "notebook:/n/a.ipynb",
                      "s3": "notebook:/n/a.ipynb", "s4": None}


# -- the walk itself, without a kernel ------------------------------------------------------


def test_a_notebook_directory_reached_through_a_link_is_still_its_own(tmp_path):
    import asyncio

    from sandbox_kernel.host_paths import HostPaths

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "data.csv").write_text("x")
    (tmp_path / "via").symlink_to(tmp_path / "real", target_is_directory=True)
    paths = HostPaths(tmp_path / "via")
    source = asyncio.run(paths.source("upload", "data.csv"))
    assert source.tree is not None and source.parts == ("data.csv",)
    source = asyncio.run(paths.source("upload", str(tmp_path / "via" / "data.csv")))
    assert source.parts == ("data.csv",)
    target = asyncio.run(paths.target("download", "out", ["f"]))
    with target.opened() as where:
        (where / "f").write_text("y")
    assert (tmp_path / "real" / "out" / "f").read_text() == "y"


def test_a_directory_swapped_for_a_link_after_the_check_is_refused(tmp_path):
    """The check and the write are two walks; the second refuses what the first did not see."""
    import asyncio

    from sandbox_kernel.host_paths import HostPaths
    from sandbox_kernel.workdir import UnsafePath

    (tmp_path / "nb" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    target = asyncio.run(HostPaths(tmp_path / "nb").target("download", "sub", ["f"]))
    (tmp_path / "nb" / "sub").rmdir()
    (tmp_path / "nb" / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UnsafePath), target.opened() as where:
        (where / "f").write_text("through the link")
    assert list((tmp_path / "elsewhere").iterdir()) == []
