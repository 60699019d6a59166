"""Capture and restore of an interpreter's variables; this file runs *inside* the sandbox.

The sandbox cannot import sandbox_kernel, so the host sends this module's
source in an execute request (see :func:`request_code`), with the request in
the global ``REQUEST``. Only the standard library is needed; cloudpickle is
used when the sandbox has it, because plain pickle stores functions and
classes defined in the notebook by reference to ``__main__``, where a new
interpreter would not find them.

The namespace is captured as a graph, not name by name: variables that reach
a common object (``b = a``, a list held by two dicts, a view and its base
array, two closures over one cell) form a group, pickled in one call so that
pickle's memo keeps them one object (:class:`_Walk`). A variable that shares
nothing goes alone, so an unchanged array is still the same file in the
store. Each pickle uses protocol 5, with its large buffers (a NumPy array's
data, say) written out of band as raw files straight from memory: no copy
into the pickle stream, and identical arrays give identical files, so the
host's content-addressed store keeps them once. Functions and classes the
notebook defined are pickled without a copy of the globals they read and
come back bound to the live namespace (:func:`_reducers`). A group whose
pickling fails is pickled member by member, and the sharing that is lost is
named (``inexact``); a variable whose pickling raises or runs longer than its
time bound is skipped with its name and the reason; the rest is saved.
Modules are recorded as imports. The report goes to ``report.json`` beside
the files, never to stdout, which belongs to the user's threads.
"""

from __future__ import annotations

import builtins
import gc
import importlib
import io
import json
import os
import pickle
import signal
import sys
import types
from itertools import compress, repeat
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


#: Types whose identity no program can observe (immutable atoms), and classes and modules
#: (a class is pickled by reference or with its definition, a module as an import): the
#: sharing walk skips them, so a string or class two variables hold never joins them.
_SKIP = dict.fromkeys([str, int, float, bool, complex, bytes, type(None), type(...), range,
                       type, types.ModuleType], False)
#: The most objects the sharing walk visits, over all variables of one capture. Each
#: object is visited once, however many variables reach it, so the walk costs what one
#: more pass of the pickler over the same containers would (a tenth of a second for
#: 400,000 small containers here), and no more: the pickles are as many objects again.
#: The bound is for a namespace that reaches a huge graph (a library's whole state through
#: one callback, say): past it, the variables not yet walked are pickled alone and named
#: as not checked, rather than the walk taking longer than the pickling it prepares.
WALK_LIMIT = 5_000_000


class _Live:
    """Stands, in a pickle, for something of the interpreter that loads it: its shell, or
    that shell's namespace (see :func:`_reducers`)."""


_SHELL = _Live()
_NAMESPACE = _Live()


def _excluded(shell: Any) -> set[int]:
    """The ids of the namespaces the walk never enters: the notebook's own (every function
    it defined holds it as ``__globals__``: entering it would join every variable with
    every function) and each module's (a library function's globals)."""
    ids = {id(shell.user_ns), id(shell.user_ns_hidden), id(builtins.__dict__)}
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            ids.add(id(namespace))
    return ids


