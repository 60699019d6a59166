"""The IPython extension: %session and %%session in a shell and in a kernel, and the widgets.

The shell is a real IPython InteractiveShell (the terminal's text fallbacks); the
kernel is a real ipykernel started by jupyter_client, whose iopub messages carry
the widgets' models (comm_open state). Sessions are real bwrap sandboxes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from IPython import get_ipython
from IPython.testing.globalipapp import start_ipython
from jupyter_client.manager import start_new_kernel

from .conftest import make_manager, needs_bwrap, short_tmpdir

pytestmark = needs_bwrap


@pytest.fixture(scope="module")
def shell():
    home = short_tmpdir("skmag-")
    ip = start_ipython() or get_ipython()  # one global shell per process
    with make_manager(home, isolation="bwrap") as manager:
        from sandbox_magics import SessionMagics

        magics = SessionMagics(ip, manager=manager)
        ip.register_magics(magics)
        yield ip, magics, manager


def run_line(capsys, ip, line: str) -> tuple[str, str]:
    ip.run_line_magic("session", line)
    out = capsys.readouterr()
    return out.out, out.err


def run_cell(capsys, ip, line: str, cell: str) -> tuple[str, str]:
    ip.run_cell_magic("session", line, cell)
    out = capsys.readouterr()
    return out.out, out.err


def test_help_usage_and_one_line_errors(shell, capsys):
    ip, _, _ = shell
    out, _ = run_line(capsys, ip, "help")
    for name in ("new", "use", "pause", "upload", "checkpoint", "dashboard", "insights"):
        assert f"\n  {name} " in out
    out, _ = run_line(capsys, ip, "help pause")
    assert out.startswith("usage:  %session pause [--freeze] [name]")
    _, err = run_line(capsys, ip, "bogus")
    assert err.count("\n") == 1 and "unknown command 'bogus'" in err
    _, err = run_line(capsys, ip, "timeout soon")
    assert err.count("\n") == 1 and "argument seconds: invalid float value" in err
    _, err = run_line(capsys, ip, "info")
    assert "no current session" in err and "Traceback" not in err
    assert "%%session [NAME]" in ip.find_line_magic("session").__doc__


def test_session_cell_runs_in_the_sandbox_with_live_output(shell, capsys):
    ip, magics, manager = shell
    out, _ = run_line(capsys, ip, "new magic-one")
    assert out.startswith("new session magic-one")
    out, err = run_cell(capsys, ip, "--timing --insights",
                        "import os\nprint(os.getcwd(), os.getuid())\nvalue = 6 * 7\nvalue")
    assert "/home/sandbox 1000" in out and "42" in out
    assert "execute" in out and "total" in out  # the timing table
    assert magics.last_timing and "execute" in magics.last_timing
    out, err = run_cell(capsys, ip, "", "1 / 0")
    assert "ZeroDivisionError" in err and "magics.py" not in err
    out, _ = run_cell(capsys, ip, "magic-one", "print(value + 1)")
    assert out == "43\n"
    out, _ = run_line(capsys, ip, "list")
    assert "magic-one" in out and "running" in out and "LEASE" in out
    assert manager.get("magic-one").info()["execution_count"] == 3


def test_lifecycle_commands_from_the_magic(shell, capsys):
    ip, _, manager = shell
    run_line(capsys, ip, "new magic-two")
    run_cell(capsys, ip, "", "data = [1, 2, 3]")
    out, _ = run_line(capsys, ip, "checkpoint --name first")
    assert "first" in out
    run_cell(capsys, ip, "", "data.append(4)")
    out, _ = run_line(capsys, ip, "pause")
    assert out.startswith("paused magic-two")
    assert manager.get_info("magic-two")["status"] == "paused"
    out, _ = run_cell(capsys, ip, "", "print(data)")
    assert out == "[1, 2, 3, 4]\n"
    out, _ = run_line(capsys, ip, "restore first")
    assert "restored" in out
    assert run_cell(capsys, ip, "", "print(data)")[0] == "[1, 2, 3]\n"
    out, _ = run_line(capsys, ip, "history")
    assert "data.append(4)" in out
    out, _ = run_line(capsys, ip, "timeout 120 --on-timeout close")
    assert "lease 120 s" in out and "then close" in out
    out, _ = run_line(capsys, ip, "fork magic-fork")
    assert "forked into magic-fork" in out
    assert run_cell(capsys, ip, "magic-fork", "print(data)")[0] == "[1, 2, 3]\n"
    run_line(capsys, ip, "use magic-two")
    out, _ = run_line(capsys, ip, "close magic-fork")
    assert out == "closed magic-fork\n"


def test_upload_prints_a_text_progress_bar_to_completion(shell, capsys, tmp_path):
    ip, _, manager = shell
    run_line(capsys, ip, "new magic-up")
    data = tmp_path / "blob.bin"
    data.write_bytes(os.urandom(8 << 20))
    out, err = run_line(capsys, ip, f"upload {data}")
    assert err == ""
    assert "100.0%" in out and "1/1 files" in out, out
    assert "uploaded 1 file(s)" in out
    again, _ = run_line(capsys, ip, f"upload {data}")
    assert "1 unchanged" in again
    assert (Path(manager.get("magic-up").info()["work_dir"]) / "blob.bin").stat().st_size == 8 << 20


def test_dashboard_widget_rows_and_buttons(shell, capsys):
    """The dashboard's models, driven as a frontend would: a click on Pause pauses."""
    from sandbox_magics.widgets import Dashboard

    ip, magics, manager = shell
    run_line(capsys, ip, "new magic-dash")
    run_cell(capsys, ip, "", "import threading\nx = 1; lock = threading.Lock()")
    board = Dashboard(magics._dashboard_rows, magics._dashboard_act, refresh=0)
    try:
        target = manager.get("magic-dash").id
        live = {s.id for s in manager.list(status=["running", "paused", "starting", "frozen"])}
        assert set(board.rows) == live
        row = board.rows[target]

        def text(cell: str) -> str:  # a cell's one line: its title, the whole value
            return row["cells"][cell].value.split("title='")[1].split("'")[0]

        assert text("status") == "running" and text("name") == "magic-dash"
        assert "MiB" in text("memory") and text("files") == "0"
        # One column template for the header and every row: headers sit over their values.
        assert row["box"].layout.grid_template_columns == \
            board.header.layout.grid_template_columns
        assert "text-align:right" in row["cells"]["memory"].value
        assert "text-align:left" in row["cells"]["name"].value
        assert all(b.layout.width == "58px" for b in row["buttons"].values())
        row["buttons"]["pause"].click()
        assert manager.get_info("magic-dash")["status"] == "paused"
        assert "magic-dash: paused\nnot saved: lock: TypeError" in board.message.value
        assert text("status") == "paused"
        assert row["buttons"]["pause"].disabled and not row["buttons"]["resume"].disabled
        row["buttons"]["resume"].click()
        assert text("status") == "running"
        row["buttons"]["close"].click()
        assert target not in board.rows
        assert "closed" in board.message.value
        assert "magic-dash" not in board._repr_mimebundle_()["text/plain"]
    finally:
        board.close()


