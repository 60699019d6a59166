"""What happens when a lease expires: run by a session's supervisor, with no client alive.

``python -m sandbox_kernel.lease HOME SESSION_ID`` pauses the session (or
closes it, as its ``on_timeout`` says), unless it was renewed meanwhile. A
cell still running is activity: the lease is renewed instead of pausing in
the middle of it.
"""

from __future__ import annotations

import logging
import sys

from . import portal
from .errors import SandboxError, SessionBusy
from .manager import SessionManager
from .registry import lease_left

log = logging.getLogger("sandbox_kernel.lease")


def expire(home: str, session_id: str) -> str:
    """Apply the session's on_timeout if its lease has really run out; what was done."""
    manager = SessionManager(home=home)
    row = manager.registry.session(session_id)
    if row is None or row["status"] not in ("running", "frozen"):
        return "nothing: the session is not running"
    if lease_left(row) > 0:
        return "nothing: the lease was renewed"
    if row["on_timeout"] == "close":
        manager.close(session_id)
        return "closed"
    session = manager._handle(row)
    try:
        portal.call(session.pause())
    except SessionBusy:
        manager.registry.renew(session_id)
        return "renewed: a cell was running"
    return "paused"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lease: %(message)s")
    home, session_id = argv
    try:
        log.info("session %s: lease expired: %s", session_id, expire(home, session_id))
    except SandboxError as exc:
        log.error("session %s: lease expired, but: %s", session_id, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
