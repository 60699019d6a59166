"""ipywidgets views of what %session reports: transfers, timing, insights, the dashboard.

Every view carries the text and HTML that the command printed, and puts them
beside the widget in its display bundle, so a frontend without widgets
(nbconvert, a notebook viewer) still shows the same figures. Views are fed
plain dicts (progress snapshots, timing, session infos), so tests can check
their models' state without a browser. Text that can come from a sandbox (file
names, insights, messages) is escaped with ``sandbox_kernel.shown`` and then,
in HTML, with ``html.escape``: a browser honours bidi overrides too.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from sandbox_kernel.commands import (
    CommandOutput,
    render_insights,
    render_sessions,
    render_timing,
    session_row,
    timing_html,
)
from sandbox_kernel.limits import format_size
from sandbox_kernel.shown import shown


class _WithFallback:
    """Adds the command's text and HTML to the widget's display bundle."""

    fallback: CommandOutput | None = None

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = super()._repr_mimebundle_(**kwargs)  # type: ignore[misc]
        if self.fallback is not None and bundle is not None:
            bundle["text/plain"] = self.fallback.text
            if self.fallback.html:
                bundle["text/html"] = self.fallback.html
        return bundle


# -- cells of a table --------------------------------------------------------------------
#
# The tables below are grids with fixed column widths: every row (the header too) is a
# GridBox with the same template, so a header sits over its values whatever the values
# are, and rows can be added and removed without rebuilding the rest. A cell is an HTML
# widget holding one line, cut with an ellipsis at its column's width and whole in its
# title (what the browser shows on hover); numbers are right-aligned.


def _cell_html(text: str, width: int, align: str = "left", bold: bool = False,
               color: str | None = None) -> str:
    """One line of ``text`` (already escaped with ``shown``, not yet for HTML), ``width``
    pixels wide: the div's own width, so the ellipsis cuts there (a flex item's content
    would otherwise widen it to the whole text)."""
    esc = html.escape(text, quote=True)
    style = (f"width:{width}px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;"
             f"text-align:{align}" + (";font-weight:bold" if bold else "")
             + (f";color:{color}" if color else ""))
    return f"<div title='{esc}' style='{style}'>{esc}</div>"


def _cell(text: str, width: int, align: str = "left", bold: bool = False) -> w.HTML:
    return w.HTML(_cell_html(text, width, align, bold),
                  layout=w.Layout(width=f"{width}px", margin="0"))


def _template(widths: list[str]) -> str:
    """A grid's column template from the columns' widths."""
    return " ".join(widths)


def _grid_row(children: list[w.Widget], template: str, **layout: str) -> w.GridBox:
    return w.GridBox(children, layout=w.Layout(grid_template_columns=template,
                                               grid_gap="0px 6px", align_items="center",
                                               **layout))


# -- transfers -------------------------------------------------------------------

#: Columns of a transfer: name, bar, status, bytes. The bar takes the room left, the same
#: in every row (the rows are as wide as the box that holds them), total row included.
_TRANSFER = _template(["180px", "minmax(120px, 1fr)", "64px", "150px"])


class TransferProgress(_WithFallback, w.VBox):
    """Per-file bars and a total bar of the same size; bytes, rate, ETA, then what dedup saved."""

    def __init__(self, title: str = "transfer") -> None:
        self.title = w.HTML(f"<b>{html.escape(title)}</b>")
        self.total = w.FloatProgress(min=0.0, max=1.0, value=0.0, bar_style="info",
                                     layout=w.Layout(width="auto", margin="0"),
                                     _dom_classes=["sk-transfer-total"])  # for tests, too
        self.total_status = _cell("", 64)
        self.total_bytes = _cell("", 150, "right")
        self.summary = w.HTML("")
        #: One per file: its name, bar, status and bytes cells, by the file's name.
        self.rows: dict[str, dict[str, Any]] = {}
        self.files = w.VBox([], layout=w.Layout(width="100%"))
        total_row = _grid_row([_cell("total", 180, bold=True), self.total, self.total_status,
                               self.total_bytes], _TRANSFER, width="100%",
                              border_top="1px solid #ccc")
        super().__init__([self.title, self.files, total_row, self.summary])
        self._started = time.monotonic()

    def update(self, progress: dict[str, Any]) -> None:
        for item in progress["files"]:
            row = self.rows.get(item["name"])
            if row is None:
                row = self._new_row(item["name"])
            row["bar"].value = _fraction(item["bytes_completed"], item["bytes_total"],
                                         item["status"])
            row["bar"].bar_style = {"done": "success", "skipped": "success",
                                    "failed": "danger"}.get(item["status"], "")
            row["status"].value = _cell_html(shown(item["status"]), 64)
            row["bytes"].value = _cell_html(f"{format_size(item['bytes_completed'])} / "
                                            f"{format_size(item['bytes_total'])}", 150, "right")
        done, total = progress["bytes_completed"], progress["bytes_total"]
        finished = progress["files_done"] == progress["files_total"]
        self.total.value = 1.0 if finished else _fraction(done, total, "")
        self.total.bar_style = "success" if finished else "info"
        self.total_status.value = _cell_html(
            f"{progress['files_done']}/{progress['files_total']} files", 64)
        self.total_bytes.value = _cell_html(f"{format_size(done)} / {format_size(total)}",
                                            150, "right")
        self.summary.value = "<br>".join(
            html.escape(line) for line in _totals(progress, time.monotonic() - self._started))

    def _new_row(self, name: str) -> dict[str, Any]:
        bar = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="auto", margin="0"))
        row = {"name": _cell(shown(name), 180), "bar": bar, "status": _cell("", 64),
               "bytes": _cell("", 150, "right")}
        self.rows[name] = row
        self.files.children = [*self.files.children,
                               _grid_row(list(row.values()), _TRANSFER, width="100%")]
        return row


def _fraction(done: int, total: int, status: str) -> float:
    if status in ("done", "skipped"):
        return 1.0
    return min(1.0, done / total) if total else 0.0


def _totals(progress: dict[str, Any], elapsed: float) -> list[str]:
    """The totals: files, bytes, rate and ETA; then, once every file is done, what was
    stored and what dedup saved. Not before: the bytes read so far were counted as saved
    while their chunks were still being stored ("saved by dedup: 4.0 MiB (0 chunks reused,
    0 files unchanged)" while hashing)."""
    done, total = progress["bytes_completed"], progress["bytes_total"]
    rate = done / elapsed if elapsed > 0 else 0.0
    line = (f"{progress['files_done']}/{progress['files_total']} files · "
            f"{format_size(done)} of {format_size(total)} · {format_size(int(rate))}/s")
    if progress["files_done"] < progress["files_total"]:
        eta = (total - done) / rate if rate > 0 and done < total else 0.0
        return [f"{line} · ETA {eta:.1f} s"]
    stats = progress.get("stats", {})
    stored = stats.get("bytes_stored", 0)
    # The store compresses chunks too, so what was not written is not all dedup's doing.
    return [line, f"newly stored: {format_size(stored)}, "
                  f"{format_size(max(0, done - stored))} saved by dedup and compression "
                  f"({stats.get('chunks_reused', 0)} chunks reused, "
                  f"{stats.get('files_skipped', 0)} files unchanged)"]


