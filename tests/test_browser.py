"""JupyterLab in headless Chromium: pick "Python 3 (sandbox)", run cells, see their output.

Screenshots go to ``test-artifacts/`` so a person can look at what the browser showed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, short_tmpdir
from .jupyter_server import jupyter_process

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def lab(kernel_home) -> Iterator[dict]:
    root = short_tmpdir("sklab-")
    # No "get notified about Jupyter news?" toast over the screenshots' outputs.
    settings = root / ".config/lab/user-settings/@jupyterlab/apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    with jupyter_process("jupyterlab", root, "--LabApp.expose_app_in_browser=True",
                         "--ServerApp.disable_check_xsrf=True") as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _notebook(path: Path, cells: list[str]) -> None:
    path.write_text(json.dumps({
        "cells": [{"cell_type": "code", "source": src, "metadata": {}, "outputs": [],
                   "execution_count": None} for src in cells],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
    }))


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def run_all(browser, lab: dict, notebook: str, kernel_label: str, kernel_name: str,
            viewport: dict, dialog_shot: str | None = None):
    """Open ``notebook`` in JupyterLab, pick the kernel in its dialog, run every cell."""
    page = browser.new_page(viewport=viewport)
    page.goto(f"{lab['base']}/lab/tree/{notebook}?token={lab['token']}")
    pick_kernel(page, notebook, kernel_label, kernel_name, dialog_shot)
    # Not awaited: the command's promise ends when every cell has, and a cell that never
    # ends would hold the test until pytest's timeout; the callers wait for what they need.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    return page


def pick_kernel(page, notebook: str, kernel_label: str, kernel_name: str,
                dialog_shot: str | None = None) -> None:
    """Answer the kernel dialog of ``notebook`` (just opened) and wait for its kernel."""
    page.wait_for_selector(".jp-Dialog", timeout=60_000)
    if dialog_shot:
        screenshot(page, dialog_shot)
    dialog = page.locator(".jp-Dialog")
    dialog.locator("select").select_option(label=kernel_label)
    dialog.locator("button.jp-mod-accept").click()
    page.wait_for_function(
        "() => { const w = window.jupyterapp.shell.currentWidget;"
        f" return w?.context?.path === {notebook!r}"
        f" && w?.sessionContext?.session?.kernel?.name === {kernel_name!r}; }}",
        timeout=60_000)


def test_lab_runs_cells_in_the_sandbox_kernel(lab, browser):
    _notebook(lab["root"] / "browser.ipynb", [
        "import os\nprint('sandbox says', 6 * 7, 'from', os.getcwd())",
        "import io, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "from IPython.display import Image\nfig, ax = plt.subplots(figsize=(3, 2))\n"
        "ax.plot([1, 3, 2])\nbuf = io.BytesIO(); fig.savefig(buf, format='png')\n"
        "Image(buf.getvalue())",
    ])
    page = run_all(browser, lab, "browser.ipynb", "Python 3 (sandbox)", "sandbox-python",
                   viewport={"width": 1280, "height": 900}, dialog_shot="lab-kernel-dialog")
    page.wait_for_selector("text=sandbox says 42 from /home/sandbox", timeout=120_000)
    page.wait_for_selector(".jp-OutputArea-output img", timeout=120_000)
    shot = screenshot(page, "lab-sandbox-kernel")
    assert shot.stat().st_size > 10_000
    text = page.inner_text(".jp-NotebookPanel")
    assert "sandbox says 42 from /home/sandbox" in text
    img = page.locator(".jp-OutputArea-output img").first
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    assert img.evaluate("i => i.naturalWidth") > 100
    page.close()


LONG_NAME = "a-session-whose-name-is-longer-than-its-column"


def test_lab_magics_dashboard_progress_and_session_cells(lab, browser, kernel_home):
    """The extension in a plain ipykernel notebook: %%session output with its timing and
    insights, an upload's bars, and the dashboard, whose Pause button pauses the session.
    Each widget's layout is measured in the page: columns (headers over their values),
    right-aligned figures, a long name cut with the whole name on hover, buttons whose
    words fit, a total bar as long as the files' bars and full when the upload is done."""
    from sandbox_kernel import SessionManager

    blob = lab["root"] / "blob.bin"
    blob.write_bytes(os.urandom(16 << 20))
    other = lab["root"] / "an-input-file-whose-name-is-longer-than-its-column.csv"
    other.write_text("a,b\n1,2\n" * 1000)
    _notebook(lab["root"] / "magics.ipynb", [
        "%load_ext sandbox_magics",
        "%session new lab-one",
        "%%session --timing --insights\nprint('hello from the sandbox', 6 * 7)",
        f"%session upload {blob} {other}",
        f"%session new {LONG_NAME}",
        "%session use lab-one",
        "%session dashboard --refresh 1",
    ])
    page = run_all(browser, lab, "magics.ipynb", "Python 3 (ipykernel)", "python3",
                   viewport={"width": 1400, "height": 1300})
    page.wait_for_selector("text=hello from the sandbox 42", timeout=120_000)
    cells = page.locator(".jp-NotebookPanel:visible .jp-Cell")

    # Timing and insights: the figures in right-aligned columns; a heading on its own line.
    timing = cells.nth(2).locator(".jp-OutputArea-output table").first
    timing.wait_for(timeout=60_000)
    assert timing.evaluate("t => Array.from(t.querySelectorAll('tr'))"
                           ".slice(1).map(r => getComputedStyle(r.cells[2]).textAlign)"
                           ".every(a => a === 'right')")
    insights = cells.nth(2).locator(".widget-html:has-text('insights')").last.inner_text()
    assert insights.startswith("insights\n"), insights  # it read "insightsno insights"
    shot = cells.nth(2).locator(".jp-Cell-outputWrapper")
    shot.screenshot(path=str(ARTIFACTS / "lab-magics-timing-insights.png"))

    # The upload: every bar in one column, the total as long as the files' bars, and full.
    total = page.locator(".sk-transfer-total .progress-bar[style*='width: 100%']")
    total.wait_for(timeout=120_000)
    upload = cells.nth(3).locator(".jp-OutputArea-output").first
    page.wait_for_function(
        "el => el.innerText.includes('saved by dedup and compression')",
        arg=upload.element_handle(),
        timeout=60_000)
    bars = upload.locator(".progress").evaluate_all(
        "bs => bs.map(b => { const r = b.getBoundingClientRect();"
        " return [Math.round(r.x), Math.round(r.width)]; })")
    assert len(bars) == 3 and len(set(map(tuple, bars))) == 1, bars  # two files and the total
    cut = upload.locator(f"div[title='{other.name}']")
    assert cut.evaluate("d => d.scrollWidth > d.clientWidth"), "the long name is cut"
    assert cut.inner_text() == other.name  # ...with an ellipsis the page draws, not the text
    upload.screenshot(path=str(ARTIFACTS / "lab-magics-upload.png"))

    session_id = SessionManager(home=str(kernel_home)).get("lab-one").id
    long_id = SessionManager(home=str(kernel_home)).get(LONG_NAME).id
    row = page.locator(f".sk-session-{session_id}")
    row.wait_for(timeout=120_000)
    page.locator(f".sk-session-{long_id}").wait_for(timeout=60_000)
    assert "running" in row.inner_text()
    _assert_dashboard_columns(page, session_id, long_id)
    board = cells.nth(6).locator(".jp-OutputArea-output").first
    board.screenshot(path=str(ARTIFACTS / "lab-magics-dashboard-widget.png"))
    screenshot(page, "lab-magics-dashboard")
    row.locator("button", has_text="pause").click()
    manager = SessionManager(home=str(kernel_home))
    deadline = time.monotonic() + 60
    while manager.get_info(session_id)["status"] != "paused" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert manager.get_info(session_id)["status"] == "paused"
    page.wait_for_function(
        f"() => document.querySelector('.sk-session-{session_id}')?.innerText"
        ".includes('paused')", timeout=30_000)
    _assert_dashboard_columns(page, session_id, long_id)
    shot = screenshot(page, "lab-magics-dashboard-paused")
    assert shot.stat().st_size > 10_000
    page.close()


