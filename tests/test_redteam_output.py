"""Red team: the host's memory does not follow the sandbox's output.

A cell can print without end; the sandbox's memory limit does not bound what
the host keeps of it. Outputs kept per cell are capped (with a marker saying
what was left out) while ``on_output`` still sees everything, and a message
over ZeroMQ's size limit is refused before it is allocated: the run fails with
a clear error instead of hanging, and the session stays usable.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil
import pytest
from jupyter_client.manager import KernelManager
from traitlets.config import Config

from sandbox_kernel import SessionManager
from sandbox_kernel.errors import SandboxError

from .conftest import make_manager, needs_bwrap

MiB = 2**20
CAP = 8 * MiB
FLOOD = 200  # MiB, in 1 MiB writes, each flushed: 200 messages


@pytest.fixture
def capped(home) -> Iterator[SessionManager]:
    limits = {"max_output_bytes": CAP, "max_output_messages": 1000,
              "max_message_size": 4 * MiB}
    with make_manager(home, isolation="bwrap", config=Config(OutputLimits=limits)) as m:
        yield m


@contextmanager
def peak_rss_growth(process: psutil.Process | None = None) -> Iterator[Callable[[], int]]:
    """Bytes the resident memory of a process (this one) grew by at its highest, sampled
    every 5 ms."""
    me = process or psutil.Process()
    base = me.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], me.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield lambda: peak[0] - base
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], me.memory_info().rss)


def _marker(result) -> re.Match[str]:
    found = re.search(r"\[output truncated: (\d+) more bytes \(.*?\) in (\d+) messages were not "
                      r"kept", result.stderr)
    assert found, result.outputs[-1:]
    return found


@needs_bwrap
def test_a_flood_of_output_keeps_at_most_the_cap(capped):
    s = capped.create(name="flood")
    s.run("chunk = 'x' * (1 << 20)")
    seen = [0, 0]

    def on_output(out):
        seen[0] += len(out.get("text", ""))
        seen[1] += 1

    with peak_rss_growth() as growth:
        r = s.run(f"for _ in range({FLOOD}):\n    print(chunk, end='', flush=True)\n'done'",
                  on_output=on_output, timeout=120)
        kept = sum(len(o.get("text", "")) for o in r.outputs[:-1])
    assert r.ok
    # The host held about the cap, not the flood (before the cap: 200 MiB and more).
    assert growth() < 64 * MiB, f"the host grew by {growth() / MiB:.0f} MiB"
    assert seen[0] == FLOOD * MiB        # on_output saw every byte, live ...
    assert kept <= CAP                   # ... the result kept no more than the cap ...
    assert len(r.stdout) == kept
    marker = _marker(r)                  # ... and says, last, what it left out
    assert r.outputs[-1]["output_type"] == "stream" and "output truncated" in r.outputs[-1]["text"]
    dropped = FLOOD * MiB - kept         # (and the 'done' that came after it)
    assert dropped <= int(marker.group(1)) < dropped + 4096  # (+ what containers cost)
    assert int(marker.group(2)) == seen[1] - (len(r.outputs) - 1)
    assert r.result is None              # the value came after the cap: not kept either
    assert any("output truncated" in w for w in r.warnings)
    assert s.run("1 + 1").result == "2"  # the next cell starts afresh


@needs_bwrap
def test_many_small_outputs_are_capped_by_count(capped):
    s = capped.create(name="many")
    seen = []
    r = s.run("for i in range(3000):\n    print(i, flush=True)", on_output=seen.append,
              timeout=120)
    assert len(seen) > 1000 + 100        # (ipykernel joins some prints into one message)
    assert len(r.outputs) == 1000 + 1    # the cap, and the marker
    assert r.stdout.startswith("0\n1\n2\n")
    assert int(_marker(r).group(2)) == len(seen) - 1000


@needs_bwrap
def test_a_message_over_the_size_limit_fails_the_run_clearly_not_a_hang(capped):
    s = capped.create(name="huge")
    s.run("x = 41")
    # One print: ipykernel sends it as a single 16 MiB stream message, over the 4 MiB limit.
    with pytest.raises(SandboxError) as caught:
        s.run("print('y' * (16 << 20))", timeout=60)
    message = str(caught.value)
    assert type(caught.value).__name__ == "ConnectionDropped", message
    assert "max_message_size" in message and "4.0 MiB" in message
    assert "huge" in message
    # The session is alive and keeps its state: the next run reconnects.
    assert s.info()["status"] == "running"
    assert s.run("x + 1").result == "42"
    # Output under the limit still comes through whole.
    assert len(s.run("print('z' * (1 << 20))").stdout) == MiB + 1


@needs_bwrap
def test_the_kernel_relays_a_flood_live_but_keeps_only_the_cap(kernel_home):
    """The notebook kernel (the host-side proxy) was where a flood showed: 55 MiB to 1.3 GiB."""
    km = KernelManager(kernel_name="sandbox-python")
    km.start_kernel(extra_arguments=[f"--OutputLimits.max_output_bytes={CAP}",
                                     f"--OutputLimits.max_message_size={4 * MiB}"])
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        kc.execute_interactive("chunk = 'x' * (1 << 20)", timeout=60)
        proxy = psutil.Process(km.provisioner.process.pid)
        seen = [0]

        def count(msg):
            if msg["msg_type"] == "stream":
                seen[0] += len(msg["content"]["text"])

        with peak_rss_growth(proxy) as growth:
            reply = kc.execute_interactive(
                f"for _ in range({FLOOD}):\n    print(chunk, end='', flush=True)",
                timeout=120, output_hook=count)
        assert reply["content"]["status"] == "ok"
        assert seen[0] == FLOOD * MiB  # the frontend saw it all, as it came
        assert growth() < 100 * MiB, f"the kernel grew by {growth() / MiB:.0f} MiB"
        # A message over the size limit: the cell ends with the reason, then the next runs.
        errors = []
        reply = kc.execute_interactive("print('y' * (16 << 20))", timeout=60,
                                       output_hook=errors.append)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "ConnectionDropped"
        assert "max_message_size (4.0 MiB)" in reply["content"]["evalue"]
        outputs = []
        reply = kc.execute_interactive("print(chunk[:5])", timeout=60, output_hook=outputs.append)
        assert reply["content"]["status"] == "ok"
        assert [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"] == ["xxxxx\n"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_request_whose_idle_status_was_dropped_ends_after_the_grace(monkeypatch):
    """iopub drops past the receive high-water mark, and the lost message can be the idle
    status a request waits for: with its reply in, the request ends after IDLE_GRACE
    instead of waiting out its whole timeout."""
    import asyncio

    from sandbox_kernel import connection

    monkeypatch.setattr(connection, "IDLE_GRACE", 0.2)

    async def scenario() -> object:
        req = connection._Request("m1", wait_idle=True, on_message=None, on_stdin=None)
        req.reply = {"content": {"status": "ok"}}
        req._maybe_finish()  # the reply came; the idle status never will
        return await asyncio.wait_for(req.done, timeout=5)

    assert asyncio.run(scenario()) == {"content": {"status": "ok"}}


def test_nested_json_output_is_counted_as_what_it_holds():
    """[[]] * N arrives as 3 bytes an item but is held as ~64: it counts so against the cap
    (counted as 0 bytes before, so 57 MiB of it held 1.5 GiB in a result, unwarned)."""
    from sandbox_kernel.output_limits import KeptOutputs, output_size

    out = {"output_type": "display_data", "data": {"application/json": [[]] * 100_000},
           "metadata": {}}
    assert output_size(out) >= 64 * 100_000
    kept = KeptOutputs(max_bytes=1 << 20, max_messages=100)
    kept.add(out)
    assert kept.outputs == [] and kept.dropped_messages == 1