class _Walk:
    """Which variables reach a common object: the groups a capture pickles together.

    A breadth-first walk over ``gc.get_referents`` from each variable in turn, one call
    per level of the graph. Atoms, classes, modules and namespaces are not entered (see
    :data:`_SKIP`, :func:`_excluded`).

    Most objects have one referrer (a dict in a list of dicts), and such an object can be
    reached from one variable only: through that referrer. So only objects whose
    reference count says they have more than one referrer are recorded, by id, with the
    first variable that reached them; a later variable that reaches one joins that
    variable's group (union-find) and does not walk it again, so every object is visited
    once. Counting, filtering and entering go through C-level iterators (``map``,
    ``compress``), a step of :data:`_STEP` objects at a time, not a Python statement per
    object: the walk of 200,000 small dicts (with a list each) takes 0.11 s here, less than
    pickling them (0.17 s), and it runs in a thread of its own while the capture pickles
    (see :func:`capture`), mostly while buffers are written with the GIL released.

    NumPy arrays hold no references the collector sees, so their ``.base`` chain is
    followed by hand: arrays sharing one root buffer (a base and its views) are joined, and
    a root reached by two or more arrays is a *shared root*, whose views the pickler then
    keeps as views (:func:`_reducers`).
    """

    def __init__(self, values: dict[str, Any], excluded: set[int], limit: int = WALK_LIMIT):
        self.values = values
        self.names = list(values)
        self.parent = list(range(len(self.names)))
        self.unchecked: list[str] = []
        self.deferred: set[int] = set()
        #: name -> "alone" or "deferred", as the walk goes (read by the pickling thread).
        self.state: dict[str, str] = {}
        self.stopped = False
        self.error: str | None = None
        #: id of a root array -> how many distinct arrays of its family were reached.
        self.hits: dict[int, int] = {}
        #: id of a root array -> the variables that reach an array of its family.
        self.view_roots: dict[int, set[int]] = {}
        #: id -> the first variable that reached it, for objects of several referrers only.
        self.owner: dict[int, int] = dict.fromkeys(excluded, -1)
        self.root_owner: dict[int, int] = {}
        numpy = sys.modules.get("numpy")
        self.ndarray = getattr(numpy, "ndarray", None) if numpy is not None else None
        self.base_refs = 0
        self.budget = limit
        # What the count of an object reads here when it has a single referrer (a box),
        # and when it is bound once in the namespace (and in ``values``): the walk's own
        # lists and the call hold references too, the same in the probes as in the walk.
        box = [object()]
        refs = [*gc.get_referents(box)]
        self.lone = next(_counts(refs))[2][0]
        namespace = {"p": object()}
        copy = dict(namespace)
        self.root = next(_counts([copy["p"]]))[2][0]
        del refs
        if self.ndarray is not None:  # a view of a base that nothing else holds
            self.base_refs = _root(numpy.arange(2)[1:], self.ndarray)[1]

    def run(self) -> None:
        """Walk each variable in turn, noting in :attr:`state` whether it shares nothing
        (``"alone"``) or reached an object of several referrers (``"deferred"``): a thread
        of its own, beside the pickling (see capture). A failure ends the walk; the
        variables it did not reach are then named unchecked, not grouped."""
        try:
            for i, name in enumerate(self.names):
                if self.budget <= 0 or self.stopped:
                    self.unchecked.append(name)
                    continue
                self.state[name] = "deferred" if self._walk(i) else "alone"
        except BaseException as exc:  # noqa: BLE001 - named, never raised in a thread
            self.error = f"{type(exc).__name__}: {exc}"[:200]
            self.unchecked += [n for n in self.names if n not in self.state]

    def _walk(self, i: int) -> bool:
        """Walk variable ``i``; whether it reached something of more than one referrer."""
        owner = self.owner
        several = False
        refs = [self.values[self.names[i]]]
        limit = self.root
        while refs:
            following: list[Any] = []
            for kinds, cand, counts in _counts(refs):
                if any(issubclass(k, type) for k in kinds):  # classes of a metaclass
                    keep = [not isinstance(o, type) for o in cand]
                    cand, counts = list(compress(cand, keep)), list(compress(counts, keep))
                if not counts or max(counts) <= limit:  # the common case: one referrer
                    enter = cand
                else:
                    several = True
                    enter = list(compress(cand, map(limit.__ge__, counts)))
                    for obj in compress(cand, map(limit.__lt__, counts)):
                        key = id(obj)
                        j = owner.get(key)
                        if j is None:
                            owner[key] = i
                            enter.append(obj)
                        elif j != i and j >= 0:
                            self._join(i, j)
                if self.ndarray is not None and any(issubclass(k, self.ndarray)
                                                    for k in kinds):
                    arrays = [o for o in enter if isinstance(o, self.ndarray)]
                    several = self._arrays(arrays, i) or several
                self.budget -= len(enter)
                if self.budget <= 0:
                    self.unchecked.append(self.names[i])
                    following = []
                    break
                if enter:
                    following.extend(gc.get_referents(*enter))
            limit = self.lone
            refs = following
        if several:
            self.deferred.add(i)
        return several

    def _arrays(self, arrays: list[Any], i: int) -> bool:
        """Join the arrays of one buffer; whether any is a view of a base that something
        else references too (then ``i`` waits for the groups). An array loaded from a
        pickle is a view of a private base (``frombuffer`` then ``reshape``): not shared."""
        views = False
        for array in arrays:
            root, highest = _root(array, self.ndarray)
            views = views or highest > self.base_refs
            key = id(root)
            self.hits[key] = self.hits.get(key, 0) + 1
            j = self.root_owner.setdefault(key, i)
            if j != i:
                self._join(i, j)
            self.view_roots.setdefault(key, set()).add(i)
        return views

    def _find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def _join(self, i: int, j: int) -> None:
        a, b = self._find(i), self._find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def groups(self) -> list[list[str]]:
        """The variables :meth:`run` found reaching something of several referrers, in
        groups that share something (a group of one shares nothing after all)."""
        by_root: dict[int, list[str]] = {}
        for i in sorted(self.deferred):
            by_root.setdefault(self._find(i), []).append(self.names[i])
        return list(by_root.values())

    def shared_roots(self) -> tuple[set[int], set[str]]:
        """Root arrays reached by two arrays or more, and the variables that reach them."""
        roots = {key for key, n in self.hits.items() if n > 1}
        names = {self.names[i] for key in roots for i in self.view_roots[key]}
        return roots, names


