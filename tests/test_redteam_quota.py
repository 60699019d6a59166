"""Red team, security issue 15, hole 9: the shared store must not grow past every quota.

Before: rewriting one file in every cell stored each version as an artifact for
good, closing the session and running gc kept all of it, and the ``disk`` limit
counted uploads only. Now a path keeps its latest version (``keep_versions``),
a session's artifacts count against its ``disk`` limit, and closing a session
releases its artifacts (but those tagged ``keep_tag``) and uploads, for gc to free.
Sizes are measured on disk, in the store's packs.
"""

from __future__ import annotations

import os

from sandbox_kernel.artifacts import Artifact, ArtifactPolicy

from .conftest import make_manager

MiB = 1 << 20
REWRITE = ("import os\nwith open({name!r}, 'wb') as f:\n"
           "    f.write(os.urandom({size}))")  # random: neither compressed nor deduplicated


def packs_bytes(manager) -> int:
    return sum(p.stat().st_size for p in (manager.store.root / "packs").iterdir())


def write(session, name: str, size: int) -> None:
    r = session.run(REWRITE.format(name=name, size=size))
    assert r.ok, r.error


def test_a_file_rewritten_in_six_cells_keeps_one_version_and_close_releases_it(home, tmp_path):
    with make_manager(home, isolation="bwrap", store_gc_grace=0.0) as m:
        s = m.create(name="rewrite")
        s.run("x = 1")
        before = packs_bytes(m)
        for _ in range(6):
            write(s, "big.bin", 16 * MiB)
            # Each version recorded before the next cell rewrites it (recording runs beside
            # the next cell; one caught mid-rewrite may share chunks, and so packs, with it).
            versions = s.artifacts(path="big.bin")
        assert len(versions) == 1, f"{len(versions)} versions of big.bin are kept"
        m.gc()
        grown = packs_bytes(m) - before
        assert 16 * MiB <= grown < 2 * 16 * MiB, f"the store grew by {grown / MiB:.0f} MiB"

        write(s, "keep.bin", 1 * MiB)
        kept = s.artifacts(path="keep.bin")[0].tag("keep")
        kept_bytes = kept.read()
        upload = tmp_path / "given.bin"
        upload.write_bytes(os.urandom(2 * MiB))
        given = s.upload(upload)["files"][0]["hash"]
        big = versions[0].hash
        m.close("rewrite")
        m.gc()
        assert m.store.file(big) is None, "a closed session's artifact outlived gc"
        assert m.store.file(given) is None, "a closed session's upload outlived gc"
        rows = m.registry.artifacts(s.id)
        assert [r["path"] for r in rows] == ["keep.bin"]
        again = Artifact(**rows[0], _store=m.store, _registry=m.registry)
        assert again.read() == kept_bytes  # the tagged one stays, whole
        assert MiB <= packs_bytes(m) - before < MiB + MiB // 2


def test_artifacts_count_against_the_disk_limit(home):
    with make_manager(home, isolation="bwrap") as m:
        m.artifact_policy = ArtifactPolicy(record_outputs=False)
        s = m.create(name="quota", limits={"disk": "20MiB"})
        write(s, "a.bin", 8 * MiB)
        write(s, "b.bin", 8 * MiB)
        write(s, "c.bin", 8 * MiB)  # the cell succeeds; its artifact would be 24 MiB in all
        assert sorted(a.path for a in s.artifacts()) == ["a.bin", "b.bin"]
        # The next run's result says what was refused: once, or twice when the previous
        # run's recording (which runs beside the next cell) saw c.bin half-written too.
        warnings = s.run("pass").warnings
        assert warnings and all("c.bin" in w and "disk limit" in w for w in warnings), warnings
        old_a = s.artifacts(path="a.bin")[0].hash
        write(s, "a.bin", 8 * MiB)  # a new version replaces the old one: it fits
        now = {a.path: a.hash for a in s.artifacts()}
        assert sorted(now) == ["a.bin", "b.bin"] and now["a.bin"] != old_a
        assert m.registry.artifact_bytes(s.id) == 16 * MiB
        assert s._inner._recorder.take_warnings() == []
        assert (s.work_dir / "c.bin").stat().st_size == 8 * MiB  # the file itself is there


def test_versions_kept_and_tagged_versions_survive(home):
    with make_manager(home, isolation="bwrap", store_gc_grace=0.0) as m:
        m.artifact_policy = ArtifactPolicy(keep_versions=2, record_outputs=False)
        s = m.create(name="versions")
        for v in ("v1", "v2", "v3"):
            s.run(f"open('log.txt', 'w').write({v!r})")
            s.artifacts()  # recorded before the next cell rewrites it
        logs = s.artifacts(path="log.txt")
        assert [a.read() for a in logs] == [b"v2", b"v3"]
        logs[0].tag("final")
        for v in ("v4", "v5"):
            s.run(f"open('log.txt', 'w').write({v!r})")
            s.artifacts()
        assert [a.read() for a in s.artifacts(path="log.txt")] == [b"v2", b"v4", b"v5"]
        gone = logs[1].hash  # v3: released when v5 was recorded
        m.gc()
        assert m.store.file(gone) is None and m.store.file(logs[0].hash) is not None
        logs[0].delete()
        logs[0].delete()  # a second delete releases nothing more
        assert [a.read() for a in s.artifacts(path="log.txt")] == [b"v4", b"v5"]
