"""Text that came from a sandbox, made safe to show on a terminal, in a notebook or a widget.

Whatever a sandbox writes reaches a screen sooner or later: the names of its
files (artifact paths), the MIME types it displays, its kernel's last log line
(a dead session's reason), the names of its variables and the errors their
pickling raised, the labels and code a notebook carries. Printed raw, such text
can retitle the terminal (``ESC ] 0;`` ... ``BEL``), clear it (``ESC [ 2J``),
overwrite what was printed (``CR``, ``BS``), forge whole lines after a newline
("session closed OK"), or reorder what is read (bidi overrides such as
``U+202E``). :func:`shown` turns each such character into a visible escape in
the style of Python's ``repr`` (``\\x1b``, ``\\r``, ``\\n``, ``\\u202e``), so the
reader sees what the sandbox wrote and the screen does nothing with it.

Backslashes are kept as they are (paths and messages would double them
otherwise); the only cost is that a name holding the four characters ``\\x1b``
reads like one holding an escape, which is harmless. The module uses the
standard library alone: the supervisor, which must start in milliseconds,
imports it to clean a dead kernel's log line at the source.
"""

from __future__ import annotations

import re
import unicodedata

#: Appended when ``limit`` cut the text, so a cut is never mistaken for the whole.
MORE = "…"

#: Invisible joiners that scripts (Persian, Devanagari) and emoji sequences need;
#: every other format character (bidi marks, overrides and isolates, tags, BOM) is escaped.
_KEPT_FORMAT = frozenset("\u200c\u200d")
#: Control characters ``repr`` writes with a letter.
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


#: SGR (colour and style) sequences: all a cell's own output needs of a terminal's escapes.
_SGR = re.compile(r"(\x1b\[[0-9;]{0,32}m)")


def shown_stream(text: str) -> str:
    """A cell's own output for a terminal (``sandbox-kernel run``, ``%%session`` in a
    terminal IPython): as a plain kernel's, with newlines, tabs, carriage returns (progress
    bars) and colours kept, and every other control escaped: no cursor moves, no title,
    clipboard (OSC 52) or device-control sequence reaches the terminal."""
    parts = _SGR.split(text)
    return "".join(part if i % 2 else
                   "".join(c if c == "\r" or _harmless(c, True) else _escape(c) for c in part)
                   for i, part in enumerate(parts))


def shown(text: object, limit: int | None = None, *, lines: bool = False) -> str:
    """``text`` (``str()`` of it) with every character that could act on a screen escaped.

    Escaped: C0 controls (ESC, CR, BS, NUL, ...), DEL, C1 controls (``\\x80``-``\\x9f``,
    8-bit CSI among them), bidi marks, overrides and isolates, line and paragraph
    separators, lone surrogates (a file name that is not UTF-8, which would
    otherwise make ``print`` raise), and newlines and tabs. With ``lines=True``
    (a log tail, a multi-line report) newlines and tabs stay real and ``\\r\\n``
    becomes ``\\n``; every other character is escaped all the same. ``limit``
    bounds the length of the result (before :data:`MORE`), never cutting an escape.
    """
    text = str(text)
    if lines:
        text = text.replace("\r\n", "\n")
    if text.isprintable() and limit is None:  # the common case: nothing to escape
        return text
    out: list[str] = []
    size = 0
    for char in text:
        piece = char if _harmless(char, lines) else _escape(char)
        if limit is not None and size + len(piece) > limit:
            out.append(MORE)
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _harmless(char: str, lines: bool) -> bool:
    if char.isprintable():
        return True
    if char in "\n\t":
        return lines
    category = unicodedata.category(char)
    if category in ("Cc", "Cs", "Zl", "Zp"):
        return False
    if category == "Cf":
        return char in _KEPT_FORMAT
    return True  # other spaces, private use, unassigned: shown as themselves, inert


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