def _root(array: Any, ndarray: type) -> tuple[Any, int]:
    """The array that owns ``array``'s buffer, and the highest reference count among the
    bases on the way: a base held by its view alone reads as :attr:`_Walk.base_refs`."""
    root = array
    highest = 0
    while isinstance(root.base, ndarray):
        root = root.base
        highest = max(highest, sys.getrefcount(root))
    return root, highest


#: How many objects the walk takes per step: each step is a few C calls that hold the GIL
#: (about a millisecond each here), so the pickling thread gets it back soon after each
#: write of a buffer, and the walk runs while those writes run.
_STEP = 8192


def _counts(refs: list[Any]) -> Any:
    """For each step of ``refs``: the kinds of object in it, those worth walking, and their
    reference counts, in C loops (``map``, ``compress``), not a statement per object."""
    for start in range(0, len(refs), _STEP):
        part = refs[start:start + _STEP]
        kinds = list(map(type, part))
        cand = list(compress(part, map(_SKIP.get, kinds, repeat(True))))
        counts = list(map(sys.getrefcount, cand))
        yield set(kinds), cand, counts


def _reducers(base: type, namespace: dict[str, Any], roots: set[int]) -> type:
    """A pickler class over ``base`` (pickle's or cloudpickle's) that keeps what a group
    shares: NumPy views of a shared root stay views of it, and (over cloudpickle) the
    notebook's functions are bound to the live namespace and closures keep their cells."""
    numpy = sys.modules.get("numpy")
    ndarray = getattr(numpy, "ndarray", None) if numpy is not None else None
    cloud = hasattr(base, "reducer_override")
    make_empty_cell = None
    if cloud:
        from cloudpickle.cloudpickle import _make_empty_cell as make_empty_cell

    class _Reducers(base):  # type: ignore[misc, valid-type]
        """``copied``: views of a shared root that could not stay views (named as such)."""

        copied: list[str]

        def reducer_override(self, obj: Any) -> Any:
            if obj is _NAMESPACE:
                return getattr, (_SHELL, "user_ns")
            if obj is _SHELL:
                from IPython.core.getipython import get_ipython

                return get_ipython, ()
            if ndarray is not None and type(obj) is ndarray and obj.base is not None:
                reduced = self._view(obj)
                if reduced is not None:
                    return reduced
            if not cloud:
                return NotImplemented
            if type(obj) is types.CellType:
                # Created empty and filled by its state, as cloudpickle's own functions do,
                # so that a cell holding its function (recursion) pickles; being memoized,
                # a cell two closures share comes back as one cell.
                try:
                    contents = obj.cell_contents
                except ValueError:
                    return make_empty_cell, ()
                return make_empty_cell, (), (None, {"cell_contents": contents})
            if type(obj) is types.FunctionType and obj.__globals__ is namespace:
                return self._function(obj)
            return super().reducer_override(obj)

        def _view(self, view: Any) -> Any:
            root = view.base
            while isinstance(root.base, ndarray):
                root = root.base
            if id(root) not in roots or not isinstance(root, ndarray):
                return None
            if type(root) is not ndarray or root.dtype.hasobject or \
                    not root.flags.c_contiguous:
                self.copied.append(f"a {view.dtype} view of a {type(root).__name__}")
                return None
            offset = (view.__array_interface__["data"][0]
                      - root.__array_interface__["data"][0])
            return ndarray, (view.shape, view.dtype, root, offset, view.strides)

        def _function(self, func: types.FunctionType) -> Any:
            """No copy of the globals it reads, unlike cloudpickle: they load as the live
            namespace, so rebinding a global, or ``global x`` in the function, acts on the
            notebook's variables. Defaults and the rest go in the state (a default may be
            the function itself)."""
            slots = {"__defaults__": func.__defaults__, "__kwdefaults__": func.__kwdefaults__,
                     "__qualname__": func.__qualname__, "__module__": func.__module__,
                     "__doc__": func.__doc__, "__annotations__": func.__annotations__}
            return (types.FunctionType,
                    (func.__code__, _NAMESPACE, func.__name__, None, func.__closure__),
                    (func.__dict__ or None, slots))

    return _Reducers


