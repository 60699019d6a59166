"""Runs inside the sandbox: a kernel that speaks ZeroMQ over TCP only, reached over unix sockets.

Deno's Jupyter kernel fails with the IPC transport. ZeroMQ's IPC and TCP
transports carry the same ZMTP byte stream, so this relay listens on the
unix sockets our clients connect to (the ``ipc`` connection file in the
session's kernel directory) and pipes each connection, byte for byte, to the
kernel's port on the sandbox's own loopback. The sandbox keeps its private
network namespace: nothing is reachable from outside it, and it reaches
nothing outside. Standard library only (the sandbox cannot import
sandbox_kernel); the host passes this file's source to ``python -c``.

Usage: python -c SOURCE CONNECTION_FILE KERNEL_ARGV...   ("{tcp_connection_file}" in
KERNEL_ARGV is replaced by the TCP connection file written for the kernel).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys

CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
FIRST_TCP_PORT = 41001


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(path: str, port: int) -> asyncio.AbstractServer:
    async def connected(ur: asyncio.StreamReader, uw: asyncio.StreamWriter) -> None:
        for _ in range(600):  # the kernel may still be starting: up to a minute
            try:
                tr, tw = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            uw.close()
            return
        await asyncio.gather(_pipe(ur, tw), _pipe(tr, uw))

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return await asyncio.start_unix_server(connected, path=path)


async def main(argv: list[str]) -> int:
    conn_file, kernel_argv = argv[0], argv[1:]
    with open(conn_file) as f:
        conn = json.load(f)
    tcp = {k: v for k, v in conn.items() if k not in CHANNELS and k not in ("ip", "transport")}
    tcp.update(transport="tcp", ip="127.0.0.1")
    for i, channel in enumerate(CHANNELS):
        tcp[channel] = FIRST_TCP_PORT + i
    tmp = os.environ.get("TMPDIR", "/tmp")
    os.environ.setdefault("DENO_DIR", os.path.join(tmp, "deno"))  # writable, in memory
    tcp_file = os.path.join(tmp, "kernel-tcp.json")
    with open(tcp_file, "w") as f:
        json.dump(tcp, f)
    servers = [await _serve(f"{conn['ip']}-{conn[channel]}", tcp[channel])
               for channel in CHANNELS]
    argv_ = [a.replace("{tcp_connection_file}", tcp_file) for a in kernel_argv]
    kernel = await asyncio.create_subprocess_exec(*argv_)
    loop = asyncio.get_running_loop()
    # Interrupts (SIGINT) and stops (SIGTERM) reach the kernel, which the relay outlives by
    # nothing: when the kernel ends, so does the relay, with its exit code.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: kernel.send_signal(s))
    code = await kernel.wait()
    for server in servers:
        server.close()
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
