"""Wheels built from source distributions inside a sandbox, never on the host.

A build backend is the package's own code. When the operator opts in
(``PackageInstaller.allow_source_builds``), a package that publishes no wheel
for this Python is built like this:

1. the host finds and fetches its sdist (``sdists``: no code of it runs);
2. the host installs its declared build requirements as *wheels* (uv,
   ``--no-build``) into a directory of their own;
3. a one-shot sandbox (``sandbox.confined_run``: its own host uid, the
   seccomp filter, no network, cgroup limits, a time limit, no writable host
   directory) unpacks the sdist into its in-memory /tmp and runs PyPA's
   ``build`` on it with those requirements, then writes one header line and
   the wheel's bytes to its stdout;
4. the host reads at most ``max_wheel_bytes`` of that, checks the header and
   the wheel (its name is the project's and the version the sdist's, its
   members are plain relative paths) and files it among the built wheels,
   which uv then installs like any other wheel.

Build requirements that a backend asks for only at build time
(``get_requires_for_build_wheel``) are not installed: a backend that needs
them fails with its own message, which is shown.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from traitlets import Float, Int
from traitlets.config import LoggingConfigurable

from .errors import SandboxError
from .kernelspecs import interpreter_prefixes
from .sandbox import identity
from .sandbox.confined_run import ConfinedResult, run_confined
from .sandbox.launcher import BwrapLauncher
from .sdists import SdistCandidate, build_requirements, fetch
from .shown import shown

#: Where the sandbox finds what the host gives it (read-only).
INSIDE_SDIST = "/run/build/source.tar.gz"
INSIDE_REQUIRES = "/run/build/requires"
_HEADER_MAX = 1024
_WHEEL_NAME = re.compile(r"[A-Za-z0-9_.+!-]{1,200}\.whl")
_MAX_MEMBERS = 100_000
#: The build's /dev/shm (a parallel build's semaphores and shared memory).
_SHM_SIZE = 64 << 20

#: Runs in the sandbox. Its stdout is the channel back: the build's own output goes to
#: stderr, so nothing the backend prints can pose as the header.
DRIVER = r"""
import json, os, subprocess, sys, tarfile
channel = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sdist, src, out = sys.argv[1], "/tmp/src", "/tmp/out"
os.makedirs(src)
os.makedirs(out)
with tarfile.open(sdist, "r:gz") as archive:
    archive.extractall(src, filter="data")
tops = os.listdir(src)
if len(tops) != 1:
    sys.exit(f"the source distribution holds {len(tops)} top-level entries, not one directory")
code = subprocess.call([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                        "--skip-dependency-check", "--outdir", out, os.path.join(src, tops[0])])
if code:
    sys.exit(f"the build failed (exit code {code})")
made = [n for n in os.listdir(out) if n.endswith(".whl")]
if len(made) != 1:
    sys.exit(f"the build made {len(made)} wheels, not one")
path = os.path.join(out, made[0])
channel.write(json.dumps({"wheel": made[0], "size": os.path.getsize(path)}).encode() + b"\n")
with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
        channel.write(chunk)
