"""How files are cut and named: FastCDC chunks of ~64 KiB, BLAKE3 hashes.

Content-defined cut points move with the content, so inserting bytes into a
file changes only the chunks around the insertion; every other chunk keeps
its hash and is not stored again. A file's hash is BLAKE3 over its ordered
chunk hashes, so it can be checked chunk by chunk while streaming.
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


def cut(path: str | Path) -> Iterator[memoryview]:
    for chunk in chunker().cut_file(str(path)):
        yield chunk.data


def chunk_hash(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


def file_hash(chunk_hashes: Iterable[str]) -> str:
    h = blake3.blake3()
    for c in chunk_hashes:
        h.update(bytes.fromhex(c))
    return h.hexdigest()
