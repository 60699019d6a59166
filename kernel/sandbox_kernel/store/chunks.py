"""How files are cut and named: FastCDC chunks of ~64 KiB, BLAKE3 hashes.

Content-defined cut points move with the content, so inserting bytes into a
file changes only the chunks around the insertion; every other chunk keeps
its hash and is not stored again. Memory buffers, which change in place and
do not grow in the middle, are cut at fixed offsets instead (cheaper). A
file's hash is BLAKE3 over its ordered chunk hashes, so it can be checked
chunk by chunk while streaming.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import blake3
from pyfastcdc import FastCDC

CHUNK_AVG = 64 * 1024
CHUNK_MIN = 16 * 1024
CHUNK_MAX = 256 * 1024


def chunker() -> FastCDC:
    """A chunker per thread: FastCDC objects must not be shared."""
    return FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)


def cut(path: str | Path) -> Iterator[bytes]:
    """The file's chunks, read (not mapped) and copied out of the cutter's buffer.

    Not ``cut_file``: it maps the file, and a file that shrinks while mapped (a
    sandbox rewriting its output while we record it as an artifact) kills the
    whole process with SIGBUS; a test run met exactly that. ``cut_stream``
    reuses one buffer for every chunk, and the store holds a batch of chunks
    at a time, so each chunk is copied out.
    """
    with open(path, "rb", buffering=0) as f:
        for chunk in chunker().cut_stream(f):
            yield bytes(chunk.data)


def cut_fixed(path: str | Path, size: int) -> Iterator[bytes]:
    """The file in pieces of ``size`` bytes (the last one shorter).

    For memory buffers (a NumPy array's data, captured by a snapshot): they change
    in place, where content-defined cuts buy nothing, and finding those cuts
    costs more than hashing the chunks does (about 0.55 s against 0.35 s per GiB
    here).
    """
    with open(path, "rb", buffering=0) as f:
        while True:
            data = f.read(size)
            if not data:
                return
            while len(data) < size:  # a pipe or a short read: fill the chunk
                more = f.read(size - len(data))
                if not more:
                    break
                data += more
            yield data


def chunk_hash(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


def file_hash(chunk_hashes: Iterable[str]) -> str:
    h = blake3.blake3()
    for c in chunk_hashes:
        h.update(bytes.fromhex(c))
    return h.hexdigest()