def _assert_dashboard_columns(page, *session_ids: str) -> None:
    """Every header sits over its values (same left edge and width), figures are right-
    aligned, a row is one line high, no button's word is cut, and the long name is cut
    with an ellipsis and whole in its title."""
    geometry = page.evaluate(
        "ids => { const box = el => { const r = el.getBoundingClientRect();"
        " return [Math.round(r.x), Math.round(r.width)]; };"
        " const row = el => Array.from(el.children).slice(0, 10).map(c => box(c));"
        " const head = document.querySelector('.sk-dashboard-header');"
        " return {head: row(head), rows: ids.map(i => row("
        "   document.querySelector('.sk-session-' + i)))}; }", list(session_ids))
    for values in geometry["rows"]:
        assert values == geometry["head"], geometry
    checks = page.evaluate(
        "ids => ids.map(i => { const r = document.querySelector('.sk-session-' + i);"
        " const cells = Array.from(r.children).slice(0, 10)"
        "  .map(c => c.querySelector('div[style*=ellipsis]'));"
        " return {height: r.getBoundingClientRect().height,"
        "  align: cells.map(d => getComputedStyle(d).textAlign),"
        "  cutButtons: Array.from(r.querySelectorAll('button'))"
        "   .filter(b => b.scrollWidth > b.clientWidth).map(b => b.innerText),"
        "  name: [cells[0].title, cells[0].scrollWidth > cells[0].clientWidth]}; })",
        list(session_ids))
    for check in checks:
        assert check["height"] < 40, check  # one line: nothing wraps
        assert check["align"] == ["left"] * 3 + ["right"] * 7, check
        assert check["cutButtons"] == [], check
    assert checks[-1]["name"] == [LONG_NAME, True], checks[-1]


