"""Capture and restore of an interpreter's variables; this file runs *inside* the sandbox.

The sandbox cannot import sandbox_kernel, so the host sends this module's
source in an execute request (see :func:`request_code`), with the request in
the global ``REQUEST``. Only the standard library is needed; cloudpickle is
used when the sandbox has it, because plain pickle stores functions and
classes defined in the notebook by reference to ``__main__``, where a new
interpreter would not find them.

Each variable is pickled on its own (protocol 5), with its large buffers (a
NumPy array's data, say) written out of band as raw files straight from
memory: no copy into the pickle stream, and identical arrays give identical
files, so the host's content-addressed store keeps them once. A variable
whose pickling raises or runs longer than its time bound is skipped with its
name and the reason; the rest is saved. Modules are recorded as imports.
The report goes to ``report.json`` beside the files, never to stdout, which
belongs to the user's threads.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import sys
import types
from typing import Any

REPORT = "report.json"
#: How a capture names what a notebook cannot pickle by design: widgets (their comm ties
#: them to this kernel and a frontend) and the shell and display machinery. Every notebook
#: with a slider has some, so the host sums them up in one line instead of one per name
#: (``commands.not_saved``); a resume replays the cells that made them, like any other.
LIVE_OBJECT = "a widget or display object, which lives in this kernel only"
#: Packages whose objects are live in that sense (checked along the type's MRO, so the
#: widgets of other libraries, built on ipywidgets', count too).
_LIVE_PACKAGES = ("ipywidgets", "comm", "ipykernel", "IPython")


class _TooSlow(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _TooSlow()


def _cloudpickle() -> Any:
    try:
        import cloudpickle

        return cloudpickle
    except ImportError:
        return None


def _dumps(value: Any, buffers: list[pickle.PickleBuffer], by_value: Any) -> tuple[str, bytes]:
    """Plain pickle first: it runs at C speed, where cloudpickle calls back into Python for
    every object. Its stream names ``__main__`` only when the value holds something defined
    in the notebook, which a new interpreter would not find; then cloudpickle pickles those
    by value. (A string "__main__" in the data just takes the slower, equally correct path.)
    """
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        if b"__main__" not in data or by_value is None:
            return "pickle", data
    except (pickle.PicklingError, TypeError, AttributeError):
        if by_value is None:
            raise
    buffers.clear()
    return "cloudpickle", by_value.dumps(value, protocol=5, buffer_callback=buffers.append)


def _write(path: str, data: Any) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _user_variables(shell: Any) -> dict[str, Any]:
    """What %who would list: the user's names, not IPython's own."""
    hidden = shell.user_ns_hidden
    return {
        name: value for name, value in list(shell.user_ns.items())
        if not name.startswith("_") and not (name in hidden and hidden[name] is value)
        and name not in ("In", "Out", "exit", "quit", "get_ipython")
    }


def _live(value: Any) -> bool:
    """Whether ``value`` is a widget or a piece of the kernel's display machinery, or a
    function ``interact`` made into one (it carries its widget in ``.widget``)."""
    if isinstance(value, types.FunctionType | types.MethodType):
        value = getattr(value, "widget", None)
        if value is None:
            return False
    try:
        mro = type(value).__mro__
    except AttributeError:
        return False
    return any(str(getattr(t, "__module__", "") or "").split(".")[0] in _LIVE_PACKAGES
               for t in mro)


def capture(shell: Any, out_dir: str, per_variable_timeout: float) -> dict[str, Any]:
    by_value = _cloudpickle()
    report: dict[str, Any] = {"variables": {}, "imports": {}, "skipped": {},
                              "execution_count": shell.execution_count}
    use_alarm = per_variable_timeout > 0 and hasattr(signal, "setitimer")
    previous = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
    try:
        for index, (name, value) in enumerate(_user_variables(shell).items()):
            if isinstance(value, types.ModuleType):
                report["imports"][name] = value.__name__
                continue
            buffers: list[pickle.PickleBuffer] = []
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, per_variable_timeout)
                try:
                    how, data = _dumps(value, buffers, by_value)
                finally:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                raws = [b.raw() for b in buffers]
            except _TooSlow:
                report["skipped"][name] = (f"pickling took longer than {per_variable_timeout:g} s")
                continue
            except BaseException as exc:  # noqa: BLE001 - any failure is reported, by name
                if isinstance(exc, KeyboardInterrupt):
                    raise
                reason = f"{type(exc).__name__}: {exc}".strip()
                report["skipped"][name] = LIVE_OBJECT if _live(value) else reason[:300]
                continue
            files = [f"v{index}.pkl"] + [f"v{index}.b{i}" for i in range(len(raws))]
            for file, blob in zip(files, [data, *raws], strict=True):
                # Written under a hidden name, then renamed: the host stores each file
                # as soon as its name appears, while the next one is written.
                part = os.path.join(out_dir, f".{file}.part")
                _write(part, blob)
                os.rename(part, os.path.join(out_dir, file))
            report["variables"][name] = {
                "files": files, "type": f"{type(value).__module__}.{type(value).__qualname__}",
                "size": len(data) + sum(r.nbytes for r in raws), "pickler": how,
            }
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, previous)
    return report


def _read(path: str, writable: bool) -> Any:
    """A file's bytes; large buffers are mapped copy-on-write, so they load lazily."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if writable and size >= 1 << 20:
            import mmap

            return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        data = bytearray(size)
        view = memoryview(data)
        while view:
            n = os.readv(fd, [view])
            if n == 0:
                raise EOFError(f"{path} is shorter than it was")
            view = view[n:]
        return data
    finally:
        os.close(fd)


