"""Load (issue 9): many clients at once, many sessions held, a large registry.

These assert behaviour under load (every client gets its own results, every
held session keeps its state, every registry row is listed); the speed figures
come from `make stress`, which runs the same work at full size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .conftest import make_manager, needs_bwrap
from .load_client import run_clients

pytestmark = needs_bwrap

def test_fifty_concurrent_clients_each_get_their_own_results(home):
    with make_manager(home, isolation="bwrap") as m:
        names = [f"load{k}" for k in range(10)]
        for name in names:
            m.create(name=name)
        reports = run_clients(home, names, per_target=5, cells=10)
        assert len(reports) == 50
        assert [r["wrong"] for r in reports] == [[]] * 50
        assert sorted(r["client"] for r in reports) == list(range(50))
        for name in names:  # every cell of every client is in its session's history
            assert len([e for e in m.get_history(name) if e["status"] == "ok"]) == 5 * (1 + 10)
            assert m.get_info(name)["status"] == "running"


def test_a_hundred_sessions_held_with_the_idle_ones_paused_or_frozen(home):
    running_at_most = 8
    with make_manager(home, isolation="bwrap") as m:
        sessions = []
        for i in range(100):
            s = m.create(name=f"held{i}")
            assert s.run(f"x = {i}").ok
            sessions.append(s)
            if i >= running_at_most:  # the oldest running one goes idle
                idle = sessions[i - running_at_most]
                idle.pause(mode="freeze" if i % 3 == 0 else "snapshot")
        statuses = [s.info()["status"] for s in m.list()]
        assert len(statuses) == 100
        assert statuses.count("running") == running_at_most
        assert statuses.count("frozen") + statuses.count("paused") == 100 - running_at_most
        assert statuses.count("frozen") > 20 and statuses.count("paused") > 50
        paused = [s for s in sessions if s.info()["status"] == "paused"]
        assert all(s.usage() is None for s in paused)  # no process, no memory
        frozen = [s.usage() for s in sessions if s.info()["status"] == "frozen"]
        assert all(u is not None and u["memory"] > 0 for u in frozen)  # kept in memory
        for i in (0, 3, 50, 51, 90, 99):  # frozen, paused and running ones all answer
            assert sessions[i].run("print(x)").stdout == f"{i}\n"


def test_a_thousand_sessions_in_the_registry_are_all_listed(home):
    with make_manager(home, isolation="bwrap") as m:
        live = m.create(name="live", tags=["keep"])
        now = time.time()
        for i in range(1000):
            m.registry.insert_session({
                "id": uuid.uuid4().hex[:12], "name": f"old{i}", "language": "python",
                "status": "closed" if i % 2 else "paused", "created": now - 1000 + i,
                "last_activity": now, "timeout": 600.0, "isolation": "bwrap",
                "session_dir": str(home / "gone" / str(i)), "connection_file": "-",
                "tags": ["batch"] if i % 10 == 0 else []})
        everyone = m.list()
        assert len(everyone) == 1001
        assert [s.name for s in everyone[:3]] == ["old0", "old1", "old2"]
        assert everyone[-1].name == "live"
        assert len(m.list(status="paused")) == 500
        assert [s.name for s in m.list(tags=["keep"])] == ["live"]
        assert len(m.list(tags=["batch"])) == 100
        def cli_list(*flags: str) -> list[str]:
            cli = subprocess.run(
                [str(Path(sys.executable).parent / "sandbox-kernel"), "list", *flags],
                env={**os.environ, "SANDBOX_KERNEL_HOME": str(home)},
                capture_output=True, text=True, timeout=60)
            assert cli.returncode == 0, cli.stderr
            return [line.split()[0] for line in cli.stdout.splitlines()[1:]]

        assert cli_list("--all") == [f"old{i}" for i in range(1000)] + ["live"]
        # By default the closed ones (every odd one here) are left out.
        assert cli_list() == [f"old{i}" for i in range(0, 1000, 2)] + ["live"]
        assert live.run("print('still fine')").stdout == "still fine\n"
