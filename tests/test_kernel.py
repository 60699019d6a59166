"""The sandbox kernel driven by a jupyter_client client: sessions, restarts, widgets, faults."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from sandbox_kernel import SessionManager

from .conftest import ROOT


@pytest.fixture(autouse=True)
def _home(kernel_home):
    return kernel_home


@pytest.fixture
def kernel(request):
    """A started sandbox kernel and a ready client; JPY_SESSION_NAME set per test."""
    started = []

    def start(notebook: str | None = None):
        km = KernelManager(kernel_name="sandbox-python")
        env = {**os.environ}
        if notebook:
            env["JPY_SESSION_NAME"] = notebook
        km.start_kernel(env=env)
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        started.append((km, kc))
        return km, kc

    yield start
    for km, kc in started:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def execute(kc, code: str, timeout: float = 60):
    """Run code; return (reply content, iopub messages for it)."""
    msgs = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=msgs.append)
    for m in msgs:  # every relayed message names the frontend's own request as parent
        assert m["parent_header"]["msg_id"] == reply["parent_header"]["msg_id"]
    # ...and they come in protocol order, even though the sandbox starts before the proxy
    # has published busy and execute_input.
    kinds = [m["msg_type"] for m in msgs]
    assert kinds[:2] == ["status", "execute_input"], kinds
    assert msgs[0]["content"]["execution_state"] == "busy"
    assert msgs[-1]["content"].get("execution_state") == "idle", kinds
    return reply["content"], msgs


def texts(msgs) -> str:
    return "".join(m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream")


def results(msgs) -> list[str]:
    return [m["content"]["data"]["text/plain"] for m in msgs
            if m["msg_type"] == "execute_result"]


def test_cells_run_in_the_notebooks_sandbox_session(kernel, kernel_home):
    km, kc = kernel("work/analysis.ipynb")
    reply, msgs = execute(kc, "import os; value = 6 * 7; print(os.getcwd(), os.getuid()); value")
    assert reply["status"] == "ok"
    assert texts(msgs) == "/home/sandbox 1000\n"
    assert results(msgs) == ["42"]
    infos = [s.info() for s in SessionManager(home=str(kernel_home)).list(status="running")]
    mine = [i for i in infos if i["name"].startswith("analysis-")]
    assert len(mine) == 1 and mine[0]["isolation"] == "bwrap"


def test_a_cell_sees_no_output_that_is_not_its_own(kernel, kernel_home):
    """Start-up chatter of the sandbox's kernel, or another client's cells, stay out."""
    import queue

    _, kc = kernel("work/foreign.ipynb")
    first = kc.execute("from IPython.display import clear_output; print('mine'); clear_output()")
    kc.get_shell_msg(timeout=60)
    (other,) = [s for s in SessionManager(home=str(kernel_home)).list(status="running")
                if s.name.startswith("foreign-")]
    assert other.run("print('from another client')").stdout == "from another client\n"
    second = kc.execute("print('mine again')")
    kc.get_shell_msg(timeout=60)
    foreign, idle = [], 0
    while idle < 2:
        try:
            msg = kc.get_iopub_msg(timeout=5)
        except queue.Empty:
            break
        mine = msg["parent_header"].get("msg_id") in (first, second)
        if not mine and msg["msg_type"] not in ("status", "iopub_welcome"):
            foreign.append((msg["msg_type"], msg["content"]))
        if mine and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle += 1
    assert idle == 2 and foreign == []


def test_restart_reattaches_with_variables_intact(kernel):
    km, kc = kernel("work/restart.ipynb")
    execute(kc, "kept = [1, 2, 3]")
    before, _ = execute(kc, "%session info")
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=60)
    reply, msgs = execute(kc, "kept")
    assert reply["status"] == "ok"
    assert results(msgs) == ["[1, 2, 3]"]
    # The numbering goes on after `%session info` (run by the proxy, numbered 2); a fresh
    # kernel would say 1.
    assert reply["execution_count"] == 3


def test_a_session_paused_by_another_client_resumes_at_the_next_cell(kernel, kernel_home):
    km, kc = kernel("work/paused.ipynb")
    execute(kc, "import numpy as np\ndata = np.arange(10)\nrows = (r for r in range(3))")
    manager = SessionManager(home=str(kernel_home))
    mine = [s for s in manager.list(status="running") if s.name.startswith("paused-")]
    assert manager.get(mine[0].id).pause()["status"] == "paused"
    assert manager.get_info(mine[0].id)["status"] == "paused"
    reply, msgs = execute(kc, "print(int(data.sum()), next(rows))")
    assert reply["status"] == "ok", reply
    assert texts(msgs) == "45 0\n"
    assert manager.get_info(mine[0].id)["status"] == "running"


def test_a_second_kernel_for_the_same_notebook_shares_the_session(kernel):
    _, first = kernel("work/shared.ipynb")
    execute(first, "shared_value = 'from the first kernel'")
    _, second = kernel("work/shared.ipynb")
    assert results(execute(second, "shared_value")[1]) == ["'from the first kernel'"]


def test_session_new_gives_a_fresh_session(kernel):
    km, kc = kernel("work/fresh.ipynb")
    execute(kc, "old = 1")
    reply, msgs = execute(kc, "%session new")
    assert reply["status"] == "ok"
    shown = [m for m in msgs if m["msg_type"] == "display_data"]
    assert "new session" in shown[0]["content"]["data"]["text/plain"]
    reply, msgs = execute(kc, "old")
    assert reply["status"] == "error" and reply["ename"] == "NameError"
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=60)
    assert execute(kc, "old")[0]["ename"] == "NameError"  # the binding moved to the new session


def test_session_commands_in_the_kernel(kernel):
    _, kc = kernel()
    execute(kc, "x = 1")
    reply, msgs = execute(kc, "%session timing")
    shown = [m for m in msgs if m["msg_type"] == "display_data"]
    assert reply["status"] == "ok" and "execute" in shown[0]["content"]["data"]["text/plain"]
    reply, msgs = execute(kc, "%session info")
    data = [m for m in msgs if m["msg_type"] == "display_data"][0]["content"]["data"]
    assert "isolation:" in data["text/plain"] and "<table>" in data["text/html"]
    reply, msgs = execute(kc, "%session bogus")
    assert reply["status"] == "error" and "unknown command 'bogus'" in reply["evalue"]
    reply, msgs = execute(kc, "y = 2\n%session timing\ny + 1")
    assert reply["status"] == "ok" and results(msgs) == ["3"]
    # The lifecycle commands, the same code as the extension's.
    reply, msgs = execute(kc, "%session pause")
    shown = [m for m in msgs if m["msg_type"] == "display_data"][0]["content"]["data"]
    assert shown["text/plain"].startswith("paused ")
    reply, msgs = execute(kc, "print(x + y)")
    assert reply["status"] == "ok" and texts(msgs) == "3\n"
    reply, msgs = execute(kc, "%session dashboard")
    shown = [m for m in msgs if m["msg_type"] == "display_data"][0]["content"]["data"]
    assert "running" in shown["text/plain"] and "<table>" in shown["text/html"]
    reply, msgs = execute(kc, "%session help checkpoint")
    shown = [m for m in msgs if m["msg_type"] == "display_data"][0]["content"]["data"]
    assert "usage:  %session checkpoint" in shown["text/plain"]


def test_rich_outputs_clear_and_update_display(kernel):
    _, kc = kernel()
    code = (
        "from IPython.display import display, clear_output, HTML\n"
        "h = display(HTML('<i>one</i>'), display_id=True)\n"
        "h.update(HTML('<i>two</i>'))\n"
        "print('before clear'); clear_output(wait=True); print('after clear')"
    )
    reply, msgs = execute(kc, code)
    kinds = [m["msg_type"] for m in msgs if m["msg_type"] not in ("status", "execute_input")]
    assert kinds == ["display_data", "update_display_data", "stream", "clear_output", "stream"]
    update = [m for m in msgs if m["msg_type"] == "update_display_data"][0]
    assert update["content"]["data"]["text/html"] == "<i>two</i>"
    assert update["content"]["transient"]["display_id"]


def test_error_carries_the_sandbox_traceback(kernel):
    _, kc = kernel()
    reply, msgs = execute(kc, "def boom():\n    raise RuntimeError('deep')\nboom()")
    assert reply["status"] == "error"
    assert reply["ename"] == "RuntimeError" and reply["evalue"] == "deep"
    errors = [m for m in msgs if m["msg_type"] == "error"]
    assert len(errors) == 1 and any("boom()" in line for line in errors[0]["content"]["traceback"])


def test_widget_in_the_sandbox_responds_to_the_frontend(kernel):
    _, kc = kernel()
    reply, msgs = execute(kc, "import ipywidgets as w; slider = w.IntSlider(value=3); slider")
    assert reply["status"] == "ok"
    opens = [m for m in msgs if m["msg_type"] == "comm_open"]
    model = [m for m in opens if m["content"]["data"]["state"].get("_model_name") ==
             "IntSliderModel"]
    assert model, [m["content"]["data"]["state"].get("_model_name") for m in opens]
    comm_id = model[0]["content"]["comm_id"]
    assert model[0]["content"]["data"]["state"]["value"] == 3
    views = [m for m in msgs if m["msg_type"] == "execute_result"]
    assert "application/vnd.jupyter.widget-view+json" in views[0]["content"]["data"]
    # The frontend moves the slider: a comm_msg goes through the kernel into the sandbox.
    kc.session.send(kc.shell_channel.socket, kc.session.msg(
        "comm_msg", {"comm_id": comm_id, "data": {"method": "update", "state": {"value": 7},
                                                  "buffer_paths": []}}))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if results(execute(kc, "slider.value")[1]) == ["7"]:
            break
        time.sleep(0.1)
    assert results(execute(kc, "slider.value")[1]) == ["7"]
    comm_info = kc.comm_info(reply=True)["content"]["comms"]
    assert comm_id in comm_info
    # And a change made in the sandbox reaches the frontend as a comm_msg of that cell.
    _, msgs = execute(kc, "slider.value = 9")
    updates = [m["content"]["data"] for m in msgs
               if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id]
    assert {"method": "update", "state": {"value": 9}, "buffer_paths": []} in updates


def test_a_comm_message_is_idle_only_once_the_sandbox_has_answered_it(kernel):
    """JupyterLab ends a comm message's future at its idle status, and an Output widget
    captures what the sandbox prints in answer (``interact``) through that future: the
    busy and idle the frontend sees are the sandbox's, around its answer."""
    import queue

    _, kc = kernel()
    _, msgs = execute(kc, "import ipywidgets as w\ns = w.IntSlider()\n"
                          "s.observe(lambda c: print('value', c['new']), 'value')\ns")
    (comm_id,) = [m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_open"
                  and m["content"]["data"]["state"]["_model_name"] == "IntSliderModel"]
    request = kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {
        "method": "update", "state": {"value": 5}, "buffer_paths": []}})
    kc.session.send(kc.shell_channel.socket, request)
    seen, deadline = [], time.monotonic() + 30
    while time.monotonic() < deadline and ("status", "idle") not in seen:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") == request["header"]["msg_id"]:
            c = msg["content"]
            seen.append((msg["msg_type"], c.get("execution_state") or c.get("text")))
    seen = [s for s in seen if s[0] in ("status", "stream")]
    assert seen == [("status", "busy"), ("stream", "value 5\n"), ("status", "idle")], seen