def load(shell: Any, in_dir: str, variables: dict[str, Any]) -> dict[str, Any]:
    """Unpickle the given variables into the user namespace; name each failure.

    The cyclic garbage collector is off meanwhile: unpickling creates containers by
    the hundred thousand, each allocation counting towards a collection that would
    find nothing to free (2-3x faster for lists of dicts).
    """
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load(shell, in_dir, variables)
    finally:
        if enabled:
            gc.enable()


def _load(shell: Any, in_dir: str, variables: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = {"restored": [], "failed": {}}
    for name, entry in variables.items():
        try:
            files = entry["files"]
            data = _read(os.path.join(in_dir, files[0]), writable=False)
            buffers = [_read(os.path.join(in_dir, f), writable=True) for f in files[1:]]
            shell.user_ns[name] = pickle.loads(data, buffers=buffers)
            report["restored"].append(name)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            report["failed"][name] = f"{type(exc).__name__}: {exc}"[:300]
    return report


def restore(shell: Any, in_dir: str, request: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = {"imports": [], "failed": {}}
    if request.get("reset"):
        shell.reset(new_session=False)
    for name, module in request.get("imports", {}).items():
        try:
            shell.user_ns[name] = importlib.import_module(module)
            report["imports"].append(name)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            report["failed"][name] = f"import {module} failed: {type(exc).__name__}: {exc}"
    loaded = load(shell, in_dir, request.get("variables", {}))
    report["restored"] = loaded["restored"]
    report["failed"].update(loaded["failed"])
    if request.get("execution_count") and not request.get("reset"):
        # A new interpreter continues the numbering. A restore in place does not go back:
        # IPython's history database refuses a line number twice.
        shell.execution_count = max(shell.execution_count, request["execution_count"])
    return report


def main(request: dict[str, Any]) -> None:
    shell = get_ipython()  # type: ignore[name-defined]  # noqa: F821 - the kernel's builtin
    directory = request["dir"]
    if request["op"] == "capture":
        report = capture(shell, directory, request.get("timeout", 0))
    elif request["op"] == "load":
        report = load(shell, directory, request["variables"])
    else:
        report = restore(shell, directory, request)
    report["python"] = sys.version.split()[0]
    tmp = os.path.join(directory, f".{REPORT}.tmp")
    _write(tmp, json.dumps(report).encode())
    os.replace(tmp, os.path.join(directory, REPORT))


if "REQUEST" in globals():
    main(REQUEST)  # type: ignore[name-defined]  # noqa: F821


def request_code(request: dict[str, Any]) -> str:
    """Host side: the execute request's code that runs this file with ``request``."""
    with open(__file__) as f:
        source = f.read()
    return (f"exec(compile({source!r}, 'sandbox-kernel-snapshot', 'exec'), "
            f"{{'__name__': 'sandbox_kernel_snapshot', 'REQUEST': {request!r}}})")