def _drag_to_end(page, slider) -> None:
    """Drag ``slider``'s handle past the end of its track, as a person would."""
    handle = slider.locator(".noUi-handle").bounding_box()
    track = slider.locator(".noUi-target").bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] + 30, handle["y"] + handle["height"] / 2,
                    steps=8)
    page.mouse.up()


def test_lab_widget_callbacks_print_into_their_outputs(lab, browser):
    """Issue 17, item 1, in the sandbox kernel: what a widget's callback prints shows in the
    notebook. The slider of ``interact(lambda n: print(n), n=(0, 100))`` prints its value
    again when it moves, and a Button's on_click writes into an Output. (A comm message's
    idle came before the callback's output, and JupyterLab drops output after idle.)"""
    _notebook(lab["root"] / "callbacks.ipynb", [
        "from ipywidgets import interact\ninteract(lambda n: print(n), n=(0, 100));",
        "import ipywidgets as w\nbutton = w.Button(description='write')\n"
        "out = w.Output()\n\ndef clicked(_):\n    with out:\n"
        "        print('the button wrote this')\n\nbutton.on_click(clicked)\n"
        "display(button, out)",
        "import time\nslow = w.Button(description='slow'); slow_out = w.Output()\n\n"
        "def slowly(_):\n    time.sleep(1)\n    with slow_out:\n"
        "        print('the slow button wrote this')\n\nslow.on_click(slowly)\n"
        "display(slow, slow_out)",
        "print('ran after the click')",
    ])
    page = run_all(browser, lab, "callbacks.ipynb", "Python 3 (sandbox)", "sandbox-python",
                   viewport={"width": 1280, "height": 900})
    cells = page.locator(".jp-NotebookPanel:visible .jp-Cell")
    printed = cells.nth(0).locator(".widget-interact .widget-output")
    page.wait_for_function("el => el.innerText.trim() === '50'",
                           arg=printed.element_handle(timeout=120_000), timeout=120_000)
    _drag_to_end(page, cells.nth(0).locator(".widget-slider"))
    page.wait_for_function("el => el.innerText.trim() === '100'",
                           arg=printed.element_handle(), timeout=60_000)
    button = cells.nth(1).locator(".widget-button:has-text('write')")
    button.wait_for(timeout=60_000)
    button.click()
    written = cells.nth(1).locator(".widget-output")
    page.wait_for_function("el => el.innerText.includes('the button wrote this')",
                           arg=written.element_handle(), timeout=60_000)
    assert printed.inner_text().strip() == "100"
    assert written.inner_text().strip() == "the button wrote this"
    # A callback still running when the next cell is run: as in a plain kernel, its output
    # lands in its Output, and the cell's in the cell, whatever the order they end in.
    wait_cell_done(page, 3)
    cells.nth(2).locator(".widget-button:has-text('slow')").click()
    run_cell(page, 3)
    slow_out = cells.nth(2).locator(".widget-output")
    page.wait_for_function("el => el.innerText.includes('the slow button wrote this')",
                           arg=slow_out.element_handle(), timeout=60_000)
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.content.widgets[3].model"
        ".executionCount > 4", timeout=60_000)
    assert cell_output(page, 3).strip() == "ran after the click"
    assert slow_out.inner_text().strip() == "the slow button wrote this"
    shot = screenshot(page, "lab-widget-callbacks")
    assert shot.stat().st_size > 10_000
    page.close()


