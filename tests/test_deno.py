"""JavaScript and TypeScript sessions: Deno's kernel in the same bubblewrap sandbox.

Deno speaks ZeroMQ over TCP only; a relay inside the sandbox joins it to the
unix sockets our clients use, so the sandbox keeps its private network.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import tarfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest
from IPython import get_ipython
from IPython.testing.globalipapp import start_ipython
from nbclient import NotebookClient
from traitlets.config import Config

from sandbox_kernel.errors import InvalidArgument

from .conftest import make_manager, needs_bwrap

pytestmark = needs_bwrap


def test_state_streams_and_errors_with_their_stack(manager):
    s = manager.create(name="js", language="javascript")
    assert s.info()["enforcement"]["memory"].startswith("cgroup")  # V8: no RLIMIT_AS
    first = s.run("let total = 0;\nfor (const n of [1, 2, 3]) total += n;\n"
                  "console.log('sum is', total);\nconsole.error('to stderr');")
    assert first.ok, first.error
    assert first.stdout == "sum is 6\n" and first.stderr == "to stderr\n"
    assert "7" in s.run("total + 1").outputs[0]["data"]["text/plain"]
    failed = s.run("function inner() { throw new TypeError('bad input'); }\ninner();")
    assert failed.status == "error" and failed.error["ename"] == "TypeError"
    assert failed.error["evalue"] == "bad input"
    assert any("at inner" in line for line in failed.error["traceback"]), failed.error
    # Files a cell writes are artifacts, as in Python sessions.
    assert s.run("await Deno.writeTextFile('out.txt', 'from deno')").ok
    deadline = time.monotonic() + 10
    while not s.artifacts(path="out.txt") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.artifacts(path="out.txt")[0].read() == b"from deno"


def test_the_js_sandbox_cannot_reach_the_hosts_loopback(manager):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted: list = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    s = manager.create(name="jsnet", language="javascript")
    result = s.run(
        "let outcome;\n"
        f"try {{ const c = await Deno.connect({{hostname: '127.0.0.1', port: {port}}}); "
        "outcome = 'connected'; c.close(); }\n"
        "catch (e) { outcome = 'refused: ' + e.name; }\nconsole.log(outcome);")
    assert result.ok, result.error
    assert result.stdout.startswith("refused"), result.stdout
    assert not accepted
    server.close()


def test_pause_and_resume_rebuild_state_by_replay(manager):
    s = manager.create(name="ts", language="typescript")
    assert s.run("const greet = (n: string): string => `hi ${n}`;\nlet count: number = 1;").ok
    assert s.run("count += 41;").ok
    paused = s.pause()
    assert paused["status"] == "paused" and s.info()["status"] == "paused"
    out = s.run("console.log(count, greet('there'))")
    assert out.stdout == "42 hi there\n", (out.stdout, out.error)
    report = s.last_resume
    assert list(report.replayed.values()) == [[1, 2]]
    assert "by replaying cells [1, 2]" in str(report)
    assert s.pause(mode="freeze")["status"] == "frozen"
    assert s.run("console.log(count)").stdout == "42\n"  # memory kept, thawed by the run


def test_typescript_kernelspec_runs_a_notebook_through_nbclient(kernel_home):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("interface P { x: number }\nconst p: P = { x: 20 };"),
        nbformat.v4.new_code_cell("console.log(p.x * 2 + 2)"),
    ]
    NotebookClient(nb, kernel_name="sandbox-typescript", timeout=120).execute()
    assert nb.cells[1].outputs[0]["text"] == "42\n"


def test_session_new_with_a_language_from_the_magic(manager, capsys):
    from sandbox_magics import SessionMagics

    ip = start_ipython() or get_ipython()  # one global shell per process
    ip.register_magics(SessionMagics(ip, manager=manager))
    ip.run_line_magic("session", "new tsmagic --language typescript")
    ip.run_cell_magic("session", "", "const xs: number[] = [1, 2, 3];\n"
                      "console.log(JSON.stringify(xs.map(x => x * 2)))")
    assert capsys.readouterr().out.endswith("[2,4,6]\n")
    assert manager.get("tsmagic").info()["language"] == "typescript"


def _npm_registry(root: Path) -> tuple[str, ThreadingHTTPServer]:
    """A local npm registry with one package, so the test needs no network."""
    package = io.BytesIO()
    with tarfile.open(fileobj=package, mode="w:gz") as tar:
        for name, text in {
            "package/package.json": json.dumps({"name": "sk-hello", "version": "1.2.0",
                                                "type": "module", "main": "index.js"}),
            "package/index.js": "export const hello = (n) => `hello ${n} from npm`;\n",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tgz = package.getvalue()
    (root / "sk-hello-1.2.0.tgz").write_bytes(tgz)
    server = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()
    (root / "sk-hello").write_text(json.dumps({
        "name": "sk-hello", "dist-tags": {"latest": "1.2.0"},
        "versions": {"1.2.0": {
            "name": "sk-hello", "version": "1.2.0", "dependencies": {},
            "dist": {"tarball": f"{url}sk-hello-1.2.0.tgz", "integrity": integrity,
                     "shasum": hashlib.sha1(tgz).hexdigest()}}},
    }))
    server.RequestHandlerClass = partial(SimpleHTTPRequestHandler, directory=str(root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return url, server


def test_npm_package_fetched_outside_imports_with_no_network_inside(home, tmp_path):
    url, server = _npm_registry(tmp_path)
    try:
        with make_manager(home, isolation="bwrap",
                          config=Config({"DenoPackages": {"registry_url": url}})) as m:
            s = m.create(name="npm", language="javascript", packages=["npm:sk-hello@1.2.0"])
            assert s.last_install.cache_hit is False and "fetch" in s.last_install.timing
            out = s.run("import { hello } from 'npm:sk-hello@1.2.0';\nconsole.log(hello('js'))")
            assert out.stdout == "hello js from npm\n", (out.stdout, out.error)
            # The sandbox itself has no network: the registry is on the host's loopback.
            probe = s.run(f"try {{ await fetch('{url}sk-hello'); console.log('reached') }} "
                          "catch (e) { console.log('no network') }")
            assert probe.stdout == "no network\n"
            again = m.create(name="npm2", language="typescript").install(["npm:sk-hello@1.2.0"])
            assert again.cache_hit and "fetch" not in again.timing
            with pytest.raises(InvalidArgument, match="not a Deno package"):
                s.install(["https://evil.example/x.js"])
    finally:
        server.shutdown()
