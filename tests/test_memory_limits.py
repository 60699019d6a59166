"""A memory limit means memory, and a kernel that dies mid-cell ends that cell with the reason.

Real bwrap sandboxes, and the sandbox kernel driven by a jupyter_client client. A
512 MiB session must run ordinary code (``import numpy``, BLAS threads, a 16 MiB
print): those failed when the limit was applied as RLIMIT_AS, which counts address
space that libraries reserve but do not use. Past the limit the kernel dies, and
the cell that was running ends with the reason (through ``Session.run`` and
through the sandbox kernel, where it used to hang), and the next cell brings the
session back and says how.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from sandbox_kernel import SessionManager
from sandbox_kernel.errors import SessionDead
from sandbox_kernel.registry import Registry

from .conftest import make_manager, needs_bwrap

pytestmark = needs_bwrap

MiB = 1024**2
LIMIT = 512 * MiB
#: Imports NumPy, multiplies matrices (OpenBLAS starts a thread per CPU) and prints 16 MiB.
ORDINARY = """
import numpy as np
a = np.random.default_rng(0).random((1500, 1500))
product = float((a @ a).sum())
text = 'x' * (16 * 1024 * 1024)
print(text)
print(len(text), product > 0)
"""
#: Allocates and touches 64 MiB at a time until the memory runs out.
RUNAWAY = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))"
#: Generous: a cell that ends at all ends in well under a second here.
CLIENT_TIMEOUT = 120


def memory_cgroup(session_dir: Path) -> bool:
    """Whether the supervisor put this session into a memory cgroup (the host decides)."""
    return "memory" in json.loads((session_dir / "supervisor.json").read_text())["cgroups"]


def test_numpy_and_a_16_mib_print_work_in_a_512_mib_session(manager: SessionManager) -> None:
    s = manager.create(name="numpy", limits={"memory": "512MiB"})
    r = s.run(ORDINARY)
    assert r.ok, r.error
    assert r.stdout.endswith(f"{16 * MiB} True\n")
    assert len(r.stdout) > 16 * MiB
    enforced = s.info()["enforcement"]["memory"]
    unlimited = s.run("import resource\n"
                      "resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY")
    if memory_cgroup(s.work_dir.parent):  # the cgroup alone: no address-space limit beside it
        assert enforced == "cgroup"
        assert unlimited.result == "True"
    else:
        assert enforced.startswith("rlimit: address space at most"), enforced
        assert unlimited.result == "False"


def test_without_a_memory_cgroup_the_address_space_limit_leaves_room(home: Path) -> None:
    """Where no memory cgroup can be had, the address-space limit stands in for it, far
    enough above the limit for ordinary code, and info() says the limit itself is not
    enforced; a runaway allocation is still refused."""
    with make_manager(home, isolation="bwrap", cgroups=False) as manager:
        s = manager.create(name="fallback", limits={"memory": "512MiB"})
        enforced = s.info()["enforcement"]["memory"]
        assert enforced.startswith("rlimit: address space at most"), enforced
        assert "512 MiB limit itself is not enforced" in enforced
        r = s.run(ORDINARY)
        assert r.ok, r.error
        assert r.stdout.endswith(f"{16 * MiB} True\n")
        from sandbox_kernel.limits import address_space_limit  # (new: the old code fails above)

        ceiling = s.run("import resource; resource.getrlimit(resource.RLIMIT_AS)[0]")
        assert int(ceiling.result) == address_space_limit(LIMIT, os.cpu_count())
        # Refused at once (malloc fails), so no memory is used on the way.
        too_much = s.run(f"big = bytearray({address_space_limit(LIMIT) + 1024**3})")
        assert too_much.error["ename"] == "MemoryError"
        assert s.run("'alive'").result == "'alive'"


def test_a_run_past_the_limit_ends_with_the_reason_and_restart_keeps_the_files(
        manager: SessionManager) -> None:
    s = manager.create(name="runaway", limits={"memory": "512MiB"})
    if not memory_cgroup(s.work_dir.parent):
        pytest.skip("no writable memory cgroup here: the address-space limit raises "
                    "MemoryError instead (see the test above)")
    assert s.run("open('kept.txt', 'w').write('written before'); x = 1").ok
    with pytest.raises(SessionDead) as died:
        s.run(RUNAWAY)
    message = str(died.value)
    assert "out of memory (limit 512 MiB)" in message, message
    assert "restart()" in message, message  # what to do
    info = s.info()
    assert info["status"] == "dead"
    assert info["reason"] == "the session's kernel was killed: out of memory (limit 512 MiB)"
    report = s.restart()
    assert report.restarted and "no variables" in str(report)
    assert s.info()["status"] == "running"
    assert s.run("print('x' in globals(), open('kept.txt').read())").stdout == \
        "False written before\n"


def test_a_kernel_killed_by_a_signal_says_so_without_its_old_log(
        manager: SessionManager) -> None:
    """SIGKILL leaves no dying words: the log's last line is ipykernel's start-up banner,
    which the reason used to quote as if it explained the death."""
    s = manager.create(name="killed")
    with pytest.raises(SessionDead):
        s.run("import os; os.kill(os.getpid(), 9)")
    assert s.info()["reason"] == "the session's kernel was killed by SIGKILL"


# -- through the sandbox kernel ------------------------------------------------------


@pytest.fixture
def kernel(kernel_home: Path) -> Iterator[Callable[..., BlockingKernelClient]]:
    """Starts a sandbox kernel for a notebook path, with a 512 MiB memory limit on the
    sessions it creates; a ready client."""
    started: list[tuple[KernelManager, BlockingKernelClient]] = []

    def start(notebook: str) -> BlockingKernelClient:
        km = KernelManager(kernel_name="sandbox-python")
        km.start_kernel(env={**os.environ, "JPY_SESSION_NAME": notebook},
                        extra_arguments=["--SessionManager.default_limits", "memory=512MiB"])
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        started.append((km, kc))
        return kc

    yield start
    for km, kc in started:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def execute(kc: BlockingKernelClient, code: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a cell; its reply's content and the iopub messages it caused. A cell that never
    ends fails here, after CLIENT_TIMEOUT, with TimeoutError."""
    msgs: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, timeout=CLIENT_TIMEOUT, output_hook=msgs.append)
    assert msgs[-1]["msg_type"] == "status", msgs[-1]
    assert msgs[-1]["content"]["execution_state"] == "idle"
    return reply["content"], msgs


