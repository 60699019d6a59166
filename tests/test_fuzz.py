"""Fuzzing (issue 9) with hypothesis: whatever a user or a file hands us.

Session names, %session argument strings, requirement strings, work-directory
paths and download manifests drawn at random. Each is either accepted, and
then what it leads to stays where it must (a name round-trips, a path stays in
the work directory, a download lands in its folder), or refused with one of
our errors, whose message the magics and the CLI show as one line. Anything
else (a TypeError, a traceback, a file written elsewhere) fails the test.
"""

from __future__ import annotations

import asyncio
import os
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox_kernel import deno_packages
from sandbox_kernel.commands import (
    COMMANDS,
    CommandError,
    CommandOutput,
    parse_args,
    run_command,
)
from sandbox_kernel.errors import InvalidArgument, SandboxError
from sandbox_kernel.host_paths import HostPaths
from sandbox_kernel.manager import _check_name
from sandbox_kernel.packages import InstallFailed, parse_requirements
from sandbox_kernel.transfer import TransferFailed
from sandbox_kernel.workdir import UnsafePath, WorkDir, relative_parts
from sandbox_magics.magics import _cell_args

from .conftest import make_manager, needs_bwrap, short_tmpdir

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

#: Text that looks like what people type, with the characters that break parsers mixed in.
TRICKY = st.text(alphabet=st.sampled_from(
    string.ascii_letters + string.digits + " -_.=<>!~/\\'\"*@:;,[]{}()#$%&?\t\n\0é…🙂"),
    max_size=40)
TEXT = st.one_of(TRICKY, st.text(max_size=40))


@pytest.fixture(scope="module")
def registry_manager():
    home = short_tmpdir("skz-")
    with make_manager(home, isolation="bwrap") as m:
        yield m


@FUZZ
@given(name=st.one_of(TEXT, st.integers(), st.none(), st.binary(max_size=8)))
def test_session_names(registry_manager, name):
    try:
        accepted = _check_name(name)
    except InvalidArgument as exc:
        assert repr(name)[:20] in str(exc) or "name" in str(exc)
    else:
        assert accepted == name and isinstance(accepted, str)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", accepted), accepted
    try:  # looking a session up by anything at all
        registry_manager.get(name)
    except SandboxError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        pytest.fail(f"get({name!r}) found a session in an empty registry")


class NoSession:
    """The commands' context in a notebook where no session was made yet."""

    def __init__(self, manager):
        self.manager = manager
        self.last_timing = None
        self.last_insights: list[str] = []
        self.scope = None
        self.host_paths = HostPaths(None)

    async def current(self):
        raise CommandError("no current session; `%session new NAME` makes one")

    async def use(self, session) -> None:
        raise AssertionError("no command given random arguments should switch sessions")

    def watch_transfer(self, batch):
        return None

    def default_name(self):
        return None


#: Commands run for real on random arguments: those that cannot start or fetch anything.
SAFE_TO_RUN = sorted(set(COMMANDS) - {"new", "fork", "install", "upload", "download",
                                      "dashboard", "use"})


PARSERS = {**COMMANDS, "%%session": _cell_args}


@FUZZ
@given(command=st.sampled_from(sorted(PARSERS)), args=TEXT)
def test_every_command_parser_accepts_or_explains(command, args):
    try:
        parse_args(PARSERS[command], args, "hint")
    except CommandError as exc:
        assert str(exc).startswith("%") and str(exc).endswith("; hint")


@FUZZ
@given(line=st.one_of(TEXT, st.builds(lambda c, a: f"{c} {a}", st.sampled_from(SAFE_TO_RUN),
                                      TEXT)))
def test_session_magic_lines(registry_manager, line):
    if line.split()[:1] and line.split()[0] not in SAFE_TO_RUN:
        line = "help " + line  # an unknown command: %session help names the real ones
    try:
        out = asyncio.run(run_command(NoSession(registry_manager), line))
    except SandboxError as exc:
        assert str(exc)
    else:
        assert isinstance(out, CommandOutput) and isinstance(out.text, str)