def text_bar(progress: dict[str, Any], elapsed: float, width: int = 30) -> str:
    """The terminal's progress line."""
    done, total = progress["bytes_completed"], progress["bytes_total"]
    frac = 1.0 if progress["files_done"] == progress["files_total"] else (
        min(1.0, done / total) if total else 0.0)
    filled = int(frac * width)
    return (f"[{'#' * filled}{' ' * (width - filled)}] {frac * 100:5.1f}%  "
            + "; ".join(_totals(progress, elapsed)).replace(" · ", ", "))


# -- timing and insights ------------------------------------------------------------

class TimingView(_WithFallback, w.VBox):
    """A stacked bar, one segment per stage, over a table of the stages: colour, name,
    time and share in fixed columns, the figures right-aligned (``timing_html``, which the
    kernel shows too)."""

    def __init__(self, timing: dict[str, float]) -> None:
        self.fallback = render_timing(timing)
        total = timing.get("total") or sum(timing.values()) or 1.0
        #: Each stage's share of the bar, in percent, as drawn.
        self.shares = {k: round(max(0.5, 100 * v / total), 1)
                       for k, v in timing.items() if k != "total"}
        self.stages = dict(timing)
        bar, table = timing_html(timing)
        super().__init__([
            w.HTML(f"<b>timing</b> · total {total * 1000:.1f} ms"),
            w.HTML(bar, layout=w.Layout(width="100%")),
            w.HTML(table),
        ])


class InsightsView(_WithFallback, w.VBox):
    """The insights, each an item of a list under its heading (or a line saying there are
    none), in one HTML widget."""

    def __init__(self, insights: list[str]) -> None:
        self.fallback = render_insights(insights)
        self.insights = list(insights)
        body = ("<ul style='margin:4px 0;padding-left:20px'>"
                + "".join(f"<li style='line-height:1.4'>{html.escape(shown(i))}</li>"
                          for i in insights) + "</ul>"
                if insights else
                "<div><i>no insights: no stage dominated the last run</i></div>")
        super().__init__([w.HTML(f"<div><b>insights</b></div>{body}")])


# -- the dashboard ---------------------------------------------------------------------

