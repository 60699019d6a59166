"""JavaScript and TypeScript sessions: Deno's kernel in the same bubblewrap sandbox.

Deno speaks ZeroMQ over TCP only; a relay inside the sandbox joins it to the
unix sockets our clients use, so the sandbox keeps its private network.
"""

from __future__ import annotations

import socket
import threading

import nbformat
from IPython.testing.globalipapp import start_ipython
from nbclient import NotebookClient

from .conftest import needs_bwrap

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

    ip = start_ipython()
    ip.register_magics(SessionMagics(ip, manager=manager))
    ip.run_line_magic("session", "new tsmagic --language typescript")
    ip.run_cell_magic("session", "", "const xs: number[] = [1, 2, 3];\n"
                      "console.log(JSON.stringify(xs.map(x => x * 2)))")
    assert capsys.readouterr().out.endswith("[2,4,6]\n")
    assert manager.get("tsmagic").info()["language"] == "typescript"