def _pickle_with(cls: type, value: Any, buffers: list[pickle.PickleBuffer],
                 copied: list[str]) -> bytes:
    out = io.BytesIO()
    pickler = cls(out, protocol=5, buffer_callback=buffers.append)
    pickler.copied = copied
    pickler.dump(value)
    return out.getvalue()


def _dumps(value: Any, buffers: list[pickle.PickleBuffer], by_value: Any,
           namespace: dict[str, Any], roots: set[int] | None, copied: list[str]
           ) -> tuple[str, bytes]:
    """Plain pickle first: it runs at C speed, where cloudpickle calls back into Python for
    every object. Its stream names ``__main__`` only when the value holds something defined
    in the notebook, which a new interpreter would not find; then cloudpickle pickles those
    by value. (A string "__main__" in the data just takes the slower, equally correct path.)
    With ``roots`` (the value holds views of a shared array), the plain pickler keeps them
    views (:func:`_reducers`), at the cost of a Python call per object.
    """
    try:
        if roots:
            data = _pickle_with(_reducers(pickle.Pickler, namespace, roots), value, buffers,
                                copied)
        else:
            data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        if b"__main__" not in data or by_value is None:
            return "pickle", data
    except (pickle.PicklingError, TypeError, AttributeError):
        if by_value is None:
            raise
    buffers.clear()
    copied.clear()
    return "cloudpickle", _pickle_with(_reducers(by_value.Pickler, namespace, roots or set()),
                                       value, buffers, copied)


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


def _save(out_dir: str, stem: str, value: Any, timeout: float, by_value: Any,
          namespace: dict[str, Any], roots: set[int] | None, copied: list[str]
          ) -> tuple[str, list[str], int]:
    """Pickle ``value`` into ``stem``'s files; how, which files, and how many bytes.
    Raises what pickling raised, or _TooSlow past ``timeout`` seconds (0: no bound)."""
    buffers: list[pickle.PickleBuffer] = []
    if timeout > 0:
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        how, data = _dumps(value, buffers, by_value, namespace, roots, copied)
    finally:
        if timeout > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
    raws = [b.raw() for b in buffers]
    files = [f"{stem}.pkl"] + [f"{stem}.b{i}" for i in range(len(raws))]
    for file, blob in zip(files, [data, *raws], strict=True):
        # Written under a hidden name, then renamed: the host stores each file
        # as soon as its name appears, while the next one is written.
        part = os.path.join(out_dir, f".{file}.part")
        _write(part, blob)
        os.rename(part, os.path.join(out_dir, file))
    return how, files, len(data) + sum(r.nbytes for r in raws)


def _type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _failure(exc: BaseException, value: Any, timeout: float) -> str:
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    if isinstance(exc, _TooSlow):
        return f"pickling took longer than {timeout:g} s"
    return LIVE_OBJECT if _live(value) else f"{type(exc).__name__}: {exc}".strip()[:300]


