"""Faults (issue 9, first part): a client killed in the middle of a lifecycle change.

Whatever instant the kill lands at, the session must be left running or paused,
never in between, with nothing lost: the next run (which resumes a paused
session) sees every variable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from .conftest import make_manager, needs_bwrap

pytestmark = needs_bwrap

PAUSE = ("from sandbox_kernel import SessionManager\n"
         "SessionManager(isolation='bwrap').get('victim').pause()\n")


def test_client_killed_mid_pause_leaves_the_session_whole(home):
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home)}
    with make_manager(home, isolation="bwrap") as m:
        s = m.create(name="victim")
        assert s.run("import numpy as np\n"
                     "a = np.random.default_rng(0).random(20_000_000)\n"
                     "x = 7\ng = (i for i in range(5))").ok
        expected = s.run("print(x, a.shape, round(float(a[123]), 6))").stdout
        for delay in (0.3, 0.6, 1.0, 1.5):
            client = subprocess.Popen([sys.executable, "-c", PAUSE], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            client.kill()
            client.wait()
            status = m.get_info("victim")["status"]
            assert status in ("running", "paused"), status
            out = m.get("victim").run("print(x, a.shape, round(float(a[123]), 6))")
            assert out.stdout == expected, (delay, status, out.error)
            assert m.get_info("victim")["status"] == "running"
        # What a killed capture left is cleared by the next lifecycle change.
        m.get("victim").checkpoint()
        leftovers = m.get("victim").run(
            "import os\nprint([n for d in ('/run/kernel', '/run/snapshot') "
            "for n in os.listdir(d) if n.startswith('snap-')])")
        assert leftovers.stdout.strip() == "[]", leftovers.stdout
