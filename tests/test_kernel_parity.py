"""The sandbox kernel beside a plain ipykernel: the same messages in, the same sequence out.

Each test drives a real plain ipykernel ("python3", from this environment) and the sandbox
kernel through jupyter_client with the same requests, and compares what comes back on
iopub and shell, message by message: types, which request each names as its parent, the
order of busy and idle, the execution counts. A frontend acts on exactly these: JupyterLab
ends a request's future at its idle (output after it is dropped) and shows the kernel idle
at any idle status, so a difference here is a difference the user sees.
"""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from sandbox_kernel import SessionManager

#: Seconds to wait for any one message before calling a kernel stuck (a test fails then).
STUCK = 60


@pytest.fixture(autouse=True)
def _home(kernel_home):
    return kernel_home


@pytest.fixture
def kernels():
    """start(kernel_name, notebook=None) -> (manager, client), both shut down afterwards."""
    started: list[tuple[KernelManager, BlockingKernelClient]] = []

    def start(kernel_name: str, notebook: str | None = None):
        km = KernelManager(kernel_name=kernel_name)
        env = {**os.environ}
        if notebook:
            env["JPY_SESSION_NAME"] = notebook
        km.start_kernel(env=env)
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=90)
        started.append((km, kc))
        _drain(kc)
        return km, kc

    yield start
    for km, kc in started:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _drain(kc: BlockingKernelClient) -> None:
    """Drop what start-up left on iopub (kernel_info's status, iopub_welcome)."""
    while True:
        try:
            kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            return


def send(kc: BlockingKernelClient, msg_type: str, content: dict[str, Any]) -> str:
    msg = kc.session.msg(msg_type, content)
    kc.session.send(kc.shell_channel.socket, msg)
    return msg["header"]["msg_id"]


def shape(msg: dict[str, Any], labels: dict[str, str]) -> tuple[Any, ...]:
    """What a frontend acts on in one iopub message, with request ids as their labels."""
    kind, c = msg["msg_type"], msg["content"]
    if kind == "status":
        return (kind, c["execution_state"])
    if kind == "execute_input":
        return (kind, c["execution_count"])
    if kind == "stream":
        return (kind, c["name"], c["text"])
    if kind == "execute_result":
        return (kind, c["execution_count"], c["data"].get("text/plain"))
    if kind == "comm_msg":  # model ids differ between the kernels; what is said does not
        state = c["data"].get("state", {})
        captured_by = state.get("msg_id")  # an Output widget capturing under a request
        return (kind, c["data"].get("method"), tuple(sorted(state)),
                labels.get(captured_by, captured_by))
    if kind == "clear_output":
        return (kind, c["wait"])
    if kind == "error":
        return (kind, c["ename"])
    if kind == "display_data":
        return (kind, c["data"].get("text/plain"))
    return (kind,)


def trace(kc: BlockingKernelClient, labels: dict[str, str], until: set[str]) -> list[tuple]:
    """The iopub messages whose parent is one of ``labels`` (msg_id -> label), in order, as
    (label, *shape), until each request in ``until`` has said idle. Stream pieces in a row
    are joined: where a print's text is cut depends on flush timing, in both kernels."""
    seen: list[tuple] = []
    waiting = set(until)
    while waiting:
        msg = kc.get_iopub_msg(timeout=STUCK)  # queue.Empty: a kernel is stuck
        parent = msg["parent_header"].get("msg_id")
        if parent not in labels:
            continue
        item = (labels[parent], *shape(msg, labels))
        if seen and item[1] == "stream" and seen[-1][:3] == item[:3]:
            seen[-1] = (*item[:3], seen[-1][3] + item[3])
        else:
            seen.append(item)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            waiting.discard(parent)
    return seen


def reply_to(kc: BlockingKernelClient, msg_id: str) -> dict[str, Any]:
    while True:
        reply = kc.get_shell_msg(timeout=STUCK)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"]


