"""The store: chunks packed into append-only files, indexed in SQLite, verified on every read.

A file per chunk would cost one create and one fsync per 64 KiB (16,000 per
GiB), so new chunks are appended to a pack file instead: written under a
temporary name, fsynced once, renamed, and only then indexed, in one
transaction. A pack is flushed every ``pack_size`` bytes, so an upload that is
killed keeps every pack it finished and a rerun stores only what is missing.
A chunk is compressed with zstd only when its file compresses (judged on its
first chunk) and the result is smaller. Every read checks the chunk's BLAKE3
hash; a corrupt chunk is reported, dropped from the index so that the next
upload of its content repairs it, and never served.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from ..errors import SandboxError
from .chunks import chunk_hash, cut, cut_fixed, file_hash

RAW, ZSTD = 0, 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    hash TEXT PRIMARY KEY, pack TEXT NOT NULL, offset INTEGER NOT NULL,
    stored INTEGER NOT NULL, size INTEGER NOT NULL, codec INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_pack ON chunks(pack);
CREATE TABLE IF NOT EXISTS files (
    hash TEXT PRIMARY KEY, size INTEGER NOT NULL, chunks TEXT NOT NULL,
    refs INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stat_cache (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL, dev INTEGER NOT NULL, hash TEXT NOT NULL
);
"""
_BATCH = 256  # chunks looked up in the index at once
#: The second half of a large export (see ContentStore.export).
_EXPORTS = concurrent.futures.ThreadPoolExecutor(max_workers=4,
                                                 thread_name_prefix="sandbox-kernel-export")


def _lower_priority() -> None:
    with contextlib.suppress(OSError):  # a nicety: verification is correct at any priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


#: Verification of packs handed out to be mapped: one thread at a time, at a lower
#: priority, so that the sandbox a resume starts meanwhile keeps a core to itself.
_VERIFY_READ = 4 << 20  # bytes read at once while verifying
_VERIFY = concurrent.futures.ThreadPoolExecutor(max_workers=1, initializer=_lower_priority,
                                                thread_name_prefix="sandbox-kernel-verify")


def _offsets(chunks: list[tuple[str, int]]) -> list[int]:
    """Where each chunk starts in its file."""
    return list(itertools.accumulate((size for _, size in chunks), initial=0))[:-1]


class CorruptChunk(SandboxError):
    """A stored chunk does not match its hash."""


class MissingChunk(SandboxError):
    """A file needs a chunk the store does not have."""


@dataclass
class FileRecord:
    """A stored file, and what storing it cost."""

    hash: str
    size: int
    chunks: list[tuple[str, int]]
    new_chunks: int = 0
    reused_chunks: int = 0
    bytes_written: int = 0  # to the store, after compression
    stat_cache_hit: bool = False
    extra: dict[str, int] = field(default_factory=dict)