channel.close()
"""


class SourceBuildFailed(SandboxError):
    """The sandboxed build did not give back a usable wheel; nothing was installed."""


class SourceBuilder(LoggingConfigurable):
    """Builds one sdist's wheel in a one-shot sandbox; the limits are configuration."""

    memory = Int(4 << 30, help="Bytes of memory a build may use (its /tmp included).").tag(
        config=True)
    tmp_size = Int(2 << 30, help="Bytes of the build's in-memory /tmp, where the source "
                   "is unpacked and the wheel made.").tag(config=True)
    processes = Int(256, help="Processes a build may run at once.").tag(config=True)
    timeout = Float(900.0, help="Seconds a build may take.").tag(config=True)
    max_sdist_bytes = Int(256 << 20, help="The largest source distribution fetched.").tag(
        config=True)
    max_wheel_bytes = Int(512 << 20, help="The largest wheel taken back from a build.").tag(
        config=True)

    def __init__(self, home: Path, launcher: BwrapLauncher, **kwargs: object):
        super().__init__(**kwargs)
        self.home = Path(home)
        self.launcher = launcher
        self.built_dir = self.home / "built-wheels"

    def build(self, python: str, requirement: Requirement, candidate: SdistCandidate,
              install_requires: Callable[[Sequence[str], Path], None]) -> Path:
        """The wheel of ``candidate``, built in a sandbox and filed in ``built_dir``.

        ``install_requires(requirements, directory)`` installs build requirements as
        wheels into ``directory`` (the installer's uv, ``--no-build``)."""
        if not self.launcher.available():
            raise SourceBuildFailed(
                f"{requirement.name} would have to be built from source, and builds run only "
                "in a bubblewrap sandbox, which does not work here (install the Debian "
                "package 'bubblewrap' and allow user namespaces)")
        hidden = str(self.home.resolve())  # the state directory, where it falls in a bind
        if hidden not in self.launcher.hidden:
            self.launcher.hidden = [*self.launcher.hidden, hidden]
        scratch_root = self.home / "builds"
        scratch_root.mkdir(mode=0o700, exist_ok=True)
        _clear_leftovers(scratch_root)
        scratch = Path(tempfile.mkdtemp(prefix="build-", dir=scratch_root))
        lock = _hold(scratch)
        ident = None
        try:
            given = scratch / "given"
            given.mkdir(mode=0o755)
            sdist = fetch(candidate, given, self.max_sdist_bytes)
            sdist.chmod(0o644)
            requires_dir = given / "requires"
            requires_dir.mkdir(mode=0o755)
            requires = build_requirements(sdist, self.tmp_size)  # (all a build unpacks)
            if requires:
                install_requires(requires, requires_dir)
            _open_to_all(requires_dir)
            token = secrets.token_hex(6)
            ident = identity.claim(scratch, f"build-{token}")
            plan = self.launcher.one_shot(
                scratch, [python, "-c", DRIVER, INSIDE_SDIST],
                read_only=list(interpreter_prefixes(python)),
                binds=[(str(sdist), INSIDE_SDIST), (str(requires_dir), INSIDE_REQUIRES)],
                tmp_size=self.tmp_size, identity=ident)
            # bubblewrap's /dev is a tmpfs of its own, writable by the build and as large as
            # memory: read-only, with a small /dev/shm, so that the build's in-memory scratch
            # is /tmp's tmp_size (and _SHM_SIZE), with or without a memory cgroup.
            at = plan.argv.index("--remount-ro")
            plan.argv[at:at] = ["--size", str(_SHM_SIZE), "--tmpfs", "/dev/shm",
                                "--remount-ro", "/dev"]
            plan.env["PYTHONPATH"] = INSIDE_REQUIRES
            plan.env["SOURCE_DATE_EPOCH"] = "315532800"  # reproducible zip times
            self.log.info("building %s from source in a sandbox", candidate.filename)
            result = run_confined(
                {**asdict(plan), "file_size": self.tmp_size}, scratch / "wheel.out",
                stdout_cap=self.max_wheel_bytes + _HEADER_MAX, timeout=self.timeout,
                memory=self.memory, processes=self.processes,
                name=f"sandbox-kernel-build-{token}")
            if result.timed_out or result.overflowed or result.returncode != 0:
                raise SourceBuildFailed(_failure(candidate, result, self.timeout,
                                                 self.max_wheel_bytes))
            return self._file_wheel(scratch / "wheel.out", candidate)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if ident is not None:
                identity.release(scratch, ident)
            os.close(lock)

    def _file_wheel(self, output: Path, candidate: SdistCandidate) -> Path:
        """Check what the sandbox sent (header, name, size, members) and keep the wheel."""
        fd = os.open(output, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            header = f.readline(_HEADER_MAX)
            try:
                meta = json.loads(header)
                filename, size = meta["wheel"], meta["size"]
                if set(meta) != {"wheel", "size"} or not isinstance(filename, str) \
                        or type(size) is not int:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise SourceBuildFailed(
                    f"the build of {candidate.filename} sent back no valid header "
                    f"({shown(header[:200].decode('utf-8', 'replace'))})") from None
            _check_name(filename, candidate)
            body_start = f.tell()
            total = os.fstat(fd).st_size
            if size != total - body_start or size > self.max_wheel_bytes:
                raise SourceBuildFailed(f"the build of {candidate.filename} sent "
                                        f"{total - body_start} bytes for a wheel of {size}")
            self.built_dir.mkdir(mode=0o755, exist_ok=True)
            tmp = self.built_dir / f".{secrets.token_hex(8)}.part"
            with open(tmp, "xb") as out:
                shutil.copyfileobj(f, out)
        try:
            _check_members(tmp, filename)
            tmp.chmod(0o644)
            final = self.built_dir / filename
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final


def _hold(scratch: Path) -> int:
    """A lock on ``scratch`` held while its build runs (its descriptor): a directory whose
    lock nobody holds is a killed manager's (see _clear_leftovers). Locked before it is
    named ``.lock``, so that no one finds it unlocked."""
    fd = os.open(scratch / ".lock.new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(scratch / ".lock.new", scratch / ".lock")
    return fd


def _clear_leftovers(scratch_root: Path) -> None:
    """The scratch directories of builds whose manager was killed (bubblewrap ended their
    processes with it), removed, and their uids given back."""
    for entry in scratch_root.glob("build-*"):
        try:
            fd = os.open(entry / ".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # being made (or not a build's)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a build that runs
        try:
            ident = identity.load(entry)
            shutil.rmtree(entry, ignore_errors=True)
            identity.release(entry, ident)
        finally:
            os.close(fd)


def _open_to_all(directory: Path) -> None:
    """The build requirements, readable by the sandbox's uid (uv made them the host's)."""
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755, follow_symlinks=False)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o644 | (os.stat(path).st_mode & 0o111))


def _check_name(filename: str, candidate: SdistCandidate) -> None:
    if not _WHEEL_NAME.fullmatch(filename):
        raise SourceBuildFailed(f"the build of {candidate.filename} named its wheel "
                                f"{shown(filename[:200])}, which is not a wheel file name")
    try:
        name, version, _build, _tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        raise SourceBuildFailed(f"the build of {candidate.filename} named its wheel "
                                f"{shown(filename)}, which is not a wheel file name") from None
    if canonicalize_name(name) != candidate.name or version != candidate.version:
        raise SourceBuildFailed(
            f"the build of {candidate.filename} made a wheel of {shown(str(name))} "
            f"{version}, not of {candidate.name} {candidate.version}; refused")


def _check_members(path: Path, filename: str) -> None:
    """A wheel whose members are relative paths inside it, and not too many of them."""
    try:
        with zipfile.ZipFile(path) as wheel:
            names = wheel.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceBuildFailed(f"the built wheel {filename} is not a zip file ({exc})") from None
    if len(names) > _MAX_MEMBERS:
        raise SourceBuildFailed(f"the built wheel {filename} holds more than {_MAX_MEMBERS} files")
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] or "\0" in name:
            raise SourceBuildFailed(f"the built wheel {filename} holds {shown(name[:200])}, "
                                    "a path outside it; refused")


def _failure(candidate: SdistCandidate, result: ConfinedResult, timeout: float,
             cap: int) -> str:
    """Why a build failed, with the end of its log, escaped."""
    what = f"building {candidate.filename} in a sandbox failed: "
    if result.timed_out:
        what += f"it took longer than {timeout:g} s (SourceBuilder.timeout)"
    elif result.overflowed:
        what += f"it sent back more than {cap} bytes (SourceBuilder.max_wheel_bytes)"
    elif result.out_of_memory:
        what += "it ran out of memory (SourceBuilder.memory)"
    else:
        what += f"exit code {result.returncode}"
    tail = result.stderr_tail.decode("utf-8", "replace")
    lines = [ln for ln in tail.splitlines() if ln.strip()][-12:]
    if lines:
        what += "; its log ends:\n" + "\n".join(shown(ln[:300]) for ln in lines)
    return what
