"""Uploads and downloads through the store: dedup counted in bytes, progress, bad input, faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sandbox_kernel.errors import InvalidArgument
from sandbox_kernel.transfer import QuotaExceeded, TransferFailed
from sandbox_kernel.workdir import UnsafePath

MiB = 1024 * 1024


@pytest.fixture
def files(tmp_path):
    def make(name: str, size: int, seed: int = 0) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size) if seed == 0 else bytes([seed % 256]) * size)
        return path
    return make


def test_commit_places_files_and_returns_a_manifest(manager, files, tmp_path):
    s = manager.create(name="up")
    a = files("data/a.bin", 3 * MiB)
    b = files("data/sub/b.txt", 1000, seed=7)
    commit = s.upload_commit()
    commit.add(tmp_path / "data", "inputs")
    manifest = commit.commit(tmp_path / "manifest.json")
    dests = sorted(f["dest"] for f in manifest["files"])
    assert dests == ["inputs/a.bin", "inputs/sub/b.txt"]
    assert json.loads((tmp_path / "manifest.json").read_text())["files"] == manifest["files"]
    entry = [f for f in manifest["files"] if f["dest"] == "inputs/a.bin"][0]
    assert entry["size"] == 3 * MiB and len(entry["chunks"]) > 10 and len(entry["hash"]) == 64
    assert s.run("import os; os.path.getsize('inputs/a.bin')").result == str(3 * MiB)
    assert (s.work_dir / "inputs/sub/b.txt").read_bytes() == b.read_bytes()
    assert manifest["stats"]["bytes_moved"] == 3 * MiB + 1000
    # The manifest round trip: a later download group fetches the same bytes, verified.
    saved = json.loads((tmp_path / "manifest.json").read_text())
    group = s.download_group()
    for f in saved["files"]:
        group.add(f, tmp_path / "restored" / f["dest"])
    results = group.finish()
    assert all(r["verified"] for r in results)
    assert (tmp_path / "restored/inputs/a.bin").read_bytes() == a.read_bytes()


def test_progress_is_polled_from_another_thread(manager, files):
    s = manager.create(name="progress")
    big = files("big.bin", 96 * MiB)
    commit = s.upload_commit()
    commit.add(big)
    seen = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            seen.append(commit.get_progress())
            time.sleep(0.002)

    watcher = threading.Thread(target=poll)
    watcher.start()
    commit.commit()
    stop.set()
    watcher.join()
    done = commit.get_progress()
    assert done["bytes_completed"] == done["bytes_total"] == 96 * MiB
    assert done["files"][0]["status"] == "done" and done["files_done"] == 1
    completed = [p["bytes_completed"] for p in seen]
    assert completed == sorted(completed)
    assert any(0 < c < 96 * MiB for c in completed)  # seen part-way, not only at the ends


def test_dedup_level_one_unchanged_file_moves_nothing(manager, files):
    s = manager.create(name="dedup1")
    f = files("model.bin", 8 * MiB)
    first = s.upload(f)["stats"]
    assert first["bytes_moved"] == 8 * MiB and first["bytes_hashed"] == 8 * MiB
    again = s.upload(f)["stats"]
    assert again == {**again, "bytes_moved": 0, "bytes_hashed": 0, "bytes_stored": 0,
                     "files_skipped": 1, "stat_cache_hits": 1}
    # When the sandbox changes its copy, the next upload puts the file back.
    s.run("open('model.bin', 'ab').write(b'changed')")
    restored = s.upload(f)["stats"]
    assert restored["bytes_moved"] == 8 * MiB and restored["bytes_stored"] == 0
    assert (s.work_dir / "model.bin").read_bytes() == f.read_bytes()


def test_dedup_level_two_known_chunks_are_not_stored_again(manager, files, tmp_path):
    one, two = manager.create(name="dedup2a"), manager.create(name="dedup2b")
    f = files("shared.bin", 8 * MiB)
    first = one.upload(f)
    assert first["stats"]["bytes_stored"] == 8 * MiB
    copy = tmp_path / "copy-of-shared.bin"
    shutil.copyfile(f, copy)  # new inode: no stat-cache hit, the content is read and hashed
    stats = two.upload(copy)["stats"]
    assert stats["bytes_hashed"] == 8 * MiB and stats["stat_cache_hits"] == 0
    assert stats["bytes_stored"] == 0 and stats["chunks_new"] == 0
    assert stats["chunks_reused"] == len(first["files"][0]["chunks"])  # every one of them
    assert stats["bytes_moved"] == 8 * MiB


def test_dedup_level_three_stat_cache_skips_hashing(manager, files):
    s = manager.create(name="dedup3")
    f = files("data.bin", 8 * MiB)
    s.upload(f, "one.bin")
    stats = s.upload(f, "two.bin")["stats"]  # same local file, new destination
    assert stats["stat_cache_hits"] == 1 and stats["bytes_hashed"] == 0
    assert stats["bytes_moved"] == 8 * MiB
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: hashed again
    stats = s.upload(f, "three.bin")["stats"]
    assert stats["stat_cache_hits"] == 0 and stats["bytes_hashed"] == 8 * MiB
    assert stats["bytes_stored"] == 0


def test_a_small_insert_stores_few_new_chunks(manager, files, tmp_path):
    s = manager.create(name="insert")
    f = files("log.bin", 16 * MiB)
    s.upload(f)
    data = f.read_bytes()
    edited = tmp_path / "log-edited.bin"
    edited.write_bytes(data[:7 * MiB] + b"x" * 100 + data[7 * MiB:])
    stats = s.upload(edited, "log.bin")["stats"]
    assert 1 <= stats["chunks_new"] <= 3
    assert stats["bytes_stored"] < 1 * MiB


@pytest.mark.parametrize("dest, message", [
    ("../escape.txt", "leaves the work directory"),
    ("a/../../escape.txt", "leaves the work directory"),
    ("/etc/passwd", "absolute"),
    ("nul\0byte", "NUL"),
    ("", "empty"),
])
def test_bad_destinations(manager, files, dest, message):
    s = manager.create(name="dests")
    f = files("x.txt", 10, seed=1)
    with pytest.raises(InvalidArgument, match=message):
        s.upload_commit().add(f, dest)
    with pytest.raises(InvalidArgument, match=message):
        s.download_group().add(dest, f.parent / "out")


def test_links_in_the_sandbox_are_never_followed(manager, files, tmp_path):
    s = manager.create(name="links")
    secret = Path.home() / f".sk-secret-{os.getpid()}"
    secret.write_text("host secret")
    try:
        r = s.run(textwrap.dedent(f"""
            import os
            os.symlink({str(secret)!r}, 'file-link')
            os.symlink('/etc', 'dir-link')
            os.makedirs('real', exist_ok=True)
            try:
                os.link('/usr/bin/env', 'hard-link')
                print('hardlinked')
            except OSError as e:
                print('no hardlink:', type(e).__name__)
        """))
        assert "no hardlink" in r.stdout
        for source in ("file-link", "dir-link/hostname"):
            with pytest.raises(TransferFailed, match="symlink"):
                s.download([source], tmp_path / "out")
        assert not (tmp_path / "out" / "file-link").exists()
        f = files("payload.txt", 10, seed=2)
        with pytest.raises(UnsafePath, match="symlink"):
            s.upload(f, "dir-link/payload.txt")
        assert not Path("/etc/payload.txt").exists()
        s.run("import os; os.remove('file-link'); os.symlink('/etc/hostname', 'file-link')")
        assert [a.path for a in s.artifacts()] == []  # links are not recorded either
    finally:
        secret.unlink()


def test_quota(manager, files):
    s = manager.create(name="quota", limits={"disk": "4MiB"})
    with pytest.raises(QuotaExceeded, match="disk quota"):
        s.upload(files("too-big.bin", 5 * MiB))
    assert not (s.work_dir / "too-big.bin").exists()
    assert s.upload(files("fits.bin", 1 * MiB))["stats"]["bytes_moved"] == MiB


def test_a_corrupt_chunk_is_detected_and_never_served(manager, files, tmp_path):
    s = manager.create(name="corrupt")
    f = files("precious.bin", 2 * MiB)
    manifest = s.upload(f)
    chunk = manifest["files"][0]["chunks"][5][0]
    db = sqlite3.connect(Path(manager.home) / "store" / "store.db")
    pack, offset = db.execute("SELECT pack, offset FROM chunks WHERE hash=?", (chunk,)).fetchone()
    db.close()
    with open(Path(manager.home) / "store" / "packs" / pack, "r+b") as p:
        p.seek(offset + 100)
        p.write(b"\x00\x01\x02\x03")
    with pytest.raises(TransferFailed, match="corrupt"):
        s.download(manifest, tmp_path / "out")
    assert not (tmp_path / "out" / "precious.bin").exists()
    s.upload(f, "again.bin")  # unchanged local file: copied as is, no store read involved
    assert (s.work_dir / "again.bin").read_bytes() == f.read_bytes()
    fresh = tmp_path / "fresh-copy.bin"
    shutil.copyfile(f, fresh)
    assert s.upload(fresh, "repair.bin")["stats"]["chunks_new"] == 1  # ... and repairs it
    s.download(manifest, tmp_path / "out")
    assert (tmp_path / "out" / "precious.bin").read_bytes() == f.read_bytes()


def test_client_killed_mid_upload(manager, files):
    s = manager.create(name="killed")
    big = files("huge.bin", 320 * MiB)
    script = textwrap.dedent(f"""
        import sys, time
        from sandbox_kernel import SessionManager
        commit = SessionManager(home={manager.home!r}).get("killed").upload_commit()
        commit.add({str(big)!r})
        while True:
            print(commit.get_progress()["bytes_completed"], flush=True)
            time.sleep(0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if int(line) > 280 * MiB:  # several 64 MiB packs sealed by now
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (s.work_dir / "huge.bin").exists()  # nothing partial in the sandbox
    assert s.run("import os; os.path.exists('huge.bin')").result == "False"
    packs = Path(manager.home) / "store" / "packs"
    db = sqlite3.connect(Path(manager.home) / "store" / "store.db")
    indexed = {p for (p,) in db.execute("SELECT DISTINCT pack FROM chunks")}
    db.close()
    assert indexed and all((packs / p).exists() for p in indexed)
    assert not any(p.startswith(".") for p in indexed)  # no temporary pack is indexed
    again = s.upload(big)["stats"]
    # Only what was missing is stored again: at least one whole durable pack is reused.
    assert again["bytes_stored"] <= 320 * MiB - 64 * MiB
    assert again["chunks_reused"] * 256 * 1024 >= 64 * MiB
    assert (s.work_dir / "huge.bin").stat().st_size == 320 * MiB


def test_create_with_files_and_cli_round_trip(manager, files, tmp_path):
    f = files("seed.csv", 50, seed=3)
    s = manager.create(name="seeded", files={str(f): "in/seed.csv"})
    assert s.last_upload["files"][0]["dest"] == "in/seed.csv"
    assert s.run("len(open('in/seed.csv', 'rb').read())").result == "50"
    env = {**os.environ, "SANDBOX_KERNEL_HOME": manager.home}
    cli = str(Path(sys.executable).with_name("sandbox-kernel"))
    out = subprocess.run([cli, "download", "seeded", "in/seed.csv", f"--to={tmp_path / 'cli'}"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "verified" in out.stdout
    assert (tmp_path / "cli" / "seed.csv").read_bytes() == f.read_bytes()
    bad = subprocess.run([cli, "upload", "seeded", str(f), "--dest=../x"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("sandbox-kernel: error:")


def test_a_file_that_shrinks_while_stored_does_not_kill_the_process(tmp_path):
    """The store reads files; a mapped file that shrinks raises SIGBUS (a test run met it,
    when a sandbox rewrote a file its recorder was storing). In a subprocess, so that a
    regression fails this test instead of killing pytest."""
    code = (
        "import os, threading, time\n"
        "from sandbox_kernel.store import ContentStore\n"
        f"store = ContentStore({str(tmp_path / 's')!r})\n"
        f"path = {str(tmp_path / 'f.bin')!r}\n"
        "open(path, 'wb').write(os.urandom(256 << 20))\n"
        "threading.Thread(target=lambda: (time.sleep(0.02), os.truncate(path, 4096))).start()\n"
        "record = store.ingest(path)\n"
        "print('stored', record.size < 256 << 20)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-500:])
    assert out.stdout.startswith("stored")
