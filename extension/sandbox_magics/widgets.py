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
    stage_color,
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


# -- transfers -------------------------------------------------------------------


class TransferProgress(_WithFallback, w.VBox):
    """Per-file bars and totals: bytes, rate, ETA, bytes saved by dedup."""

    def __init__(self, title: str = "transfer") -> None:
        self.title = w.HTML(f"<b>{html.escape(title)}</b>")
        self.total = w.FloatProgress(min=0.0, max=1.0, value=0.0, description="total",
                                     bar_style="info")
        self.summary = w.HTML("")
        self.rows: dict[str, tuple[w.FloatProgress, w.HTML]] = {}
        self.files = w.VBox([])
        super().__init__([self.title, self.files, self.total, self.summary])
        self._started = time.monotonic()

    def update(self, progress: dict[str, Any]) -> None:
        for item in progress["files"]:
            row = self.rows.get(item["name"])
            if row is None:
                bar = w.FloatProgress(min=0.0, max=1.0, description=_short(shown(item["name"])),
                                      layout=w.Layout(width="60%"))
                label = w.HTML("")
                row = self.rows[item["name"]] = (bar, label)
                self.files.children = [*self.files.children, w.HBox([bar, label])]
            bar, label = row
            bar.value = _fraction(item["bytes_completed"], item["bytes_total"], item["status"])
            bar.bar_style = {"done": "success", "skipped": "success",
                             "failed": "danger"}.get(item["status"], "")
            label.value = (f"{html.escape(shown(item['status']))} · "
                           f"{format_size(item['bytes_completed'])} / "
                           f"{format_size(item['bytes_total'])}")
        done, total = progress["bytes_completed"], progress["bytes_total"]
        finished = progress["files_done"] == progress["files_total"]
        self.total.value = 1.0 if finished else _fraction(done, total, "")
        self.total.bar_style = "success" if finished else "info"
        self.summary.value = _totals(progress, time.monotonic() - self._started)


def _fraction(done: int, total: int, status: str) -> float:
    if status in ("done", "skipped"):
        return 1.0
    return min(1.0, done / total) if total else 0.0


def _totals(progress: dict[str, Any], elapsed: float) -> str:
    done, total = progress["bytes_completed"], progress["bytes_total"]
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 and done < total else 0.0
    stats = progress.get("stats", {})
    saved = max(0, done - stats.get("bytes_stored", 0)) if done else 0
    return (f"{progress['files_done']}/{progress['files_total']} files · "
            f"{format_size(done)} of {format_size(total)} · {format_size(int(rate))}/s · "
            f"ETA {eta:.1f} s · saved by dedup: {format_size(saved)} "
            f"({stats.get('chunks_reused', 0)} chunks reused, "
            f"{stats.get('files_skipped', 0)} files unchanged)")


def text_bar(progress: dict[str, Any], elapsed: float, width: int = 30) -> str:
    """The terminal's progress line."""
    done, total = progress["bytes_completed"], progress["bytes_total"]
    frac = 1.0 if progress["files_done"] == progress["files_total"] else (
        min(1.0, done / total) if total else 0.0)
    filled = int(frac * width)
    return f"[{'#' * filled}{' ' * (width - filled)}] {frac * 100:5.1f}%  " + html.unescape(
        _totals(progress, elapsed).replace(" · ", ", "))


# -- timing and insights ------------------------------------------------------------


class TimingView(_WithFallback, w.VBox):
    """A stacked bar, one segment per stage, and the table of stages."""

    def __init__(self, timing: dict[str, float]) -> None:
        self.fallback = render_timing(timing)
        total = timing.get("total") or sum(timing.values()) or 1.0
        stages = [(k, v) for k, v in timing.items() if k != "total"]
        self.segments = [
            w.HTML(f"<div title='{html.escape(k)}: {v * 1000:.1f} ms' style='height:14px;"
                   f"background:{stage_color(i)}'></div>",
                   layout=w.Layout(width=f"{max(0.5, 100 * v / total):.1f}%", margin="0"))
            for i, (k, v) in enumerate(stages)
        ]
        legend = " ".join(
            f"<span style='color:{stage_color(i)}'>■</span> {html.escape(k)} "
            f"{v * 1000:.1f} ms" for i, (k, v) in enumerate(stages))
        self.stages = dict(timing)
        super().__init__([
            w.HTML(f"<b>timing</b> · total {total * 1000:.1f} ms"),
            w.HBox(self.segments, layout=w.Layout(width="100%")),
            w.HTML(legend),
            w.HTML("<table>" + "".join(
                f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>"
                f"{v * 1000:.1f} ms</td><td style='text-align:right'>"
                f"{'' if k == 'total' else f'{100 * v / total:.1f}%'}</td></tr>"
                for k, v in timing.items()) + "</table>"),
        ])


class InsightsView(_WithFallback, w.VBox):
    def __init__(self, insights: list[str]) -> None:
        self.fallback = render_insights(insights)
        self.insights = list(insights)
        body = ("<ul>" + "".join(f"<li>{html.escape(shown(i))}</li>" for i in insights) + "</ul>"
                if insights else "<i>no insights: no stage dominated the last run</i>")
        super().__init__([w.HTML(f"<b>insights</b>{body}")])


# -- the dashboard ---------------------------------------------------------------------

COLUMNS = ("name", "status", "language", "lease", "cpu", "memory", "packages", "files",
           "runs", "last run")
ACTIONS = ("pause", "resume", "renew", "close")


class Dashboard(_WithFallback, w.VBox):
    """A live table of sessions, one row each, with pause, resume, renew and close buttons.

    ``fetch`` returns the session infos (with usage); ``act(action, session_id)``
    carries out a button. A background thread refreshes every ``refresh``
    seconds until ``stop()``; rows are updated in place, so the frontend's
    models are not replaced on every refresh.
    """

    def __init__(self, fetch: Callable[[], list[dict[str, Any]]],
                 act: Callable[[str, str], str], refresh: float = 2.0) -> None:
        self._fetch = fetch
        self._act = act
        self.rows: dict[str, dict[str, Any]] = {}
        self.message = w.HTML("")
        header = w.HBox([_cell(f"<b>{c}</b>") for c in COLUMNS] + [_cell("")],
                        layout=w.Layout(border_bottom="1px solid #999"))
        self.table = w.VBox([header])
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
            for column in COLUMNS:
                row["cells"][column].value = html.escape(values[column])
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
        cells = {c: _cell("") for c in COLUMNS}
        buttons = {a: w.Button(description=a, layout=w.Layout(width="84px"),
                               tooltip=f"{a} this session") for a in ACTIONS}
        for action, button in buttons.items():
            button.on_click(lambda _b, a=action, sid=session_id: self._click(a, sid))
        box = w.HBox([*cells.values(), *buttons.values()])
        box.add_class(f"sk-session-{session_id}")
        row = self.rows[session_id] = {"cells": cells, "buttons": buttons, "box": box}
        self.table.children = [*self.table.children, box]
        return row

    def _click(self, action: str, session_id: str) -> None:
        try:
            self.message.value = html.escape(shown(self._act(action, session_id), lines=True))
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


def _cell(value: str) -> w.HTML:
    return w.HTML(value, layout=w.Layout(width="96px", overflow="hidden"))


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
