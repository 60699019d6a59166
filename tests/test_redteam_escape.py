"""Red team (issue 15, hole 6): the sandbox writes text meant to take over the screen that
shows it.

The attacker controls every string a session produces: the names of the files it
writes (artifact paths), the MIME types of what it displays, its kernel's last
log line (which becomes the session's ``reason`` when it dies), the names of its
variables and the errors their pickling raises (a pause's "not saved" lines, a
resume's "could not restore" lines), the labels and code a notebook gives. It
plants terminal escapes (retitle the window, clear the screen), carriage returns
that overwrite a line, newlines followed by a forged line, and a bidi override.
Each probe runs a real command (``sandbox-kernel ...``, ``%session ...``, the
widgets) and fails if one such character reaches the output raw, or if the
escaped form of the attacker's text is missing (nothing may be hidden either).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython import get_ipython
from IPython.testing.globalipapp import start_ipython

from sandbox_kernel import SessionManager
from sandbox_kernel.errors import SessionDead

from .conftest import make_manager, needs_bwrap, short_tmpdir

pytestmark = needs_bwrap

CLI = str(Path(sys.executable).with_name("sandbox-kernel"))

FORGED = "session closed OK"
#: Hostile file names, and how each must read once escaped.
FILES = {
    "a\x1b]0;pwned\x07b": r"a\x1b]0;pwned\x07b",
    "c\x1b[2Jd": r"c\x1b[2Jd",
    "e\rf": r"e\rf",
    f"g\n{FORGED}": rf"g\n{FORGED}",
    "h\u202etxt.exe": r"h\u202etxt.exe",
    "i\x9b31mj": r"i\x9b31mj",
    "<img src=x onerror=alert(1)>": "<img src=x onerror=alert(1)>",
}
MIME = "text/x-\x1b[2J-evil"
LABEL = f"\x1b]0;pwned\x07\n{FORGED}"
#: The host takes only Python names for variables from a snapshot report; the reason a
#: variable was not saved (its pickling error) is free text, up to 1000 characters.
VARIABLE = "evil_value"
WHY = f"\x1b[2J\rFAKE\n{FORGED}\u202e"
WHY_SHOWN = rf"\x1b[2J\rFAKE\n{FORGED}\u202e"
NOT_SAVED = f"not saved: {VARIABLE}: ValueError: {WHY_SHOWN} ("
LOST = f"could not restore {VARIABLE}: ValueError: {WHY_SHOWN};"
DEATH = "\x1b[31mFAKE\rline \x1b]0;pwned\x07 \u202eend"
DEATH_SHOWN = r"\x1b[31mFAKE\rline \x1b]0;pwned\x07 \u202eend"
#: What must never reach a screen raw: C0 (but newline and tab), DEL, C1, bidi, separators.
RAW = [chr(c) for c in (*range(0x00, 0x09), *range(0x0b, 0x20), *range(0x7f, 0xa0))] + [
    "\u061c", "\u200e", "\u200f", *map(chr, range(0x202a, 0x202f)),
    *map(chr, range(0x2066, 0x206a)), "\u2028", "\u2029"]

PLANT_FILES = f"""
for name in {list(FILES)!r}:
    open(name, "w").write("x")
from IPython.display import display
display({{{MIME!r}: "hi"}}, raw=True)
"""
# A variable whose pickling error is hostile: a pause skips it, and a resume loses it
# (set through globals(), no recorded cell is seen to define it, so none is replayed).
PLANT_VARIABLE = f"""
class Evil:
    def __reduce__(self):
        raise ValueError({WHY!r})
