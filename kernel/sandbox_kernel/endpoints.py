"""What a client connects to: the host's own record, and sockets proven to be the kernel's.

The kernel binds its ZeroMQ sockets in a directory the sandbox can write,
so whatever is there when a client comes may be a planted symlink to
another unix socket on the host, or something else entirely; and a
connection file in that directory could name any transport and address.
So the connection info lives in the session's host-only directory and names
no sandbox-chosen value; and before each attach the host hard-links each
expected socket into a host-only directory (``link()`` never follows a
link) and checks the link: a socket, owned by the sandbox's uid. Clients
connect to those links, which the sandbox can no longer change; a socket
that fails the check stops the attach with :class:`SocketsReplaced`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from typing import Any

from .errors import SandboxError
from .paths import SessionLayout
from .sandbox.identity import Identity

#: The kernel's channels and the suffix of each one's socket (ipc "ports").
PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
#: The channels a client connects to (the heartbeat is not used).
CLIENT_CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port")
_KEY = re.compile(r"[0-9a-fA-F-]{16,128}")


class SocketsReplaced(SandboxError):
    """A kernel socket of a session is not what the kernel bound: not connected to."""


def write_host_connection(layout: SessionLayout, key: bytes) -> None:
    """Record the session's key where only the host can write (atomically, mode 0600)."""
    info = {"key": key.decode()}
    tmp = layout.root / f".{layout.connection_file.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, layout.connection_file)


def _key(layout: SessionLayout) -> str:
    """The session's key: from the host-only file, else (a session started by an older
    version) from the legacy file, of which nothing but a well-formed key is taken."""
    for path in (layout.connection_file, layout.legacy_connection_file):
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd) as f:
                key = json.loads(f.read(65536)).get("key")
            if isinstance(key, str) and _KEY.fullmatch(key):
                return key
    raise SandboxError(f"the session in {layout.root} has no usable connection key; "
                       "close it and create a new one")


def connection_info(layout: SessionLayout) -> dict[str, Any]:
    """The info a client connects with: every value the host's own."""
    return {"transport": "ipc", "ip": str(layout.socket_links / "k"),
            "key": _key(layout), "signature_scheme": "hmac-sha256", "kernel_name": "",
            **PORTS}


def sockets_bound(layout: SessionLayout) -> bool:
    """True once the kernel has bound every socket a client needs (by name only)."""
    return all(os.path.lexists(f"{layout.socket_prefix}-{PORTS[c]}") for c in CLIENT_CHANNELS)


def link_sockets(layout: SessionLayout, identity: Identity | None) -> None:
    """Hard-link the kernel's sockets into the host-only directory, each checked.

    A link to a symlink is a symlink, so the check sees what the sandbox put
    there, never what it points to; and once linked, the sandbox replacing
    its file changes nothing for the host. The owner must be the sandbox's
    uid (the manager's own when it has no other to give).
    """
    links = layout.socket_links
    links.mkdir(mode=0o700, exist_ok=True)
    owner = identity.uid if identity is not None else os.getuid()
    src_fd = os.open(layout.kernel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    dst_fd = os.open(links, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for channel in CLIENT_CHANNELS:
            name = f"k-{PORTS[channel]}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dst_fd)
            try:
                os.link(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd,
                        follow_symlinks=False)
            except OSError as exc:
                raise SocketsReplaced(f"the kernel socket {name} of the session in "
                                      f"{layout.root} cannot be checked: {exc.strerror}") from None
            st = os.stat(name, dir_fd=dst_fd, follow_symlinks=False)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != owner:
                os.unlink(name, dir_fd=dst_fd)
                what = ("a symlink" if stat.S_ISLNK(st.st_mode) else
                        "not a socket" if not stat.S_ISSOCK(st.st_mode) else
                        f"owned by uid {st.st_uid}, not the sandbox's {owner}")
                raise SocketsReplaced(
                    f"the kernel socket {name} of the session in {layout.root} is {what}: "
                    "something in the sandbox replaced it, so no client connects to it; "
                    "close the session")
    finally:
        os.close(src_fd)
        os.close(dst_fd)