def test_transfer_timing_and_insight_views_hold_the_figures():
    """The views' models, as a frontend receives them: figures in fixed columns, a total
    bar the size of the files' bars, names whole on hover, no dedup figure before it is
    known, and an insights heading that does not run into its text."""
    from sandbox_magics.widgets import InsightsView, TimingView, TransferProgress

    view = TransferProgress("upload")
    name = "a-rather-long-directory-name/and-a-long-file-name.bin"
    files = [{"name": name, "bytes_completed": 50, "bytes_total": 100, "status": "hashing"}]
    view.update({"files": files, "bytes_completed": 50, "bytes_total": 100, "files_done": 0,
                 "files_total": 1, "stats": {"bytes_stored": 0, "chunks_reused": 0}})
    row = view.rows[name]
    assert row["bar"].value == 0.5 and view.total.value == 0.5
    assert "ETA" in view.summary.value and "dedup" not in view.summary.value  # not known yet
    assert f"title='{name}'" in row["name"].value and "text-overflow:ellipsis" in \
        row["name"].value
    file_row, total_row = view.files.children[0], view.children[2]
    assert file_row.layout.grid_template_columns == total_row.layout.grid_template_columns
    assert row["bar"] in file_row.children and view.total in total_row.children
    assert row["bar"].layout.width == view.total.layout.width == "auto"  # both fill a column
    assert "text-align:right" in row["bytes"].value
    files[0].update(bytes_completed=100, status="done")
    view.update({"files": files, "bytes_completed": 100, "bytes_total": 100, "files_done": 1,
                 "files_total": 1, "stats": {"bytes_stored": 20, "chunks_reused": 3}})
    assert row["bar"].value == 1.0 and row["bar"].bar_style == "success"
    assert view.total.value == 1.0 and view.total.bar_style == "success"
    assert ("newly stored: 20 B, 80 B saved by dedup and compression (3 chunks reused, "
            "0 files unchanged)") in view.summary.value

    timing = TimingView({"resume": 0.9, "execute": 0.1, "total": 1.0})
    assert timing.shares == {"resume": 90.0, "execute": 10.0}
    table = timing.children[2].value
    assert "table-layout:fixed" in table and "<col style='width:96px'>" in table
    assert "text-align:right'>900.0 ms</td>" in table and "text-align:right'>90.0%</td>" in table
    bundle = timing._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "resume" in bundle["text/plain"] and "90.0%" in bundle["text/plain"]
    insights = InsightsView(["resume took 0.9 s"])
    assert "<li style='line-height:1.4'>resume took 0.9 s</li>" in insights.children[0].value
    none = InsightsView([]).children[0].value
    assert none.startswith("<div><b>insights</b></div><div>")  # was "insightsno insights"


