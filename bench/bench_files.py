"""Files through the store, against cp and an hf_xet upload commit to a local:// endpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import Row

from sandbox_kernel import SessionManager

GiB = 1024**3
MiB = 1024**2


def _random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    return path


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_files(manager: SessionManager, size: int = GiB) -> list[Row]:
    import hf_xet

    tmp = Path(tempfile.mkdtemp(prefix="skbf-", dir="/tmp"))
    try:
        src = _random_file(tmp / "new.bin", size)
        with open(src, "rb") as f:  # the same warm page cache for everyone
            while f.read(64 * MiB):
                pass
        cp_s = _timed(lambda: subprocess.run(["cp", str(src), str(tmp / "cp-copy.bin")],
                                             check=True))
        # Ours is durable (fsynced) when commit() returns; so is cp followed by sync.
        cp_sync_s = _timed(lambda: subprocess.run(
            ["sh", "-c", f"cp {src} {tmp / 'cp-sync.bin'} && sync {tmp / 'cp-sync.bin'}"],
            check=True))
        session = manager.create(name="bench-files")
        ours_s = _timed(lambda: session.upload(src))
        xet = hf_xet.XetSession()
        xet_dir = tmp / "xet"

        def xet_upload() -> None:
            with xet.new_upload_commit(endpoint=f"local://{xet_dir}") as commit:
                commit.start_upload_file(str(src))

        xet_s = _timed(xet_upload)
        again: dict = {}
        reupload_s = _timed(lambda: again.update(session.upload(src)))
        assert again["stats"]["files_skipped"] == 1

        half = _random_file(tmp / "half.bin", size // 2)
        session.upload(half, "half.bin")
        data = half.read_bytes()
        edited = tmp / "half-edited.bin"
        edited.write_bytes(data[: len(data) // 2] + b"i" * 100 + data[len(data) // 2:])
        del data
        inserted = session.upload(edited, "half.bin")["stats"]
        manager.close(session.id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gib = size / GiB
    return [
        Row(f"upload new data {gib:g} GiB", size / MiB / ours_s, size / MiB / cp_s, "cp",
            "MiB/s", ">= 0.9x", higher_is_better=True),
        Row(f"upload new data {gib:g} GiB", size / MiB / ours_s, size / MiB / cp_sync_s,
            "cp && sync (durable, as ours)", "MiB/s", "-", higher_is_better=True),
        Row(f"upload new data {gib:g} GiB", size / MiB / ours_s, size / MiB / xet_s,
            "hf_xet upload commit, local://", "MiB/s", ">= 1x", higher_is_better=True),
        Row(f"re-upload unchanged {gib:g} GiB", reupload_s * 1000, cp_s * 1000, "cp", "ms",
            "<= 50 ms"),
        Row(f"100-byte insert into {gib / 2:g} GiB: new chunks", inserted["chunks_new"],
            size // 2 // (64 * 1024), "chunks in the file (~64 KiB each)", "chunks", "<= 3"),
    ]
