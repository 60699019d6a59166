"""Requirement strings as the installer accepts them: one package each, never an option.

Its own module because both the installer and the source-build path read
requirements (a user's, and an sdist's build requirements), and neither may
smuggle a command-line option, a file or a URL to uv.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .errors import InvalidArgument


def parse_requirements(specs: Iterable[str], allow_direct: bool = False) -> list[Requirement]:
    """Accept requirement strings only: no options, files, URLs or paths (unless allowed)."""
    if isinstance(specs, str):
        specs = [specs]
    out = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise InvalidArgument(f"not a package requirement: {spec!r}")
        text = spec.strip()
        if text.startswith("-"):
            raise InvalidArgument(
                f"{spec!r} looks like a command-line option; give package requirements only "
                "(index settings are configuration: PackageInstaller.index_url, find_links, …)"
            )
        if any(c in text for c in "\n\r\0") or re.search(r"\s-{1,2}[a-z]", text):
            raise InvalidArgument(f"{spec!r} is not a single package requirement")
        if not allow_direct and (text.startswith((".", "/", "~")) or "://" in text):
            raise InvalidArgument(
                f"{spec!r} is a path or URL; installing from those is off "
                "(PackageInstaller.allow_direct_references)"
            )
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise InvalidArgument(f"{spec!r} is not a valid requirement: {exc}") from None
        if req.url and not allow_direct:
            raise InvalidArgument(
                f"{spec!r} names a URL; installing from URLs is off "
                "(PackageInstaller.allow_direct_references)"
            )
        out.append(req)
    return out


def merge_specs(specs: Sequence[str]) -> list[str]:
    """Later requirements for a name replace earlier ones; order kept."""
    merged: dict[str, str] = {}
    for spec in specs:
        merged[canonicalize_name(Requirement(spec).name)] = spec
    return list(merged.values())
