"""Artifacts: what runs produce is recorded, stored by content, tagged, found again."""

from __future__ import annotations

import time

from sandbox_kernel.artifacts import ArtifactPolicy

from .conftest import make_manager

PLOT = ("%matplotlib inline\nimport matplotlib.pyplot as plt\n"
        "plt.figure(figsize=(2, 2)); plt.plot([1, 3, 2]); plt.show()")


def test_files_and_rich_outputs_are_recorded(manager, tmp_path):
    s = manager.create(name="art")
    first = s.run("import os\nos.makedirs('out', exist_ok=True)\n"
                  "open('out/table.csv', 'w').write('a,b\\n1,2\\n')\n"
                  "from IPython.display import HTML, display\ndisplay(HTML('<b>report</b>'))")
    s.run(PLOT)
    s.run("x = 1")  # produces nothing
    arts = s.artifacts()
    kinds = [(a.kind, a.path, a.mime) for a in arts]
    assert kinds == [("file", "out/table.csv", "text/csv"), ("output", None, "text/html"),
                     ("output", None, "image/png")]
    table, html, png = arts
    assert table.read() == b"a,b\n1,2\n" and table.size == 8 and len(table.hash) == 64
    assert html.read() == b"<b>report</b>"
    assert png.read()[:8] == b"\x89PNG\r\n\x1a\n"
    executions = s.executions()
    assert table.execution_id == html.execution_id == executions[-3]["id"]
    assert png.execution_id == executions[-2]["id"]
    assert first.ok
    saved = png.save(tmp_path)
    assert saved.read_bytes() == png.read() and saved.suffix == ".png"


def test_changes_and_unchanged_files(manager):
    s = manager.create(name="changes")
    s.run("open('log.txt', 'w').write('one')")
    s.run("open('other.txt', 'w').write('x')")
    s.run("open('log.txt', 'w').write('two')")
    logs = s.artifacts(path="log.txt")
    assert [a.read() for a in logs] == [b"two"]  # the latest version (keep_versions=1)
    assert [a.path for a in s.artifacts()].count("other.txt") == 1  # unchanged: once


def test_uploads_are_not_artifacts(manager, tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("given")
    s = manager.create(name="given", files=[str(src)])
    s.upload(src, "again/input.txt")
    s.run("open('made.txt', 'w').write(open('input.txt').read() * 2)")
    assert [a.path for a in s.artifacts()] == ["made.txt"]


def test_tags_filters_and_delete(manager):
    s = manager.create(name="tags")
    s.run("open('a.txt', 'w').write('a')")
    mark = time.time()
    time.sleep(0.01)
    s.run("open('b.txt', 'w').write('b')")
    a, b = s.artifacts()
    a.tag("final", "v1")
    assert [x.path for x in s.artifacts(tag="final")] == ["a.txt"]
    assert s.artifacts(tag="final")[0].tags == ["final", "v1"]
    a.untag("final")
    assert s.artifacts(tag="final") == []
    assert [x.path for x in s.artifacts(since=mark)] == ["b.txt"]
    b.delete()
    assert [x.path for x in s.artifacts()] == ["a.txt"]


def test_limits_are_configuration(home):
    with make_manager(home, isolation="bwrap") as m:
        m.artifact_policy = ArtifactPolicy(max_per_session=2, record_outputs=False,
                                           ignore=["scratch/*"])
        s = m.create(name="limited")
        s.run("import os; os.makedirs('scratch', exist_ok=True)\n"
              "open('scratch/tmp.bin', 'w').write('t')")
        s.run(PLOT)
        for i in range(4):
            s.run(f"open('f{i}.txt', 'w').write('{i}')")
        assert [a.path for a in s.artifacts()] == ["f0.txt", "f1.txt"]