def test_comm_message_for_a_missing_comm_is_harmless(kernel):
    _, kc = kernel()
    kc.session.send(kc.shell_channel.socket, kc.session.msg(
        "comm_msg", {"comm_id": uuid.uuid4().hex, "data": {"method": "update"}}))
    kc.session.send(kc.shell_channel.socket, kc.session.msg(
        "comm_close", {"comm_id": uuid.uuid4().hex, "data": {}}))
    reply, msgs = execute(kc, "'still fine'")
    assert results(msgs) == ["'still fine'"]


def test_a_cell_sent_while_the_sandbox_starts_is_queued_not_lost(kernel_home):
    km = KernelManager(kernel_name="sandbox-python")
    km.start_kernel(env={**os.environ, "JPY_SESSION_NAME": "work/early.ipynb"})
    kc = km.client()
    kc.start_channels()
    try:
        msg_id = kc.execute("early = 'queued'; early")  # before any kernel_info answer
        reply = kc.get_shell_msg(timeout=90)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "ok"
        timing, msgs = execute(kc, "%session timing")
        text = [m for m in msgs if m["msg_type"] == "display_data"][0]["content"]["data"]
        assert "execute" in text["text/plain"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_sandbox_that_dies_mid_cell(kernel):
    _, kc = kernel("work/dies.ipynb")
    reply, msgs = execute(kc, "import os; os._exit(9)")
    assert reply["status"] == "error"
    assert reply["ename"] == "SessionDead"
    assert "exited with code 9" in reply["evalue"]
    assert "%session new" in reply["evalue"]
    reply, msgs = execute(kc, "1 + 1")  # the session comes back, and says how
    assert results(msgs) == ["2"]
    assert "had died" in texts(msgs) and "started again with no variables" in texts(msgs)
    assert execute(kc, "%session new")[0]["status"] == "ok"
    assert results(execute(kc, "1 + 1")[1]) == ["2"]


def test_reopening_a_notebook_whose_sandbox_died_brings_back_its_checkpoint(kernel):
    km, kc = kernel("work/reboot.ipynb")
    execute(kc, "kept = {'a': 1}")
    assert execute(kc, "%session checkpoint --name before")[0]["status"] == "ok"
    execute(kc, "kept['b'] = 2")
    m = SessionManager(home=os.environ["SANDBOX_KERNEL_HOME"])  # (make_manager closes all)
    s = m.get("reboot-" + _digest("notebook:work/reboot.ipynb"))
    # The kernel records a cell just after replying to it; the kill below must come after.
    deadline = time.monotonic() + 10
    while "kept['b'] = 2" not in [h["code"] for h in s.history()] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    kc.stop_channels()
    km.shutdown_kernel(now=True)  # the notebook is closed; its session lives on
    os.kill(s.info()["pid"], 9)  # the supervisor: its sandbox dies with it
    assert _wait_dead(m, s.name)
    km, kc = kernel("work/reboot.ipynb")  # reopened after, say, a reboot
    reply, msgs = execute(kc, "kept")
    assert reply["status"] == "ok", reply
    assert results(msgs) == ["{'a': 1, 'b': 2}"]  # the checkpoint, then the cell run after it
    assert "had died" in texts(msgs) and "started again from checkpoint" in texts(msgs)


def test_reopening_a_notebook_whose_sandbox_died_without_checkpoint_starts_it_empty(kernel):
    km, kc = kernel("work/gone.ipynb")
    execute(kc, "kept = 1; open('file.txt', 'w').write('on disk')")
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    m = SessionManager(home=os.environ["SANDBOX_KERNEL_HOME"])  # (make_manager closes all)
    s = m.get("gone-" + _digest("notebook:work/gone.ipynb"))
    os.kill(s.info()["pid"], 9)  # the supervisor: its sandbox dies with it
    assert _wait_dead(m, s.name)
    km, kc = kernel("work/gone.ipynb")
    reply, msgs = execute(kc, "'kept' in globals(), open('file.txt').read()")
    assert results(msgs) == ["(False, 'on disk')"]  # the same session: its files are there
    assert "started again with no variables" in texts(msgs)


def _digest(key: str) -> str:
    return hashlib.blake2b(key.encode(), digest_size=3).hexdigest()


def _wait_dead(manager, name: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if manager.get_info(name)["status"] == "dead":
            return True
        time.sleep(0.1)
    return False


def test_interrupt_during_input(kernel):
    km, kc = kernel()
    # stop_on_error=False: otherwise ipykernel aborts a request that arrives within its
    # abort window after the error, which is its rule, not ours (a fresh-clone CI run met it).
    msg_id = kc.execute("value = input('waiting: ')", allow_stdin=True, stop_on_error=False)
    request = kc.get_stdin_msg(timeout=30)
    assert request["content"]["prompt"] == "waiting: "
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_type") == "kernel_info_request":
        reply = kc.get_shell_msg(timeout=30)  # a late answer to wait_for_ready's retries
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert results(execute(kc, "'usable'")[1]) == ["'usable'"]


def test_interrupt_stops_a_busy_cell(kernel):
    km, kc = kernel()
    msg_id = kc.execute("while True: pass")
    time.sleep(1.5)
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_type") == "kernel_info_request":
        reply = kc.get_shell_msg(timeout=30)  # a late answer to wait_for_ready's retries
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "KeyboardInterrupt"


def test_an_interrupt_while_the_session_starts_stops_the_first_cell(kernel):
    """The kernel answers at once and starts its session in the background: an interrupt
    sent while the first cell waits for it must not be lost (it was: the cell then ran)."""
    km, kc = kernel()
    msg_id = kc.execute("import time\nfor _ in range(3000):\n    time.sleep(0.01)\n"
                        "print('ran to the end')")
    # As a frontend does: interrupt a cell shown as running (an interrupt that overtakes
    # the request, on its own channel, is ignored by any kernel).
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "execute_input" and msg["parent_header"].get("msg_id") == msg_id:
            break
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_type") == "kernel_info_request":
        reply = kc.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error", reply["content"]
    assert reply["content"]["ename"] == "KeyboardInterrupt"


def test_shutdown_leaves_the_session_to_its_lease(kernel_home):
    km = KernelManager(kernel_name="sandbox-python")
    km.start_kernel(env={**os.environ, "JPY_SESSION_NAME": "work/left.ipynb"})
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    execute(kc, "left = 'behind'")
    kc.stop_channels()
    km.shutdown_kernel()
    manager = SessionManager(home=str(kernel_home))
    (session,) = [s for s in manager.list(status="running") if s.name.startswith("left-")]
    assert session.run("left").result == "'behind'"


def test_kernelspec_and_install(tmp_path):
    spec = json.loads((ROOT / "share/jupyter/kernels/sandbox-python/kernel.json").read_text())
    assert spec["argv"][:3] == ["python", "-m", "sandbox_kernel"]
    assert spec["display_name"] == "Python 3 (sandbox)"
    assert spec["interrupt_mode"] == "message"
    from sandbox_kernel.kernelspec import install

    python_spec, ts_spec = (Path(p) for p in install(prefix=str(tmp_path)))
    installed = json.loads((python_spec / "kernel.json").read_text())
    assert os.path.isabs(installed["argv"][0])
    assert python_spec == tmp_path / "share/jupyter/kernels/sandbox-python"
    typescript = json.loads((ts_spec / "kernel.json").read_text())
    assert typescript["display_name"] == "TypeScript (sandbox)"
    assert "--SandboxKernel.session_language=typescript" in typescript["argv"]
    assert (ts_spec / "logo-64x64.png").exists()


NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb")
                   if not p.name.endswith(".out.ipynb"))  # executed copies made by `make demo`


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_execute_with_the_sandbox_kernel(path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="sandbox-python", timeout=300,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if path.name == "quickstart.ipynb":
        assert any("image/png" in o.get("data", {}) for o in outputs)
        assert any("still has 10000 samples" in o.get("text", "") for o in outputs)
