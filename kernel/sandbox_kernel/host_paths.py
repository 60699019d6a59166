"""Host paths named by a notebook's ``%session`` lines: its own directory, or the user's yes.

The sandbox kernel runs ``%session upload`` / ``download`` / ``artifacts --save`` as the
host user, but the lines come from the notebook, which is untrusted: unchecked,
``%session upload ~/.ssh/id_ed25519`` put a host secret in the sandbox for the next line
to print, and ``%session download keys --to ~/.ssh`` wrote a sandbox-made file there.
So a notebook's lines reach its own directory on the host (where Jupyter starts its
kernel) and nothing else:

- a path is taken relative to that directory (an absolute one must lie under it) and
  walked component by component with ``O_NOFOLLOW`` (:class:`HostDir`, the work
  directory's walk), so a symlink in it (a cloned repository may ship one) is never
  followed out; files are read, and directories created and written into, through
  those descriptors, so a link swapped in between the check and the use is refused;
- ``..``, absolute paths elsewhere, symlinks, and hidden names (``.git``, ``.env``,
  ``.ssh``: a ``.git/config`` written there would run commands at the next ``git
  status``) are not refused outright but asked about: the kernel asks the user on the
  frontend's stdin ("allow %session upload to read /etc/x, outside this notebook's
  directory? [y/N]"), and only a typed yes goes on. Nothing the sandbox sends (an
  output, a payload) can answer an input request; without stdin (nbconvert, papermill)
  the line is refused.

Unconfined (``root`` None) is the user's own rights, as the API and the CLI have: the
magics of a host IPython, whose cells can open any file anyway, unless configured.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .errors import SandboxError
from .shown import shown
from .workdir import WorkDir, check_parts, relative_parts

if TYPE_CHECKING:
    from .transfer import UploadCommit

#: Asks the person at the frontend (a surface's ``ask``: the stdin channel, which nothing
#: a sandbox sends can answer) and returns what they typed; SandboxError if it cannot.
Ask = Callable[[str], Awaitable[str]]


class HostPathRefused(SandboxError):
    """A %session line named a host path outside the notebook's directory, through a link or
    hidden, and the user did not allow it."""


class HostDir(WorkDir):
    """A notebook's directory on the host, walked as a work directory is: never through a
    link. Unlike a sandbox's work directory it is the host user's own, so what is created
    in it keeps the user as its owner."""

    where = "this notebook's directory"

    def _foreign_owner(self) -> tuple[int, int] | None:
        return None


def notebook_dir(configured: str | None = None) -> Path:
    """The notebook's directory on the host.

    ``configured`` if given; else the directory of ``JPY_SESSION_NAME`` when that is an
    absolute path (Jupyter Server sets it to the notebook's path, and starts the kernel
    in the notebook's directory); else the working directory (older servers set an API
    path relative to their root, and the same cwd).
    """
    if configured:
        return Path(os.path.abspath(os.path.expanduser(configured)))
    notebook = os.environ.get("JPY_SESSION_NAME", "")
    if os.path.isabs(notebook) and os.path.isdir(os.path.dirname(notebook)):
        return Path(os.path.dirname(notebook))
    return Path(os.getcwd())


@dataclass
class HostSource:
    """What an upload reads: a file or directory of the notebook's directory (``tree`` and
    ``parts``, read by descriptors), or a path the user chose (``path``)."""

    shown: str
    tree: HostDir | None = None
    parts: tuple[str, ...] = ()
    path: Path | None = None

    def add_to(self, commit: UploadCommit, dest: str | None) -> list[str]:
        """Queue the files on ``commit``; return what a directory held that was not taken
        (links, FIFOs, hidden names), to be named to the user."""
        if self.tree is None:
            assert self.path is not None
            commit.add(self.path, dest)
            return []
        name = self.parts[-1] if self.parts else self.tree.root.name
        base = relative_parts(dest if dest is not None else name, "destination")
        st = self.tree.lstat(self.parts) if self.parts else os.stat(self.tree.root)
        if st is None:  # gone since it was checked
            raise HostPathRefused(f"no file or directory {shown(self.shown)!r} in "
                                  f"{self.tree.where}")
        if stat.S_ISREG(st.st_mode):
            commit.add_from(self.tree, self.parts, base, st.st_size)
            return []
        skipped: list[str] = []
        found = self.tree.scan(under=self.parts, skipped=skipped)
        left_out: dict[str, None] = {}  # in order, once each
        for rel in sorted({*found, *skipped}):
            parts = tuple(rel.split("/"))
            hidden = next((i for i, p in enumerate(parts) if p.startswith(".")), None)
            if hidden is not None:  # named once, at its first hidden component
                left_out["/".join(parts[:hidden + 1])] = None
            elif rel in found:
                commit.add_from(self.tree, self.parts + parts, base + parts, found[rel][0])
            else:  # a link, a FIFO, a socket: not followed, not read
                left_out[rel] = None
        prefix = "/".join(self.parts)
        return [f"{prefix}/{rel}" if prefix else rel for rel in left_out]


@dataclass
class HostTarget:
    """Where a download or a saved artifact goes: a directory of the notebook's directory
    (``tree`` and ``parts``, made and opened by descriptors), or one the user chose."""

    shown: str
    tree: HostDir | None = None
    parts: tuple[str, ...] = ()
    path: Path | None = None

    @contextlib.contextmanager
    def opened(self) -> Iterator[Path]:
        """The directory, as a path that reaches it without a walk while it is open.

        ``/proc/self/fd/N`` names the directory opened by descriptors itself, so
        what is written below it goes into that directory whatever its path becomes;
        a file name there that is a link is replaced (a rename), never written through.
        """
        if self.tree is None:
            assert self.path is not None
            self.path.mkdir(parents=True, exist_ok=True)
            yield self.path
            return
        with self.tree.directory(self.parts, create=True) as fd:
            yield Path(f"/proc/self/fd/{fd}")

    def show(self, written: str | os.PathLike[str], opened: Path) -> str:
        """A path written below ``opened`` as the user named its directory."""
        rel = os.path.relpath(os.fspath(written), opened)
        return rel if self.shown == "." else f"{self.shown.rstrip('/')}/{rel}"


class HostPaths:
    """The host paths a surface's %session lines may use: ``root`` and below, or what the
    user allows when asked (``ask``); everything when ``root`` is None."""

    def __init__(self, root: Path | None, ask: Ask | None = None) -> None:
        self.root = root
        self.ask = ask

    async def source(self, command: str, text: str) -> HostSource:
        """What ``%session {command} {text}`` may read."""
        if self.root is None:
            return HostSource(text, path=Path(text).expanduser())
        tree = self._tree()
        parts = self._inside(text)
        reason = self._hidden_or_outside(parts)
        if reason is None:
            assert parts is not None
            reason = self._walk_source(command, text, tree, parts)
        if reason is None:
            return HostSource(text, tree, parts or ())
        where = self._absolute(text)
        await self._allow(command, "read", where, reason)
        return HostSource(str(where), path=where)

    async def target(self, command: str, text: str, names: Iterable[str]) -> HostTarget:
        """Where ``%session {command}`` may write files called ``names`` (given by the line
        or by the sandbox: each must be one plain name) into the directory ``text``."""
        names = list(names)
        for name in names:
            check_parts((name,))
        if self.root is None:
            return HostTarget(text, path=Path(text).expanduser())
        tree = self._tree()
        parts = self._inside(text)
        reason = self._hidden_or_outside(parts, names)
        if reason is None:
            assert parts is not None
            reason = self._walk_target(command, text, tree, parts)
        if reason is None:
            return HostTarget(text, tree, parts or ())
        where = self._absolute(text)
        await self._allow(command, "write into", where, reason)
        return HostTarget(str(where), path=where)

    # -- the checks ---------------------------------------------------------------

    def _tree(self) -> HostDir:
        """The root as a walk starts from it: its own path resolved (the notebook's
        directory may be reached through a link; it is the user's, and the walk below it
        follows none)."""
        assert self.root is not None
        return HostDir(os.path.realpath(self.root))

    def _inside(self, text: str) -> tuple[str, ...] | None:
        """``text``'s components below the root, or None when it is outside (by its words
        alone: ``..`` counts as outside; links are the walk's business)."""
        assert self.root is not None
        if not isinstance(text, str) or not text or "\0" in text:
            raise HostPathRefused(f"no such path {shown(text)!r}")
        path = PurePosixPath(os.path.expanduser(text))
        if path.is_absolute():
            for root in dict.fromkeys((self.root, Path(os.path.realpath(self.root)))):
                with contextlib.suppress(ValueError):
                    path = path.relative_to(root)
                    break
            else:
                return None
        parts = tuple(p for p in path.parts if p not in ("", "."))
        return None if ".." in parts else parts

    @staticmethod
    def _hidden_or_outside(parts: tuple[str, ...] | None, names: Iterable[str] = ()
                           ) -> str | None:
        if parts is None:
            return ", outside this notebook's directory"
        hidden = next((p for p in (*parts, *names) if p.startswith(".")), None)
        if hidden is not None:
            return f", a hidden name ({shown(hidden)!r}) in this notebook's directory"
        return None

    def _walk_source(self, command: str, text: str, tree: HostDir,
                     parts: tuple[str, ...]) -> str | None:
        """None if ``parts`` is a file or directory reached without a link; the reason to
        ask if a link is on the way; HostPathRefused if there is nothing to read."""
        for i in range(len(parts)):
            st = tree.lstat(parts[:i + 1])
            if st is not None and stat.S_ISLNK(st.st_mode):
                return self._through_link(parts[i])
            last = i == len(parts) - 1
            if st is None or not (stat.S_ISDIR(st.st_mode) or
                                  (last and stat.S_ISREG(st.st_mode))):
                what = "no file or directory" if st is None else "no regular file or directory"
                raise HostPathRefused(f"%session {command}: {what} {shown(text)!r} in this "
                                      f"notebook's directory ({shown(str(self.root))})")
        return None

    def _walk_target(self, command: str, text: str, tree: HostDir,
                     parts: tuple[str, ...]) -> str | None:
        """None if ``parts`` is a directory, or can be made one, without a link on the way."""
        for i in range(len(parts)):
            st = tree.lstat(parts[:i + 1])
            if st is None:
                return None  # made by descriptors when written into
            if stat.S_ISLNK(st.st_mode):
                return self._through_link(parts[i])
            if not stat.S_ISDIR(st.st_mode):
                raise HostPathRefused(f"%session {command}: {shown(text)!r} is not a directory "
                                      "(a file is in the way)")
        return None

    @staticmethod
    def _through_link(name: str) -> str:
        return (f", which runs through a symlink ({shown(name)!r}) in this notebook's "
                "directory")

    def _absolute(self, text: str) -> Path:
        """Where ``text`` points, as the user will be asked about it."""
        assert self.root is not None
        return Path(os.path.abspath(os.path.join(self.root, os.path.expanduser(text))))

    async def _allow(self, command: str, verb: str, where: Path, reason: str) -> None:
        """Go on only if the user types y or yes; HostPathRefused otherwise."""
        path = shown(str(where))
        try:
            if self.ask is None:
                raise SandboxError("this surface cannot ask")
            answer = await self.ask(f"allow %session {command} to {verb} {path}{reason}? [y/N] ")
        except SandboxError as exc:  # no input for this cell, or interrupted
            why = str(exc).removeprefix("%session: ")
            raise HostPathRefused(
                f"%session {command}: {path}{reason}; a notebook's %session lines {verb} only "
                f"inside its own directory ({shown(str(self.root))}) unless you allow it when "
                f"asked, and it could not ask you: {why}") from None
        if answer.strip().lower() not in ("y", "yes"):
            raise HostPathRefused(f"%session {command}: {path}{reason}: not allowed")
