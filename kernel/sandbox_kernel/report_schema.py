"""The strict schema of the reports a sandbox writes when it captures or loads its state.

The report comes from code that runs in the sandbox, next to the user's code,
which can replace anything there (``exec``, ``json``, the capture function):
whatever it says is hostile input. The host takes from it only what this
module lets through: names from a fixed grammar (Python identifiers, dotted
module names, and capture file names the host itself would have chosen,
one path component each), sizes and counts that are integers in range, and
texts that are strings of bounded length. Anything else fails the whole
report, so a pause, checkpoint or resume stops with a clear error and the
session keeps its state; nothing in it is ever used to build a host path.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import SandboxError

#: What a report may hold at most: generous for real notebooks, small for the host.
MAX_VARIABLES = 200_000
MAX_BUFFERS = 10_000
#: Files one capture may name in all: each becomes a store task on the host.
MAX_FILES = 200_000
#: The largest report file the host reads.
MAX_REPORT_BYTES = 16 << 20
MAX_TEXT = 1000
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_PICKLERS = ("pickle", "cloudpickle")
#: The first file of a saved variable: its own pickle (vN) or its group's (gN).
_FIRST = re.compile(r"([vg])(\d{1,9})\.pkl")


class ReportInvalid(SandboxError):
    """A sandbox's snapshot report does not follow the schema: nothing of it is used."""


def _fail(what: str) -> ReportInvalid:
    return ReportInvalid(f"the sandbox's snapshot report is not valid ({what}); the state "
                         "was not saved or loaded from it, and the session keeps its state")


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.isidentifier() or len(value) > 256:
        raise _fail(f"{what} {value!r:.80} is not a Python name")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"{what} is not a string")
    return value[:MAX_TEXT]


def _count(value: Any, what: str, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < 2**62:
        raise _fail(f"{what} is not a whole number from {low}")
    return value


def _mapping(value: Any, what: str, limit: int = MAX_VARIABLES) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) > limit:
        raise _fail(f"{what} is not a mapping of at most {limit} entries")
    return value


def capture_files(index: int, buffers: int, prefix: str = "v") -> list[str]:
    """The files a capture writes for its ``index``-th pickle with ``buffers`` buffers: a
    variable alone (``v``) or a group of variables (``g``); the only names the host accepts
    (see snapshot.capture)."""
    return [f"{prefix}{index}.pkl"] + [f"{prefix}{index}.b{i}" for i in range(buffers)]


def _files(name: str, entry: dict[str, Any]) -> tuple[str, int, list[str]]:
    """A variable's files, checked: (prefix, index, files)."""
    files = entry.get("files")
    if not isinstance(files, list) or not 1 <= len(files) <= MAX_BUFFERS + 1:
        raise _fail(f"the files of {name} are not a list of 1 to {MAX_BUFFERS + 1} names")
    first = files[0]
    match = _FIRST.fullmatch(first) if isinstance(first, str) else None
    if match is None:
        raise _fail(f"the first file of {name} is {first!r:.80}, not vN.pkl or gN.pkl")
    prefix, index = match.group(1), int(match.group(2))
    if files != capture_files(index, len(files) - 1, prefix):
        raise _fail(f"the files of {name} are not the names a capture writes")
    group = entry.get("group")
    if (prefix == "g") != (group is not None) or (group is not None and group != first[:-4]):
        raise _fail(f"the files of {name} are not those of its group")
    return prefix, index, files


