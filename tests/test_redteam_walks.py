"""Red team, security issue 15, hole 10 (and the part check behind it): the host walks the
work directory by descriptors only, one name at a time, within a budget.

The sandbox owns its work directory and may rewrite it while the host looks: a
component that is really a path (``../../etc``, ``link/x``) must never reach
``openat``, a directory swapped for a link to a host directory mid-scan must not
be listed, and a tree of empty directories must cost the host no more than the
scan limit allows. These run over plain directories (no sandbox needed): what a
sandbox can do to its work directory, a thread of this test does here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sandbox_kernel.errors import InvalidArgument
from sandbox_kernel.workdir import UnsafePath, WorkDir

IN_ACCESS, IN_OPEN = 0x1, 0x20


@pytest.fixture
def outside(tmp_path: Path) -> tuple[WorkDir, Path]:
    """A work directory three levels below a secret, with a link to a host directory."""
    (tmp_path / "secret.txt").write_text("host secret")
    (tmp_path / "hostdir").mkdir()
    (tmp_path / "hostdir" / "x").write_text("linked secret")
    root = tmp_path / "a" / "b" / "work"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "inside.txt").write_text("inside")
    (root / "sub" / "link").symlink_to(tmp_path / "hostdir")
    return WorkDir(root), tmp_path


BAD_PARTS = [
    ("sub", "../../../../secret.txt"),  # '..' inside one component
    ("sub", "link/x"),                  # a symlinked directory inside one component
    ("..", "..", "..", "secret.txt"),   # '..' as components
    ("sub", "", "inside.txt"),
    ("sub", ".", "inside.txt"),
    ("sub", "inside.txt\0"),
    ("/etc", "passwd"),
]


@pytest.mark.parametrize("parts", BAD_PARTS)
def test_open_file_refuses_a_component_that_is_not_one_name(outside, parts):
    work, _ = outside
    with pytest.raises(UnsafePath, match="not a single file name"), work.open_file(parts):
        pytest.fail(f"{parts} was opened")


@pytest.mark.parametrize("parts", BAD_PARTS)
def test_every_method_taking_parts_refuses_them(outside, parts):
    work, base = outside
    staged = base / "staged"
    staged.write_text("payload")
    with pytest.raises(UnsafePath), work.directory(parts):
        pass
    with pytest.raises(UnsafePath), work.directory(parts, create=True):
        pass
    with pytest.raises(UnsafePath):
        work.place(staged, parts)
    with pytest.raises(UnsafePath):
        work.unlink(parts)
    with pytest.raises(UnsafePath):
        work.lstat(parts)
    assert staged.read_text() == "payload"  # not moved anywhere
    assert (base / "secret.txt").read_text() == "host secret"  # not replaced or removed
    assert (base / "hostdir" / "x").read_text() == "linked secret"


def test_one_name_per_component_still_works_and_links_stay_refused(outside):
    work, base = outside
    with work.open_file(("sub", "inside.txt")) as (fd, st):
        assert os.read(fd, 100) == b"inside" and st.st_size == 6
    with pytest.raises(UnsafePath, match="symlink"), work.open_file(("sub", "link", "x")):
        pass
    with pytest.raises(InvalidArgument, match="no file"), work.open_file(("sub", "nope")):
        pass
    staged = base / "staged"
    staged.write_text("placed")
    work.place(staged, ("new", "dir", "f.txt"))
    assert (work.root / "new" / "dir" / "f.txt").read_text() == "placed"


# -- a directory swapped for a link while the host scans ----------------------------------

_FLIPPER = """
import os, sys
root = sys.argv[1]
d, real, link = (os.path.join(root, n) for n in ("d", "d.real", "d.link"))
while True:  # 'd' is a directory, then a link to the host's directory, then again ...
    os.rename(d, real); os.rename(link, d); os.rename(d, link); os.rename(real, d)
