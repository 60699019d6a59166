"""The session's work directory, as the host touches it: never through a link.

The sandbox can put anything in its work directory, symlinks to host files
included, and can swap a directory for a link between our check and our use.
So the host never resolves a path there with the kernel's path walk: it opens
each component with ``O_NOFOLLOW`` relative to the directory before it, and
places, reads and lists files through those descriptors. A link anywhere on
the way is refused, and nothing ever follows one out of the work directory.

A component is one name: ``..``, ``.``, an empty name or one holding ``/``
would make the kernel walk more than one step inside ``openat`` (where
``O_NOFOLLOW`` guards only the last), so every method refuses them, whoever
built the parts (file names read from a report the sandbox wrote included).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .errors import InvalidArgument, SandboxError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(SandboxError):
    """A path in the work directory runs through a link, is not a regular file, or has a
    component that is not a single name."""


def relative_parts(path: str | os.PathLike[str], what: str = "path") -> tuple[str, ...]:
    """Check a path meant to stay inside the work directory; return its components."""
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\0" in text:
        raise InvalidArgument(f"{what} {text!r} is empty or contains a NUL byte")
    p = PurePosixPath(text)
    if p.is_absolute():
        raise InvalidArgument(f"{what} {text!r} is absolute; give a path inside the work "
                              "directory, like data/input.csv")
    parts = tuple(part for part in p.parts if part not in ("", "."))
    if not parts or ".." in parts:
        raise InvalidArgument(f"{what} {text!r} leaves the work directory ('..')")
    return parts


def check_parts(parts: tuple[str, ...]) -> tuple[str, ...]:
    """``parts`` if each is one plain name (not "", ".", "..", no "/" or NUL), else UnsafePath.

    ``openat(dir_fd, "a/../b", O_NOFOLLOW)`` walks ``..`` and follows links in
    every component but the last; only single names keep the walk one step long.
    """
    if not isinstance(parts, tuple):
        raise UnsafePath(f"work-directory path components must be a tuple, not {parts!r}")
    for name in parts:
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name
                or "\0" in name):
            raise UnsafePath(f"{'/'.join(map(str, parts))!r}: the component {name!r} is not "
                             "a single file name inside the work directory")
    return parts


class WorkDir:
    #: How messages name the directory (a notebook's directory on the host reuses the walk).
    where = "the work directory"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @contextlib.contextmanager
    def directory(self, parts: tuple[str, ...], create: bool = False) -> Iterator[int]:
        """A descriptor of the directory ``parts`` (components, no links), made if asked."""
        check_parts(parts)
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            owner = self._foreign_owner() if create else None
            for name in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                        if owner is not None:  # a link swapped in meanwhile: its own owner
                            os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
                try:
                    nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise UnsafePath(self._why(parts, name, exc)) from None
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def place(self, source: str | Path, parts: tuple[str, ...]) -> os.stat_result:
        """Move ``source`` (same filesystem) to ``parts`` atomically; return its stat."""
        with self.directory(self._parent(parts), create=True) as fd:
            try:
                existing = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                raise UnsafePath(f"{'/'.join(parts)} is a directory in {self.where}")
            owner = self._foreign_owner()
            if owner is not None:  # the sandbox's user owns what the host puts in its place
                os.chown(source, *owner, follow_symlinks=False)
            os.replace(source, parts[-1], dst_dir_fd=fd)  # replaces a link, never follows it
            return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)

    def _foreign_owner(self) -> tuple[int, int] | None:
        """The root directory's owner when it is not us: a sandbox that runs as a uid of its
        own (see sandbox.identity) must own the files and directories the host creates."""
        st = os.stat(self.root, follow_symlinks=False)
        return None if st.st_uid == os.geteuid() else (st.st_uid, st.st_gid)

    @contextlib.contextmanager
    def open_file(self, parts: tuple[str, ...]) -> Iterator[tuple[int, os.stat_result]]:
        """A regular file, opened read-only without following links."""
        with self.directory(self._parent(parts)) as dir_fd:
            try:
                # O_NONBLOCK: a FIFO planted by the sandbox must not hang the host's open.
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                             | os.O_NONBLOCK, dir_fd=dir_fd)
            except FileNotFoundError:
                raise InvalidArgument(f"no file {'/'.join(parts)!r} in {self.where}"
                                      ) from None
            except OSError as exc:
                raise UnsafePath(self._why(parts, parts[-1], exc)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePath(f"{'/'.join(parts)} is not a regular file")
            yield fd, st
        finally:
            os.close(fd)

    def unlink(self, parts: tuple[str, ...]) -> None:
        """Remove a file (a link itself, never what it points to), if it is there."""
        with self.directory(self._parent(parts)) as fd, \
                contextlib.suppress(FileNotFoundError):
            os.unlink(parts[-1], dir_fd=fd)

    def remove_tree(self, parts: tuple[str, ...]) -> None:
        """Remove what is at ``parts`` (a directory with all in it, a file, a link itself),
        if it is there, through descriptors: shutil.rmtree checks a path and then opens it,
        and a directory the sandbox swaps for a link to a FIFO meanwhile would block it."""
        with self.directory(self._parent(parts)) as fd:
            _remove_at(fd, parts[-1], depth=0)

    def lstat(self, parts: tuple[str, ...]) -> os.stat_result | None:
        """The entry itself (a link is not followed), or None if it is not reachable."""
        parent = self._parent(parts)  # malformed parts are an error, not "absent"
        try:
            with self.directory(parent) as fd:
                return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except (OSError, UnsafePath):
            return None

    def scan(self, limit: int = 100_000, max_depth: int = 64, under: tuple[str, ...] = (),
             skipped: list[str] | None = None) -> dict[str, tuple[int, int, int]]:
        """Regular files (path → size, mtime_ns, inode), walked by descriptors.

        Each directory is opened relative to its parent's descriptor with
        ``O_NOFOLLOW | O_DIRECTORY``, so a directory the sandbox swaps for a link
        between our listing and our descent is refused (ELOOP, ENOTDIR), never
        followed: no path outside the work directory is ever listed. Every entry
        looked at (directories, links and other files too, not only the regular
        files reported) counts toward ``limit``, and directories deeper than
        ``max_depth`` are not entered: a tree of empty directories costs the host
        no more than a tree of files would. ``under`` scans only that directory
        (paths stay relative to it); ``skipped`` collects what is neither a regular
        file nor a directory (links, FIFOs, sockets), which is never reported.
        """
        found: dict[str, tuple[int, int, int]] = {}
        budget = [limit]
        try:
            with self.directory(under) as fd:
                self._scan_dir(fd, "", 0, max_depth, budget, found, skipped)
        except (OSError, UnsafePath):
            pass
        return found

    def _scan_dir(self, fd: int, rel: str, depth: int, max_depth: int, budget: list[int],
                  found: dict[str, tuple[int, int, int]],
                  skipped: list[str] | None = None) -> None:
        """One directory of :meth:`scan`: its files recorded, its subdirectories entered."""
        subdirs: list[str] = []
        try:
            with os.scandir(fd) as entries:  # lists the descriptor, never a path
                for entry in entries:
                    if budget[0] <= 0:
                        break
                    budget[0] -= 1
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
                        elif entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)  # fstatat(fd, name)
                            path = f"{rel}/{entry.name}" if rel else entry.name
                            found[path] = (st.st_size, st.st_mtime_ns, st.st_ino)
                        elif skipped is not None:
                            skipped.append(f"{rel}/{entry.name}" if rel else entry.name)
                    except OSError:
                        continue
        except OSError:
            return
        if depth >= max_depth:
            return
        for name in subdirs:
            if budget[0] <= 0:
                return
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)  # swapped for a link: refused
            except OSError:
                continue
            try:
                self._scan_dir(sub, f"{rel}/{name}" if rel else name, depth + 1, max_depth,
                               budget, found, skipped)
            finally:
                os.close(sub)

    def usage(self) -> int:
        """Bytes in the work directory's regular files, as far as :meth:`scan` looks."""
        return sum(size for size, _, _ in self.scan().values())

    @staticmethod
    def _parent(parts: tuple[str, ...]) -> tuple[str, ...]:
        """The directory part of a file's ``parts``, all of them checked."""
        check_parts(parts)
        if not parts:
            raise UnsafePath("an empty path names no file in the work directory")
        return parts[:-1]

    def _why(self, parts: tuple[str, ...], name: str, exc: OSError) -> str:
        shown = "/".join(parts)
        if isinstance(exc, NotADirectoryError) or exc.errno == errno.ELOOP:  # a link
            return (f"{shown!r} runs through a symlink or non-directory ({name!r}) in "
                    f"{self.where}; links are never followed out of it")
        return f"{shown!r}: {exc.strerror}"


#: How deep remove_tree descends; a deeper tree (which only a sandbox would make) is left.
_MAX_REMOVE_DEPTH = 64


def _remove_at(dir_fd: int, name: str, depth: int) -> None:
    try:
        fd = os.open(name, _DIR_FLAGS | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)  # a file or a link: the entry itself goes
        return
    try:
        if depth >= _MAX_REMOVE_DEPTH:
            return
        for entry in os.listdir(fd):
            _remove_at(fd, entry, depth + 1)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=dir_fd)
