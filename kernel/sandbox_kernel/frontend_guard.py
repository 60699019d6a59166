"""What one session sends one frontend, passed through the output and widget policies.

The sandbox kernel relays an ordinary kernel's messages; a frontend trusts a
live kernel's messages as it trusts the person who runs it. This is where the
relay stops trusting the sandbox: rich outputs (display, result, update),
comms, an execute_reply's payloads and user expressions, an inspect_reply's
bundle and the inner kernel's help links each pass the policy unless the
session is trusted (``%session trust``). Streams, errors and status carry
text only and pass untouched; so do bundles of data types only, which is the
path of almost every cell, checked by their keys alone.
"""

from __future__ import annotations

import re
from typing import Any

from .output_policy import OutputPolicy
from .trust import TrustFlag
from .widget_policy import CommGate, WidgetPolicy

BUNDLES = frozenset({"display_data", "execute_result", "update_display_data"})
COMMS = frozenset({"comm_open", "comm_msg", "comm_close"})


class FrontendGuard:
    """The filter between one session and one frontend (state: the comms let through)."""

    def __init__(self, outputs: OutputPolicy, widgets: WidgetPolicy,
                 trusted: TrustFlag) -> None:
        self.outputs = outputs
        self.comms = CommGate(widgets, outputs)
        #: Whether the session is trusted now (cheap to call; see trust.TrustFlag).
        self.trusted = trusted

    def iopub(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """``msg`` as the frontend may see it, or None to drop it."""
        kind = msg["header"]["msg_type"]
        if kind in BUNDLES:
            content = msg["content"]
            data = content.get("data")
            if not isinstance(data, dict):
                return None
            if self.outputs.passes(data) or self.trusted():
                return msg
            clean = self.outputs.filter_bundle(data, self.comms.view_allowed)
            return msg if clean is data else {**msg, "content": {**content, "data": clean}}
        if kind in COMMS:
            return self.comms.from_sandbox(msg, self.trusted())
        return msg

    def execute_reply(self, content: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """An execute_reply's content with its payloads and user expressions filtered, and
        the notes to show for what was refused."""
        payloads = content.get("payload")
        expressions = content.get("user_expressions")
        if not payloads and not expressions:
            return content, []
        trusted = self.trusted()
        kept, notes = self.outputs.filter_payloads(
            payloads if isinstance(payloads, list) else [], trusted, self.comms.view_allowed)
        content = {**content, "payload": kept}
        if isinstance(expressions, dict) and not trusted:
            content["user_expressions"] = {
                k: (self.outputs.filter_output(v, self.comms.view_allowed)
                    if isinstance(v, dict) else v) for k, v in expressions.items()}
        return content, notes

    def inspect_reply(self, content: dict[str, Any]) -> dict[str, Any]:
        """An inspect_reply (a tooltip, the inspector) renders its bundle like an output."""
        data = content.get("data")
        if not isinstance(data, dict) or self.outputs.passes(data) or self.trusted():
            return content
        return {**content, "data": self.outputs.filter_bundle(data, self.comms.view_allowed)}



def help_links(links: Any, schemes: list[str]) -> list[dict[str, str]]:
    """The inner kernel's help links that are web links (the Help menu opens them)."""
    if not isinstance(links, list):
        return []
    allowed = {s.lower() for s in schemes if s != "mailto"}
    return [{"text": str(link.get("text", "")), "url": link["url"]} for link in links
            if isinstance(link, dict) and isinstance(link.get("url"), str)
            and (m := re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*):", link["url"]))
            and m.group(1).lower() in allowed]
