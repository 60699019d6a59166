"""Widgets from a sandbox: which comms reach the frontend, and with what state.

A widget's front end is code the browser loads by the model's module name:
a sandbox that opens a comm for a model of any module makes the frontend
instantiate that module's JavaScript with the state the sandbox chose, and
the core controls put some traits into the page as HTML (``HTML`` and
``HTMLMath`` values, descriptions with ``description_allow_html``). So a
comm from the sandbox passes only for an allowed target and, for widgets, for
models and views of allowed modules (the core ipywidgets ones by default);
HTML-valued traits are sanitized on the way out, an ``Output`` widget's
outputs pass the output policy, style traits fetch nothing. Messages on a
comm that was refused (or never opened) are dropped, so ``IntSlider``,
``Button``, ``interact`` and ``Output`` keep working and nothing else runs.

:class:`CommGate` holds what one frontend connection has let through; the
frontend's own comm_opens (the widget manager's ``jupyter.widget.control``)
are recorded too, so the sandbox's replies on them pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from traitlets import Dict, List, Unicode
from traitlets.config import LoggingConfigurable

from .output_policy import OutputPolicy
from .sanitize import NOTE_HTML, inert_css

WIDGET_TARGET = "jupyter.widget"
CONTROL_TARGET = "jupyter.widget.control"
_MODULE_KEYS = ("_model_module", "_view_module")


class WidgetPolicy(LoggingConfigurable):
    """Which comms and widget modules a sandbox may use in the frontend."""

    comm_targets = List(Unicode(), [WIDGET_TARGET, CONTROL_TARGET, "jupyter.widget.version"],
                        help="Comm targets a sandbox may open or answer on; others are "
                             "dropped.").tag(config=True)
    model_modules = List(Unicode(), ["@jupyter-widgets/controls", "@jupyter-widgets/base",
                                     "@jupyter-widgets/output"],
                         help="Widget modules (model and view) the frontend may instantiate "
                              "for a sandbox: a module is JavaScript run in the page.",
                         ).tag(config=True)
    html_traits = Dict(default_value={"HTMLModel": ["value"], "HTMLMathModel": ["value"]},
                       key_trait=Unicode(), value_trait=List(Unicode()),
                       help="Traits the frontend puts into the page as HTML, by model name; "
                            "sanitized. (description, with description_allow_html, is "
                            "handled for every model.)").tag(config=True)


@dataclass
class _Comm:
    target: str
    model: str = ""
    #: description_allow_html and description as the frontend has them.
    allow_html: bool = False
    description: str = ""


class CommGate:
    """The comms one frontend connection has let through, and the filter for new messages."""

    def __init__(self, widgets: WidgetPolicy, outputs: OutputPolicy) -> None:
        self.widgets = widgets
        self.outputs = outputs
        self._comms: dict[str, _Comm] = {}

    def view_allowed(self, model_id: str) -> bool:
        """Whether a widget view may name ``model_id`` (a model this gate let through)."""
        comm = self._comms.get(model_id)
        return comm is not None and comm.target == WIDGET_TARGET

    def from_frontend(self, msg_type: str, content: dict[str, Any]) -> None:
        """Record comms the frontend opens (they are the frontend's, so they are allowed)."""
        comm_id = content.get("comm_id")
        if msg_type == "comm_open" and content.get("target_name") in self.widgets.comm_targets:
            self._comms[str(comm_id)] = _Comm(str(content["target_name"]))
        elif msg_type == "comm_close":
            self._comms.pop(str(comm_id), None)

    def from_sandbox(self, msg: dict[str, Any], trusted: bool) -> dict[str, Any] | None:
        """``msg`` (comm_open, comm_msg or comm_close) as the frontend may get it, or None."""
        kind = msg["header"]["msg_type"]
        content = msg.get("content") or {}
        comm_id = str(content.get("comm_id"))
        data = content.get("data") if isinstance(content.get("data"), dict) else {}
        if kind == "comm_open":
            return self._open(msg, comm_id, str(content.get("target_name")), data, trusted)
        comm = self._comms.get(comm_id)
        if kind == "comm_close":
            self._comms.pop(comm_id, None)
            return msg if comm is not None else None
        if comm is None:
            return None
        if trusted:
            return msg
        if comm.target == WIDGET_TARGET and isinstance(data.get("state"), dict):
            state = self._state(comm, data["state"])
            if state is None:
                return None
            return msg if state is data["state"] else _with_data(msg, {**data, "state": state})
        if comm.target == CONTROL_TARGET and data.get("method") == "update_states":
            return self._states(msg, data)
        return msg

    # -- comm_open ------------------------------------------------------------------

    def _open(self, msg: dict[str, Any], comm_id: str, target: str, data: dict[str, Any],
              trusted: bool) -> dict[str, Any] | None:
        if target not in self.widgets.comm_targets and not trusted:
            self.log_refused(f"comm target {target!r}")
            return None
        comm = _Comm(target)
        if target != WIDGET_TARGET or trusted:
            self._comms[comm_id] = comm
            if trusted and target == WIDGET_TARGET:
                comm.model = str((data.get("state") or {}).get("_model_name", ""))
            return msg
        state = data.get("state") if isinstance(data.get("state"), dict) else {}
        if not self._modules_allowed(state, opening=True):
            self.log_refused(f"widget module {state.get('_model_module')!r}")
            return None
        comm.model = str(state.get("_model_name", ""))
        clean = self._state(comm, state)
        if clean is None:
            return None
        self._comms[comm_id] = comm
        return msg if clean is state else _with_data(msg, {**data, "state": clean})

    def _modules_allowed(self, state: dict[str, Any], opening: bool) -> bool:
        allowed = self.widgets.model_modules
        if opening and state.get("_model_module") not in allowed:
            return False
        return all(state[k] in allowed or (k == "_view_module" and not state[k])
                   for k in _MODULE_KEYS if k in state)

    # -- state ------------------------------------------------------------------------

    def _state(self, comm: _Comm, state: dict[str, Any]) -> dict[str, Any] | None:
        """``state`` with its HTML sanitized; None when it names a module not allowed."""
        if any(k in state for k in _MODULE_KEYS) and not self._modules_allowed(state, False):
            return None
        if "_model_name" in state:
            comm.model = str(state["_model_name"])
        changed: dict[str, Any] = {}
        for key in self.widgets.html_traits.get(comm.model, ()):
            value = state.get(key)
            if isinstance(value, str) and "<" in value:
                changed[key] = self._html(value)
        if "description_allow_html" in state:
            comm.allow_html = bool(state["description_allow_html"])
        if isinstance(state.get("description"), str):
            comm.description = state["description"]
        if comm.allow_html and "<" in comm.description and (
                "description" in state or "description_allow_html" in state):
            # Also when only the flag turns on: the frontend already has the text.
            changed["description"] = self._html(comm.description)
        if comm.model == "OutputModel" and isinstance(state.get("outputs"), list):
            outputs = [self.outputs.filter_output(o, self.view_allowed) if isinstance(o, dict)
                       else o for o in state["outputs"]]
            if any(a is not b for a, b in zip(outputs, state["outputs"], strict=True)):
                changed["outputs"] = outputs
        if comm.model.endswith("StyleModel"):
            for key, value in state.items():
                if isinstance(value, str) and (clean := inert_css(value)) != value:
                    changed[key] = clean
        return {**state, **changed} if changed else state

    def _html(self, value: str) -> str:
        clean, active = self.outputs.sanitizer.html(value)
        return clean + NOTE_HTML if active else clean

    def _states(self, msg: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """The widget manager's ``update_states`` (all models, on a page reload): models of
        modules not allowed are left out, with their buffers; the rest sanitized, and let
        through from now on."""
        states = data.get("states") if isinstance(data.get("states"), dict) else {}
        kept: dict[str, Any] = {}
        for model_id, entry in states.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("state"), dict):
                continue
            state = {"_model_module": entry.get("model_module"), **entry["state"]}
            if not self._modules_allowed(state, opening=True):
                self.log_refused(f"widget module {entry.get('model_module')!r}")
                continue
            comm = self._comms.get(model_id) or _Comm(WIDGET_TARGET,
                                                      str(entry.get("model_name", "")))
            clean = self._state(comm, entry["state"])
            if clean is None:
                continue
            self._comms[model_id] = comm
            kept[model_id] = entry if clean is entry["state"] else {**entry, "state": clean}
        paths = data.get("buffer_paths") or []
        buffers = msg.get("buffers") or []
        pairs = [(p, b) for p, b in zip(paths, buffers, strict=False)
                 if isinstance(p, list) and p and p[0] in kept]
        out = _with_data(msg, {**data, "states": kept, "buffer_paths": [p for p, _ in pairs]})
        out["buffers"] = [b for _, b in pairs]
        return out

    def log_refused(self, what: str) -> None:
        self.widgets.log.info("sandbox-kernel: dropped a comm from the sandbox: %s", what)


def _with_data(msg: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return {**msg, "content": {**msg["content"], "data": data}}
