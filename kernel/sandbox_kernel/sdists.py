"""Source distributions, found, fetched and read without running any of their code.

uv cannot hand us an sdist without building it (it has no download command,
and ``pip download`` runs the build backend to learn the metadata), so the
host finds it itself: in the find-links directories and pages and in the
package indexes the installer is configured with (the Simple Repository API,
read by ``pypi-simple``), picks the newest version the requirement allows,
and downloads it, checked against the digest the index gives. The only thing
read from inside the archive on the host is ``pyproject.toml``'s
``[build-system] requires``, through ``tarfile`` and ``tomllib``, in memory,
bounded; nothing is extracted here. ``tarfile`` reads a member's extended header
(a GNU long name, a pax record) whole into memory, skips a member by
decompressing it, and follows a negative size backwards; so it reads the
archive through ``_Bounded``, which refuses a read larger than a header could
legitimately be, a seek backwards, and decompressing past ``max_unpacked``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tomllib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from packaging.requirements import Requirement
from packaging.utils import InvalidSdistFilename, canonicalize_name, parse_sdist_filename
from packaging.version import Version

from .errors import SandboxError
from .requirements import parse_requirements

#: uv's default index, used when none is configured.
PYPI = "https://pypi.org/simple/"
#: PEP 517's build requirements for a project that names none.
LEGACY_REQUIRES = ["setuptools>=40.8.0"]
_MAX_PYPROJECT = 1 << 20
#: The largest single read of the decompressed archive: a header record, or pyproject.toml.
_MAX_READ = 2 * _MAX_PYPROJECT
#: How far into the decompressed archive the host looks for pyproject.toml (a build
#: unpacks the whole archive into SourceBuilder.tmp_size, 2 GiB by default).
MAX_UNPACKED = 2 << 30
_MAX_MEMBERS = 100_000
_MAX_REQUIRES = 64


class SdistUnavailable(SandboxError):
    """No source distribution of the package could be found or fetched."""


@dataclass(frozen=True)
class SdistCandidate:
    """One source distribution a source offers: a local file or a URL."""

    name: str
    version: Version
    filename: str
    location: str
    #: The index's digests (algorithm -> hex); empty for find-links directories.
    digests: tuple[tuple[str, str], ...] = ()


def find_sdist(requirement: Requirement, find_links: Sequence[str], indexes: Sequence[str],
               offline: bool, timeout: float = 60.0) -> SdistCandidate:
    """The newest sdist of ``requirement``'s project its specifier allows, from the
    find-links first and then the indexes (in that order, as uv looks)."""
    name = canonicalize_name(requirement.name)
    found: list[SdistCandidate] = []
    for link in find_links:
        if urlparse(link).scheme == "file":
            found += _from_directory(name, Path(urlparse(link).path))
        elif _is_url(link):
            if not offline:
                found += _from_page(name, link, timeout)
        else:
            found += _from_directory(name, Path(link))
    if not offline:
        for index in indexes:
            found += _from_index(name, index, timeout)
    allowed = [c for c in found if requirement.specifier.contains(
        c.version, prereleases=True if requirement.specifier.prereleases else None)]
    if not allowed:
        where = ", ".join([*find_links, *([] if offline else indexes)]) or "nowhere (offline)"
        raise SdistUnavailable(
            f"no source distribution of {requirement} was found in {where}")
    best = max(c.version for c in allowed)
    return next(c for c in allowed if c.version == best)


def fetch(candidate: SdistCandidate, directory: Path, max_bytes: int,
          timeout: float = 300.0) -> Path:
    """A copy of the sdist in ``directory`` (the host's own), at most ``max_bytes``."""
    target = directory / candidate.filename
    if not _is_url(candidate.location):
        source = Path(candidate.location)
        with open(source, "rb") as src:  # a file the operator's find-links directory holds
            if os.fstat(src.fileno()).st_size > max_bytes:
                raise SdistUnavailable(f"{candidate.filename} is larger than {max_bytes} bytes")
            with open(target, "xb") as dst:
                shutil.copyfileobj(src, dst)
        return target
    from pypi_simple import DigestMismatchError, DistributionPackage, PyPISimple

    package = DistributionPackage(
        filename=candidate.filename, url=candidate.location, project=candidate.name,
        version=str(candidate.version), package_type="sdist",
        digests=dict(candidate.digests), requires_python=None, has_sig=None)
    try:
        with PyPISimple() as client:
            client.download_package(package, target, verify=bool(candidate.digests),
                                    timeout=timeout)
    except DigestMismatchError as exc:
        raise SdistUnavailable(f"{candidate.filename} does not match the index's digest: "
                               f"{exc}") from None
    except OSError as exc:
        raise SdistUnavailable(f"could not download {candidate.filename}: {exc}") from None
    if target.stat().st_size > max_bytes:
        target.unlink()
        raise SdistUnavailable(f"{candidate.filename} is larger than {max_bytes} bytes")
    return target


def build_requirements(sdist: Path, max_unpacked: int = MAX_UNPACKED) -> list[str]:
    """``[build-system] requires`` of the sdist's ``pyproject.toml`` (PEP 517's default
    when there is none), each checked to be a plain requirement (no URL or path);
    ``pyproject.toml`` must lie within the first ``max_unpacked`` bytes unpacked."""
    text = _read_pyproject(sdist, max_unpacked)
    if text is None:
        return list(LEGACY_REQUIRES)
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeError, RecursionError) as exc:
        raise SdistUnavailable(f"{sdist.name}: its pyproject.toml is not TOML ({exc})") from None
    system = data.get("build-system")
    if system is None:
        return list(LEGACY_REQUIRES)
    requires = system.get("requires") if isinstance(system, dict) else None
    if (not isinstance(requires, list) or len(requires) > _MAX_REQUIRES
            or not all(isinstance(r, str) and len(r) < 500 for r in requires)):
        raise SdistUnavailable(f"{sdist.name}: [build-system] requires is not a short list "
                               "of requirement strings")
    parsed = parse_requirements(requires) if requires else []
    for req in parsed:
        # uv takes a name that looks like a file ("x-1.0-py3-none-any.whl", "x.tar.gz") for
        # a path in its working directory, the manager's: a project's canonical name (no
        # dots) never does, and means the same project.
        req.name = canonicalize_name(req.name)
    return [str(r) for r in parsed]