def comm_ids(msgs: list[dict[str, Any]], model: str) -> list[str]:
    return [m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_open"
            and m["content"]["data"]["state"].get("_model_name") == model]


def run(kc: BlockingKernelClient, code: str) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, timeout=STUCK, output_hook=msgs.append)
    assert reply["content"]["status"] == "ok", reply["content"]
    return msgs


def both(kernels, notebook: str) -> dict[str, BlockingKernelClient]:
    return {"plain": kernels("python3")[1], "sandbox": kernels("sandbox-python", notebook)[1]}


# -- comm messages ------------------------------------------------------------------------

WIDGETS = """\
import time
import ipywidgets as w
from ipywidgets import interact
slider = w.IntSlider()
slider.observe(lambda change: (time.sleep(0.3), print('value', change['new'])), 'value')
out = w.Output()
button = w.Button(description='go')
def clicked(_):
    with out:
        print('clicked')
button.on_click(clicked)
display(slider, button, out)
"""


def widget_session(kc: BlockingKernelClient) -> list[tuple]:
    """Widget callbacks that print, each followed at once by a cell, as a user moves a
    slider or clicks and then runs the next cell: the sequence the kernel answers with."""
    msgs = run(kc, WIDGETS)
    (slider,) = comm_ids(msgs, "IntSliderModel")
    (button,) = comm_ids(msgs, "ButtonModel")
    msgs = run(kc, "interact(lambda n: print(n), n=(0, 100));")
    (interact_slider,) = comm_ids(msgs, "IntSliderModel")
    seen = []
    for comm_id, data in (
        (slider, {"method": "update", "state": {"value": 5}, "buffer_paths": []}),
        (button, {"method": "custom", "content": {"event": "click"}}),
        (interact_slider, {"method": "update", "state": {"value": 7}, "buffer_paths": []}),
    ):
        comm = send(kc, "comm_msg", {"comm_id": comm_id, "data": data})
        cell = kc.execute("print('next cell')")
        seen += trace(kc, {comm: "comm", cell: "cell"}, until={comm, cell})
        seen.append(("cell reply", reply_to(kc, cell)["execution_count"]))
    return seen


def test_comm_messages_are_answered_as_a_plain_kernel_answers_them(kernels):
    """busy, everything the handler sends (an observer's print, a Button writing into an
    Output, interact's function), then idle, all under the comm message; and only then
    the next cell's busy. The sandbox kernel's idle for the comm came while the next cell
    ran, so JupyterLab showed the kernel idle with a cell running."""
    clients = both(kernels, "work/parity-comms.ipynb")
    plain = widget_session(clients["plain"])
    sandbox = widget_session(clients["sandbox"])
    assert ("comm", "stream", "stdout", "value 5\n") in plain
    assert ("comm", "comm_msg", "update", ("msg_id",), "comm") in plain  # Output captures
    assert ("comm", "stream", "stdout", "7\n") in plain
    assert sandbox == plain


def test_a_cell_awaiting_a_widget_gets_its_change(kernels):
    """A comm message that comes while a cell awaits is handled at once (ipykernel does so
    without busy or idle), so a cell can await a widget; the sandbox kernel passes it on
    while its cell runs, as the design has it, and the sandbox handles it as a plain
    kernel does."""
    clients = both(kernels, "work/parity-await-widget.ipynb")
    seen = {}
    for name, kc in clients.items():
        msgs = run(kc, "import asyncio, ipywidgets as w\n"
                       "changed = asyncio.get_running_loop().create_future()\n"
                       "slider = w.IntSlider()\n"
                       "slider.observe(lambda c: changed.done() or changed.set_result(c['new']),"
                       " 'value')\n"
                       "slider")
        (slider,) = comm_ids(msgs, "IntSliderModel")
        cell = kc.execute("print('got', await changed)")
        labels = {cell: "cell"}
        before: list[tuple] = []  # as a frontend: the widget is moved once the cell runs
        while not any(item[1] == "execute_input" for item in before):
            before += trace_one(kc, labels)
        comm = send(kc, "comm_msg", {"comm_id": slider, "data": {
            "method": "update", "state": {"value": 5}, "buffer_paths": []}})
        labels[comm] = "comm"
        seen[name] = before + trace(kc, labels, until={cell})
        seen[name].append(("cell reply", reply_to(kc, cell)["execution_count"]))
    assert ("cell", "stream", "stdout", "got 5\n") in seen["plain"]
    assert seen["sandbox"] == seen["plain"]