def test_lab_session_tables_in_the_sandbox_kernel(lab, browser):
    """The sandbox kernel shows %session dashboard, timing and history as HTML tables
    (widgets need the extension): names left, figures right under their headers (JupyterLab
    right-aligned every cell), a long cell cut with its whole text on hover."""
    _notebook(lab["root"] / "tables.ipynb", [
        "x = sum(range(10**6)); print('summed')",
        "%session dashboard",
        "%session timing",
        "%session history",
    ])
    page = run_all(browser, lab, "tables.ipynb", "Python 3 (sandbox)", "sandbox-python",
                   viewport={"width": 1280, "height": 900})
    for i in range(4):
        wait_cell_done(page, i)
    cells = page.locator(".jp-NotebookPanel:visible .jp-Cell")
    board = cells.nth(1).locator(".jp-OutputArea-output table")
    align = board.evaluate("t => Array.from(t.rows).map(r => Array.from(r.cells)"
                           ".map(c => getComputedStyle(c).textAlign[0]).join(''))")
    assert set(align) == {"lllrrrrrrr"}, align  # name, status, language; then the figures
    history = cells.nth(3).locator(".jp-OutputArea-output table")
    code = history.locator("td[title]").first
    assert code.get_attribute("title") == "x = sum(range(10**6)); print('summed')"
    assert code.evaluate("c => c.scrollWidth > c.clientWidth")  # cut, with an ellipsis
    shot = screenshot(page, "lab-session-tables")
    assert shot.stat().st_size > 10_000
    page.close()


def _pwn(flag: str) -> str:
    """JavaScript an attacker's output would run: a flag on the page, and a file written on
    the host through the server's API with the page's token (as issue 16's probe did)."""
    return (f"window.__sk_{flag} = 1; var s = window.jupyterapp.serviceManager.serverSettings;"
            f"fetch(s.baseUrl + 'api/contents/pwned-{flag}.txt', {{method: 'PUT', headers: "
            "{Authorization: 'token ' + s.token}, body: JSON.stringify({type: 'file', "
            "format: 'text', content: 'pwned'})})")


def test_lab_runs_no_script_from_the_sandbox_and_still_shows_tables_plots_widgets(lab, browser):
    """Security issue 16 in a real JupyterLab: JavaScript output, an <img onerror>, raw HTML
    in markdown and an HTML widget's handler do not run (no flag on the page, no file on
    the host), and a note says what was held back; a pandas table, a matplotlib figure, a
    slider with interact and a Button with an Output still work."""
    flags = ("js", "img", "md", "widget")

    def onerror(flag: str) -> str:
        return repr(f'<img src=x onerror="{_pwn(flag)}">')

    cells = [
        f"display({{'application/javascript': {_pwn('js')!r}}}, raw=True)",
        "from IPython.display import HTML, Markdown\n"
        f"HTML('<b>html kept</b>' + {onerror('img')})",
        f"Markdown('**markdown** ' + {onerror('md')})",
        f"import ipywidgets as w\nw.HTML('<i>widget kept</i>' + {onerror('widget')})",
        "import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'rain_mm': [763, 6]})",
        "%matplotlib inline\nimport matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(figsize=(3, 2)); ax.plot([1, 3, 2]); plt.show()",
        "from ipywidgets import interact\n@interact(x=(0, 10))\n"
        "def double(x=3):\n    print('double is', x * 2)",
        "b = w.Button(description='press me'); out = w.Output()\n"
        "b.on_click(lambda _: out.append_stdout('button pressed\\n'))\ndisplay(b, out)",
    ]
    _notebook(lab["root"] / "policy.ipynb", cells)
    page = run_all(browser, lab, "policy.ipynb", "Python 3 (sandbox)", "sandbox-python",
                   viewport={"width": 1280, "height": 1600})
    page.wait_for_selector(".widget-button:has-text('press me')", timeout=180_000)
    page.wait_for_selector("text=double is 6", timeout=60_000)
    time.sleep(2)  # what a script would do happens at render time; give it every chance
    ran = page.evaluate(f"() => {[f'__sk_{f}' for f in flags]!r}.filter(n => n in window)")
    written = [f for f in flags if (lab["root"] / f"pwned-{f}.txt").exists()]
    assert ran == [] and written == [], (ran, written)

    # The slider dragged to its end: the sandbox runs the function, its Output updates.
    handle = page.locator(".widget-slider .noUi-handle").first.bounding_box()
    track = page.locator(".widget-slider .noUi-target").first.bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] + 30, handle["y"] + handle["height"] / 2,
                    steps=8)
    page.mouse.up()
    page.wait_for_selector("text=double is 20", timeout=60_000)
    page.locator(".widget-button:has-text('press me')").click()
    page.wait_for_selector("text=button pressed", timeout=60_000)
    shot = screenshot(page, "lab-output-policy")
    assert shot.stat().st_size > 10_000
    panel = page.locator(".jp-NotebookPanel:visible")  # earlier tests' notebooks are restored
    text = panel.inner_text()
    assert "application/javascript output blocked" in text
    assert "text/markdown with HTML or non-web links shown as text" in text
    assert "html kept" in text and "widget kept" in text
    assert text.count("scripts, event handlers or frames were removed") >= 2
    table = panel.locator(".jp-OutputArea-output table.dataframe")
    assert table.count() == 1 and "Oslo" in table.inner_text()
    # pandas' own <style> block is in the page, its rules parsed.
    rules = panel.locator(".jp-OutputArea-output style").first.evaluate(
        "s => Array.from(s.sheet.cssRules).map(r => r.selectorText)")
    assert ".dataframe thead th" in rules, rules
    img = panel.locator(".jp-OutputArea-output img[src^='data:image/png']").first
    assert img.evaluate("i => i.naturalWidth") > 100
    table.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "lab-output-policy-table.png"),
                    clip=_around(table.bounding_box(), img.bounding_box()))
    page.close()