def test_magics_in_a_kernel_show_widgets_with_text_fallbacks(tmp_path):
    home = short_tmpdir("skmagk-")
    env = {**os.environ, "SANDBOX_KERNEL_HOME": str(home)}
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    try:
        def execute(code: str) -> list[dict]:
            msgs: list[dict] = []
            reply = kc.execute_interactive(code, timeout=120, output_hook=msgs.append)
            assert reply["content"]["status"] == "ok", reply["content"]
            return msgs

        execute("%load_ext sandbox_magics")
        msgs = execute("%session new k-one")
        assert "new session k-one" in "".join(m["content"].get("text", "") for m in msgs)
        msgs = execute("%%session --timing\nprint('inside', 6 * 7)")
        assert "inside 42\n" in [m["content"].get("text") for m in msgs]
        shown = [m for m in msgs if m["msg_type"] == "display_data"]
        assert "application/vnd.jupyter.widget-view+json" in shown[-1]["content"]["data"]
        assert "execute" in shown[-1]["content"]["data"]["text/plain"]
        data = tmp_path / "up.bin"
        data.write_bytes(os.urandom(4 << 20))
        msgs = execute(f"%session upload {data}")
        opened = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in msgs
                  if m["msg_type"] == "comm_open"}
        total = [cid for cid, st in opened.items()
                 if st.get("_model_name") == "FloatProgressModel"
                 and "sk-transfer-total" in st.get("_dom_classes", [])]
        assert len(total) == 1, "the upload's total bar"
        values = [m["content"]["data"]["state"]["value"] for m in msgs
                  if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == total[0]
                  and "value" in m["content"]["data"].get("state", {})]
        assert values and values[-1] == 1.0, values
        msgs = execute("%session dashboard --refresh 0")
        buttons = [s["description"] for s in (m["content"]["data"]["state"] for m in msgs
                   if m["msg_type"] == "comm_open") if s.get("_model_name") == "ButtonModel"]
        assert buttons == ["pause", "resume", "renew", "close"]
        board = [m for m in msgs if m["msg_type"] == "display_data"][-1]["content"]["data"]
        assert "k-one" in board["text/plain"] and "<table>" in board["text/html"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        with make_manager(home):
            pass  # closes the kernel's sessions


def test_host_paths_are_the_users_own_unless_confined(shell, capsys, tmp_path, monkeypatch):
    """A host IPython's cells have the user's rights, so its %session lines do too; with
    confine_host_paths they keep to the notebook's directory and ask before leaving it."""
    ip, magics, _ = shell
    run_line(capsys, ip, "new magic-paths")
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's own file")
    out, err = run_line(capsys, ip, f"upload {outside}")
    assert "uploaded 1 file(s)" in out, err
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "inside.txt").write_text("inside")
    monkeypatch.chdir(tmp_path / "nb")
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    prompts: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt: prompts.append(prompt) or "n")
    magics.confine_host_paths = True
    try:
        _, err = run_line(capsys, ip, f"upload {outside} --dest again.txt")
        assert err.strip() == (f"%session upload: {outside}, outside this notebook's "
                               "directory: not allowed")
        assert prompts == [f"allow %session upload to read {outside}, outside this "
                           "notebook's directory? [y/N] "]
        out, err = run_line(capsys, ip, "upload inside.txt")
        assert "uploaded 1 file(s)" in out, err
    finally:
        magics.confine_host_paths = False
    run_line(capsys, ip, "close magic-paths")


def test_insights_name_the_figures_they_rest_on(shell, capsys):
    from sandbox_kernel.timing import run_insights, transfer_insights

    slow_resume = run_insights({"resume": 1.5, "execute": 0.01, "total": 1.52})
    assert len(slow_resume) == 1 and "1.50 s of 1.52 s" in slow_resume[0]
    assert "mode='freeze'" in slow_resume[0]
    assert run_insights({"execute": 1.5, "total": 1.5}) == []  # the user's own code: no advice
    upload = transfer_insights({"bytes_hashed": 900 << 20}, 4.0, 1000 << 20)
    assert "90% of its 1000.0 MiB" in upload[0] and "4.00 s" in upload[0]
    assert "`%session upload`" in upload[0] and "create(" not in upload[0]
    assert transfer_insights({"bytes_hashed": 0}, 4.0, 1000 << 20) == []  # all cached
    ip, magics, _ = shell
    magics.last_timing = {"resume": 1.5, "execute": 0.01, "total": 1.52}
    out, _ = run_line(capsys, ip, "insights")
    assert out.startswith("insight: resuming the paused session took 1.50 s")
    # What to do, as the %session command to run (it named the API's mode= and set_timeout).
    assert "`%session pause --freeze`" in out and "`%session timeout SECONDS`" in out, out
    assert "mode=" not in out and "set_timeout(" not in out


