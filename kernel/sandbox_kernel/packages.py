"""Package environments: resolved with uv outside the sandbox, installed once, shared as layers.

A *layer* is a directory holding exactly one set of pinned distributions,
installed with ``uv pip install --no-deps --target``. Its id is a hash of the
pins, the Python version and the platform, so any session that needs the same
pins uses the same directory and installs nothing. A session's packages are a
stack of layers over the base environment (the interpreter's own
site-packages, which holds ipykernel): a request that extends what a session
has builds a layer with only the difference.

Resolution (``uv pip compile``) is constrained by the base environment and the
session's existing layers, so the kernel's own packages keep their versions.
Resolutions are cached (``resolution_ttl``) so that a repeated request runs
no uv at all. The sandbox never needs the network: the layers directory is
bound into it read-only.

Only wheels are installed (``--no-build`` for resolution and install): a
source distribution's build backend is arbitrary code, and uv would run it
here, on the host, as the manager's user, outside the sandbox. A package
with no wheel is refused, unless the operator opts in to source builds: then
its wheel is built in a one-shot sandbox with no network (``source_builds``)
and uv takes it from there like any other wheel.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from traitlets import Bool, Float, Instance, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .errors import SandboxError
from .registry import Registry
from .requirements import merge_specs, parse_requirements
from .sdists import PYPI, SdistUnavailable, find_sdist
from .source_builds import SourceBuilder, SourceBuildFailed

T = TypeVar("T")
_COMPLETE = ".complete"  # written last: a layer without it is half-built and never used
_COMPILED = ".compiled"  # written when the layer's bytecode has been compiled
_COMPILING = ".compiling"  # locked by the layer's compiler while it runs
#: Run detached (a double fork), at a low priority, by one process per layer at a time.
_COMPILE_BOOT = """
import fcntl, os, sys
if os.fork() == 0:
    os.setsid()
    os.nice(10)
    layer, complete, compiling, compiled = sys.argv[1:5]
    lock = os.open(os.path.join(layer, compiling), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os._exit(0)
    import importlib.util, py_compile
    for root, dirs, files in os.walk(os.path.join(layer, "site-packages")):
        for name in files:
            if not name.endswith(".py"):
                continue
            if not os.path.exists(os.path.join(layer, complete)):
                os._exit(0)  # the layer is being removed: create nothing in it
            source = os.path.join(root, name)
            cached = importlib.util.cache_from_source(source)
            if os.path.exists(cached):
                continue  # compiled by an earlier run that was cut short
            try:
                os.mkdir(os.path.dirname(cached))  # not makedirs: never recreate a removed dir
            except FileExistsError:
                pass
            except OSError:
                continue
            try:
                py_compile.compile(source, cfile=cached, doraise=True)
            except Exception:
                pass  # not Python 3, or gone meanwhile: imports compile it, or fail, as ever
    if os.path.exists(os.path.join(layer, complete)):
        open(os.path.join(layer, compiled), "w").close()
"""


def wait_for_compilers(layers_dir: Path, timeout: float = 120.0) -> None:
    """Wait until no layer under ``layers_dir`` is being compiled (before removing it all)."""
    deadline = time.monotonic() + timeout
    while any(_compiling(layer) for layer in layers_dir.glob("*")) and \
            time.monotonic() < deadline:
        time.sleep(0.05)


def _compiling(layer: Path) -> bool:
    """Whether a compiler holds the layer's lock (checked here: starting one costs 30 ms)."""
    try:
        fd = os.open(layer / _COMPILING, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _compile_bytecode(layer: Path, python: str) -> None:
    """Compile a layer's bytecode in the background, unless that is done.

    Sandboxes see layers read-only and so cannot cache bytecode: without it every
    session compiles each module it imports, each time (pandas: 2.1 s to import
    instead of 0.4 s here). Not as part of the install: the session that asked
    for the packages starts at once (compiling pandas and scikit-learn takes
    about 4 s here), and the sessions after it find the bytecode.
    """
    if (layer / _COMPILED).exists() or _compiling(layer):
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run([python, "-I", "-S", "-c", _COMPILE_BOOT, str(layer), _COMPLETE,
                        _COMPILING, _COMPILED],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)


class InstallFailed(SandboxError):
    """uv could not resolve or install the requested packages; nothing was changed."""


class SourceBuildRefused(InstallFailed):
    """A package would have to be built from source, which is off (or did not help)."""

    def __init__(self, message: str, package: str | None = None):
        super().__init__(message)
        #: The package uv found no wheel for, when its message says.
        self.package = package


@dataclass
class InstallResult:
    """What an install did, and what it cost."""

    requested: list[str]
    layers: list[str]
    #: Everything the session asks for after this install (earlier specs for a name replaced).
    all_requested: list[str] = field(default_factory=list)
    new_packages: dict[str, str] = field(default_factory=dict)
    cache_hit: bool = True
    restart_needed: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    #: Packages whose wheels this install built from source, in a sandbox.
    built_from_source: list[str] = field(default_factory=list)

    @property
    def insights(self) -> list[str]:
        from .timing import install_insights

        return install_insights(self)

    def summary(self) -> str:
        if self.new_packages:
            what = ", ".join(f"{n} {v}" for n, v in sorted(self.new_packages.items()))
            how = "cache hit" if self.cache_hit else "cache miss"
            text = f"installed {what} ({how}, {self.timing.get('total', 0):.2f} s)"
        else:
            text = (f"nothing new to install: {', '.join(self.requested) or 'no packages'} "
                    f"already available ({self.timing.get('total', 0) * 1000:.0f} ms)")
        if self.restart_needed:
            text += ("; restart needed, already imported: " + ", ".join(self.restart_needed))
        return text


class PackageInstaller(LoggingConfigurable):
    """Resolves and installs package layers with uv; index settings are configuration."""

    uv = Unicode(help="The uv executable (default: the one of the `uv` package).").tag(
        config=True)

    @default("uv")
    def _uv_default(self) -> str:
        try:
            from uv import find_uv_bin

            return find_uv_bin()
        except (ImportError, FileNotFoundError):
            return shutil.which("uv") or "uv"

    index_url = Unicode(None, allow_none=True,
                        help="The package index (default: $SANDBOX_KERNEL_INDEX_URL, else uv's: "
                        "PyPI).").tag(config=True)
    extra_index_urls = List(Unicode(), help="More indexes ($SANDBOX_KERNEL_EXTRA_INDEX_URLS, "
                            "space-separated).").tag(config=True)
    find_links = List(Unicode(), help="Directories or pages of wheels "
                      "($SANDBOX_KERNEL_FIND_LINKS, space-separated).").tag(config=True)
    no_index = Bool(help="Use find_links only, no index ($SANDBOX_KERNEL_NO_INDEX=1).").tag(
        config=True)
    offline = Bool(help="Never touch the network; use what uv has cached "
                   "($SANDBOX_KERNEL_OFFLINE=1).").tag(config=True)
    allow_direct_references = Bool(
        False, help="Accept URLs and local paths as requirements (a local source tree "
        "still needs allow_source_builds)."
    ).tag(config=True)
    allow_source_builds = Bool(
        False, help="Build packages that publish no wheel for this Python and platform from "
        "their source distribution, each in a one-shot sandbox with no network, its own "
        "uid and the seccomp filter (limits: SourceBuilder); the wheel it makes is checked "
        "and installed like any other. Needs bubblewrap. Off: wheels only (uv --no-build), "
        "and a package without one is refused."
    ).tag(config=True)
    max_source_builds = Int(
        8, help="Source builds one install may run (a package and the sdist-only packages "
        "it needs)."
    ).tag(config=True)
    cache_dir = Unicode(None, allow_none=True,
                        help="uv's cache, shared by every layer ($SANDBOX_KERNEL_UV_CACHE_DIR; "
                        "default: uv's own).").tag(config=True)
    resolution_ttl = Float(
        24 * 3600.0, help="Seconds a cached resolution is reused before uv resolves again."
    ).tag(config=True)
    timeout = Float(900.0, help="Seconds an install may take.").tag(config=True)

    @default("index_url")
    def _index_url_default(self) -> str | None:
        return os.environ.get("SANDBOX_KERNEL_INDEX_URL") or None

    @default("extra_index_urls")
    def _extra_default(self) -> list[str]:
        return os.environ.get("SANDBOX_KERNEL_EXTRA_INDEX_URLS", "").split()

    @default("find_links")
    def _find_links_default(self) -> list[str]:
        return os.environ.get("SANDBOX_KERNEL_FIND_LINKS", "").split()

    @default("no_index")
    def _no_index_default(self) -> bool:
        return os.environ.get("SANDBOX_KERNEL_NO_INDEX", "") in ("1", "true", "yes")

    @default("offline")
    def _offline_default(self) -> bool:
        return os.environ.get("SANDBOX_KERNEL_OFFLINE", "") in ("1", "true", "yes")

    @default("cache_dir")
    def _cache_dir_default(self) -> str | None:
        return os.environ.get("SANDBOX_KERNEL_UV_CACHE_DIR") or None

    #: Builds sdists in a sandbox when ``allow_source_builds`` is on (the manager gives it).
    builder = Instance(SourceBuilder, allow_none=True)

    def __init__(self, home: Path, registry: Registry, **kwargs: Any):
        super().__init__(**kwargs)
        self.home = Path(home)
        self.layers_dir = self.home / "layers"
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self._base: dict[str, dict[str, str]] = {}

    # -- the whole operation ------------------------------------------------

    def install(
        self,
        python: str,
        requested: Sequence[str],
        have: Sequence[str] = (),
        layers: Sequence[str] = (),
    ) -> InstallResult:
        """Make ``requested`` available on top of ``have`` (specs) in ``layers`` (ids)."""
        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        reqs = parse_requirements(requested, self.allow_direct_references)
        all_specs = merge_specs([*have, *(str(r) for r in reqs)])
        existing = self.layer_pins(layers)
        # What the session has stays as it is, except what this request names again.
        asked = {canonicalize_name(r.name) for r in reqs}
        keep = {n: v for n, v in existing.items() if n not in asked}
        t = time.perf_counter()
        built: list[str] = []
        pins = self._building(python, reqs, built, timing,
                              lambda: self.resolve(python, all_specs, keep))
        timing["resolve"] = time.perf_counter() - t - timing.get("build", 0.0)
        base = self.base_packages(python)
        new = {n: v for n, v in pins.items() if base.get(n) != v and existing.get(n) != v}
        result = InstallResult(requested=[str(r) for r in reqs], layers=list(layers),
                               all_requested=all_specs)
        if new:
            t = time.perf_counter()
            layer_id, made = self._building(python, reqs, built, timing,
                                            lambda: self.ensure_layer(python, new))
            timing["install"] = time.perf_counter() - t
            result.layers = [*layers, layer_id]
            result.new_packages = new
            result.cache_hit = not made
        result.built_from_source = built
        timing["total"] = time.perf_counter() - t0
        result.timing = timing
        return result

    # -- source builds ---------------------------------------------------------

    def _building(self, python: str, reqs: Sequence[Requirement], built: list[str],
                  timing: dict[str, float], step: Callable[[], T]) -> T:
        """``step()``; when it needs a package built from source and that is allowed,
        build its wheel in a sandbox and run ``step`` again (a package once per install).
        ``built`` and ``timing["build"]`` collect what was built and how long it took."""
        while True:
            try:
                return step()
            except SourceBuildRefused as exc:
                name = exc.package and canonicalize_name(exc.package)
                if not self.allow_source_builds or not name:
                    raise
                if name in built:
                    raise SourceBuildRefused(
                        f"{name} was built from source in a sandbox, and uv still cannot use "
                        f"the wheel it made ({exc})", name) from None
                if len(built) >= self.max_source_builds:
                    raise SourceBuildRefused(
                        f"{name} would be source build number {len(built) + 1} of this "
                        "install; PackageInstaller.max_source_builds allows "
                        f"{self.max_source_builds}", name) from None
                t = time.perf_counter()
                self._build_from_source(python, name, reqs)
                timing["build"] = timing.get("build", 0.0) + time.perf_counter() - t
                built.append(name)

    def _build_from_source(self, python: str, name: str, reqs: Sequence[Requirement]) -> Path:
        """Find ``name``'s sdist (as the request constrains it) and build it in a sandbox."""
        if self.builder is None:
            raise SourceBuildRefused(f"{name} needs a source build and this installer has no "
                                     "builder", name)
        asked = [r for r in reqs if canonicalize_name(r.name) == name]
        requirement = asked[0] if asked else Requirement(name)
        indexes = [] if self.no_index else [self.index_url or PYPI, *self.extra_index_urls]
        try:
            candidate = find_sdist(requirement, self.find_links, indexes, self.offline)
            return self.builder.build(python, requirement, candidate,
                                      lambda needs, target: self._install_build_requires(
                                          python, name, needs, target))
        except (SdistUnavailable, SourceBuildFailed) as exc:
            raise InstallFailed(f"could not build {name} from source: {exc}") from None

    def _install_build_requires(self, python: str, name: str, needs: Sequence[str],
                                target: Path) -> None:
        """A build's declared requirements, as wheels only, into ``target``."""
        self._uv("pip", "install", "--target", str(target), "--python", python, "--quiet",
                 *self._build_args(), *self._index_args(), *needs,
                 action=f"install {name}'s build requirements ({', '.join(needs)})")

    # -- resolution ---------------------------------------------------------

    def resolve(self, python: str, specs: Sequence[str], keep: dict[str, str]) -> dict[str, str]:
        """The pinned set for ``specs``, keeping the base's and ``keep``'s versions."""
        if not specs:
            return {}
        base = self.base_packages(python)
        constraints = sorted(f"{n}=={v}" for n, v in {**base, **keep}.items())
        key = _digest({"specs": sorted(specs), "constraints": constraints,
                       "index": self._index_config(), "python": python_tag(python)})
        cached = self.registry.cached_resolution(key, max_age=self.resolution_ttl)
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory(prefix="sk-resolve-") as tmp:
            req_file = Path(tmp) / "requirements.in"
            req_file.write_text("\n".join(specs) + "\n")
            con_file = Path(tmp) / "constraints.txt"
            con_file.write_text("\n".join(constraints) + "\n")
            out = self._uv("pip", "compile", str(req_file), "-c", str(con_file),
                           "--python", python, "--no-header", "--no-annotate", "--quiet",
                           *self._build_args(), *self._index_args(),
                           action="resolve " + " ".join(specs))
        pins = {}
        for line in out.splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, _, version = line.partition("==")
                pins[canonicalize_name(name.split("[")[0].strip())] = version.split(";")[0].strip()
        self.registry.store_resolution(key, pins)
        return pins

    def base_packages(self, python: str) -> dict[str, str]:
        """The distributions the interpreter's own environment has (ipykernel and company)."""
        if python not in self._base:
            out = self._uv("pip", "freeze", "--python", python, action="list the base packages")
            found = {}
            for line in out.splitlines():
                if "==" in line:
                    name, _, version = line.partition("==")
                    found[canonicalize_name(name)] = version.strip()
            self._base[python] = found
        return self._base[python]

    # -- layers ---------------------------------------------------------------

    def layer_path(self, layer_id: str) -> Path:
        return self.layers_dir / layer_id

    def layer_pins(self, layers: Sequence[str]) -> dict[str, str]:
        pins: dict[str, str] = {}
        for layer_id in layers:
            layer = self.registry.layer(layer_id)
            if layer is not None:
                pins.update(layer["pins"])
        return pins

    def ensure_layer(self, python: str, pins: dict[str, str]) -> tuple[str, bool]:
        """The layer holding exactly ``pins``; build it unless it exists. True if built."""
        layer_id = _digest({"pins": sorted(pins.items()), "python": python_tag(python)})[:16]
        path = self.layer_path(layer_id)
        with self._lock(layer_id) as lock_fd:
            # Builds of this layer that still exist were cut short (we hold their lock).
            for leftover in self.layers_dir.glob(f".build-{layer_id}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if (path / _COMPLETE).exists():
                if self.registry.layer(layer_id) is None:  # its builder died before recording it
                    self.registry.store_layer(layer_id, pins, python_tag(python), _tree_size(path))
                self.registry.touch_layer(layer_id)
                path.chmod(0o755)  # built before sandboxes had uids of their own: 0700
                _compile_bytecode(path, python)  # unless done: its compiler may have been killed
                return layer_id, False
            tmp = Path(tempfile.mkdtemp(prefix=f".build-{layer_id}-", dir=self.layers_dir))
            try:
                self._uv("pip", "install", "--no-deps", "--target", str(tmp / "site-packages"),
                         "--python", python, "--quiet", *self._build_args(),
                         *self._index_args(),
                         *(f"{n}=={v}" for n, v in sorted(pins.items())),
                         action="install " + ", ".join(f"{n}=={v}" for n, v in pins.items()),
                         hold=(lock_fd,))
                (tmp / "site-packages" / ".lock").unlink(missing_ok=True)  # uv's, for --target
                (tmp / _COMPLETE).write_text(json.dumps(pins))
                # mkdtemp made it 0700; sandboxes run as uids of their own and read it.
                tmp.chmod(0o755)
                shutil.rmtree(path, ignore_errors=True)  # a half-built leftover
                os.replace(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.registry.store_layer(layer_id, pins, python_tag(python), _tree_size(path))
        _compile_bytecode(path, python)
        return layer_id, True

    def gc(self, in_use: Iterable[str]) -> list[str]:
        """Remove layers no session uses, and leftovers of interrupted builds."""
        keep = set(in_use)
        removed = []
        for entry in self.layers_dir.iterdir():
            if entry.name.startswith(".build-"):
                layer_id = entry.name.removeprefix(".build-").rsplit("-", 1)[0]
                with self._lock(layer_id, wait=False) as held:
                    if held is not None:  # no builder has it: a leftover of a killed one
                        shutil.rmtree(entry, ignore_errors=True)
                continue
            if not entry.is_dir() or entry.name in keep or _compiling(entry):
                continue  # (one being compiled was just built: it goes next time if unused)
            with self._lock(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
            self.registry.forget_layer(entry.name)
            removed.append(entry.name)
        return removed

    @contextlib.contextmanager
    def _lock(self, layer_id: str, wait: bool = True) -> Iterator[int | None]:
        """One builder per layer across processes; gc takes the same lock.

        Yields the locked descriptor, or None if not ``wait`` and someone holds
        it. A killed builder's lock goes with the last process holding it.
        """
        lock_path = self.layers_dir / f".{layer_id}.lock"
        with open(lock_path, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield None
                return
            try:
                yield f.fileno()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- uv ---------------------------------------------------------------------

    def _index_args(self) -> list[str]:
        args: list[str] = []
        if self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        if self.allow_source_builds and self.builder is not None \
                and self.builder.built_dir.is_dir():
            args += ["--find-links", str(self.builder.built_dir)]  # wheels built in sandboxes
        if self.no_index:
            args.append("--no-index")
        if self.offline:
            args.append("--offline")
        return args

    def _build_args(self) -> list[str]:
        """uv's arguments that keep every build backend from running here: wheels only,
        always (source builds happen in a sandbox, and reach uv as wheels); and that keep
        it from reading configuration files, which it looks for in its working directory
        and the directories above it: a kernel's is its notebook's folder, where the
        notebook's own `%session download` writes, so a uv.toml planted there chose the
        packages of every notebook installing after it (see PackageInstaller's traits and
        uv's UV_* environment variables for the installer's configuration)."""
        return ["--no-build", "--no-config"]

    def _index_config(self) -> dict[str, Any]:
        return {"index": self.index_url, "extra": list(self.extra_index_urls),
                "links": list(self.find_links), "no_index": self.no_index,
                "wheels_only": not self.allow_source_builds}

    def _uv(self, *args: str, action: str, hold: tuple[int, ...] = ()) -> str:
        """Run uv; ``hold``: lock descriptors it inherits, so that a uv orphaned by a
        killed client keeps the layer locked until it has finished writing."""
        env = dict(os.environ)
        if self.cache_dir:
            env["UV_CACHE_DIR"] = self.cache_dir
        env.pop("VIRTUAL_ENV", None)
        try:
            proc = subprocess.run([self.uv, *args], capture_output=True, text=True, env=env,
                                  timeout=self.timeout, stdin=subprocess.DEVNULL,
                                  pass_fds=hold)
        except FileNotFoundError:
            raise InstallFailed(f"uv is not installed ({self.uv}); `pip install uv`") from None
        except subprocess.TimeoutExpired:
            raise InstallFailed(f"could not {action}: uv took longer than {self.timeout:g} s"
                                ) from None
        if proc.returncode != 0:
            message = _uv_message(proc.stderr)
            no_wheel = _no_wheel_package(message)
            if no_wheel is not None:
                raise SourceBuildRefused(
                    f"could not {action}: {no_wheel} has no wheel for this Python and "
                    "platform, and source distributions are refused for safety (building "
                    "one runs the package's own code). Pick a version of "
                    f"{no_wheel} that publishes a wheel, serve a wheel of it with "
                    "PackageInstaller.find_links, or let it be built in a sandbox with no "
                    "network: PackageInstaller.allow_source_builds = True "
                    f"(uv: {message})", no_wheel)
            raise InstallFailed(f"could not {action}: {message}")
        return proc.stdout


def _no_wheel_package(message: str) -> str | None:
    """The package uv could not use because ``--no-build`` leaves it no wheel (uv 0.9+'s words)."""
    for pattern in (r"Wheels are required for `([^`]+)` because building from source is disabled",
                    r"\b([A-Za-z0-9][A-Za-z0-9._-]*)(?:==\S+)? has no usable wheels"):
        found = re.search(pattern, message)
        if found:
            return found.group(1)
    return None


def _uv_message(stderr: str) -> str:
    """uv's explanation, without its decorations, on as few lines as it takes."""
    lines = [re.sub(r"^\s*(×|╰─▶|error:|hint:)\s*", "", ln).strip() for ln in stderr.splitlines()]
    text = " ".join(ln for ln in lines if ln)
    return text[:1500] or "uv failed without a message"


@functools.cache
def python_tag(python: str) -> str:
    """Python version, platform and machine of an interpreter: part of every layer's key."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        version = platform.python_version()
    else:
        code = "import platform; print(platform.python_version())"
        version = subprocess.run([python, "-c", code], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
    return f"cp{version}-{sys.platform}-{platform.machine()}"


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