"""


class _Inotify:
    """Opens of a directory (or of anything in it), seen by the kernel, not by our code."""

    def __init__(self, path: Path):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self._libc.inotify_add_watch(
                self.fd, os.fsencode(path), IN_OPEN | IN_ACCESS) < 0:
            pytest.skip("inotify is not available here")

    def events(self) -> bytes:
        try:
            return os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.fd)


def test_a_directory_swapped_for_a_link_mid_scan_is_never_listed(tmp_path):
    """Another process flips ``d`` between a directory and a link to a host directory as
    fast as it can while the host scans; the host directory is never opened and its
    uniquely named file never appears. (The path walk this replaced listed it in about
    one scan in fifty here.)"""
    host = tmp_path / "host"
    host.mkdir()
    sentinel = f"SENTINEL-{uuid.uuid4().hex}"
    (host / sentinel).write_text("host file")
    root = tmp_path / "work"
    (root / "d").mkdir(parents=True)
    (root / "d" / "inside").write_text("i")
    (root / "d.link").symlink_to(host)
    for i in range(10):  # other directories, scanned between the listing of d and its descent
        (root / f"pad{i}").mkdir()
        for j in range(20):
            (root / f"pad{i}" / f"f{j}").touch()
    watch = _Inotify(host)
    flipper = subprocess.Popen([sys.executable, "-c", _FLIPPER, str(root)])
    work, scans, seen_inside = WorkDir(root), 0, 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline or scans < 500:
            found = work.scan()
            scans += 1
            assert not [p for p in found if sentinel in p], f"scan {scans} listed the host"
            seen_inside += "d/inside" in found or "d.real/inside" in found
    finally:
        flipper.kill()
        flipper.wait()
        opened = watch.events()
        watch.close()
    assert opened == b"", "the host directory behind the link was opened"
    assert seen_inside > 0  # the directory itself was scanned whenever it was one


# -- the scan's budget: directories count, depth is bounded ---------------------------------

def test_directories_count_toward_the_scan_limit(tmp_path):
    """200 directories of one file each: every entry looked at counts, a directory as much
    as a file. (The path walk counted files only: it found 100 of them with a limit of 100,
    after listing every directory.)"""
    for i in range(200):
        (tmp_path / f"d{i:03}").mkdir()
        (tmp_path / f"d{i:03}" / "f").touch()
    work = WorkDir(tmp_path)
    assert work.scan(limit=100) == {}  # the limit is spent on the directories
    assert len(work.scan(limit=300)) == 100  # 200 directories, then 100 files
    assert len(work.scan()) == 200  # the default limit sees them all


def test_a_tree_of_empty_directories_stops_at_the_limit(tmp_path, monkeypatch):
    """200,000 empty directories, scanned with a limit of 1,000: about a thousand directories
    are listed, not 200,000. (Counted by wrapping os.scandir; what is found is not changed.)"""
    root = tmp_path / "work"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(200_000):
            os.mkdir(f"{i:06}", dir_fd=fd)
    finally:
        os.close(fd)
    listed = []
    real_scandir = os.scandir

    def counting(path):
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting)
    started = time.perf_counter()
    assert WorkDir(root).scan(limit=1_000) == {}
    took = time.perf_counter() - started
    monkeypatch.undo()
    assert len(listed) <= 1_001, f"{len(listed)} directories listed for a limit of 1,000"
    assert took < 5, took


def test_depth_is_bounded(tmp_path):
    """A file 100 directories down is beyond the default depth (64) and within a larger one."""
    deep = tmp_path
    for _ in range(100):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("deep")
    assert WorkDir(tmp_path).scan() == {}
    found = WorkDir(tmp_path).scan(max_depth=128)
    assert list(found) == ["/".join(["d"] * 100 + ["bottom.txt"])]


def test_scan_does_not_follow_a_work_directory_that_is_a_link(tmp_path):
    """The work directory itself swapped for a link: nothing is listed through it."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("s")
    (tmp_path / "work").symlink_to(host)
    assert WorkDir(tmp_path / "work").scan() == {}
    with contextlib.suppress(FileNotFoundError):
        (tmp_path / "work").unlink()


@pytest.mark.timeout(20)
def test_remove_tree_removes_links_themselves_and_never_blocks_on_a_fifo(outside):
    """Snapshot directories are removed by descriptors: a link (to a host directory, to a
    FIFO) planted where a directory was is removed itself, nothing behind it is touched,
    and nothing blocks."""
    work, tmp = outside
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    (work.root / "snap-a").symlink_to(tmp / "hostdir")
    (work.root / "snap-b").symlink_to(fifo)
    tree = work.root / "snap-c" / "deep" / "er"
    tree.mkdir(parents=True)
    (tree / "f").write_text("x")
    (tree / "out").symlink_to(tmp / "hostdir")
    for name in ("snap-a", "snap-b", "snap-c", "snap-missing"):
        work.remove_tree((name,))
    assert not any(p.name.startswith("snap-") for p in work.root.iterdir())
    assert (tmp / "hostdir" / "x").read_text() == "linked secret"
    assert fifo.exists()
    with pytest.raises(UnsafePath):
        work.remove_tree(("..",))
