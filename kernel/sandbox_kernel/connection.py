"""One client's sockets to a kernel, with replies and outputs routed to their request.

The Jupyter protocol already carries everything a cell produces, so we use
it as is: jupyter_client makes and signs the sockets, and one reader task per
socket hands each message to the request it answers (by the parent
header's msg_id). Messages no request claims (another client's outputs,
comm traffic) go to ``on_unrouted``, which the kernel proxy relays. Many
requests can be in flight at once; a request is done when its reply has
come and, for shell requests, iopub has reported the kernel idle for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Container
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.session import Session
from zmq.utils.monitor import parse_monitor_message

Message = dict[str, Any]
#: Signatures remembered to refuse a replayed message, as jupyter_client's Session does.
_SEEN_SIGNATURES = 65536
MessageHook = Callable[[str, Message], None]
LostHook = Callable[[str], None]
StdinHook = Callable[[str, bool], "str | Awaitable[str]"]


class ConnectionLost(Exception):
    """The kernel went away while requests were waiting on it."""


def unpack_message(
    session: Session, frames: list[bytes], seen: Container[bytes] = ()
) -> Message:
    """Verify and unpack a message, as Session.deserialize does minus its date parsing.

    jupyter_client turns every ISO date in the headers into a datetime, 40 of
    its 57 microseconds per message; nothing here reads those dates, and the
    kernel proxy unpacks several messages per cell on its critical path. A
    signature in ``seen`` is refused as a replay.
    """
    if len(frames) < 5:
        raise ValueError("malformed message")
    signature = frames[0]
    if session.auth is not None:
        if not signature or signature in seen:
            raise ValueError("unsigned or replayed message")
        if not hmac.compare_digest(signature, session.sign(frames[1:5])):
            raise ValueError("invalid signature")
    unpack = session.unpack
    header = unpack(frames[1])
    return {
        "header": header,
        "msg_id": header["msg_id"],
        "msg_type": header["msg_type"],
        "parent_header": unpack(frames[2]),
        "metadata": unpack(frames[3]),
        "content": unpack(frames[4]),
        "buffers": [memoryview(b) for b in frames[5:]],
    }


class _WatchedSocket(zmq.asyncio.Socket):
    """A socket that reports its disconnections, watched from before it connects.

    ZeroMQ answers a message over MAXMSGSIZE by dropping the connection and
    does not reconnect: a reader would wait for ever. The monitor starts
    before ``connect`` so that no drop can slip past it.
    """

    def connect(self, addr: str) -> Any:
        if self.type != zmq.PAIR:  # (the monitor's own socket is a PAIR)
            self.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        return super().connect(addr)


class _LimitedContext(zmq.asyncio.Context):
    """The shared context, shadowed: same I/O thread, its own default socket options."""

    _socket_class = _WatchedSocket


#: Seconds a request whose reply has come waits for its idle status before it is done
#: without it. The kernel publishes idle right after the reply; it never comes when
#: iopub dropped it (ZeroMQ drops past the receive high-water mark, see OutputLimits),
#: and a request must not then wait out its whole timeout.
IDLE_GRACE = 5.0


class _Request:
    __slots__ = ("msg_id", "done", "reply", "idle", "wait_idle", "on_message", "on_stdin",
                 "linger", "grace")

    def __init__(self, msg_id: str, wait_idle: bool, on_message: MessageHook | None,
                 on_stdin: StdinHook | None, linger: float = 0.0):
        self.msg_id = msg_id
        self.done: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.reply: Message | None = None
        self.idle = not wait_idle
        self.wait_idle = wait_idle
        self.on_message = on_message
        self.on_stdin = on_stdin
        self.linger = linger
        self.grace: asyncio.TimerHandle | None = None

    def _maybe_finish(self) -> None:
        if self.reply is not None and not self.idle and self.grace is None:
            self.grace = asyncio.get_running_loop().call_later(IDLE_GRACE, self._finish)
        if self.reply is not None and self.idle and not self.done.done():
            if self.linger:
                asyncio.get_running_loop().call_later(self.linger, self._finish)
                self.linger = 0.0
            else:
                self.done.set_result(self.reply)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(self.reply)


class KernelConnection:
    _on_lost: LostHook | None = None
    _lost = False
    _monitors: tuple[zmq.asyncio.Socket, ...] = ()

    def __init__(self, connection: str | dict[str, Any], on_unrouted: MessageHook | None = None,
                 linger: float = 0.0):
        """``connection``: a connection file, or the connection info itself (what the
        sandbox kernel uses: built by the host, never read from a file a sandbox can write).
        ``linger``: seconds a shell request keeps collecting output after its reply and
        idle status, for kernels whose output can trail them (Deno's, under load)."""
        self.client = AsyncKernelClient(context=zmq.asyncio.Context.instance())
        if isinstance(connection, dict):
            self.client.load_connection_info(connection)
        else:
            self.client.load_connection_file(connection)
        self.session = self.client.session
        self.on_unrouted = on_unrouted
        self._pending: dict[str, _Request] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._failure: BaseException | None = None
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.linger = linger

    def open(self, max_message_size: int = -1, receive_hwm: int = 1000,
             on_lost: LostHook | None = None) -> None:
        """Connect the four channels.

        ``max_message_size`` (ZeroMQ's MAXMSGSIZE, -1: none) and ``receive_hwm``
        (RCVHWM, messages) bound what the kernel can make this process hold.
        ``on_lost(channel)`` is called once, when ZeroMQ drops a channel's
        connection: the kernel ended, or sent a message over the size limit.
        """
        context = _LimitedContext.shadow(self.client.context)
        context.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        context.setsockopt(zmq.RCVHWM, receive_hwm)
        self.client.context = context
        self._on_lost = on_lost
        ident = self.session.bsession
        self._sockets = {
            "shell": self.client.connect_shell(identity=ident),
            "control": self.client.connect_control(identity=ident),
            "stdin": self.client.connect_stdin(identity=ident),
            "iopub": self.client.connect_iopub(),
        }
        self._monitors = tuple(s.get_monitor_socket() for s in self._sockets.values())
        for (channel, sock), monitor in zip(self._sockets.items(), self._monitors, strict=True):
            self._tasks.append(asyncio.ensure_future(self._read(channel, sock)))
            self._tasks.append(asyncio.ensure_future(self._watch(channel, monitor)))

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()
        for sock in self._sockets.values():
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            sock.close(linger=0)
        for monitor in self._monitors:
            monitor.close(linger=0)
        self._monitors = ()
        self._sockets.clear()
        self.fail(ConnectionLost("the connection was closed"))

    def fail(self, exc: BaseException) -> None:
        """Fail every waiting request (and all later ones) with ``exc``."""
        self._failure = exc
        for req in list(self._pending.values()):
            if not req.done.done():
                req.done.set_exception(exc)
                req.done.exception()  # awaiting callers still get it; nobody else must
        self._pending.clear()

    def send(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        *,
        on_message: MessageHook | None = None,
        on_stdin: StdinHook | None = None,
        wait_idle: bool | None = None,
        header: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> asyncio.Future[Message]:
        """Send a request; the returned future resolves to its reply when the request is done."""
        if self._failure is not None:
            raise self._failure
        msg = self.session.msg(msg_type, content, metadata=metadata)
        if header:
            msg["header"].update(header)
        msg_id = msg["header"]["msg_id"]
        idle = channel == "shell" if wait_idle is None else wait_idle
        req = _Request(msg_id, idle, on_message, on_stdin,
                       self.linger if channel == "shell" and idle else 0.0)
        self._pending[msg_id] = req
        req.done.add_done_callback(lambda _: self._pending.pop(msg_id, None))
        self.session.send(self._sockets[channel], msg)
        return req.done

    def send_raw(self, channel: str, msg: Message, buffers: list[Any] | None = None) -> None:
        """Send a message that expects no routed answer (comm_msg, input_reply)."""
        if self._failure is not None:
            raise self._failure
        self.session.send(self._sockets[channel], msg, buffers=buffers)

    async def _read(self, channel: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            parts = await sock.recv_multipart()
            try:
                _, body = self.session.feed_identities(parts)
                msg = self._unpack(body)
            except Exception:  # a message that fails its signature is dropped, not obeyed
                continue
            try:
                self._dispatch(channel, msg)
            except Exception:  # a faulty hook must not stop the reader
                import traceback

                traceback.print_exc()

    async def _watch(self, channel: str, monitor: zmq.asyncio.Socket) -> None:
        """Tell ``on_lost`` (once per connection) that ZeroMQ dropped a channel."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED and not self._lost:
                self._lost = True
                if self._on_lost is not None:
                    self._on_lost(channel)

    def _unpack(self, frames: list[bytes]) -> Message:
        msg = unpack_message(self.session, frames, self._seen)
        self._seen[frames[0]] = None
        if len(self._seen) > _SEEN_SIGNATURES:
            self._seen.popitem(last=False)
        return msg

    def _dispatch(self, channel: str, msg: Message) -> None:
        parent = msg.get("parent_header", {}).get("msg_id")
        req = self._pending.get(parent) if parent else None
        if req is None:
            if self.on_unrouted is not None:
                self.on_unrouted(channel, msg)
            return
        if req.on_message is not None:
            req.on_message(channel, msg)
        kind = msg["header"]["msg_type"]
        if channel in ("shell", "control") and kind.endswith("_reply"):
            req.reply = msg
            req._maybe_finish()
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            req.idle = True
            req._maybe_finish()
        elif channel == "stdin" and kind == "input_request":
            asyncio.ensure_future(self._answer_input(req, msg))

    async def _answer_input(self, req: _Request, request: Message) -> None:
        content = request["content"]
        if req.on_stdin is None:
            value = ""
        else:
            try:
                answer = req.on_stdin(content.get("prompt", ""), bool(content.get("password")))
                value = await answer if inspect.isawaitable(answer) else answer
            except Exception as exc:
                value = ""
                with contextlib.suppress(Exception):
                    self.send_raw("stdin", self.session.msg(
                        "input_reply", {"status": "error", "value": "", "evalue": str(exc)},
                        parent=request))
                return
        self.send_raw("stdin", self.session.msg("input_reply", {"value": value}, parent=request))
