"""A private event loop in a daemon thread: the blocking API's way into the async core.

jupyter_client's blocking clients run their own loop in the calling
thread, which fails when that thread already runs one (IPython kernels,
notebooks). Running the core on one loop in its own thread works from any
thread, keeps zmq sockets on the thread that made them, and lets a
connection outlive the call that opened it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_portal: tuple[int, asyncio.AbstractEventLoop, threading.Thread] | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The portal's loop, started on first use (and again in a forked child)."""
    global _portal
    with _lock:
        if _portal is None or _portal[0] != os.getpid():
            new_loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=new_loop.run_forever, name="sandbox-kernel-portal", daemon=True
            )
            thread.start()
            _portal = (os.getpid(), new_loop, thread)
        return _portal[1]


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    target = loop()
    if _portal is not None and threading.current_thread() is _portal[2]:
        coro.close()
        raise RuntimeError("a blocking sandbox_kernel call was made on its own loop; "
                           "use the async API (AsyncSessionManager) inside coroutines")
    return asyncio.run_coroutine_threadsafe(coro, target)


def call(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the portal loop and wait for its result."""
    return submit(coro).result(timeout)