#: The dashboard's columns: key (of ``session_row``), width in pixels, alignment.
COLUMNS: tuple[tuple[str, int, str], ...] = (
    ("name", 120, "left"), ("status", 64, "left"), ("language", 72, "left"),
    ("lease", 44, "right"), ("cpu", 52, "right"), ("memory", 72, "right"),
    ("packages", 72, "right"), ("files", 40, "right"), ("runs", 40, "right"),
    ("last run", 64, "right"))
ACTIONS = ("pause", "resume", "renew", "close")
#: A button's width: "resume" fits with 4px padding (at 84px in a row of shrinking boxes
#: it read "resu…"). With the columns, about 940 pixels: a notebook beside the file
#: browser at 1400 pixels shows it whole.
_BUTTON = 58
_DASHBOARD = _template([f"{width}px" for _, width, _ in COLUMNS]
                       + [f"{len(ACTIONS) * _BUTTON + (len(ACTIONS) - 1) * 4}px"])
_STATUS_COLOR = {"running": "#2e7d32", "paused": "#666", "frozen": "#1565c0",
                 "dead": "#c62828", "starting": "#b26a00"}


class Dashboard(_WithFallback, w.VBox):
    """A live table of sessions, one row each, with pause, resume, renew and close buttons.

    ``fetch`` returns the session infos (with usage); ``act(action, session_id)``
    carries out a button. A background thread refreshes every ``refresh``
    seconds until ``stop()``; rows are updated in place, so the frontend's
    models are not replaced on every refresh. Columns have fixed widths (see COLUMNS);
    where the output is narrower than the table, the table scrolls sideways.
    """

    def __init__(self, fetch: Callable[[], list[dict[str, Any]]],
                 act: Callable[[str, str], str], refresh: float = 2.0) -> None:
        self._fetch = fetch
        self._act = act
        self.rows: dict[str, dict[str, Any]] = {}
        self.message = w.HTML("")
        self.header = _grid_row(
            [_cell(key, width, align, bold=True) for key, width, align in COLUMNS]
            + [_cell("", 0)], _DASHBOARD, border_bottom="1px solid #999", width="max-content",
            padding="0 0 2px 0")
        self.header.add_class("sk-dashboard-header")
        self.table = w.VBox([self.header], layout=w.Layout(overflow="auto hidden",
                                                           width="100%"))
        super().__init__([w.HTML("<b>sandbox sessions</b>"), self.table, self.message])
        self._stop = threading.Event()
        self.refresh()
        if refresh > 0:
            thread = threading.Thread(target=self._loop, args=(refresh,), daemon=True,
                                      name="sandbox-dashboard")
            thread.start()

    def refresh(self) -> None:
        infos = self._fetch()
        now = time.time()
        seen = set()
        for info in infos:
            seen.add(info["id"])
            values = session_row(info, now)
            row = self.rows.get(info["id"])
            if row is None:
                row = self._new_row(info["id"])
            for key, width, align in COLUMNS:
                color = _STATUS_COLOR.get(values[key]) if key == "status" else None
                row["cells"][key].value = _cell_html(values[key], width, align, color=color)
            status = info["status"]
            row["buttons"]["pause"].disabled = status not in ("running", "frozen")
            row["buttons"]["resume"].disabled = status not in ("paused", "frozen")
            row["buttons"]["renew"].disabled = status != "running"
        for gone in set(self.rows) - seen:
            self.table.children = [c for c in self.table.children
                                   if c is not self.rows[gone]["box"]]
            del self.rows[gone]
        self.fallback = render_sessions(infos)

    def _new_row(self, session_id: str) -> dict[str, Any]:
        cells = {key: _cell("", width, align) for key, width, align in COLUMNS}
        buttons = {a: w.Button(description=a, tooltip=f"{a} this session",
                               layout=w.Layout(width=f"{_BUTTON}px", margin="0",
                                               padding="0 4px"))
                   for a in ACTIONS}
        for action, button in buttons.items():
            button.on_click(lambda _b, a=action, sid=session_id: self._click(a, sid))
        actions = w.HBox(list(buttons.values()), layout=w.Layout(grid_gap="4px",
                                                                 margin="2px 0"))
        box = _grid_row([*cells.values(), actions], _DASHBOARD, width="max-content")
        box.add_class(f"sk-session-{session_id}")
        row = self.rows[session_id] = {"cells": cells, "buttons": buttons, "box": box}
        self.table.children = [*self.table.children, box]
        return row

    def _click(self, action: str, session_id: str) -> None:
        try:
            said = html.escape(shown(self._act(action, session_id), lines=True))
            self.message.value = f"<div style='white-space:pre-wrap'>{said}</div>"
        except Exception as exc:  # noqa: BLE001 - shown in the dashboard, one line
            self.message.value = f"<span style='color:#c00'>{html.escape(shown(exc))}</span>"
        self.refresh()

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep refreshing; say why it failed
                self.message.value = html.escape(f"refresh failed: {shown(exc)}")

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop()
        super().close()