class ContentStore:
    def __init__(self, root: str | Path, pack_size: int = 64 * 1024 * 1024,
                 compression_level: int = 3):
        self.root = Path(root)
        self.packs = self.root / "packs"
        self.packs.mkdir(parents=True, exist_ok=True)
        self.pack_size = pack_size
        self.level = compression_level
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)

    # -- database ----------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """A connection per thread: uploads hash files in parallel."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(str(self.root / "store.db"), timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read snapshot (WAL): takes no write lock, so lookups never queue behind a writer."""
        db = self._connection()
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, its lock taken up front."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")  # may fail too (a full disk): then roll back as well
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # -- writing -----------------------------------------------------------------

    def ingest(
        self,
        path: str | Path,
        copy_to: str | Path | None = None,
        on_bytes: Callable[[int], None] | None = None,
        one_pack: bool = False,
        fixed_chunks: int | None = None,
    ) -> FileRecord:
        """Store a local file (and, in the same pass, copy it to ``copy_to``).

        ``one_pack`` keeps all of the file's new chunks in one pack, however large:
        when every chunk is new and incompressible, that pack is then the file byte
        for byte, and :meth:`pack_holding` can hand it out to be mapped. (Uploads
        keep to ``pack_size``, so that a killed upload keeps the packs it finished.)
        ``fixed_chunks`` cuts at fixed offsets, every so many bytes (see
        :func:`chunks.cut_fixed`): for memory buffers, which change in place.
        """
        writer = _PackWriter(self, one_pack)
        chunks: list[tuple[str, int]] = []
        record = FileRecord("", 0, chunks)
        compress: bool | None = None
        batch: list[tuple[str, memoryview]] = []
        out = open(copy_to, "wb") if copy_to is not None else None  # noqa: SIM115
        try:
            for data in (cut_fixed(path, fixed_chunks) if fixed_chunks else cut(path)):
                if compress is None:
                    compress = len(zstandard.compress(bytes(data), 1)) < 0.9 * len(data)
                if out is not None:
                    out.write(data)
                h = chunk_hash(data)
                chunks.append((h, len(data)))
                record.size += len(data)
                batch.append((h, data))
                if len(batch) >= _BATCH:
                    self._store_batch(batch, writer, record, bool(compress))
                    batch = []
                if on_bytes is not None:
                    on_bytes(len(data))
            self._store_batch(batch, writer, record, bool(compress))
            writer.flush()
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            writer.abandon()
            raise
        finally:
            if out is not None:
                out.close()
        record.hash = file_hash(h for h, _ in chunks)
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO files (hash, size, chunks, refs, created) "
                       "VALUES (?, ?, ?, 0, ?)",
                       (record.hash, record.size, json.dumps(chunks), time.time()))
        return record

    def _store_batch(self, batch: list[tuple[str, memoryview]], writer: _PackWriter,
                     record: FileRecord, compress: bool) -> None:
        if not batch:
            return
        known = self._known({h for h, _ in batch}) | writer.pending
        for h, data in batch:
            if h in known:
                record.reused_chunks += 1
                continue
            known.add(h)
            record.bytes_written += writer.add(h, data, compress)
            record.new_chunks += 1

    def _known(self, hashes: set[str]) -> set[str]:
        marks = ",".join("?" * len(hashes))
        with self._read() as db:
            rows = db.execute(f"SELECT hash FROM chunks WHERE hash IN ({marks})", tuple(hashes))
            return {r[0] for r in rows}

    # -- reading -----------------------------------------------------------------

    def file(self, digest: str) -> FileRecord | None:
        with self._read() as db:
            row = db.execute("SELECT size, chunks FROM files WHERE hash=?", (digest,)).fetchone()
        if row is None:
            return None
        return FileRecord(digest, row[0], [tuple(c) for c in json.loads(row[1])])

    def read_chunk(self, digest: str) -> bytes:
        return self._read_located(digest, self._locate([digest]).get(digest), {})

    def _locate(self, digests: list[str]) -> dict[str, tuple[str, int, int, int]]:
        """Where chunks are (pack, offset, stored size, codec), a few hundred per query."""
        found: dict[str, tuple[str, int, int, int]] = {}
        unique = list(dict.fromkeys(digests))
        with self._read() as db:
            for i in range(0, len(unique), 500):
                part = unique[i:i + 500]
                rows = db.execute("SELECT hash, pack, offset, stored, codec FROM chunks "
                                  f"WHERE hash IN ({','.join('?' * len(part))})", part)
                found.update((r[0], tuple(r[1:])) for r in rows)
        return found

    def _read_located(self, digest: str, where: tuple[str, int, int, int] | None,
                      packs: dict[str, int]) -> bytes:
        """A chunk's bytes, verified; ``packs`` caches open pack descriptors for the caller."""
        if where is None:
            raise MissingChunk(f"chunk {digest[:16]}… is not in the store; upload its file again")
        pack, offset, stored, codec = where
        try:
            fd = packs.get(pack)
            if fd is None:
                fd = packs[pack] = os.open(self.packs / pack, os.O_RDONLY | os.O_CLOEXEC)
            payload = os.pread(fd, stored, offset)
            data = zstandard.decompress(payload) if codec == ZSTD else payload
        except (OSError, zstandard.ZstdError):
            data = b""
        if chunk_hash(data) != digest:
            raise self._corrupt(digest, pack)
        return data

    def _corrupt(self, digest: str, pack: str) -> CorruptChunk:
        with self._db() as db:  # never serve it again; the next upload of it repairs it
            db.execute("DELETE FROM chunks WHERE hash=?", (digest,))
        return CorruptChunk(
            f"chunk {digest[:16]}… in pack {pack} is corrupt (its hash does not match); "
            "it was not served. Upload the file again to repair the store."
        )

    def pack_holding(self, digest: str) -> Path | None:
        """The pack whose bytes are exactly this file's, verified; None if it is not stored so.

        A sandbox can map such a pack copy-on-write instead of being handed a copy
        of the file: resuming a session then writes nothing, where a copy of its
        arrays costs a new page of memory for every page of data. Only a pack that
        is the file byte for byte qualifies (raw chunks, in order, nothing else in
        it: see ``ingest(one_pack=True)``), so whoever maps it sees that file and
        nothing more. Its chunks are verified first, as on every read.
        """
        record = self.file(digest)
        if record is None or file_hash(h for h, _ in record.chunks) != digest:
            return None  # export() says what is wrong
        where = self._locate([h for h, _ in record.chunks])
        packs = {w[0] for w in where.values()}
        if len(packs) != 1 or len(where) != len(record.chunks):
            return None
        offsets = _offsets(record.chunks)
        if any(where[h][1:] != (at, size, RAW)
               for (h, size), at in zip(record.chunks, offsets, strict=True)):
            return None
        pack = packs.pop()
        path = self.packs / pack
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size != record.size:
                    return None
                bad = self._verify_in_place(f.fileno(), record.chunks, offsets)
        except (OSError, ValueError):
            return None
        if bad is not None:
            raise self._corrupt(bad, pack)
        return path

    @staticmethod
    def _verify_in_place(fd: int, chunks: list[tuple[str, int]], offsets: list[int]
                         ) -> str | None:
        """The first chunk whose bytes in the file do not match its hash, or None.

        Read, not mapped: a disk error while reading a mapping would kill this
        process (SIGBUS), where a read raises. Runs of chunks are read into one
        buffer, on the one verifying thread (see ``_VERIFY``).
        """
        def verify() -> str | None:
            buffer, i, n = bytearray(_VERIFY_READ), 0, len(chunks)
            while i < n:  # chunks i..j-1: a run that fits the buffer (at least one chunk)
                j = i + 1
                while j < n and offsets[j] + chunks[j][1] - offsets[i] <= _VERIFY_READ:
                    j += 1
                size = offsets[j - 1] + chunks[j - 1][1] - offsets[i]
                run = memoryview(buffer if size <= len(buffer) else bytearray(size))[:size]
                if os.preadv(fd, [run], offsets[i]) != size:
                    return chunks[i][0]
                for k in range(i, j):
                    at = offsets[k] - offsets[i]
                    if chunk_hash(run[at:at + chunks[k][1]]) != chunks[k][0]:
                        return chunks[k][0]
                i = j
            return None

        return _VERIFY.submit(verify).result()

    def export(self, digest: str, dest: str | Path,
               on_bytes: Callable[[int], None] | None = None, fsync: bool = True) -> FileRecord:
        """Write a stored file to ``dest``: verified, fsynced, renamed into place.

        Large files are read, verified and written by two threads, each over its
        own half of the chunks (BLAKE3 and zstd release the GIL). ``fsync=False``
        for transient copies (a snapshot being loaded): the store keeps the
        durable one.
        """
        record = self.file(digest)
        if record is None:
            raise MissingChunk(f"file {digest[:16]}… is not in the store")
        if file_hash(h for h, _ in record.chunks) != digest:
            raise CorruptChunk(f"file {digest[:16]}… does not match its chunk list")
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.sk-{uuid.uuid4().hex[:8]}")
        where = self._locate([h for h, _ in record.chunks])
        offsets = _offsets(record.chunks)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, record.size)

                def part(lo: int, hi: int) -> None:
                    packs: dict[str, int] = {}
                    try:
                        for i in range(lo, hi):
                            h = record.chunks[i][0]
                            data = self._read_located(h, where.get(h), packs)
                            os.pwrite(fd, data, offsets[i])
                            if on_bytes is not None:
                                on_bytes(len(data))
                    finally:
                        for pfd in packs.values():
                            os.close(pfd)

                n = len(record.chunks)
                if n >= 64:
                    half = n // 2
                    other = _EXPORTS.submit(part, half, n)
                    try:
                        part(0, half)
                    finally:
                        other.result()
                else:
                    part(0, n)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return record

    # -- references, the stat cache, gc ------------------------------------------------

    def add_ref(self, digest: str, n: int = 1) -> None:
        with self._db() as db:
            db.execute("UPDATE files SET refs = refs + ? WHERE hash=?", (n, digest))

    def release(self, digest: str) -> None:
        self.add_ref(digest, -1)

    def stat_lookup(self, path: str | Path, st: os.stat_result) -> str | None:
        """The hash of a local file unchanged since it was last stored, without reading it."""
        with self._read() as db:
            row = db.execute("SELECT size, mtime_ns, ino, dev, hash FROM stat_cache WHERE path=?",
                             (str(path),)).fetchone()
            if row is None or tuple(row[:4]) != (st.st_size, st.st_mtime_ns, st.st_ino,
                                                 st.st_dev):
                return None
            exists = db.execute("SELECT 1 FROM files WHERE hash=?", (row[4],)).fetchone()
        return row[4] if exists else None

    def stat_store(self, path: str | Path, st: os.stat_result, digest: str) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO stat_cache VALUES (?, ?, ?, ?, ?, ?)",
                       (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, digest))

    def gc(self, grace: float = 3600.0) -> dict[str, int]:
        """Drop unreferenced files, then chunks no file needs, then packs no chunk is in."""
        now = time.time()
        with self._db() as db:
            dropped_files = db.execute("DELETE FROM files WHERE refs <= 0 AND created < ?",
                                       (now - grace,)).rowcount
            live = {h for (c,) in db.execute("SELECT chunks FROM files")
                    for h, _ in json.loads(c)}
            dead = [h for (h,) in db.execute("SELECT hash FROM chunks WHERE created < ?",
                                             (now - grace,)) if h not in live]
            for i in range(0, len(dead), 500):
                part = dead[i:i + 500]
                db.execute(f"DELETE FROM chunks WHERE hash IN ({','.join('?' * len(part))})",
                           part)
            used_packs = {p for (p,) in db.execute("SELECT DISTINCT pack FROM chunks")}
        removed = 0
        for pack in self.packs.iterdir():
            stale_tmp = pack.name.startswith(".") and now - pack.stat().st_mtime > grace
            if stale_tmp or (pack.suffix == ".pack" and pack.name not in used_packs
                             and now - pack.stat().st_mtime > grace):
                pack.unlink(missing_ok=True)
                removed += 1
        return {"files": dropped_files, "chunks": len(dead), "packs": removed}

    def stats(self) -> dict[str, int]:
        with self._read() as db:
            chunks, stored, raw = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(stored),0), COALESCE(SUM(size),0) FROM chunks"
            ).fetchone()
            files = db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        return {"chunks": chunks, "stored_bytes": stored, "raw_bytes": raw, "files": files}