def trace_one(kc: BlockingKernelClient, labels: dict[str, str]) -> list[tuple]:
    """The next iopub message for one of ``labels``, shaped as ``trace`` does."""
    while True:
        msg = kc.get_iopub_msg(timeout=STUCK)
        parent = msg["parent_header"].get("msg_id")
        if parent in labels:
            return [(labels[parent], *shape(msg, labels))]


# -- top-level await ------------------------------------------------------------------------

ASYNC_CELLS = [
    "import asyncio\nawait asyncio.sleep(0.05)",
    "async def ticks(n):\n"
    "    for i in range(n):\n"
    "        await asyncio.sleep(0.01)\n"
    "        yield i\n"
    "async for i in ticks(3):\n"
    "    print('tick', i)",
    "import contextlib\n"
    "@contextlib.asynccontextmanager\n"
    "async def opened(name):\n"
    "    print('open', name)\n"
    "    yield name.upper()\n"
    "    print('close', name)\n"
    "async with opened('db') as handle:\n"
    "    await asyncio.sleep(0.01)\n"
    "handle",
    "await asyncio.gather(*(asyncio.sleep(0.01, result=n) for n in range(3)))",
]


def test_top_level_await_async_for_and_async_with(kernels):
    """As in IPython: a cell may await. The sandbox kernel never answered
    ``await asyncio.sleep(0.05)`` (its inner ipykernel raised inside do_execute)."""
    clients = both(kernels, "work/parity-await.ipynb")
    seen = {}
    for name, kc in clients.items():
        seen[name] = []
        for code in ASYNC_CELLS:
            cell = kc.execute(code)
            seen[name] += trace(kc, {cell: "cell"}, until={cell})
            reply = reply_to(kc, cell)
            seen[name].append(("cell reply", reply["status"], reply["execution_count"]))
    assert ("cell", "stream", "stdout", "tick 0\ntick 1\ntick 2\n") in seen["plain"]
    assert ("cell", "execute_result", 3, "'DB'") in seen["plain"]
    assert seen["sandbox"] == seen["plain"]


# -- execution counts -----------------------------------------------------------------------

@dataclass
class Cell:
    code: str
    silent: bool
    status: str = ""
    #: execute_input's count (None: none came), the reply's, each execute_result's.
    shown: int | None = None
    replied: int | None = None
    results: list[int] = field(default_factory=list)
    outputs: list[tuple] = field(default_factory=list)


def run_cell(kc: BlockingKernelClient, code: str, silent: bool = False) -> Cell:
    cell = Cell(code, silent)
    msg_id = kc.execute(code, silent=silent, stop_on_error=False)
    for _, *rest in trace(kc, {msg_id: "cell"}, until={msg_id}):
        if rest[0] == "execute_input":
            cell.shown = rest[1]
        elif rest[0] == "execute_result":
            cell.results.append(rest[1])
        if rest[0] not in ("status", "execute_input"):
            cell.outputs.append(tuple(rest))
    reply = reply_to(kc, msg_id)
    cell.status, cell.replied = reply["status"], reply["execution_count"]
    return cell


def assert_numbered_as_a_plain_kernel_numbers(cells: list[Cell]) -> None:
    """Each cell takes the next number: execute_input, reply and result agree on it; a
    silent cell takes none and its reply names the last one."""
    last = 0
    for cell in cells:
        if cell.silent:
            assert (cell.shown, cell.replied) == (None, last), cell
        else:
            assert cell.shown == cell.replied == last + 1, cell
            assert all(n == cell.shown for n in cell.results), cell
            last = cell.shown


