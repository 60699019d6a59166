"""Sessions: state, streaming, errors, interrupts, persistence across processes."""

from __future__ import annotations

import textwrap
import threading
import time

import pytest

from sandbox_kernel.errors import ExecutionTimeout
from sandbox_kernel.result import RemoteError

from .conftest import python_in_subprocess


def test_state_persists_between_runs(session):
    assert session.run("counter = 41").ok
    result = session.run("counter += 1; counter")
    assert result.status == "ok"
    assert result.result == "42"


def test_the_kernel_does_not_load_a_debugger_but_user_code_may(session):
    """The sandbox kernel offers no debugger, so its inner kernel skips debugpy (0.1 s of
    every start); a cell that imports debugpy itself still gets it."""
    out = session.run("import sys, ipykernel.debugger as d\n"
                      "print('debugpy' in sys.modules, d._is_debugpy_available)\n"
                      "import debugpy\nprint(debugpy.__name__)")
    assert out.ok, out.error
    assert out.stdout.split() == ["False", "False", "debugpy"]


def test_result_fields(session):
    r = session.run("import sys; print('to out'); print('to err', file=sys.stderr); 6 * 7")
    assert r.stdout == "to out\n"
    assert r.stderr == "to err\n"
    assert r.result == "42"
    assert r.error is None
    assert isinstance(r.execution_count, int) and r.execution_count > 0
    assert {"execute", "total"} <= set(r.timing)
    assert r.timing["total"] >= r.timing["execute"] > 0
    kinds = [o["output_type"] for o in r.outputs]
    assert kinds == ["stream", "stream", "execute_result"]


def test_rich_output_is_kept_as_mime_bundles(session):
    r = session.run(
        "from IPython.display import display, HTML\n"
        "display(HTML('<b>bold</b>'))"
    )
    (out,) = [o for o in r.outputs if o["output_type"] == "display_data"]
    assert out["data"]["text/html"] == "<b>bold</b>"
    assert "text/plain" in out["data"]


def test_streaming_order_and_arrival(session):
    seen: list[tuple[float, dict]] = []
    code = textwrap.dedent("""
        import sys, time
        for i in range(6):
            print(f"out {i}", flush=True)
            print(f"err {i}", file=sys.stderr, flush=True)
            time.sleep(0.05)
        time.sleep(1.5)
        print("last", flush=True)
    """)
    r = session.run(code, on_output=lambda out: seen.append((time.monotonic(), out)))
    done = time.monotonic()
    texts = "".join(o["text"] for _, o in seen)
    expected = "".join(f"out {i}\nerr {i}\n" for i in range(6)) + "last\n"
    assert texts == expected
    assert [o for _, o in seen] == r.outputs
    # The first output was delivered while the cell was still sleeping, not at the end.
    assert done - seen[0][0] > 1.0


def test_error_carries_traceback(session):
    r = session.run("def f():\n    raise ValueError('bad value')\nf()")
    assert r.status == "error"
    assert r.error["ename"] == "ValueError"
    assert r.error["evalue"] == "bad value"
    tb = "\n".join(r.error["traceback"])
    assert "f()" in tb and "bad value" in tb
    assert r.outputs[-1]["output_type"] == "error"
    with pytest.raises(RemoteError, match="ValueError: bad value"):
        r.raise_for_error()
    assert session.run("1 + 1").result == "2"


def test_interrupt_stops_infinite_loop(session):
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("r", session.run("while True: pass")))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive()
    session.interrupt()
    worker.join(30)
    assert not worker.is_alive()
    assert box["r"].status == "error"
    assert box["r"].error["ename"] == "KeyboardInterrupt"
    assert session.run("'still usable'").result == "'still usable'"


def test_timeout_interrupts_and_session_survives(session):
    with pytest.raises(ExecutionTimeout, match="interrupted"):
        session.run("import time; time.sleep(60)", timeout=1)
    assert session.run("40 + 2").result == "42"
    statuses = [e["status"] for e in session.executions()]
    assert "timeout" in statuses


def test_input_is_answered_by_on_stdin(session):
    prompts = []

    def answer(prompt: str, password: bool) -> str:
        prompts.append((prompt, password))
        return "Ada"

    r = session.run("name = input('who? '); print('hello', name)", on_stdin=answer)
    assert r.stdout.endswith("hello Ada\n")
    assert prompts == [("who? ", False)]
    no_stdin = session.run("input('x')")
    assert no_stdin.error["ename"] == "StdinNotImplementedError"


def test_executions_are_recorded_with_timing(session, shared_manager):
    session.run("recorded_marker = 1")
    rows = shared_manager.registry.executions(session.id)
    last = rows[-1]
    assert last["code"] == "recorded_marker = 1"
    assert last["status"] == "ok"
    assert "execute" in last["timing"]
    assert session.info()["execution_count"] == last["execution_count"]


def test_attach_from_another_process_keeps_variables(home):
    created = python_in_subprocess(textwrap.dedent("""
        from sandbox_kernel import SessionManager
        s = SessionManager().create(name="persist")
        s.run("secret_value = 'made in process one'")
        print(s.info()["status"])
    """), home)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "running"
    attached = python_in_subprocess(textwrap.dedent("""
        from sandbox_kernel import SessionManager
        s = SessionManager().get("persist")
        r = s.run("secret_value")
        print(r.result)
        print(sorted(r.timing))
        SessionManager().close("persist")
    """), home)
    assert attached.returncode == 0, attached.stderr
    value, stages = attached.stdout.strip().splitlines()
    assert value == "'made in process one'"
    assert "attach" in stages


def test_first_run_waits_for_a_starting_sandbox(manager):
    s = manager.create(name="lazy", wait=False)
    assert s.info()["status"] in ("starting", "running")
    r = s.run("'ready'")
    assert r.result == "'ready'"
    assert "start" in r.timing
    assert s.info()["status"] == "running"


def test_info_and_list(manager):
    s = manager.create(name="listed", tags=["team-a", "gpu"], limits={"memory": "1GiB"})
    info = s.info()
    assert info["name"] == "listed" and info["id"] == s.id
    assert info["language"] == "python"
    assert info["status"] == "running"
    assert info["isolation"] == "bwrap"
    assert info["tags"] == ["gpu", "team-a"]
    assert info["limits"]["memory"] == 1024**3
    assert info["created"] <= info["last_activity"]
    assert s.run("open('made-here.txt', 'w').write('x')").ok
    assert (s.work_dir / "made-here.txt").read_text() == "x"
    assert info["work_dir"] == str(s.work_dir)
    other = manager.create(name="unlisted-tag")
    assert [x.name for x in manager.list(tags=["team-a"])] == ["listed"]
    assert {x.name for x in manager.list(status="running")} == {"listed", "unlisted-tag"}
    manager.close(other.name)
    assert other.info()["status"] == "closed"
    assert {x.name for x in manager.list(status="running")} == {"listed"}