def _around(*boxes: dict | None) -> dict:
    """The rectangle holding ``boxes`` (page coordinates), with a margin."""
    found = [b for b in boxes if b]
    x0 = max(0, min(b["x"] for b in found) - 40)
    y0 = max(0, min(b["y"] for b in found) - 40)
    x1 = max(b["x"] + b["width"] for b in found) + 40
    y1 = max(b["y"] + b["height"] for b in found) + 40
    return {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}


def run_cell(page, index: int) -> None:
    """Run cell ``index`` of the current notebook, as Shift+Enter on it would."""
    page.evaluate("i => { const nb = window.jupyterapp.shell.currentWidget.content;"
                  " nb.activeCellIndex = i;"
                  " window.jupyterapp.commands.execute('notebook:run-cell'); }", index)
    # Not awaited: the run may wait on an input box the test answers next.


def cell_output(page, index: int) -> str:
    return page.locator(".jp-NotebookPanel:visible .jp-Cell").nth(index).locator(
        ".jp-OutputArea").inner_text()


def wait_cell_done(page, index: int, timeout: int = 120_000) -> None:
    """Until cell ``index`` of the current notebook has an execution count (its run ended)."""
    page.wait_for_function(
        "i => { const m = window.jupyterapp.shell.currentWidget.content.widgets[i].model;"
        " return typeof m.executionCount === 'number'; }", arg=index, timeout=timeout)