def test_execution_counts_go_on_across_session_commands_pause_resume_and_restart(kernels):
    """A %session cell takes a number (the proxy runs it, the sandbox never sees it); the
    next cell must not take it again, nor may a resumed sandbox (paused at an earlier
    count) or a restarted kernel (which forgot its count) number a cell lower."""
    _, plain = kernels("python3")
    km, kc = kernels("sandbox-python", "work/parity-counts.ipynb")
    script = [  # (code, silent); the plain kernel runs those before the first restart that
        # are not %session lines
        ("a = 1", False),
        ("%session info", False),
        ("a", False),
        ("1 / 0", False),
        ("%session pause", False),
        ("a + 1", False),  # resumes the session
        ("%session timing", False),
        ("silently = True", True),
        ("RESTART", False),
        ("a + 2", False),
        ("%session checkpoint --name counted", False),
        ("RESTART", False),  # right after a %session cell
        ("silently", True),
        ("a + 3", False),
        ("In[11], In[10], Out[10]", False),
    ]
    cells, plain_cells = [], []
    for code, silent in script:
        if code == "RESTART":
            km.restart_kernel(now=False)
            kc.wait_for_ready(timeout=90)
            _drain(kc)
            plain = None
            continue
        cells.append(run_cell(kc, code, silent))
        if plain is not None and "%session" not in code:
            plain_cells.append(run_cell(plain, code, silent))
    by_code = {c.code: c for c in cells}
    assert by_code["%session pause"].status == "ok"
    assert by_code["a + 1"].outputs == [("execute_result", 6, "2")]
    # The resume happened for that cell: its timing says so.
    (timing,) = by_code["%session timing"].outputs
    assert "resume" in timing[1], timing
    # The sandbox's In and Out are numbered as the frontend numbered the cells.
    assert cells[-1].outputs == [("execute_result", 11, "('In[11], In[10], Out[10]', "
                                                        "'a + 3', 4)")]
    # A plain kernel numbers its cells 1, 2, 3...; the sandbox kernel numbers its cells,
    # %session ones too, the same way, and goes on across pause, resume and restarts.
    assert [c.status for c in plain_cells] == ["ok", "ok", "error", "ok", "ok"]
    assert_numbered_as_a_plain_kernel_numbers(plain_cells)
    assert_numbered_as_a_plain_kernel_numbers(cells)
    assert [c.shown for c in cells if not c.silent] == list(range(1, 12))


def test_execution_counts_go_on_when_a_dead_session_comes_back(kernels, kernel_home):
    """A notebook reopened after its sandbox died gets it back from a checkpoint, with the
    cells after it replayed (at the checkpoint's count); its next cell still takes the
    number after the last one shown, a %session cell's included."""
    km, kc = kernels("sandbox-python", "work/parity-replay.ipynb")
    cells = [run_cell(kc, "kept = 1"), run_cell(kc, "%session checkpoint --name base"),
             run_cell(kc, "kept += 1"), run_cell(kc, "%session info")]
    manager = SessionManager(home=str(kernel_home))
    (session,) = [s for s in manager.list(status="running")
                  if s.name.startswith("parity-replay-")]
    # The kernel records a cell just after replying to it; the kill must come after.
    deadline = time.monotonic() + 30
    while "kept += 1" not in [h["code"] for h in session.history()] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    os.kill(session.info()["pid"], 9)  # the supervisor: its sandbox dies with it
    while manager.get_info(session.id)["status"] != "dead" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert manager.get_info(session.id)["status"] == "dead"
    _, kc = kernels("sandbox-python", "work/parity-replay.ipynb")
    cells.append(run_cell(kc, "kept"))
    assert cells[-1].outputs[-1] == ("execute_result", 5, "2")  # the checkpoint, replayed
    assert_numbered_as_a_plain_kernel_numbers(cells)
