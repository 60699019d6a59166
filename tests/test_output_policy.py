"""What a sandbox sends a frontend passes the output policy (security issue 16).

Probes through a real sandbox kernel driven by jupyter_client, as a frontend
would see it: active output (JavaScript, scripts and handlers in HTML and
SVG, unknown types, widgets of other modules, HTML widgets, Output widgets,
payloads) never reaches the frontend and a note says so; pandas tables,
matplotlib images, sliders with ``interact`` and buttons with ``Output``
still work; ``%session trust`` lifts the policy for one session, asked on
stdin. Then unit tests of the policy itself. The browser's side is in
``tests/test_browser.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import time
import uuid

import pytest
from jupyter_client.manager import KernelManager

from .conftest import needs_bwrap

pytestmark = needs_bwrap

#: Strings the probes put into active content: none may reach the frontend.
MARKERS = ("__sk_js", "__sk_img", "__sk_link", "__sk_svg", "__sk_evil", "__sk_w1", "__sk_w2",
           "__sk_w3", "__sk_out", "__sk_css", "__sk_md", "__sk_page")


@pytest.fixture(scope="module")
def kc(kernel_home):
    """One sandbox kernel (one session) for the probes that do not change its trust."""
    km, client = _start()
    yield client
    client.stop_channels()
    km.shutdown_kernel(now=True)


def _start():
    km = KernelManager(kernel_name="sandbox-python")
    km.start_kernel(env={**os.environ, "JPY_SESSION_NAME": f"policy-{uuid.uuid4().hex[:6]}"})
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return km, client


def run(kc, code: str, answer: str | None = None, allow_stdin: bool | None = None):
    """Run ``code``; (reply content, the messages a frontend got for it, but execute_input
    which echoes the code). ``answer`` replies to input requests."""
    msgs: list[dict] = []

    def stdin_hook(msg):
        kc.input(answer if answer is not None else "")

    reply = kc.execute_interactive(
        code, timeout=120, output_hook=msgs.append, stdin_hook=stdin_hook,
        allow_stdin=allow_stdin if allow_stdin is not None else answer is not None)
    return reply["content"], [m for m in msgs if m["msg_type"] != "execute_input"]


def frontend_text(reply, msgs) -> str:
    """Everything the frontend got, as one string to search for markers."""
    return json.dumps([reply, [m["content"] for m in msgs]])


def bundles(msgs, kinds=("display_data", "execute_result", "update_display_data")):
    return [m["content"]["data"] for m in msgs if m["msg_type"] in kinds]


def assert_inert(reply, msgs):
    seen = frontend_text(reply, msgs)
    assert not [m for m in MARKERS if m in seen], seen[:2000]


# -- probes: active output never reaches the frontend ---------------------------------------


def test_javascript_is_blocked_with_a_note_and_the_rest_of_the_bundle_kept(kc):
    reply, msgs = run(kc, "display({'application/javascript': 'window.__sk_js = 1', "
                          "'text/plain': 'plain kept'}, raw=True)")
    assert reply["status"] == "ok"
    assert_inert(reply, msgs)
    (data,) = bundles(msgs)
    assert set(data) == {"text/plain"}
    assert "application/javascript output blocked" in data["text/plain"]
    assert "%session trust" in data["text/plain"] and "plain kept" in data["text/plain"]


@pytest.mark.parametrize("markup", [
    "<script>window.__sk_js = 1</script><b>bold kept</b>",
    "<img src=x onerror='window.__sk_img = 1'><b>bold kept</b>",
    "<a href='javascript:window.__sk_link=1'>link</a><b>bold kept</b>",
    "<iframe srcdoc='<script>__sk_js()</script>'></iframe><b>bold kept</b>",
    "<div style='background:url(https://example.org/__sk_css)'><b>bold kept</b></div>",
])
def test_html_scripts_handlers_and_javascript_links_are_removed(kc, markup):
    reply, msgs = run(kc, f"from IPython.display import HTML\nHTML({markup!r})")
    assert_inert(reply, msgs)
    (data,) = bundles(msgs)
    assert "<b>bold kept</b>" in data["text/html"]
    if "css" not in markup:
        assert "scripts, event handlers or frames were removed" in data["text/html"]


def test_svg_script_and_onload_are_removed(kc):
    svg = ("<svg xmlns='http://www.w3.org/2000/svg' onload='__sk_svg()' width='20' "
           "height='20'><script>__sk_svg()</script><rect width='10' height='10'/></svg>")
    reply, msgs = run(kc, f"from IPython.display import SVG\nSVG({svg!r})")
    assert_inert(reply, msgs)
    (data,) = bundles(msgs)
    assert "<rect" in data["image/svg+xml"] and "<script" not in data["image/svg+xml"]
    assert "removed from image/svg+xml" in data["text/plain"]


def test_unknown_mime_type_is_blocked(kc):
    reply, msgs = run(kc, "display({'application/x-sk-exec': '__sk_js', 'text/plain': 'p'}, "
                          "raw=True)")
    assert_inert(reply, msgs)
    (data,) = bundles(msgs)
    assert set(data) == {"text/plain"} and "application/x-sk-exec output blocked" in \
        data["text/plain"]


def test_markdown_with_html_is_shown_as_text(kc):
    reply, msgs = run(kc, "from IPython.display import Markdown, display\n"
                          "display(Markdown('**fine** [docs](https://example.org)'))\n"
                          "display(Markdown('<img src=x onerror=__sk_md()>'))")
    fine, bad = bundles(msgs)
    assert fine["text/markdown"] == "**fine** [docs](https://example.org)"
    assert set(bad) == {"text/plain"} and "text/markdown with HTML" in bad["text/plain"]


_EVIL_WIDGET = """
import ipywidgets as w, traitlets
class Evil(w.DOMWidget):
    _model_module = traitlets.Unicode('sk-evil-widgets').tag(sync=True)
    _view_module = traitlets.Unicode('sk-evil-widgets').tag(sync=True)
    _model_name = traitlets.Unicode('EvilModel').tag(sync=True)
    _view_name = traitlets.Unicode('EvilView').tag(sync=True)
    payload = traitlets.Unicode('__sk_evil').tag(sync=True)
