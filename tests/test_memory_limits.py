"""A memory limit means memory.

Real bwrap sandboxes. A 512 MiB session must run ordinary code (``import numpy``,
BLAS threads, a 16 MiB print): those failed when the limit was applied as
RLIMIT_AS, which counts address space that libraries reserve but do not use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sandbox_kernel import SessionManager
from sandbox_kernel.errors import SessionDead

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


def test_a_kernel_killed_by_a_signal_says_so_without_its_old_log(
        manager: SessionManager) -> None:
    """SIGKILL leaves no dying words: the log's last line is ipykernel's start-up banner,
    which the reason used to quote as if it explained the death."""
    s = manager.create(name="killed")
    with pytest.raises(SessionDead):
        s.run("import os; os.kill(os.getpid(), 9)")
    assert s.info()["reason"] == "the session's kernel was killed by SIGKILL"
