"""Upload commits and download groups: batches of files through the store, with progress.

As in XetSession: an :class:`UploadCommit` takes files as they are added and
works on them in parallel at once; ``get_progress()`` is a cheap snapshot any
thread may poll, no callbacks; ``commit()`` waits, places every file in the
work directory at once, and returns a manifest (JSON) that a later
:class:`DownloadGroup` can fetch from. Files are staged outside the work
directory and renamed in only at commit, so an interrupted upload leaves no
partial file in the sandbox, and the store keeps every pack it finished, so
the rerun stores only what is missing.

Dedup happens at three levels, each counted in the manifest's ``stats``: a
file the session already has with the same content is not placed again
(``files_skipped``); chunks the store has are not written again
(``chunks_reused``); a local file unchanged since it was last stored (size,
mtime, inode) is not even read (``stat_cache_hits``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument, SandboxError, is_disk_full
from .limits import format_size
from .sandbox.kernel_log import log_size
from .sandbox.supervisor import KERNEL_LOG
from .shown import shown
from .store import ContentStore, FileRecord
from .workdir import WorkDir, relative_parts

if TYPE_CHECKING:
    from .session import AsyncSession

_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                              thread_name_prefix="sandbox-kernel-transfer")
#: The copies into the sandbox that run beside an upload's hashing. A pool of their own:
#: an upload waits for its copy, and must never wait for a worker of its own pool.
_COPIES = concurrent.futures.ThreadPoolExecutor(max_workers=8,
                                                thread_name_prefix="sandbox-kernel-copy")


class TransferFailed(SandboxError):
    """Some files of a batch could not be transferred; nothing of the batch was placed."""


class QuotaExceeded(SandboxError):
    """The upload would take the work directory over the session's disk quota."""


@dataclass
class ItemProgress:
    name: str
    bytes_completed: int = 0
    bytes_total: int = 0
    status: str = "queued"  # queued, hashing, copying, done, skipped, failed
    hash: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Source:
    """A local file to upload: a path the caller chose (links followed, as any program of
    the caller's would), or a file of a confined tree (``tree`` and ``parts``), opened by
    descriptors when its turn comes, never through a link."""

    path: Path
    tree: WorkDir | None = None
    parts: tuple[str, ...] = ()

    @contextlib.contextmanager
    def opened(self) -> Iterator[tuple[Path, os.stat_result]]:
        """A path to read the file by, and its stat: the same file for as long as it is open
        (``/proc/self/fd/N`` names the open file itself, whatever its path becomes)."""
        if self.tree is None:
            yield self.path, self.path.stat()
            return
        with self.tree.open_file(self.parts) as (fd, st):
            yield Path(f"/proc/self/fd/{fd}"), st