evil = Evil()
print(evil.model_id)
evil
"""


def test_widget_of_a_module_off_the_allowlist_never_reaches_the_frontend(kc):
    reply, msgs = run(kc, _EVIL_WIDGET)
    assert reply["status"] == "ok"
    assert_inert(reply, msgs)
    model_id = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream").strip()
    # Its layout (a core model) is let through; the model itself is not, nor its view.
    assert [m["content"]["data"]["state"]["_model_name"] for m in msgs
            if m["msg_type"] == "comm_open"] == ["LayoutModel"]
    (data,) = bundles(msgs)
    assert "application/vnd.jupyter.widget-view+json" not in data
    assert "widget model that is not allowed" in data["text/plain"]
    reply, msgs = run(kc, "evil.payload = '__sk_evil again'; evil.close()")
    assert_inert(reply, msgs)
    assert not [m for m in msgs if m["msg_type"].startswith("comm_")
                and m["content"]["comm_id"] == model_id]


def test_an_allowed_widget_cannot_switch_to_another_module(kc):
    _, msgs = run(kc, "import ipywidgets as w\nswitch = w.IntSlider(value=1)\nswitch")
    (opened,) = [m for m in msgs if m["msg_type"] == "comm_open"
                 and m["content"]["data"]["state"]["_model_name"] == "IntSliderModel"]
    _, msgs = run(kc, "switch._view_module = 'sk-evil-widgets'\nswitch.value = 2")
    updates = [m["content"]["data"]["state"] for m in msgs if m["msg_type"] == "comm_msg"
               and m["content"]["comm_id"] == opened["content"]["comm_id"]]
    assert {"value": 2} in updates
    assert not [u for u in updates if "_view_module" in u]


def test_html_widget_values_and_descriptions_are_sanitized(kc):
    reply, msgs = run(kc, "import ipywidgets as w\n"
                          "h = w.HTML(\"<img src=x onerror='__sk_w1()'><b>kept</b>\")\n"
                          "c = w.Checkbox(description=\"<img src=x onerror='__sk_w3()'>c\")\n"
                          "display(h, c)")
    states = {s["_model_name"]: s for s in (m["content"]["data"]["state"] for m in msgs
                                            if m["msg_type"] == "comm_open")}
    value = states["HTMLModel"]["value"]
    assert "onerror" not in value and "<b>kept</b>" in value and "removed" in value
    # Text while description_allow_html is off (the frontend sets it as text): kept as is.
    assert states["CheckboxModel"]["description"].startswith("<img src=x onerror=")
    # A later update, and turning description_allow_html on after the text was sent.
    reply, msgs = run(kc, "h.value = '<script>__sk_w2()</script><i>new</i>'\n"
                          "c.description_allow_html = True")
    assert_inert(reply, msgs)
    updates = [m["content"]["data"]["state"] for m in msgs if m["msg_type"] == "comm_msg"]
    assert any(u.get("value", "").startswith("<i>new</i>") for u in updates), updates
    (flip,) = [u for u in updates if "description_allow_html" in u]
    assert flip["description"].startswith("<img>c")


def test_output_widget_outputs_pass_the_policy(kc):
    reply, msgs = run(kc, "import ipywidgets as w\nfrom IPython.display import Javascript\n"
                          "o = w.Output()\no.append_display_data(Javascript('__sk_out()'))\no")
    assert reply["status"] == "ok"
    assert_inert(reply, msgs)
    outputs = [m["content"]["data"]["state"]["outputs"] for m in msgs
               if m["msg_type"] in ("comm_open", "comm_msg")
               and "outputs" in m["content"]["data"].get("state", {})]
    assert outputs and outputs[-1], outputs
    assert "application/javascript output blocked" in outputs[-1][0]["data"]["text/plain"]


def test_set_next_input_edit_and_exit_payloads_are_refused(kc):
    reply, msgs = run(kc, "ip = get_ipython()\n"
                          "ip.set_next_input('%session download keys --to /root/.ssh', "
                          "replace=True)\n"
                          "ip.payload_manager.write_payload({'source': 'ask_exit', "
                          "'keepkernel': False})")
    assert reply["status"] == "ok" and reply["payload"] == []
    (data,) = bundles(msgs)
    assert "asked to put text into the next cell; refused" in data["text/plain"]
    assert "asked the frontend to shut the kernel down; refused" in data["text/plain"]


def test_page_payload_keeps_its_text_and_loses_its_scripts(kc):
    reply, _ = run(kc, "get_ipython().payload_manager.write_payload({'source': 'page', "
                       "'data': {'text/html': \"<img src=x onerror='__sk_page()'>help\", "
                       "'text/plain': 'help'}, 'start': 0})")
    (page,) = reply["payload"]
    assert page["source"] == "page" and page["data"]["text/plain"] == "help"
    assert "__sk_page" not in page["data"]["text/html"]


# -- what keeps working --------------------------------------------------------------------


def test_plain_results_pass_untouched(kc):
    reply, msgs = run(kc, "1 + 1")
    assert bundles(msgs) == [{"text/plain": "2"}]


def test_pandas_table_keeps_its_table_and_style(kc):
    import pandas as pd

    reply, msgs = run(kc, "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3.5, 4.5]})")
    (data,) = bundles(msgs)
    html = data["text/html"]
    expected = pd.DataFrame({"a": [1, 2], "b": [3.5, 4.5]})._repr_html_()
    assert html == expected.replace("<style scoped>", '<style scoped="">')
    assert '<table border="1" class="dataframe">' in html and ".dataframe tbody tr th" in html


def test_pandas_styler_keeps_its_per_cell_colours(kc):
    _, msgs = run(kc, "import pandas as pd\n"
                      "pd.DataFrame({'a': [1, 2]}).style.map(lambda v: 'color: red')")
    html = bundles(msgs)[0]["text/html"]
    ids = [part.split('"')[0] for part in html.split(' id="')[1:]]
    assert ids and all(i.startswith("sandbox-") for i in ids)
    assert f"#{ids[1]}" in html or any(f"#{i}" in html for i in ids)  # selectors renamed too


def test_matplotlib_png_passes_unchanged(kc):
    reply, msgs = run(kc, "import io, base64, hashlib, matplotlib\nmatplotlib.use('Agg')\n"
                          "import matplotlib.pyplot as plt\n"
                          "fig, ax = plt.subplots(figsize=(2, 2)); ax.plot([1, 3, 2])\n"
                          "buf = io.BytesIO(); fig.savefig(buf, format='png')\n"
                          "png = base64.b64encode(buf.getvalue()).decode()\n"
                          "display({'image/png': png, 'text/plain': 'figure'}, raw=True)\n"
                          "print(hashlib.sha256(png.encode()).hexdigest())")
    (data,) = bundles(msgs)
    assert set(data) == {"image/png", "text/plain"}
    printed = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
    assert hashlib.sha256(data["image/png"].encode()).hexdigest() == printed.strip()
    assert base64.b64decode(data["image/png"]).startswith(b"\x89PNG")


def _iopub_until(kc, pred, timeout=30.0) -> list[dict]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        seen.append(msg)
        if pred(msg):
            return seen
    raise AssertionError(f"not seen within {timeout} s: {[m['msg_type'] for m in seen]}")


def _send_comm(kc, comm_id: str, data: dict) -> None:
    kc.session.send(kc.shell_channel.socket, kc.session.msg(
        "comm_msg", {"comm_id": comm_id, "data": data}))


def test_interact_slider_still_updates_its_output(kc):
    reply, msgs = run(kc, "from ipywidgets import interact\n"
                          "@interact(x=(0, 10))\ndef double(x=3):\n    print('double', x * 2)")
    assert reply["status"] == "ok"
    opens = {m["content"]["data"]["state"]["_model_name"]: m["content"]["comm_id"]
             for m in msgs if m["msg_type"] == "comm_open"}
    assert {"IntSliderModel", "OutputModel", "VBoxModel"} <= set(opens)
    assert any("double 6" in m["content"].get("text", "") for m in msgs)
    _send_comm(kc, opens["IntSliderModel"],
               {"method": "update", "state": {"value": 7}, "buffer_paths": []})
    seen = _iopub_until(kc, lambda m: "double 14" in m["content"].get("text", ""))
    assert [m for m in seen if m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == opens["OutputModel"]]  # the capture, as always


def test_button_and_output_widget_still_work(kc):
    _, msgs = run(kc, "import ipywidgets as w\nb = w.Button(description='go')\n"
                      "out = w.Output()\n"
                      "b.on_click(lambda _: out.append_stdout('clicked\\n'))\ndisplay(b, out)")
    opens = {m["content"]["data"]["state"]["_model_name"]: m["content"]["comm_id"]
             for m in msgs if m["msg_type"] == "comm_open"}
    _send_comm(kc, opens["ButtonModel"], {"method": "custom", "content": {"event": "click"}})
    seen = _iopub_until(kc, lambda m: m["msg_type"] == "comm_msg"
                        and m["content"]["comm_id"] == opens["OutputModel"]
                        and "clicked" in json.dumps(m["content"]["data"]))
    assert seen


# -- %session trust ------------------------------------------------------------------------


def test_trust_is_asked_on_stdin_and_restores_everything(kernel_home):
    km, kc = _start()
    try:
        js = "display({'application/javascript': 'window.__sk_js = 1'}, raw=True)"
        reply, msgs = run(kc, "%session trust", allow_stdin=False)
        assert reply["status"] == "error" and "needs an answer from you" in reply["evalue"]
        reply, msgs = run(kc, "%session trust", answer="no")
        assert "stays untrusted" in json.dumps(bundles(msgs))
        # A payload cannot place the command, and a cell cannot answer its own prompt.
        reply, msgs = run(kc, "get_ipython().set_next_input('%session trust')")
        assert reply["payload"] == []
        assert "application/javascript output blocked" in json.dumps(bundles(run(kc, js)[1]))

        prompts = []
        msgs = []
        reply = kc.execute_interactive(
            "%session trust", timeout=120, output_hook=msgs.append, allow_stdin=True,
            stdin_hook=lambda m: (prompts.append(m["content"]["prompt"]), kc.input("yes")))
        assert reply["content"]["status"] == "ok"
        assert "Trust session" in prompts[0] and "run as code" in prompts[0]
        reply, msgs = run(kc, js)
        assert bundles(msgs) == [{"application/javascript": "window.__sk_js = 1"}]
        reply, msgs = run(kc, "%session info")
        assert "trusted:        True" in bundles(msgs)[0]["text/plain"]
        # Trusted, yet a payload still cannot write a %session line into a cell.
        reply, _ = run(kc, "get_ipython().set_next_input('%session untrust')")
        assert reply["payload"] == []

        run(kc, "%session untrust")
        reply, msgs = run(kc, js)
        assert_inert(reply, msgs)
        reply, msgs = run(kc, "%session info")
        assert "trusted:        False" in bundles(msgs)[0]["text/plain"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


# -- %%session in a host IPython -----------------------------------------------------------


def test_session_cell_magic_republishes_through_the_policy(shared_manager, monkeypatch):
    """``%%session`` republishes the sandbox's outputs in a host kernel: the same policy, and
    ``%session trust`` (asked with input()) lifts it there too."""
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    import sandbox_magics.magics as magics_module
    from sandbox_magics import SessionMagics

    ip = start_ipython() or get_ipython()
    magics = SessionMagics(ip, manager=shared_manager)
    ip.register_magics(magics)
    shown = []
    monkeypatch.setattr(magics_module, "publish_display_data",
                        lambda data, metadata=None, **kw: shown.append(data))
    ip.run_line_magic("session", "new policy-magics")
    cell = ("display({'application/javascript': '__sk_js()', 'text/plain': 'p'}, raw=True)\n"
            "from IPython.display import HTML\nHTML('<img src=x onerror=__sk_img()><b>b</b>')")
    ip.run_cell_magic("session", "", cell)
    assert "__sk_" not in json.dumps(shown), shown
    assert "application/javascript output blocked" in shown[0]["text/plain"]
    assert "<b>b</b>" in shown[1]["text/html"]

    answers = iter(["no", "yes"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    ip.run_line_magic("session", "trust")
    assert shared_manager.get("policy-magics").info()["trusted"] is False
    ip.run_line_magic("session", "trust")
    assert shared_manager.get("policy-magics").info()["trusted"] is True
    shown.clear()
    ip.run_cell_magic("session", "", cell)
    assert shown[0] == {"application/javascript": "__sk_js()", "text/plain": "p"}
    ip.run_line_magic("session", "untrust")
    assert shared_manager.get("policy-magics").info()["trusted"] is False


# -- the policy itself ---------------------------------------------------------------------


@pytest.fixture
def policy():
    from sandbox_kernel.output_policy import OutputPolicy

    return OutputPolicy()


def test_data_only_bundles_pass_as_the_same_object(policy):
    data = {"text/plain": "x", "image/png": "AAAA", "application/json": {"a": 1}}
    assert policy.filter_bundle(data) is data
    vega = {"application/vnd.vegalite.v5+json": {"mark": "bar"}, "text/plain": "chart"}
    assert policy.filter_bundle(vega) == vega


def test_blocked_types_become_one_note_each(policy):
    out = policy.filter_bundle({"application/javascript": "x", "application/pdf": "y",
                                "text/plain": "t"})
    lines = out["text/plain"].splitlines()
    assert lines[:2] == ["[sandbox-kernel: application/javascript output blocked; "
                         "`%session trust` allows it]",
                         "[sandbox-kernel: application/pdf output blocked; "
                         "`%session trust` allows it]"]
    assert lines[2] == "t" and set(out) == {"text/plain"}


def test_widget_views_pass_only_for_models_the_gate_let_through(policy):
    view = {"application/vnd.jupyter.widget-view+json": {"model_id": "m1"}, "text/plain": "w"}
    assert "application/vnd.jupyter.widget-view+json" not in policy.filter_bundle(view)
    assert policy.filter_bundle(view, lambda mid: mid == "m1")["text/plain"] == "w"


@pytest.mark.parametrize("markup, gone", [
    ("<img src=x onerror=alert(1)>", "onerror"),
    ("<svg><animate attributeName=href to=javascript:alert(1) /></svg>", "javascript"),
    ("<a href=' jav&#x09;ascript:alert(1)'>x</a>", "ascript"),
    ("<form action=https://e><input></form>", "form"),
    ("<p data-commandlinker-command='terminal:create-new'>p</p>", "commandlinker"),
    ("<style>@import 'https://e/x.css'; p{background:u\\72l(https://e/y)}</style>", "x.css"),
    ("<style>p{color:red}</**/style><img src=x onerror=alert(1)></style>", "<img"),
    ("<img src='https://e/leak?secret=1'>", "leak"),
    ("<svg><use href='data:image/svg+xml,<svg onload=alert(1)>'/></svg>", "data:"),
    ("<math><maction actiontype=statusline href=javascript:alert(1)>x</maction></math>",
     "javascript"),
    ("<object data=x></object><embed src=x><base href=https://e/>", "https"),
])
def test_html_sanitizer_removes(policy, markup, gone):
    clean, _ = policy.sanitizer.html(markup)
    assert gone not in clean, clean


def test_html_sanitizer_keeps_what_tables_and_plots_need(policy):
    markup = ("<style>#t td{color:#fff;background:url(data:image/png;base64,AA)}</style>"
              "<table id=t class=dataframe><tr style='text-align:right'><td colspan=2>1</td>"
              "</tr></table><img src='data:image/png;base64,AAAA' width=10>"
              "<a href='https://example.org'>docs</a><a href='#t'>top</a>")
    clean, active = policy.sanitizer.html(markup)
    assert not active
    assert "#sandbox-t td{color:#fff;background:url(data:image/png;base64,AA)}" in clean
    assert '<table id="sandbox-t" class="dataframe">' in clean
    assert 'src="data:image/png;base64,AAAA"' in clean and 'href="https://example.org"' in clean
    assert 'href="#sandbox-t"' in clean


def test_svg_sanitizer_keeps_a_matplotlib_figure_drawable(policy):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 3, 2])
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    clean, active = policy.sanitizer.svg(buf.getvalue())
    assert not active
    assert clean.startswith("<svg xmlns:xlink=") and 'xmlns="http://www.w3.org/2000/svg"' in clean
    assert "xlink:href=\"#" in clean and "clip-path=\"url(#" in clean
    import xml.dom.minidom

    xml.dom.minidom.parseString(clean)  # still a well-formed document, as an <img> needs


@pytest.mark.parametrize("text, inert", [
    ("# title\n*a* < b, [docs](https://x.org) ![i](data:image/png;base64,AA)", True),
    ("$x_1 < 2$ and `code`", True),
    ("<b>x</b>", False),
    ("[x](javascript:alert(1))", False),
    ("[a [b] c](javascript:alert(1))", False),
    ("[x](&#106;avascript:alert(1))", False),
    ("![i](https://e/leak.png)", False),
    ("![i][r]\n\n[r]: https://e/leak.png", False),
    ("[r]: vbscript:x", False),
])
def test_markdown_inertness(text, inert):
    from sandbox_kernel.sanitize import markdown_is_inert

    assert markdown_is_inert(text, ["http", "https", "mailto"]) is inert


def test_css_is_made_to_fetch_nothing():
    from sandbox_kernel.sanitize import inert_css

    for css in ("a{background:url(https://e)}", "a{background:URL( 'https://e')}",
                "@import 'https://e'", "a{background:image-set('https://e' 1x)}",
                "a{background:u\\72 l(https://e)}", "a{background:u/**/rl(https://e)}"):
        out = inert_css(css)
        assert "url(" not in out.lower() and "@import" not in out and "set(" not in out, out
    assert inert_css("a{fill:url(#p1)}") == "a{fill:url(#p1)}"


def test_comm_gate(policy):
    from sandbox_kernel.widget_policy import CommGate, WidgetPolicy

    gate = CommGate(WidgetPolicy(), policy)

    def msg(kind, content, buffers=None):
        return {"header": {"msg_type": kind}, "content": content, "buffers": buffers or []}

    evil = msg("comm_open", {"comm_id": "e", "target_name": "jupyter.widget", "data": {
        "state": {"_model_module": "evil", "_model_name": "X", "_view_module": "evil"}}})
    assert gate.from_sandbox(evil, trusted=False) is None
    assert gate.from_sandbox(msg("comm_msg", {"comm_id": "e", "data": {}}), False) is None
    assert gate.from_sandbox(msg("comm_open", {"comm_id": "o", "target_name": "my.target",
                                               "data": {}}), False) is None
    assert gate.from_sandbox(msg("comm_open", {"comm_id": "o", "target_name": "my.target",
                                               "data": {}}), True) is not None
    # The widget manager's restore of every model (a page reload): the evil one is left out,
    # with its buffer; the HTML one is sanitized and let through from then on.
    states = msg("comm_msg", {"comm_id": "c", "data": {
        "method": "update_states", "buffer_paths": [["e", "state", "b"], ["h", "state", "b"]],
        "states": {"e": {"model_module": "evil", "model_name": "X", "state": {}},
                   "h": {"model_module": "@jupyter-widgets/controls", "model_name": "HTMLModel",
                         "state": {"_model_module": "@jupyter-widgets/controls",
                                   "_model_name": "HTMLModel",
                                   "value": "<img src=x onerror=alert(1)>"}}}}},
        buffers=[b"evil", b"html"])
    gate.from_frontend("comm_open", {"comm_id": "c", "target_name": "jupyter.widget.control"})
    out = gate.from_sandbox(states, trusted=False)
    assert set(out["content"]["data"]["states"]) == {"h"} and out["buffers"] == [b"html"]
    assert "onerror" not in out["content"]["data"]["states"]["h"]["state"]["value"]
    assert gate.view_allowed("h") and not gate.view_allowed("e")
    style = msg("comm_open", {"comm_id": "s", "target_name": "jupyter.widget", "data": {
        "state": {"_model_module": "@jupyter-widgets/controls", "_model_name": "HTMLStyleModel",
                  "background": "url(https://e/leak)"}}})
    assert gate.from_sandbox(style, False)["content"]["data"]["state"]["background"] == "none"


def test_payload_filter(policy):
    kept, notes = policy.filter_payloads(
        [{"source": "set_next_input", "text": "%session upload ~/.ssh/id_rsa", "replace": True},
         {"source": "edit_magic", "filename": "/etc/passwd"},
         {"source": "page", "data": {"text/html": "<script>x</script>ok"}, "start": 0}],
        trusted=False)
    assert [p["source"] for p in kept] == ["page"]
    assert kept[0]["data"]["text/html"].startswith("ok")
    assert len(notes) == 2 and "%session upload ~/.ssh/id_rsa" in notes[0]
    kept, notes = policy.filter_payloads(
        [{"source": "set_next_input", "text": "x = 1"},
         {"source": "set_next_input", "text": "%session trust"}], trusted=True)
    assert kept == [{"source": "set_next_input", "text": "x = 1"}] and len(notes) == 1