def _read_pyproject(sdist: Path, max_unpacked: int) -> str | None:
    """The top directory's ``pyproject.toml``, read into memory, or None."""
    try:
        with gzip.open(sdist, "rb") as raw, tarfile.open(
                fileobj=_Bounded(raw, sdist.name, max_unpacked), mode="r:") as archive:
            for _ in range(_MAX_MEMBERS):
                member = archive.next()
                if member is None:
                    return None
                parts = member.name.strip("/").split("/")
                if len(parts) == 2 and parts[1] == "pyproject.toml":
                    if not member.isreg() or member.size > _MAX_PYPROJECT:
                        raise SdistUnavailable(f"{sdist.name}: its pyproject.toml is not a "
                                               "small regular file")
                    handle = archive.extractfile(member)
                    assert handle is not None
                    return handle.read(_MAX_PYPROJECT).decode("utf-8")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise SdistUnavailable(f"{sdist.name} is not a readable .tar.gz ({exc})") from None
    raise SdistUnavailable(f"{sdist.name} holds more than {_MAX_MEMBERS} members")


class _Bounded:
    """The decompressed archive as ``tarfile`` reads it, within bounds (see the module)."""

    def __init__(self, raw: gzip.GzipFile, name: str, limit: int) -> None:
        self.raw, self.name, self.limit = raw, name, limit

    def _refuse(self, why: str) -> SdistUnavailable:
        return SdistUnavailable(f"{self.name} is refused before any of it runs: {why}")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > _MAX_READ:
            raise self._refuse(f"it holds a header of {size} bytes")
        if self.raw.tell() + size > self.limit:
            raise self._refuse(f"pyproject.toml is not within its first {self.limit} "
                               "bytes unpacked")
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset < self.raw.tell() - 1:
            raise self._refuse("a member's size points backwards")
        if offset > self.limit:
            raise self._refuse(f"pyproject.toml is not within its first {self.limit} "
                               "bytes unpacked")
        return self.raw.seek(offset)

    def tell(self) -> int:
        return self.raw.tell()


def _candidate(name: str, filename: str, location: str,
               digests: tuple[tuple[str, str], ...] = ()) -> SdistCandidate | None:
    if not filename.endswith(".tar.gz") or "/" in filename:
        return None
    try:
        project, version = parse_sdist_filename(filename)
    except InvalidSdistFilename:
        return None
    if project != name:
        return None
    return SdistCandidate(name, version, filename, location, digests)


def _from_directory(name: str, directory: Path) -> list[SdistCandidate]:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    return [c for e in entries if e.is_file(follow_symlinks=False)
            and (c := _candidate(name, e.name, e.path)) is not None]


def _from_page(name: str, url: str, timeout: float) -> list[SdistCandidate]:
    """A find-links page: any HTML page of links to distributions."""
    import requests
    from pypi_simple import ProjectPage

    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise SdistUnavailable(f"could not read the find-links page {url}: {exc}") from None
    page = ProjectPage.from_html(name, response.content, base_url=response.url)
    return _from_packages(name, page.packages)


def _from_index(name: str, index: str, timeout: float) -> list[SdistCandidate]:
    from pypi_simple import NoSuchProjectError, PyPISimple

    try:
        with PyPISimple(endpoint=index.rstrip("/") + "/") as client:
            page = client.get_project_page(name, timeout=timeout)
    except NoSuchProjectError:
        return []
    except Exception as exc:  # requests' and pypi-simple's many errors: one message
        raise SdistUnavailable(f"could not read {name}'s page on {index}: {exc}") from None
    return _from_packages(name, page.packages)


def _from_packages(name: str, packages: Sequence[object]) -> list[SdistCandidate]:
    out = []
    for pkg in packages:
        if getattr(pkg, "package_type", None) != "sdist" or getattr(pkg, "is_yanked", False):
            continue
        digests = tuple(sorted((getattr(pkg, "digests", None) or {}).items()))
        found = _candidate(name, pkg.filename, pkg.url, digests)  # type: ignore[attr-defined]
        if found is not None:
            out.append(found)
    return out


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in ("http", "https")