def _groups(data: Any, variables: dict[str, Any]) -> dict[str, list[str]]:
    """The groups of variables pickled together: each named gN, with the members whose
    entries say so and no others, two at least, no name in two places."""
    groups: dict[str, list[str]] = {}
    placed: set[str] = set()
    for stem, members in _mapping(data.get("groups", {}), "groups").items():
        if not isinstance(stem, str) or not re.fullmatch(r"g\d{1,9}", stem):
            raise _fail(f"the group {stem!r:.80} is not named gN")
        if not isinstance(members, list) or not 2 <= len(members) <= MAX_VARIABLES:
            raise _fail(f"the members of group {stem} are not a list of 2 or more names")
        for name in members:
            _name(name, f"a member of group {stem}")
            if name in placed:
                raise _fail(f"it names {name} twice in its groups")
            placed.add(name)
            if variables.get(name, {}).get("group") != stem:
                raise _fail(f"group {stem} names {name}, which is not saved in it")
        groups[stem] = list(members)
    for name, entry in variables.items():
        if entry.get("group") is not None and name not in placed:
            raise _fail(f"{name} is saved in group {entry['group']}, which does not list it")
    return groups


def capture_report(data: Any) -> dict[str, Any]:
    """A capture report, checked and rebuilt from its valid parts only."""
    data = _mapping(data, "the report", 16)
    variables: dict[str, Any] = {}
    seen: dict[tuple[str, int], list[str]] = {}
    named = 0
    for name, entry in _mapping(data.get("variables"), "variables").items():
        _name(name, "a variable")
        entry = _mapping(entry, f"variable {name}", 16)
        prefix, index, files = _files(name, entry)
        if (prefix, index) in seen:
            # A group's members name its files, and no one else does.
            if prefix == "v" or seen[(prefix, index)] != files:
                raise _fail(f"the files of {name} are not the names a capture writes")
        else:
            seen[(prefix, index)] = files
            named += len(files)
        if named > MAX_FILES:
            raise _fail(f"it names more than {MAX_FILES} files")
        pickler = entry.get("pickler")
        if pickler not in _PICKLERS:
            raise _fail(f"the pickler of {name} is not one of {', '.join(_PICKLERS)}")
        variables[name] = {"files": list(files), "type": _text(entry.get("type"), "a type"),
                           "size": _count(entry.get("size"), f"the size of {name}"),
                           "pickler": pickler}
        if prefix == "g":
            variables[name]["group"] = entry["group"]
    groups = _groups(data, variables)
    for stem, members in groups.items():  # one pickle: the same pickler and size for all
        first = variables[members[0]]
        if any((variables[m]["pickler"], variables[m]["size"]) != (first["pickler"],
                                                                  first["size"])
               for m in members):
            raise _fail(f"the members of group {stem} disagree on its pickle")
    imports = {}
    for name, module in _mapping(data.get("imports"), "imports").items():
        _name(name, "an import")
        if not isinstance(module, str) or not _MODULE.fullmatch(module) or len(module) > 256:
            raise _fail(f"the module of {name} is not a dotted module name")
        imports[name] = module
    skipped = {_name(n, "a skipped variable"): _text(why, "a reason")
               for n, why in _mapping(data.get("skipped"), "skipped").items()}
    inexact = {}
    for name, why in _mapping(data.get("inexact", {}), "inexact").items():
        _name(name, "an inexact variable")
        if name not in variables:
            raise _fail(f"it says {name} is saved inexactly, but does not save it")
        inexact[name] = _text(why, "a reason")
    return {"variables": variables, "imports": imports, "skipped": skipped,
            "groups": groups, "inexact": inexact,
            "execution_count": _count(data.get("execution_count"), "the execution count", 1)}


def load_report(data: Any, requested: set[str]) -> dict[str, Any]:
    """A load or restore report: only names the host asked for, texts bounded."""
    data = _mapping(data, "the report", 16)
    restored = data.get("restored")
    if not isinstance(restored, list) or len(restored) > MAX_VARIABLES:
        raise _fail("restored is not a list")
    failed = _mapping(data.get("failed", {}), "failed")
    imports = data.get("imports", [])
    if not isinstance(imports, list) or len(imports) > MAX_VARIABLES:
        raise _fail("imports is not a list")
    for name in [*restored, *failed, *imports]:
        _name(name, "a loaded name")
        if name not in requested:
            raise _fail(f"it names {name!r}, which was not asked for")
    return {"restored": list(restored), "imports": list(imports),
            "failed": {n: _text(why, "a reason") for n, why in failed.items()}}