def test_lab_notebook_session_lines_keep_to_its_directory_and_its_own_sessions(
        lab, browser, kernel_home):
    """Issue 16 in a real JupyterLab: ``%session upload`` of a file outside the notebook's
    directory asks in the lab's input box; typing n refuses it and nothing reaches the
    sandbox. A second notebook's ``%session list`` does not show the first one's session."""
    from sandbox_kernel.registry import Registry

    secret = short_tmpdir("sksecret-") / "secret-token.txt"
    secret.write_text("host secret 7f3a\n")
    _notebook(lab["root"] / "rights-a.ipynb", [
        f"%session upload {secret} --dest secret-copy.txt",
        "import os; print('copied:', os.path.exists('secret-copy.txt'))",
    ])
    _notebook(lab["root"] / "rights-b.ipynb", ["%session list"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{lab['base']}/lab/tree/rights-a.ipynb?token={lab['token']}")
    pick_kernel(page, "rights-a.ipynb", "Python 3 (sandbox)", "sandbox-python")
    run_cell(page, 0)
    box = page.locator(".jp-NotebookPanel:visible .jp-Stdin-input")
    box.wait_for(timeout=120_000)
    prompt = page.locator(".jp-NotebookPanel:visible .jp-Stdin-prompt").inner_text()
    assert (f"allow %session upload to read {secret}, outside this notebook's directory? "
            "[y/N]") in prompt, prompt
    box.fill("n")
    screenshot(page, "lab-session-upload-asked")
    box.press("Enter")
    wait_cell_done(page, 0)
    run_cell(page, 1)
    wait_cell_done(page, 1)
    page.wait_for_selector(".jp-NotebookPanel:visible :text('copied: ')", timeout=60_000)
    refused, checked = cell_output(page, 0), cell_output(page, 1)
    assert f"%session upload: {secret}, outside this notebook's directory: not allowed" \
        in refused, refused
    assert "uploaded" not in refused and "7f3a" not in refused
    assert checked.strip() == "copied: False", checked
    screenshot(page, "lab-session-upload-refused")

    # The second notebook, open beside the first with its own sandbox kernel.
    page.evaluate("window.jupyterapp.commands.execute('docmanager:open',"
                  " {path: 'rights-b.ipynb'})")
    pick_kernel(page, "rights-b.ipynb", "Python 3 (sandbox)", "sandbox-python")
    run_cell(page, 0)
    wait_cell_done(page, 0)
    page.wait_for_selector(".jp-NotebookPanel:visible .jp-OutputArea-output", timeout=60_000)
    listed = cell_output(page, 0)
    names = [s["name"] for s in Registry(Path(kernel_home) / "registry.db").sessions()]
    a_names = [n for n in names if n.startswith("rights-a-")]
    b_names = [n for n in names if n.startswith("rights-b-")]
    assert a_names and b_names, names  # both notebooks have their session
    assert b_names[0] in listed, listed
    assert not any(n in listed for n in a_names), listed  # before issue 16: every session
    screenshot(page, "lab-session-list-own")
    page.close()


def test_lab_forged_payload_does_not_change_a_cell(lab, browser):
    """Issue 16 in a real JupyterLab: code in the sandbox asking, through a payload, to put
    a ``%session download`` line in place of the cell changes no cell; a note says so."""
    source = ("get_ipython().set_next_input('%session download x --to /tmp/pwned', "
              "replace=True)\nprint('payload sent')")
    _notebook(lab["root"] / "payload.ipynb", [source, "print('next cell')"])
    page = run_all(browser, lab, "payload.ipynb", "Python 3 (sandbox)", "sandbox-python",
                   viewport={"width": 1280, "height": 900})
    page.wait_for_selector("text=next cell", timeout=120_000)
    wait_cell_done(page, 0)
    wait_cell_done(page, 1)
    time.sleep(1)  # a payload is acted on when the reply comes; give it every chance
    sources = page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.content.widgets"
        ".map(c => c.model.sharedModel.getSource())")
    assert sources == [source, "print('next cell')"], sources
    assert not any("%session download" in s for s in sources[1:])
    out = cell_output(page, 0)
    assert "payload sent" in out and "asked to put text into the next cell; refused" in out, out
    shot = screenshot(page, "lab-payload-refused")
    assert shot.stat().st_size > 10_000
    page.close()


def test_lab_rename_shut_down_and_reopen_keeps_the_variables(lab, browser):
    """Issue 17, item 3: JupyterLab's rename (the first save asks for a name), then the
    kernel shut down and the notebook opened again under its new name: ``x`` is there,
    and the notebook says which session it kept."""
    _notebook(lab["root"] / "Untitled-rename.ipynb", ["x = 41", "x + 1"])
    page = run_all(browser, lab, "Untitled-rename.ipynb", "Python 3 (sandbox)",
                   "sandbox-python", viewport={"width": 1280, "height": 900})
    wait_cell_done(page, 1)
    assert cell_output(page, 1).splitlines()[-1] == "42"
    page.evaluate("""async () => {
        const app = window.jupyterapp;
        await app.commands.execute('docmanager:save');
        await app.serviceManager.contents.rename('Untitled-rename.ipynb',
                                                  'experiment.ipynb');
    }""")
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget?.context?.path === 'experiment.ipynb'",
        timeout=60_000)
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
    page.close()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{lab['base']}/lab/tree/experiment.ipynb?token={lab['token']}")
    page.wait_for_function(
        "() => { const w = window.jupyterapp?.shell?.currentWidget;"
        " return w?.context?.path === 'experiment.ipynb'"
        " && w?.sessionContext?.session?.kernel?.name === 'sandbox-python'; }",
        timeout=120_000)
    page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets[1].model"
                  ".sharedModel.setSource('print(x + 1)')")
    run_cell(page, 1)
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.content.widgets[1].model"
        ".executionCount > 2", timeout=120_000)
    text = cell_output(page, 1)
    assert "42" in text.splitlines(), text
    assert "renamed from Untitled-rename.ipynb: this notebook keeps its session" in text, text
    shot = screenshot(page, "lab-rename-reopen")
    assert shot.stat().st_size > 10_000
    page.close()
