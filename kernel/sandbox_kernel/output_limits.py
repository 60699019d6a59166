"""How much of a sandbox's output the host keeps, and how large a message it accepts.

The sandbox's memory is bounded by its own limits; the host's must not follow
what the sandbox prints. A cell's outputs are kept for its ``ExecutionResult``
up to a number of bytes and of messages; past that they still stream live
(``on_output``, the kernel's relay to the frontend, as a plain kernel shows
output as it arrives) but are not kept, and the result ends with a marker
saying how much was left out. ZeroMQ refuses any single message larger than
``max_message_size`` before allocating it (the peer is disconnected, which
the session reports as an error), and ``receive_hwm`` bounds how many
messages wait in each socket while the client is busy.
"""

from __future__ import annotations

from typing import Any

from traitlets import Int
from traitlets.config import LoggingConfigurable

from .limits import format_size


class OutputLimits(LoggingConfigurable):
    """The host's bounds on a sandbox's output (``c.OutputLimits``)."""

    max_output_bytes = Int(
        64 * 2**20, help="Bytes of output (text characters, data values) kept per cell in its "
        "result; more still streams live but is not kept, and a marker says how much was "
        "left out. 64 MiB holds any output a notebook can display, large images and HTML "
        "included, while a runaway loop costs the host no more.").tag(config=True)
    max_output_messages = Int(
        10_000, help="Outputs kept per cell in its result (each costs the host about a "
        "kilobyte even when empty). ipykernel sends a cell's prints in batches, about five "
        "a second, so this is over half an hour of steady output.").tag(config=True)
    max_message_size = Int(
        256 * 2**20, help="The largest message accepted from a sandbox's kernel (ZeroMQ's "
        "MAXMSGSIZE on every client socket); a larger one is refused before it is "
        "allocated, the connection is dropped and the waiting run fails with "
        "ConnectionDropped (the next run reconnects). ipykernel sends what a cell printed "
        "between two flushes as one message, so this also bounds one burst of printing.",
    ).tag(config=True)
    receive_hwm = Int(
        16, help="Messages at most queued in each client socket while the client is busy "
        "(ZeroMQ's RCVHWM); the kernel's side then holds or drops the rest, in the "
        "sandbox's memory. Worst case held by the host per socket: (receive_hwm + 1) "
        "messages of max_message_size.").tag(config=True)


class KeptOutputs:
    """One cell's outputs as kept for its result: at most ``max_bytes`` and ``max_messages``.

    A stream output that crosses the byte limit keeps the text that fits;
    any other output is kept whole or not at all.
    """

    def __init__(self, max_bytes: int, max_messages: int):
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.outputs: list[dict[str, Any]] = []
        self.kept_bytes = 0
        self.dropped_bytes = 0
        self.dropped_messages = 0

    def add(self, out: dict[str, Any]) -> None:
        size = output_size(out)
        room = self.max_bytes - self.kept_bytes
        if (self.dropped_messages or len(self.outputs) >= self.max_messages or room <= 0
                or (size > room and out["output_type"] != "stream")):
            self.dropped_bytes += size  # (once one is left out, so are all after it: in order)
            self.dropped_messages += 1
            return
        if size > room:  # a stream keeps the text that fits; the marker will follow it
            self.dropped_bytes += size - room
            self.dropped_messages += 1
            out = {**out, "text": out["text"][:room]}
            size = room
        self.kept_bytes += size
        self.outputs.append(out)

    def result(self) -> list[dict[str, Any]]:
        """The kept outputs, and the marker last when some were left out."""
        if not self.dropped_messages:
            return self.outputs
        return [*self.outputs, {"output_type": "stream", "name": "stderr",
                                "text": "\n" + self.summary() + "\n"}]

    def summary(self) -> str:
        """The marker's text (also the result's warning)."""
        return (f"[output truncated: {self.dropped_bytes} more bytes "
                f"({format_size(self.dropped_bytes)}) in {self.dropped_messages} messages "
                f"were not kept; the limit per cell is {format_size(self.max_bytes)} or "
                f"{self.max_messages} outputs (c.OutputLimits). on_output and the notebook "
                "still saw them as they came]")


#: What a container costs in this process beyond its items (an empty list or dict is 56-64
#: bytes in CPython), and each item's slot: ``[[]] * N`` arrives as 3 bytes an item and
#: is held as about 64, so it must be counted as such (it was counted as nothing).
_CONTAINER_BYTES = 64
_SLOT_BYTES = 8


def output_size(out: dict[str, Any]) -> int:
    """What an output holds in memory, about: a stream's characters; for other outputs,
    every string's and value's size, and every container's and its slots'."""
    if out["output_type"] == "stream":
        return len(out["text"])
    size, stack = 0, [out]
    while stack:  # (no recursion: the sandbox chooses how deep its JSON nests)
        item = stack.pop()
        if isinstance(item, str | bytes | bytearray | memoryview):
            size += len(item)
        elif isinstance(item, dict):
            size += _CONTAINER_BYTES + 2 * _SLOT_BYTES * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            size += _CONTAINER_BYTES + _SLOT_BYTES * len(item)
            stack.extend(item)
        else:
            size += 8  # numbers, booleans, None
    return size
