"""The output policy: which MIME types of a sandbox's output a frontend may render.

A frontend renders a live output with the page's rights, and picks the
richest type of a bundle it has a renderer for, so every type a sandbox
sends is one of three kinds:

- data (``data_types``): shown by a renderer that runs no code of the
  output's (PNG, JSON, plotly's and vega's JSON, LaTeX through MathJax's safe
  mode): passed as it is;
- markup (``html_types``, ``svg_types``, ``markdown_types``): HTML and SVG are
  sanitized (``sanitize``), markdown passes when it holds no HTML and no
  fetches, else it is shown as text;
- everything else (``application/javascript``, an unknown type whose
  renderer, if the user has one installed, may run code; widget views of
  models the comm gate refused): dropped, and a one-line note in
  ``text/plain`` says so, the bundle's other types kept.

Bundles of data types only (a cell's ``1 + 1``) pass without being copied or
looked at beyond their keys.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from traitlets import List, Unicode, observe
from traitlets.config import LoggingConfigurable

from .sanitize import NOTE_HTML, Sanitizer, markdown_is_inert

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
#: Payload sources a frontend acts on (IPython's ``page`` and friends).
PAYLOAD_NOTES = {
    "set_next_input": "asked to put text into the next cell",
    "edit_magic": "asked to open a file in an editor",
    "ask_exit": "asked the frontend to shut the kernel down",
}


def note(what: str) -> str:
    """The one line shown where something was held back."""
    return f"[sandbox-kernel: {what}; `%session trust` allows it]"


class OutputPolicy(LoggingConfigurable):
    """What of a sandbox's MIME bundles reaches a frontend (see the module's docstring)."""

    data_types = List(Unicode(), [
        "text/plain", "image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp",
        "application/json", "text/latex", "application/vnd.plotly.v1+json",
        "application/vnd.vegalite.v*+json", "application/vnd.vega.v*+json",
    ], help="MIME types passed as they are: their renderers run no code of the output's. "
            "Shell-style patterns (vega's v*) are allowed.").tag(config=True)
    html_types = List(Unicode(), ["text/html"],
                      help="Types sanitized as HTML fragments.").tag(config=True)
    svg_types = List(Unicode(), ["image/svg+xml"],
                     help="Types sanitized as SVG documents.").tag(config=True)
    markdown_types = List(Unicode(), ["text/markdown"],
                          help="Types passed when they hold no HTML or fetches, "
                               "else shown as text.").tag(config=True)
    link_schemes = List(Unicode(), ["http", "https", "mailto"],
                        help="URL schemes a link in sanitized output may use (a person "
                             "clicks it). Images and styles may only use data: URLs: "
                             "anything else is a fetch, and the sandbox has no "
                             "network.").tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._build()

    @observe("data_types", "html_types", "svg_types", "markdown_types", "link_schemes")
    def _changed(self, _change: Any) -> None:
        self._build()

    def _build(self) -> None:
        self._plain = frozenset(t for t in self.data_types if not _is_pattern(t))
        self._patterns = tuple(t for t in self.data_types if _is_pattern(t))
        self._html = frozenset(self.html_types)
        self._svg = frozenset(self.svg_types)
        self._markdown = frozenset(self.markdown_types)
        self.sanitizer = Sanitizer(self.link_schemes)

    def passes(self, data: dict[str, Any]) -> bool:
        """Whether ``data`` passes as it is without a look at its values (the fast path)."""
        plain = self._plain
        return all(mime in plain for mime in data)

    def filter_bundle(self, data: dict[str, Any],
                      view_allowed: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """``data`` as a frontend may have it: the same object when nothing changes.

        ``view_allowed(model_id)`` says whether a widget view names a model the
        comm gate let through; without it no widget view passes.
        """
        if self.passes(data):
            return data
        out: dict[str, Any] = {}
        notes: list[str] = []
        for mime, value in data.items():
            if mime in self._plain or any(fnmatch.fnmatchcase(mime, p) for p in self._patterns):
                out[mime] = value
            elif mime in self._html and isinstance(value, str):
                clean, active = self.sanitizer.html(value)
                out[mime] = clean + NOTE_HTML if active else clean
            elif mime in self._svg and isinstance(value, str):
                out[mime], active = self.sanitizer.svg(value)
                if active:
                    notes.append(note(f"scripts or event handlers removed from {mime} output"))
            elif mime in self._markdown and isinstance(value, str):
                if markdown_is_inert(value, self.link_schemes):
                    out[mime] = value
                else:
                    notes.append(note(f"{mime} with HTML or non-web links shown as text")
                                 + "\n" + value)
            elif mime == WIDGET_VIEW and view_allowed is not None and isinstance(value, dict) \
                    and view_allowed(str(value.get("model_id"))):
                out[mime] = value
            elif mime == WIDGET_VIEW:
                notes.append(note("a view of a widget model that is not allowed was blocked"))
            else:
                notes.append(note(f"{_mime_label(mime)} output blocked"))
        if notes:
            text = out.get("text/plain")
            out["text/plain"] = "\n".join(notes) + (f"\n{text}" if isinstance(text, str)
                                                    and text else "")
        return out

    def filter_output(self, output: dict[str, Any],
                      view_allowed: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """An nbformat-shaped output (an Output widget's, a run's) with its data filtered."""
        data = output.get("data")
        if not isinstance(data, dict):
            return output
        clean = self.filter_bundle(data, view_allowed)
        return output if clean is data else {**output, "data": clean}

    def filter_payloads(self, payloads: list[Any], trusted: bool,
                        view_allowed: Callable[[str], bool] | None = None,
                        ) -> tuple[list[Any], list[str]]:
        """An execute_reply's payloads as a frontend may act on them, and notes to show.

        A payload acts on the frontend, not in the output area: ``set_next_input``
        writes into a cell (a ``%session`` line there would run with the
        notebook's host rights), ``edit_magic`` opens an editor, ``ask_exit``
        shuts the kernel down. They are refused and said so; ``page`` (help
        text) is kept with its bundle filtered. A trusted session's payloads
        pass, but never one writing a ``%session`` line.
        """
        kept: list[Any] = []
        notes: list[str] = []
        for payload in payloads:
            source = payload.get("source") if isinstance(payload, dict) else None
            if trusted and not (source == "set_next_input"
                                and "%session" in str(payload.get("text", ""))):
                kept.append(payload)
            elif source == "page" and isinstance(payload.get("data"), dict):
                kept.append({**payload, "data": self.filter_bundle(payload["data"],
                                                                   view_allowed)})
            else:
                what = PAYLOAD_NOTES.get(str(source), f"sent a {_mime_label(str(source))} "
                                                      "payload")
                text = payload.get("text") if source == "set_next_input" else None
                notes.append(note(f"the sandbox {what}; refused")
                             + (f"; it was:\n{text}" if isinstance(text, str) else ""))
        return kept, notes


def _is_pattern(mime: str) -> bool:
    return any(c in mime for c in "*?[")


def _mime_label(mime: str) -> str:
    """A MIME type as a note names it: printable and short (it comes from the sandbox)."""
    label = "".join(c if c.isprintable() and c not in "[]`" else "?" for c in mime)
    return label[:80] + ("…" if len(label) > 80 else "")