def stream(msgs: list[dict[str, Any]], name: str) -> str:
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and m["content"]["name"] == name)


def errors(msgs: list[dict[str, Any]]) -> list[str]:
    return [m["content"]["evalue"] for m in msgs if m["msg_type"] == "error"]


def session_of(kernel_home: Path, prefix: str) -> dict[str, Any]:
    """The registry's row of the one session whose name starts with ``prefix``."""
    registry = Registry(kernel_home / "registry.db")
    try:
        (row,) = [r for r in registry.sessions(status=("starting", "running", "dead"))
                  if r["name"].startswith(prefix)]
    finally:
        registry.close()
    return row


def test_kernel_a_cell_past_the_memory_limit_ends_and_the_next_brings_the_session_back(
        kernel: Callable[..., BlockingKernelClient], kernel_home: Path) -> None:
    kc = kernel("work/memory.ipynb")
    reply, msgs = execute(kc, ORDINARY)
    assert reply["status"] == "ok", reply
    assert stream(msgs, "stdout").endswith(f"{16 * MiB} True\n")
    row = session_of(kernel_home, "memory-")
    assert row["limits"]["memory"] == LIMIT
    if not memory_cgroup(Path(row["session_dir"])):
        pytest.skip("no writable memory cgroup here: a runaway cell gets MemoryError instead")
    assert execute(kc, "open('kept.txt', 'w').write('kept'); x = 1")[0]["status"] == "ok"

    reply, msgs = execute(kc, RUNAWAY)  # ends, rather than hanging the notebook
    assert reply["status"] == "error"
    assert reply["ename"] == "SessionDead"
    assert reply["evalue"].startswith(
        "the session's kernel was killed: out of memory (limit 512 MiB). The next cell starts "
        "session 'memory-"), reply["evalue"]
    assert "`%session new`" in reply["evalue"]  # what to do, in the notebook's words
    assert errors(msgs) == [reply["evalue"]]
    assert session_of(kernel_home, "memory-")["status"] == "dead"

    reply, msgs = execute(kc, "print('x' in globals(), open('kept.txt').read())")
    assert reply["status"] == "ok", reply
    assert stream(msgs, "stdout") == "False kept\n"
    notice = stream(msgs, "stderr")
    assert "had died (the session's kernel was killed: out of memory (limit 512 MiB))" in notice
    assert "started again with no variables" in notice, notice
    assert session_of(kernel_home, "memory-")["status"] == "running"


def test_kernel_a_kernel_killed_mid_cell_ends_the_cell_with_the_reason(
        kernel: Callable[..., BlockingKernelClient]) -> None:
    kc = kernel("work/killed.ipynb")
    assert execute(kc, "y = 2")[0]["status"] == "ok"
    assert execute(kc, "%session checkpoint --name base")[0]["status"] == "ok"
    reply, msgs = execute(kc, "import os; os.kill(os.getpid(), 9)")
    assert reply["status"] == "error"
    assert reply["evalue"].startswith("the session's kernel was killed by SIGKILL. The next "
                                      "cell starts session 'killed-"), reply["evalue"]
    assert "again from its checkpoint" in reply["evalue"]
    assert "its log ends" not in reply["evalue"]
    reply, msgs = execute(kc, "y")
    assert reply["status"] == "ok", reply
    assert [m["content"]["data"]["text/plain"] for m in msgs
            if m["msg_type"] == "execute_result"] == ["2"]
    notice = stream(msgs, "stderr")
    assert "had died (the session's kernel was killed by SIGKILL)" in notice, notice
    assert "started again from checkpoint" in notice, notice
