"""A notebook keeps its session when it is renamed or moved: a real Jupyter Server, its
REST API as JupyterLab uses it, and the sandbox kernels it starts."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient

from .conftest import needs_bwrap, short_tmpdir
from .jupyter_server import jupyter_process
from .test_browser import _notebook

KERNEL = "sandbox-python"


class Server:
    """A Jupyter Server process and the calls JupyterLab makes to it."""

    def __init__(self, base: str, token: str, root: Path, runtime: Path):
        self.base, self.token, self.root, self.runtime = base, token, root, runtime

    def call(self, method: str, path: str, body: dict | None = None) -> dict | None:
        request = urllib.request.Request(
            f"{self.base}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        return json.loads(data) if data else None

    def open(self, path: str) -> dict:
        """Open a notebook with the sandbox kernel (POST /api/sessions)."""
        return self.call("POST", "/api/sessions", {
            "path": path, "name": Path(path).name, "type": "notebook",
            "kernel": {"name": KERNEL}})

    def rename(self, session: dict | None, old: str, new: str) -> None:
        """What JupyterLab does on a rename: the file, then the open notebook's session."""
        self.call("PATCH", f"/api/contents/{old}", {"path": new})
        if session is not None:
            self.call("PATCH", f"/api/sessions/{session['id']}",
                      {"path": new, "name": Path(new).name})

    def shut_down(self, session: dict) -> None:
        self.call("DELETE", f"/api/sessions/{session['id']}")

    def run(self, session: dict, code: str) -> dict:
        """Execute ``code`` in the session's kernel; its reply and its result or error."""
        client = BlockingKernelClient(
            connection_file=str(self.runtime / f"kernel-{session['kernel']['id']}.json"))
        client.load_connection_file()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=120)
            msg_id = client.execute(code)
            found: dict = {}
            while True:
                msg = client.get_iopub_msg(timeout=120)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "execute_result":
                    found["result"] = content["data"]["text/plain"]
                elif kind == "error":
                    found["error"] = content["ename"]
                    found["why"] = content["evalue"]  # shown when an assertion fails
                elif kind == "display_data":
                    found["display"] = found.get("display", "") + content["data"].get(
                        "text/plain", "")
                elif kind == "stream":
                    found["stream"] = found.get("stream", "") + content["text"]
                elif kind == "status" and content["execution_state"] == "idle":
                    return found
        finally:
            client.stop_channels()


@pytest.fixture(scope="module")
def server(kernel_home) -> Iterator[Server]:
    with jupyter_process("jupyter_server", short_tmpdir("skrn-")) as proc:
        yield Server(proc["base"], proc["token"], proc["root"], proc["runtime"])


@needs_bwrap
def test_a_renamed_notebook_reopens_in_its_session(server):
    _notebook(server.root / "Untitled.ipynb", [])
    first = server.open("Untitled.ipynb")
    assert server.run(first, "x = 41") == {}
    server.rename(first, "Untitled.ipynb", "analysis.ipynb")
    server.shut_down(first)
    again = server.open("analysis.ipynb")
    assert again["kernel"]["id"] != first["kernel"]["id"]  # a new kernel, the same session
    reopened = server.run(again, "x + 1")
    assert reopened["result"] == "42", reopened
    # It says so, once, naming the old path and the session.
    assert ("renamed from Untitled.ipynb: this notebook keeps its session 'Untitled"
            in reopened["stream"]), reopened
    assert "stream" not in server.run(again, "x")
    server.shut_down(again)
    # A new notebook under the old name is a new notebook, with a session of its own.
    _notebook(server.root / "Untitled.ipynb", [])
    fresh = server.open("Untitled.ipynb")
    assert server.run(fresh, "x").get("error") == "NameError"
    server.shut_down(fresh)


@needs_bwrap
def test_notebooks_in_a_moved_directory_keep_their_sessions(server):
    (server.root / "project").mkdir()
    _notebook(server.root / "project" / "model.ipynb", [])
    first = server.open("project/model.ipynb")
    assert server.run(first, "weights = [1, 2, 3]") == {}
    server.shut_down(first)
    server.rename(None, "project", "project-2024")
    again = server.open("project-2024/model.ipynb")
    moved = server.run(again, "sum(weights)")
    assert moved["result"] == "6", moved
    assert "renamed from ../project/model.ipynb:" in moved["stream"], moved
    server.shut_down(again)


@needs_bwrap
def test_a_kernel_running_through_a_rename_follows_it_and_keeps_it_after_a_restart(server):
    _notebook(server.root / "draft.ipynb", [])
    first = server.open("draft.ipynb")
    assert server.run(first, "y = 7") == {}
    server.rename(first, "draft.ipynb", "final.ipynb")
    # The running kernel (its environment still says draft.ipynb) acts as final.ipynb's:
    # its %session lines still reach its session.
    listed = server.run(first, "%session list")
    assert "draft" in listed.get("display", "") + listed.get("stream", ""), listed
    # Restarted, it starts again with draft.ipynb in its environment, and finds its session.
    server.call("POST", f"/api/kernels/{first['kernel']['id']}/restart")
    restarted = server.run(first, "y * 6")
    assert restarted["result"] == "42", restarted
    assert "renamed from" in restarted["stream"], restarted
    server.shut_down(first)
    again = server.open("final.ipynb")
    assert server.run(again, "y")["result"] == "7"
    server.shut_down(again)