class _PackWriter:
    """New chunks of one ingest, appended to packs that become visible only when durable.

    A full pack is made durable (fsync, rename, index) on a background thread
    while the ingest goes on cutting and hashing; ``flush()`` returns when
    every pack of the ingest is durable and indexed.
    """

    _flusher = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                     thread_name_prefix="sandbox-kernel-packs")

    def __init__(self, store: ContentStore, one_pack: bool = False):
        self.store = store
        self.one_pack = one_pack
        self.pending: set[str] = set()
        self._rows: list[tuple] = []
        self._file = None
        self._name = ""
        self._size = 0
        self._zstd = zstandard.ZstdCompressor(level=store.level)
        self._flushing: list[concurrent.futures.Future[None]] = []

    def add(self, digest: str, data: memoryview, compress: bool) -> int:
        payload: bytes | memoryview = data  # written as is: no copy of incompressible data
        codec = RAW
        if compress:
            packed = self._zstd.compress(data)
            if len(packed) < len(data):
                payload, codec = packed, ZSTD
        if self._file is None:
            self._name = f"{uuid.uuid4().hex}.pack"
            self._file = open(self.store.packs / f".{self._name}.tmp", "wb")  # noqa: SIM115
            self._size = 0
        self._file.write(payload)
        self._rows.append((digest, self._name, self._size, len(payload), len(data), codec,
                           time.time()))
        before = self._size
        self._size += len(payload)
        self.pending.add(digest)
        if self._size // self.store.pack_size > before // self.store.pack_size:
            if self.one_pack:
                self._write_back()
            else:
                self._seal()
        return len(payload)

    def _write_back(self) -> None:
        """Start writing a growing pack to disk in the background, so that its final
        fsync waits for the last part only, not for the whole pack."""
        assert self._file is not None
        self._file.flush()
        fd = os.dup(self._file.fileno())  # its own descriptor: the pack may be closed first

        def write_back() -> None:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

        self._flushing.append(self._flusher.submit(write_back))

    def _seal(self) -> None:
        """Hand the current pack to the background: fsync, rename, then index."""
        if self._file is None:
            return
        f, name, rows = self._file, self._name, self._rows
        self._file, self._rows = None, []
        self._flushing.append(self._flusher.submit(self._make_durable, f, name, rows))

    def _make_durable(self, f: Any, name: str, rows: list[tuple]) -> None:
        tmp = self.store.packs / f".{name}.tmp"
        try:
            f.flush()  # the last buffered bytes: a full disk can refuse them here
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, self.store.packs / name)
        except BaseException:
            with contextlib.suppress(OSError):
                f.close()
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.store.packs, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        with self.store._db() as db:
            db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def flush(self) -> None:
        self._seal()
        flushing, self._flushing = self._flushing, []
        for fut in flushing:
            fut.result()  # re-raises a failed fsync: the ingest fails, nothing half-indexed
        self.pending = set()

    def abandon(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # its buffered bytes may not fit either
                self._file.close()
            (self.store.packs / f".{self._name}.tmp").unlink(missing_ok=True)
            self._file = None
        concurrent.futures.wait(self._flushing)
