"""The store on its own: packs that hold exactly one file, fixed-size chunks, verification.

A real store on disk; corruption is made by writing into its pack files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox_kernel.store import ContentStore
from sandbox_kernel.store.store import CorruptChunk, MissingChunk

MiB = 1 << 20


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_a_one_pack_file_is_its_pack_and_is_verified_before_it_is_handed_out(tmp_path):
    store = ContentStore(tmp_path / "store", pack_size=1 * MiB)
    src = random_file(tmp_path / "buffer.bin", 5 * MiB + 123)
    record = store.ingest(src, one_pack=True, fixed_chunks=256 << 10)
    assert [size for _, size in record.chunks[:-1]] == [256 << 10] * (len(record.chunks) - 1)
    assert len(list(store.packs.glob("*.pack"))) == 1  # past pack_size, still one pack
    pack = store.pack_holding(record.hash)
    assert pack is not None and pack.read_bytes() == src.read_bytes()

    with open(pack, "r+b") as f:  # one flipped byte in the third chunk
        f.seek(2 * (256 << 10) + 7)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CorruptChunk, match="corrupt"):
        store.pack_holding(record.hash)
    # The chunk is no longer served, by either path, until an upload of it repairs it.
    assert store.pack_holding(record.hash) is None
    with pytest.raises(MissingChunk, match="not in the store"):
        store.export(record.hash, tmp_path / "out.bin")
    store.ingest(src, fixed_chunks=256 << 10)
    store.export(record.hash, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("case", ["split across packs", "compressible", "repeated chunks",
                                  "shares chunks with an earlier file"])
def test_no_pack_is_handed_out_unless_it_is_exactly_the_file(tmp_path, case):
    store = ContentStore(tmp_path / "store", pack_size=1 * MiB)
    chunk = 256 << 10
    if case == "split across packs":  # an upload keeps to pack_size
        record = store.ingest(random_file(tmp_path / "f", 3 * MiB), fixed_chunks=chunk)
    elif case == "compressible":
        (tmp_path / "f").write_bytes(b"\0" * (2 * MiB))
        record = store.ingest(tmp_path / "f", one_pack=True, fixed_chunks=chunk)
    elif case == "repeated chunks":
        (tmp_path / "f").write_bytes(os.urandom(chunk) * 4)
        record = store.ingest(tmp_path / "f", one_pack=True, fixed_chunks=chunk)
    else:  # its first half is stored already, in another pack
        first = os.urandom(MiB)
        (tmp_path / "a").write_bytes(first)
        store.ingest(tmp_path / "a", one_pack=True, fixed_chunks=chunk)
        (tmp_path / "f").write_bytes(first + os.urandom(MiB))
        record = store.ingest(tmp_path / "f", one_pack=True, fixed_chunks=chunk)
    assert store.pack_holding(record.hash) is None
    store.export(record.hash, tmp_path / "out")  # served as a copy instead
    assert (tmp_path / "out").read_bytes() == (tmp_path / "f").read_bytes()