def test_pause_sums_up_widgets_and_resume_says_what_it_did(shell, capsys):
    """Widgets cannot be pickled in any notebook: a pause names them in one line, not one
    line each (the unpicklable lock keeps its own line and reason). A resume of a running
    session says it had nothing to do (it said "resumed from checkpoint None")."""
    ip, _, manager = shell
    run_line(capsys, ip, "new magic-live")
    _, err = run_cell(capsys, ip, "", (
        "import threading\nimport ipywidgets as w\nfrom ipywidgets import interact\n"
        "button = w.Button(description='go'); out = w.Output()\n"
        "shown = interact(lambda n: print(n), n=(0, 100))\n"
        "lock = threading.Lock(); data = [1, 2, 3]\n"))
    assert err == ""
    out, err = run_line(capsys, ip, "resume")
    assert out == "the session is running already: nothing to resume\n", (out, err)
    out, err = run_line(capsys, ip, "pause")
    lines = out.splitlines()
    assert lines[0].startswith("paused magic-live in ") and "`%session resume`" in lines[0]
    assert lines[1:] == [
        "not saved: lock: TypeError: cannot pickle '_thread.lock' object (a resume replays "
        "the cells that made it)",
        "not saved: button, out, shown: widgets and display objects live in the kernel only "
        "(no notebook can pickle them); a resume replays the cells that made them"], out
    out, _ = run_line(capsys, ip, "resume")
    rebuilt = [line for line in out.splitlines() if line.startswith("rebuilt")]
    # One line for all four (their order follows the capture's, which groups may change).
    assert len(rebuilt) == 1 and rebuilt[0].endswith(" by replaying cells [1]"), out
    names = rebuilt[0].removeprefix("rebuilt ").removesuffix(" by replaying cells [1]")
    assert sorted(names.split(", ")) == ["button", "lock", "out", "shown"], out
    out, _ = run_cell(capsys, ip, "", "print(data, type(button).__name__, type(lock).__name__)")
    assert out == "[1, 2, 3] Button lock\n"
    assert manager.get_info("magic-live")["status"] == "running"
    run_line(capsys, ip, "close magic-live")


def test_a_failed_new_frees_its_name_and_hints_name_session_commands(shell, capsys):
    """`%session new NAME` that fails (here: a package no index has) leaves no dead session
    holding NAME, and every hint names the %session command to run, never the Python API
    (get()) or the CLI (`sandbox-kernel ...`)."""
    ip, _, manager = shell
    installer = manager.installer
    saved = (installer.find_links, installer.no_index, installer.offline)
    installer.find_links, installer.no_index, installer.offline = [], True, True
    try:
        _, err = run_line(capsys, ip, "new magic-fail --packages skdemo-nowhere")
    finally:
        installer.find_links, installer.no_index, installer.offline = saved
    assert err.startswith("%session new: the session could not be started: "), err
    assert err.rstrip().endswith("nothing of it was kept, so `%session new magic-fail` can "
                                 "try again"), err
    assert [r["status"] for r in manager.registry.matches("magic-fail")] in ([], ["closed"])
    out, err = run_line(capsys, ip, "new magic-fail")
    assert out.startswith("new session magic-fail"), err
    _, err = run_line(capsys, ip, "new magic-fail")
    assert "session magic-fail already exists" in err
    assert "`%session use magic-fail` makes it current" in err
    _, err = run_line(capsys, ip, "use ghost")
    assert err.strip() == "%session: no session 'ghost'; `%session list` shows the sessions"
    run_cell(capsys, ip, "", "import os; os._exit(3)")  # the sandbox's kernel dies
    _, err = run_cell(capsys, ip, "", "print('still there?')")
    assert "session 'magic-fail' is dead" in err and "`%session close magic-fail`" in err, err
    for said in (err, *(run_line(capsys, ip, line)[1] for line in ("new magic-fail",
                                                                   "use ghost"))):
        assert "sandbox-kernel" not in said and "get(" not in said, said
    run_line(capsys, ip, "close magic-fail")