class _Batch:
    """What uploads and downloads share: the session's store and work directory, progress."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.store: ContentStore = session.manager.store
        self.workdir = WorkDir(session.work_dir)
        self._items: list[ItemProgress] = []
        self._futures: list[concurrent.futures.Future[Any]] = []
        self._lock = threading.Lock()
        self.stats = {"bytes_hashed": 0, "bytes_moved": 0, "bytes_stored": 0, "chunks_new": 0,
                      "chunks_reused": 0, "files_skipped": 0, "stat_cache_hits": 0}

    def get_progress(self) -> dict[str, Any]:
        """A snapshot: per file name, bytes completed and total, status; and the totals."""
        items = [asdict(i) for i in list(self._items)]
        done = sum(1 for i in items if i["status"] in ("done", "skipped"))
        return {
            "files": items,
            "bytes_completed": sum(i["bytes_completed"] for i in items),
            "bytes_total": sum(i["bytes_total"] for i in items),
            "files_done": done,
            "files_total": len(items),
            "stats": dict(self.stats),
        }

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.stats[k] += v

    def _wait(self) -> None:
        concurrent.futures.wait(self._futures)
        failed = [i for i in self._items if i.status == "failed"]
        if failed:
            raise TransferFailed("; ".join(f"{i.name}: {i.error}" for i in failed))


class UploadCommit(_Batch):
    def __init__(self, session: AsyncSession):
        super().__init__(session)
        staging_root = Path(session.work_dir).parent / "staging"
        _remove_stale(staging_root)
        self.staging = staging_root / uuid.uuid4().hex[:12]
        self.staging.mkdir(parents=True)
        self._placements: list[tuple[ItemProgress, tuple[str, ...], Path | None, FileRecord]] = []
        self._dests: set[tuple[str, ...]] = set()
        self._committed = False

    def add(self, local_path: str | os.PathLike[str], dest: str | None = None) -> None:
        """Queue a file, or a directory's files, for upload; work starts at once."""
        if self._committed:
            raise InvalidArgument("this upload commit is already committed; start a new one")
        local = Path(local_path).expanduser().absolute()
        if not local.exists():
            raise InvalidArgument(f"no such local file or directory: {local}")
        base = relative_parts(dest if dest is not None else local.name, "destination")
        if local.is_dir():
            for root, _dirs, files in os.walk(local):
                for name in sorted(files):
                    path = Path(root) / name
                    if path.is_file():
                        rel = path.relative_to(local).parts
                        self._queue(_Source(path), base + rel, path.stat().st_size)
        elif local.is_file():
            self._queue(_Source(local), base, local.stat().st_size)
        else:
            raise InvalidArgument(f"{local} is neither a regular file nor a directory")

    def add_from(self, tree: WorkDir, parts: tuple[str, ...], dest: tuple[str, ...],
                 size: int = 0) -> None:
        """Queue the regular file ``parts`` of ``tree`` for ``dest``: opened when its turn
        comes by a descriptor walk that refuses links (a notebook's directory on the host,
        see host_paths), so what is read is what was named."""
        if self._committed:
            raise InvalidArgument("this upload commit is already committed; start a new one")
        self._queue(_Source(tree.root.joinpath(*parts), tree, parts), dest, size)

    def _queue(self, source: _Source, parts: tuple[str, ...], size: int) -> None:
        if parts in self._dests:
            raise InvalidArgument(f"two files of this commit go to {'/'.join(parts)!r}")
        self._dests.add(parts)
        item = ItemProgress("/".join(parts), bytes_total=size)
        self._items.append(item)
        self._futures.append(_POOL.submit(self._upload, source, parts, item))

    def _upload(self, source: _Source, parts: tuple[str, ...], item: ItemProgress) -> None:
        try:
            with source.opened() as (local, st):
                self._upload_open(source.path, local, st, parts, item)
        except Exception as exc:  # reported by commit(), with the file's name
            item.status, item.error = "failed", _why(exc)

    def _upload_open(self, name: Path, local: Path, st: os.stat_result,
                     parts: tuple[str, ...], item: ItemProgress) -> None:
        """Upload the file readable at ``local`` whose stat was ``st``; ``name`` keys the
        stat cache and names the file in errors."""
        known = self.store.stat_lookup(name, st)
        have = self.session.manager.registry.session_file(self.session.id, "/".join(parts))
        if known and self._unchanged_in_session(have, known, parts):
            item.status, item.hash, item.bytes_completed = "skipped", known, item.bytes_total
            self._count(files_skipped=1, stat_cache_hits=1)
            return
        staged = self.staging / uuid.uuid4().hex
        item.status = "copying" if known else "hashing"

        def progress(n: int) -> None:
            item.bytes_completed += n

        if known:  # unchanged since stored: copy it, no hashing
            record = self.store.file(known)
            assert record is not None
            _copy(local, staged, progress)
            self._count(stat_cache_hits=1, chunks_reused=len(record.chunks))
        else:
            # The copy into the sandbox (kernel-side copy, fsynced) runs beside the
            # chunking, hashing and storing; a file that changes meanwhile is refused.
            copying = _COPIES.submit(_copy_fast, local, staged)
            record = self.store.ingest(local, on_bytes=progress)
            copying.result()
            if _signature(local.stat()) != _signature(st):
                raise TransferFailed(f"{name} changed while it was uploaded; upload it again")
            self.store.stat_store(name, st, record.hash)
            self._count(bytes_hashed=record.size, bytes_stored=record.bytes_written,
                        chunks_new=record.new_chunks, chunks_reused=record.reused_chunks)
        item.hash = record.hash
        if self._unchanged_in_session(have, record.hash, parts):
            staged.unlink(missing_ok=True)
            item.status = "skipped"
            self._count(files_skipped=1)
            return
        self._placements.append((item, parts, staged, record))
        item.status = "done"

    def _unchanged_in_session(self, have: dict[str, Any] | None, digest: str,
                              parts: tuple[str, ...]) -> bool:
        """The session has this content at this path, and the sandbox has not changed it."""
        if have is None or have["hash"] != digest:
            return False
        st = self.workdir.lstat(parts)
        return st is not None and (st.st_size, st.st_mtime_ns) == (have["size"],
                                                                   have["mtime_ns"])

    def commit(self, manifest_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Wait for every file, place them all in the work directory, return the manifest."""
        if self._committed:
            raise InvalidArgument("this upload commit is already committed")
        self._committed = True
        try:
            self._wait()
            self._check_quota()
            registry = self.session.manager.registry
            for _item, parts, staged, record in self._placements:
                st = self.workdir.place(staged, parts)
                self.store.add_ref(record.hash)
                replaced = registry.set_session_file(self.session.id, "/".join(parts),
                                                     record.hash, st.st_size, st.st_mtime_ns)
                if replaced is not None:  # the path's earlier upload: its reference goes
                    self.store.release(replaced)
                if self.session._recorder is not None:
                    self.session._recorder.forget("/".join(parts), st)
                self._count(bytes_moved=record.size)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        manifest = self.manifest()
        if manifest_path is not None:
            tmp = Path(f"{manifest_path}.tmp")
            tmp.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp, manifest_path)
        return manifest

    def manifest(self) -> dict[str, Any]:
        files = []
        for item in self._items:
            record = self.store.file(item.hash) if item.hash else None
            if record is not None:
                files.append({"dest": item.name, "hash": record.hash, "size": record.size,
                              "chunks": [list(c) for c in record.chunks]})
        return {"session": self.session.id, "created": time.time(), "files": files,
                "stats": dict(self.stats)}

    def _check_quota(self) -> None:
        quota = self.session.info()["limits"].get("disk")
        if not quota:
            return
        incoming = sum(r.size for _, _, _, r in self._placements)
        replaced = sum(st.st_size for _, parts, _, _ in self._placements
                       if (st := self.workdir.lstat(parts)) is not None)
        # The kernel's log (capped, see sandbox.kernel_log) is the session's too.
        used = self.workdir.usage() + log_size(self.workdir.root.parent, KERNEL_LOG)
        if used - replaced + incoming > quota:
            raise QuotaExceeded(
                f"the upload ({format_size(incoming)}) would take the session's files (work "
                f"directory and kernel log) to "
                f"{format_size(used - replaced + incoming)}, over the session's disk quota of "
                f"{format_size(quota)}; nothing was placed. Remove files or create the session "
                "with a larger limits={'disk': ...}"
            )


class DownloadGroup(_Batch):
    def __init__(self, session: AsyncSession):
        super().__init__(session)
        self._results: list[dict[str, Any]] = []

    def add(self, source: str | dict[str, Any], local_dest: str | os.PathLike[str]) -> None:
        """A file of the work directory (a path) or of a manifest (an entry), to ``local_dest``.

        ``local_dest`` an existing directory: the file keeps its own name in it.
        """
        if isinstance(source, dict):
            digest, name, size = _manifest_entry(source)
        elif isinstance(source, str):
            parts = relative_parts(source, "sandbox path")
            name, size = parts[-1], 0
        else:
            raise InvalidArgument(f"download a work-directory path or a manifest entry, "
                                  f"not {source!r}")
        dest = Path(local_dest).expanduser().absolute()
        if dest.is_dir():
            dest = dest / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, dict):
            item = ItemProgress(source.get("dest", digest), bytes_total=size)
            self._items.append(item)
            self._futures.append(_POOL.submit(self._from_store, digest, dest, item))
        else:
            item = ItemProgress("/".join(parts))
            self._items.append(item)
            self._futures.append(_POOL.submit(self._from_sandbox, parts, dest, item))

    def _from_store(self, digest: str, dest: Path, item: ItemProgress) -> None:
        try:
            item.status = "copying"
            record = self.store.export(digest, dest, on_bytes=lambda n: _add(item, n))
            self._done(item, record, dest)
        except Exception as exc:
            item.status, item.error = "failed", _why(exc)

    def _from_sandbox(self, parts: tuple[str, ...], dest: Path, item: ItemProgress) -> None:
        tmp = dest.with_name(f".{dest.name}.sk-{uuid.uuid4().hex[:8]}")
        try:
            with self.workdir.open_file(parts) as (fd, st):
                item.bytes_total = st.st_size
                item.status = "hashing"
                record = self.store.ingest(f"/proc/self/fd/{fd}", copy_to=tmp,
                                           on_bytes=lambda n: _add(item, n))
            os.replace(tmp, dest)
            self._count(bytes_stored=record.bytes_written, chunks_new=record.new_chunks,
                        chunks_reused=record.reused_chunks)
            self._done(item, record, dest)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            item.status, item.error = "failed", _why(exc)

    def _done(self, item: ItemProgress, record: FileRecord, dest: Path) -> None:
        item.hash, item.status = record.hash, "done"
        item.bytes_completed = item.bytes_total = record.size
        self._count(bytes_moved=record.size)
        self._results.append({"source": item.name, "dest": str(dest), "hash": record.hash,
                              "size": record.size, "verified": True})

    def finish(self) -> list[dict[str, Any]]:
        """Wait for every file; each result carries the hash it was verified against."""
        self._wait()
        return list(self._results)


def _remove_stale(staging_root: Path, age: float = 3600.0) -> None:
    """Staging left by a client killed mid-upload: never visible to the sandbox, removed later."""
    if not staging_root.is_dir():
        return
    for entry in staging_root.iterdir():
        if time.time() - entry.stat().st_mtime > age:
            shutil.rmtree(entry, ignore_errors=True)


def _add(item: ItemProgress, n: int) -> None:
    item.bytes_completed += n


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _copy_fast(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)  # copy_file_range/sendfile: no bytes through Python
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def _copy(src: Path, dst: Path, progress: Any, block: int = 4 << 20) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while data := fin.read(block):
            fout.write(data)
            progress(len(data))
        fout.flush()
        os.fsync(fout.fileno())


def upload_paths(commit: UploadCommit, paths: Iterable[Any]) -> None:
    """Accept a list of paths or a {local: dest} mapping."""
    if isinstance(paths, dict):
        for local, dest in paths.items():
            commit.add(local, dest)
    else:
        for local in [paths] if isinstance(paths, str | os.PathLike) else paths:
            commit.add(local)



_HASH = re.compile(r"[0-9a-f]{64}")


def _manifest_entry(entry: dict[str, Any]) -> tuple[str, str, int]:
    """A manifest entry's hash, file name and size, checked: manifests are files users edit."""
    digest, dest, size = entry.get("hash"), entry.get("dest"), entry.get("size", 0)
    if not isinstance(digest, str) or not _HASH.fullmatch(digest):
        raise InvalidArgument(f"not a manifest entry (its hash is not 64 hex digits): "
                              f"{entry!r}")
    if dest is None:
        name = digest
    elif isinstance(dest, str) and "\0" not in dest:
        name = PurePosixPath(dest).name
    else:
        name = ""
    if name in ("", ".", ".."):
        raise InvalidArgument(f"manifest entry's dest {dest!r} names no file: {entry!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"manifest entry's size {size!r} is not a byte count: {entry!r}")
    return digest, name, size


def _why(exc: Exception) -> str:
    """A failed file's reason, as the user can act on it."""
    if is_disk_full(exc):
        return ("no space left on the device it was written to; nothing half-written was "
                "kept: free space there (`sandbox-kernel gc` for the state directory) and "
                "transfer it again")
    return shown(str(exc))  # it may quote a file name the sandbox chose
