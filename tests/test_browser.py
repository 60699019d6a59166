"""JupyterLab in headless Chromium: pick "Python 3 (sandbox)", run cells, see their output.

Screenshots go to ``test-artifacts/`` so a person can look at what the browser showed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, short_tmpdir

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(kernel_home) -> Iterator[dict]:
    root = short_tmpdir("sklab-")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / ".config"),
           "JUPYTER_RUNTIME_DIR": str(root / ".runtime")}
    log = open(root / "lab.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--ServerApp.disable_check_xsrf=True"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"JupyterLab did not start: {(root / 'lab.log').read_text()}") from None
            time.sleep(0.3)
    yield {"base": base, "token": token, "root": root}
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(20)
    proc.kill()
    log.close()
    shutil.rmtree(root, ignore_errors=True)


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
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
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


def test_lab_magics_dashboard_progress_and_session_cells(lab, browser, kernel_home):
    """The extension in a plain ipykernel notebook: %%session output, an upload's bar
    reaching 100%, and the dashboard, whose Pause button pauses the session."""
    from sandbox_kernel import SessionManager

    blob = lab["root"] / "blob.bin"
    blob.write_bytes(os.urandom(16 << 20))
    _notebook(lab["root"] / "magics.ipynb", [
        "%load_ext sandbox_magics",
        "%session new lab-one",
        "%%session\nprint('hello from the sandbox', 6 * 7)",
        f"%session upload {blob}",
        "%session dashboard --refresh 1",
    ])
    page = run_all(browser, lab, "magics.ipynb", "Python 3 (ipykernel)", "python3",
                   viewport={"width": 1400, "height": 1000})
    page.wait_for_selector("text=hello from the sandbox 42", timeout=120_000)
    # The total bar of the upload's progress widget (ipywidgets' FloatProgress).
    page.wait_for_selector(".widget-hprogress:has-text('total') "
                           ".progress-bar[style*='width: 100%']", timeout=120_000)
    screenshot(page, "lab-magics-upload")
    session_id = SessionManager(home=str(kernel_home)).get("lab-one").id
    row = page.locator(f".sk-session-{session_id}")
    row.wait_for(timeout=120_000)
    assert "running" in row.inner_text()
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
    shot = screenshot(page, "lab-magics-dashboard-paused")
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