globals()[{VARIABLE!r}] = Evil()
"""
# The kernel's last words go to its log (fd 2, which ipykernel relays to the log from a
# thread: give it a moment), then it dies: the log's tail becomes the session's reason.
DIE = f"import os, time; os.write(2, {(DEATH + chr(10)).encode()!r}); time.sleep(1); os._exit(3)"
# A notebook's cell may hold raw control characters; its first line is what history shows.
HOSTILE_CELL = "y = 1  # \x1b]0;pwned\x07 \u202e\nz = 2"


def assert_inert(output: str, *escaped: str) -> None:
    """No raw control character and no forged line in ``output``; each ``escaped`` in it."""
    found = sorted({f"U+{ord(c):04X}" for c in output if c in RAW})
    assert not found, f"raw {found} reached the screen:\n{output!r}"
    forged = [line for line in output.split("\n") if line.lstrip().startswith(FORGED)]
    assert not forged, f"a forged line reached the screen:\n{output!r}"
    for text in escaped:
        assert text in output, f"{text!r} is not shown:\n{output!r}"


@pytest.fixture(scope="module")
def home() -> Path:
    return short_tmpdir("skre-")


@pytest.fixture(scope="module")
def manager(home: Path) -> Iterator[SessionManager]:
    with make_manager(home, isolation="bwrap") as m:
        yield m


@pytest.fixture(scope="module")
def evil(manager: SessionManager) -> Any:
    """A session that wrote hostile file names and a hostile MIME type, and has a
    checkpoint with a hostile label and a cell with raw escapes in its history."""
    s = manager.create(name="evil")
    for code in (PLANT_FILES, HOSTILE_CELL):
        result = s.run(code)
        assert result.ok, result.error
    s.checkpoint(LABEL)
    return s


@pytest.fixture(scope="module")
def dying(manager: SessionManager) -> Any:
    """A session whose kernel died with a hostile last log line."""
    s = manager.create(name="dying")
    with pytest.raises(SessionDead):
        s.run(DIE)
    deadline = time.monotonic() + 30
    while s.info()["status"] != "dead" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "its log ends" in s.info()["reason"]
    return s


def cli(home: Path, *args: str) -> tuple[int, str]:
    """Exit status and stdout + stderr, as bytes would reach a terminal (no newline
    translation: a carriage return must stay one)."""
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home)}
    done = subprocess.run([CLI, *args], env=env, capture_output=True, timeout=120)
    return done.returncode, (done.stdout + done.stderr).decode(errors="backslashreplace")


ARTIFACTS = (*FILES.values(), r"text/x-\x1b[2J-evil")
LABEL_SHOWN = rf"\x1b]0;pwned\x07\n{FORGED}"
CELL_SHOWN = r"\x1b]0;pwned\x07 \u202e"


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("args, escaped", [
    (("artifacts", "evil"), ARTIFACTS),
    (("info", "dying"), (DEATH_SHOWN,)),
    (("list",), ("evil", "dying")),
    (("checkpoint", "evil", "--list"), (LABEL_SHOWN,)),
    (("history", "evil"), (CELL_SHOWN,)),
], ids=["artifacts", "info", "list", "checkpoint-list", "history"])
def test_cli_shows_sandbox_text_escaped(home, evil, dying, args, escaped):
    status, out = cli(home, *args)
    assert status == 0, out
    assert_inert(out, *escaped)


def test_cli_error_quoting_a_dead_kernels_log_is_one_escaped_line(home, dying):
    status, out = cli(home, "run", "dying", "1")
    assert status == 1
    assert_inert(out, DEATH_SHOWN)
    assert len(out.strip().splitlines()) == 1


def test_cli_pause_and_resume_show_variable_names_and_reasons_escaped(home, evil):
    assert evil.run(PLANT_VARIABLE).ok
    status, out = cli(home, "pause", "evil")
    assert status == 0, out
    assert_inert(out, NOT_SAVED)
    status, out = cli(home, "resume", "evil")
    assert status == 0, out
    assert_inert(out, LOST)


# -- %session in IPython, and the widgets -----------------------------------------------------


@pytest.fixture(scope="module")
def shell(manager: SessionManager) -> Any:
    from sandbox_magics import SessionMagics

    ip = start_ipython() or get_ipython()  # one global shell per process
    magics = SessionMagics(ip, manager=manager)
    ip.register_magics(magics)
    return ip, magics


def magic(capsys: Any, ip: Any, line: str) -> str:
    ip.run_line_magic("session", line)
    out = capsys.readouterr()
    return out.out + out.err


@pytest.mark.parametrize("line, escaped", [
    ("artifacts", ARTIFACTS),
    ("info dying", (DEATH_SHOWN,)),
    ("list", ("evil", "dying")),
    ("checkpoint --list", (LABEL_SHOWN,)),
    ("history", (CELL_SHOWN,)),
], ids=["artifacts", "info", "list", "checkpoint-list", "history"])
def test_magic_shows_sandbox_text_escaped(shell, evil, dying, capsys, line, escaped):
    ip, _ = shell
    magic(capsys, ip, "use evil")
    assert_inert(magic(capsys, ip, line), *escaped)


def test_magic_pause_and_resume_show_variable_names_and_reasons_escaped(shell, evil, capsys):
    ip, _ = shell
    magic(capsys, ip, "use evil")
    assert evil.run(PLANT_VARIABLE).ok
    assert_inert(magic(capsys, ip, "pause"), NOT_SAVED)
    assert_inert(magic(capsys, ip, "resume"), LOST)


def test_magic_error_quoting_a_dead_kernels_log_is_escaped(shell, dying, capsys):
    ip, _ = shell
    magic(capsys, ip, "use dying")
    ip.run_cell_magic("session", "", "1")
    out = capsys.readouterr()
    assert_inert(out.out + out.err, DEATH_SHOWN)


def test_info_html_shows_a_dead_kernels_log_escaped(dying):
    from sandbox_kernel.commands import render_info

    assert_inert(render_info(dying.info()).html or "", DEATH_SHOWN)


def test_transfer_widget_shows_file_names_escaped():
    from sandbox_magics.widgets import TransferProgress

    view = TransferProgress("download")
    names = list(FILES)
    view.update({"files": [{"name": n, "bytes_completed": 1, "bytes_total": 1, "status": "done"}
                           for n in names], "bytes_completed": len(names),
                 "bytes_total": len(names), "files_done": len(names),
                 "files_total": len(names), "stats": {}})
    assert_inert("\n".join(row["name"].value for row in view.rows.values()), r"e\rf")


def test_insights_widget_shows_insights_escaped():
    from sandbox_magics.widgets import InsightsView

    view = InsightsView([f"layer {LABEL} <img src=x>"])
    assert_inert(view.children[0].value + view._repr_mimebundle_()["text/plain"],
                 r"\x1b]0;pwned\x07")
    assert "<img" not in view.children[0].value


def test_dashboard_message_shows_a_resume_report_escaped(shell, evil):
    from sandbox_magics.widgets import Dashboard

    _, magics = shell
    assert evil.run(PLANT_VARIABLE).ok
    evil.pause()
    board = Dashboard(magics._dashboard_rows, magics._dashboard_act, refresh=0)
    try:
        board.rows[evil.id]["buttons"]["resume"].click()
        assert_inert(board.message.value, f"could not restore {VARIABLE}: ValueError: ")
    finally:
        board.close()


# -- the function itself ------------------------------------------------------------------------


def test_shown_escapes_every_control_character_and_keeps_the_rest():
    from sandbox_kernel.shown import shown

    every = "".join(RAW) + "\n\t"
    assert_inert(shown(every))
    assert all(c.isprintable() for c in shown(every))
    assert shown("\x1b[2J\r\n\u202e\x7f\x9b\udcff") == r"\x1b[2J\r\n\u202e\x7f\x9b\udcff"
    assert shown("plain, ünïcödé, 数据, emoji 👩‍💻, C:\\path") == (
        "plain, ünïcödé, 数据, emoji 👩‍💻, C:\\path")
    assert shown(shown("\x1b]0;x\x07")) == shown("\x1b]0;x\x07")  # idempotent
    assert shown(None) == "None" and shown(42) == "42"


def test_shown_keeps_newlines_only_when_asked_and_truncates_visibly():
    from sandbox_kernel.shown import shown

    assert shown("one\ntwo\r\nthree\tfour", lines=True) == "one\ntwo\nthree\tfour"
    assert shown("one\ntwo\tx") == r"one\ntwo\tx"
    assert shown("\x1b\n", lines=True) == "\\x1b\n"
    cut = shown("\x1b" * 10, limit=10)
    assert cut.endswith("…") and cut.startswith(r"\x1b\x1b")
    assert len(cut) <= 11 and "\\x1b" * 3 not in cut  # never half an escape
    assert shown("short", limit=10) == "short"
    assert shown("abcdefghijkl", limit=10) == "abcdefghij…"


def test_a_cells_own_output_keeps_colours_and_progress_but_no_other_terminal_control(manager):
    """`sandbox-kernel run` relays the cell's output as a plain kernel would (colours,
    carriage returns for progress bars), but a title, clipboard (OSC 52), cursor or
    device-control sequence is shown escaped, never sent to the terminal."""

    manager.create(name="streamer")
    code = ("print('\\x1b[31mred\\x1b[0m 50%\\r100%'); "
            "print('\\x1b]52;c;cHduZWQ=\\x07\\x1b]0;pwned\\x07\\x1b[2J\\x1bP+q\\x1b\\\\')")
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(manager.home)}
    out = subprocess.run([sys.executable, "-m", "sandbox_kernel.cli", "run", "streamer", code],
                         env=env, capture_output=True, timeout=120).stdout.decode()
    assert "\x1b[31mred\x1b[0m 50%\r100%" in out
    assert "\x1b]" not in out and "\x1b[2J" not in out and "\x1bP" not in out
    assert "\\x1b]52;c;cHduZWQ=\\x07" in out and "\\x1b[2J" in out