@FUZZ
@given(spec=st.one_of(TEXT, st.builds(lambda n, op, v, tail: f"{n}{op}{v}{tail}",
                                      st.sampled_from(["numpy", "a", "x-y", "-r", "--index-url",
                                                       "file", "git+https", "."]),
                                      st.sampled_from(["", "==", ">=", "@", " @ ", "[", ";"]),
                                      TRICKY, st.sampled_from(["", " ", "\n-e x", " --pre"]))))
def test_requirement_strings(spec):
    try:
        reqs = parse_requirements([spec])
    except (InvalidArgument, InstallFailed) as exc:
        assert str(exc)
    else:
        for req in reqs:
            text = str(req)
            assert not text.startswith("-") and "\n" not in text and "\0" not in text
            assert req.url is None  # direct references only when allowed
    try:
        specs = deno_packages.parse_specs([spec])
    except InvalidArgument as exc:
        assert str(exc)
    else:
        assert all(re.match(r"^(npm|jsr):", s) and not s[4:].startswith("-") for s in specs)


@FUZZ
@given(path=st.one_of(TEXT, st.lists(st.sampled_from(["a", "..", ".", "", "b", "/", "link",
                                                       "c.txt", "~", "\0"]),
                                     max_size=6).map("/".join)))
def test_work_directory_paths(path):
    try:
        parts = relative_parts(path)
    except InvalidArgument as exc:
        assert str(exc)
        return
    assert parts and all(p not in ("", ".", "..") and "/" not in p and "\0" not in p
                         for p in parts)


@pytest.fixture(scope="module")
def linked_work_dir(tmp_path_factory):
    """A work directory whose links lead out of it, next to a secret they point at."""
    base = tmp_path_factory.mktemp("fuzzwd")
    (base / "secret.txt").write_text("host secret")
    root = base / "work"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "c.txt").write_text("inside")
    (root / "link").symlink_to(base / "secret.txt")
    (root / "a" / "link").symlink_to(base)
    (root / "b").symlink_to("a")
    return WorkDir(root)


@FUZZ
@given(path=st.lists(st.sampled_from(["a", "b", "link", "c.txt", "..", ".", "secret.txt"]),
                     min_size=1, max_size=5).map("/".join))
def test_opening_a_random_path_never_leaves_the_work_directory(linked_work_dir, path):
    try:
        parts = relative_parts(path)
        with linked_work_dir.open_file(parts) as (fd, _):
            content = os.read(fd, 100)
    except (InvalidArgument, UnsafePath, FileNotFoundError) as exc:
        assert str(exc)
    else:
        assert content == b"inside", (path, content)


HEX = "0123456789abcdef"


@needs_bwrap
@FUZZ
@given(entry=st.dictionaries(
    st.sampled_from(["dest", "hash", "size", "chunks", "extra"]),
    st.one_of(TEXT, st.integers(), st.none(), st.lists(st.integers(), max_size=2),
              st.text(alphabet=HEX, min_size=64, max_size=64)),
    max_size=5), real=st.booleans())
def test_download_manifest_entries(session, tmp_path_factory, entry, real):
    if real:  # a true hash with whatever else the entry says
        entry = {**entry, "hash": stored_hash(session)}
    local = tmp_path_factory.mktemp("dl")
    outside = set(local.parent.iterdir())
    try:
        results = session.download([entry], local)
    except (InvalidArgument, TransferFailed) as exc:
        assert str(exc) and "Traceback" not in str(exc)
        results = []
    for r in results:
        assert Path(r["dest"]).parent == local and r["verified"]
    assert set(local.parent.iterdir()) == outside  # nothing written beside the folder
    assert not [p for p in local.iterdir() if p.name.startswith(".")]  # no leftovers


_stored: dict[str, str] = {}


def stored_hash(session) -> str:
    if "hash" not in _stored:
        session.run("open('fuzzed.txt', 'w').write('manifest content')")
        group = session.download_group()
        group.add("fuzzed.txt", short_tmpdir("skzd-"))
        _stored["hash"] = group.finish()[0]["hash"]
    return _stored["hash"]
