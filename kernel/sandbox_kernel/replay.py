"""Which recorded cells rebuild the variables a snapshot could not keep.

ElasticNotebook's observation: a variable that cannot be serialized (a
generator, an open file, a live connection) can usually be recomputed by
re-running the cells that made it. We read each recorded cell's names with
``ast`` (after IPython has turned its magics into Python): the names it
binds, and every name it mentions, since a cell like ``next(gen)`` or
``f.readline()`` changes a variable it only reads. To rebuild a variable we
take the cells that mention it, from the last one that binds it onward, then
the cells that the chosen ones need for names the snapshot does not have,
and so on, and run them in their original order.
"""

from __future__ import annotations

import ast
import builtins
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CellNames:
    binds: set[str] = field(default_factory=set)
    mentions: set[str] = field(default_factory=set)
    parsed: bool = True


@functools.lru_cache(maxsize=4096)
def cell_names(code: str) -> CellNames:
    """The top-level names a cell binds and mentions (uses and binds)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        code = TransformerManager().transform_cell(code)
    except Exception:  # noqa: BLE001 - fall back to the raw text
        pass
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return CellNames(parsed=False)
    names = CellNames()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.mentions.add(node.id)
            if isinstance(node.ctx, ast.Store | ast.Del):
                names.binds.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.binds.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                names.binds.add(bound)
        elif isinstance(node, ast.Global):
            names.binds.update(node.names)
    # Names bound only inside function bodies are the function's, not the cell's.
    local = _function_locals(tree)
    names.binds -= local - _top_level_binds(tree)
    names.mentions |= names.binds
    return names


def _function_locals(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for arg in ast.walk(node.args):
                if isinstance(arg, ast.arg):
                    found.add(arg.arg)
            body = node.body if isinstance(node.body, list) else [node.body]
            for stmt in body:
                for sub in ast.walk(stmt):
                    if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        found.add(sub.id)
    return found


def _top_level_binds(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(stmt.name)
            continue
        for sub in ast.walk(stmt):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                found.add(sub.id)
            elif isinstance(sub, ast.Import | ast.ImportFrom):
                found.update(a.asname or a.name.split(".")[0] for a in sub.names)
    return found


@dataclass
class ReplayPlan:
    #: The recorded executions to run again, oldest first.
    cells: list[dict[str, Any]]
    #: Each missing variable and the execution counts of the cells that rebuild it.
    rebuilds: dict[str, list[int | None]]
    #: Missing variables no recorded cell binds: they cannot come back.
    unknown: dict[str, str]
    #: Names the replayed cells bind that the snapshot restored (to be loaded again after).
    clobbered: set[str]


def plan_replay(executions: Iterable[dict[str, Any]], missing: Iterable[str],
                available: Iterable[str]) -> ReplayPlan:
    """Choose the cells that rebuild ``missing``, given the names already ``available``."""
    history = [e for e in executions if e["status"] == "ok"]
    available = set(available)
    chosen: dict[int, dict[str, Any]] = {}
    rebuilds: dict[str, list[int | None]] = {}
    unknown: dict[str, str] = {}
    todo = list(dict.fromkeys(missing))
    wanted = set(todo)
    while todo:
        name = todo.pop()
        binders = [i for i, e in enumerate(history) if name in cell_names(e["code"]).binds]
        if not binders:
            if name in wanted:
                unknown[name] = "no recorded cell defines it (was it made by another client?)"
            continue
        start = binders[-1]
        picked = [i for i in range(start, len(history))
                  if name in cell_names(history[i]["code"]).mentions]
        if name in wanted:
            rebuilds[name] = [history[i]["execution_count"] for i in picked]
        for i in picked:
            if i in chosen:
                continue
            chosen[i] = history[i]
            names = cell_names(history[i]["code"])
            for need in names.mentions - names.binds:
                if need in available or need in wanted or hasattr(builtins, need):
                    continue
                wanted_dep = need not in rebuilds
                if wanted_dep:
                    todo.append(need)
                    rebuilds.setdefault(need, [])
    cells = [chosen[i] for i in sorted(chosen)]
    binds = set().union(*(cell_names(c["code"]).binds for c in cells)) if cells else set()
    for name in list(rebuilds):
        if name not in wanted:
            del rebuilds[name]
    return ReplayPlan(cells, rebuilds, unknown, binds & available)