def capture(shell: Any, out_dir: str, per_variable_timeout: float) -> dict[str, Any]:
    """Pickle the user's variables, a group of them per pickle where they share objects
    (see :class:`_Walk`), into ``out_dir``; the report names every file and every loss.

    The walk that finds the groups runs in a thread while this one pickles each variable
    alone, in namespace order: writing an array's buffer releases the GIL, so the walk of
    the small objects costs little time of its own. A variable the walk has already
    found sharing something is not pickled alone; one it finds sharing something later
    was pickled alone in vain, and is pickled again with its group (the host stores the
    file it no longer names, and its store's gc drops it; an array's data is the same
    chunks either way). Most variables share nothing and are pickled once.
    """
    import threading

    by_value = _cloudpickle()
    report: dict[str, Any] = {"variables": {}, "imports": {}, "skipped": {}, "groups": {},
                              "inexact": {}, "execution_count": shell.execution_count}
    use_alarm = per_variable_timeout > 0 and hasattr(signal, "setitimer")
    timeout = per_variable_timeout if use_alarm else 0
    namespace = shell.user_ns
    values: dict[str, Any] = {}
    for name, value in _user_variables(shell).items():
        if isinstance(value, types.ModuleType):
            report["imports"][name] = value.__name__
        else:
            values[name] = value
    value = None  # a reference of its own would make the last variable look shared
    walk = _Walk(values, _excluded(shell))
    index = 0
    roots: set[int] = set()
    viewers: set[str] = set()

    def alone(name: str) -> bool:
        nonlocal index
        value = values[name]
        copied: list[str] = []
        try:
            how, files, size = _save(out_dir, f"v{index}", value, timeout, by_value,
                                     namespace, roots if name in viewers else None, copied)
        except BaseException as exc:  # noqa: BLE001 - any failure is reported, by name
            if name not in report["variables"]:  # else a first pickle of it stands
                report["skipped"][name] = _failure(exc, value, timeout)
            return False
        finally:
            index += 1
        report["variables"][name] = {"files": files, "type": _type_name(value),
                                     "size": size, "pickler": how}
        if copied:
            report["inexact"][name] = f"{copied[0]} it shares comes back as a copy"
        return True

    previous = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
    walker = threading.Thread(target=walk.run, name="sandbox-kernel-walk", daemon=True)
    walker.start()
    try:
        done = set()
        for name in values:
            if walk.state.get(name) != "deferred":
                alone(name)
                done.add(name)
        walker.join()
        roots, viewers = walk.shared_roots()
        for name in walk.unchecked:
            report["inexact"][name] = (
                f"the walk for shared objects stopped ({walk.error or 'more than '}"
                f"{'' if walk.error else f'{WALK_LIMIT:,} objects were in reach'}) before "
                "it: it was saved alone, and what it shares with others comes back as copies")
        for members in walk.groups():
            if len(members) == 1:
                if members[0] not in done or members[0] in viewers:
                    alone(members[0])
                continue
            _capture_group(report, members, values, f"g{index}", out_dir, timeout, by_value,
                           namespace, roots if viewers.intersection(members) else None,
                           lambda name: name in done or alone(name))
            index += 1
    finally:
        walk.stopped = True
        if use_alarm:
            signal.signal(signal.SIGALRM, previous)
    return report


def _capture_group(report: dict[str, Any], members: list[str], values: dict[str, Any],
                   stem: str, out_dir: str, timeout: float, by_value: Any,
                   namespace: dict[str, Any], roots: set[int] | None, alone: Any) -> None:
    """Pickle ``members`` together, as one dict, so pickle's memo keeps what they share;
    if that fails, each stands alone (``alone(name)``) and the lost sharing is named."""
    group = {name: values[name] for name in members}
    copied: list[str] = []
    try:
        how, files, size = _save(out_dir, stem, group, timeout * len(members), by_value,
                                 namespace, roots, copied)
    except BaseException as exc:  # noqa: BLE001 - then each alone, the loss named
        why = _failure(exc, None, timeout * len(members))
        for name in members:
            if alone(name) and name in report["variables"]:
                others = ", ".join(m for m in members if m != name)[:200]
                report["inexact"][name] = (
                    f"shares objects with {others}, but they could not be pickled "
                    f"together ({why}), so it was saved alone: a change through one no "
                    "longer shows through the others")
        return
    report["groups"][stem] = members
    for name in members:
        report["skipped"].pop(name, None)
        report["inexact"].pop(name, None)
        report["variables"][name] = {"files": files, "type": _type_name(values[name]),
                                     "size": size, "pickler": how, "group": stem}
        if copied:
            report["inexact"][name] = f"{copied[0]} its group shares comes back as a copy"


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


def _unpickle(in_dir: str, files: list[str]) -> Any:
    data = _read(os.path.join(in_dir, files[0]), writable=False)
    buffers = [_read(os.path.join(in_dir, f), writable=True) for f in files[1:]]
    return pickle.loads(data, buffers=buffers)


def _load(shell: Any, in_dir: str, variables: dict[str, Any]) -> dict[str, Any]:
    """A group's pickle (``"group"`` in its members' entries) is loaded once, and each
    member asked for takes its value from it: the host asks for a group's members
    together, so what they shared they share again."""
    report: dict[str, Any] = {"restored": [], "failed": {}}
    loaded: dict[str, tuple[Any, str | None]] = {}
    for name, entry in variables.items():
        try:
            files = entry["files"]
            if files[0] not in loaded:
                try:
                    loaded[files[0]] = (_unpickle(in_dir, files), None)
                except BaseException as exc:  # noqa: BLE001
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    loaded[files[0]] = (None, f"{type(exc).__name__}: {exc}"[:300])
            value, error = loaded[files[0]]
            if error is not None:
                report["failed"][name] = error
                continue
            shell.user_ns[name] = value[name] if entry.get("group") else value
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
