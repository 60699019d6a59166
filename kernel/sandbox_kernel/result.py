"""What a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExecutionResult:
    """The outcome of one ``Session.run``.

    ``outputs`` holds the outputs in the order the kernel sent them, in the
    shape nbformat stores them (``stream``, ``display_data``,
    ``execute_result``, ``error``; plus ``update_display_data`` and
    ``clear_output`` events), so a result can be written into a notebook.
    """

    status: str
    execution_count: int | None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    #: The evaluated ``user_expressions`` of the request, when it had any.
    expressions: dict[str, Any] = field(default_factory=dict)
    #: What went wrong around the run (not in it), e.g. a history that could not be saved.
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def insights(self) -> list[str]:
        """The run's bottleneck, if one stage dominated, and what to do about it; warnings first."""
        from .timing import run_insights

        return [*self.warnings, *run_insights(self.timing)]

    @property
    def stdout(self) -> str:
        return self._stream("stdout")

    @property
    def stderr(self) -> str:
        return self._stream("stderr")

    @property
    def result(self) -> str | None:
        """text/plain of the execute_result, or None when the cell had no value."""
        for out in self.outputs:
            if out["output_type"] == "execute_result":
                return out["data"].get("text/plain")
        return None

    def _stream(self, name: str) -> str:
        return "".join(
            o["text"] for o in self.outputs if o["output_type"] == "stream" and o["name"] == name
        )

    def raise_for_error(self) -> ExecutionResult:
        """Raise :class:`RemoteError` when the cell failed; return self otherwise."""
        if self.error is not None:
            raise RemoteError(self.error)
        return self


class RemoteError(Exception):
    """An exception raised by code inside the sandbox, carried back with its traceback."""

    def __init__(self, error: dict[str, Any]):
        self.ename = error.get("ename", "Error")
        self.evalue = error.get("evalue", "")
        self.traceback = error.get("traceback", [])
        super().__init__(f"{self.ename}: {self.evalue}")


def output_from_message(msg: dict[str, Any]) -> dict[str, Any] | None:
    """The nbformat-shaped output for an iopub message, or None for non-output messages."""
    kind = msg["header"]["msg_type"]
    c = msg["content"]
    if kind == "stream":
        return {"output_type": "stream", "name": c["name"], "text": c["text"]}
    if kind in ("display_data", "update_display_data"):
        out = {"output_type": kind, "data": c["data"], "metadata": c.get("metadata", {})}
        display_id = c.get("transient", {}).get("display_id")
        if display_id:
            out["display_id"] = display_id
        return out
    if kind == "execute_result":
        return {
            "output_type": "execute_result",
            "execution_count": c.get("execution_count"),
            "data": c["data"],
            "metadata": c.get("metadata", {}),
        }
    if kind == "error":
        return {
            "output_type": "error",
            "ename": c["ename"],
            "evalue": c["evalue"],
            "traceback": c["traceback"],
        }
    if kind == "clear_output":
        return {"output_type": "clear_output", "wait": c.get("wait", False)}
    return None
