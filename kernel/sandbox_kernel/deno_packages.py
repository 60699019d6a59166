"""``npm:`` and ``jsr:`` packages for Deno sessions, fetched outside the sandbox.

The manager runs ``deno cache`` with network, into one Deno cache
(``DENO_DIR``) shared by every session; sandboxes bind it read-only and find
the packages there with no network of their own (Deno falls back to cached
registry data offline, and tolerates a cache it cannot write). A spec that was
fetched before is a cache hit, answered from the registry without running Deno.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from traitlets import Float, Unicode, default
from traitlets.config import LoggingConfigurable

from .errors import InvalidArgument, SandboxError
from .packages import InstallResult
from .registry import Registry

SPEC = re.compile(r"^(npm|jsr):(@[a-z0-9][\w.-]*/)?[a-z0-9][\w.-]*(@[\w.^~<>=*|+ -]+)?$",
                  re.IGNORECASE)


class DenoPackages(LoggingConfigurable):
    registry_url = Unicode(
        help="The npm registry `deno cache` fetches from (NPM_CONFIG_REGISTRY); sandboxes "
        "are given the same value so that they find what was fetched.",
    ).tag(config=True)
    timeout = Float(600.0, help="Seconds a fetch may take.").tag(config=True)

    @default("registry_url")
    def _registry_default(self) -> str:
        return os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org/")

    def __init__(self, home: Path, registry: Registry, **kwargs: object):
        super().__init__(**kwargs)
        self.cache_dir = Path(home) / "deno"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.registry = registry

    def sandbox_env(self) -> dict[str, str]:
        return {"DENO_DIR": str(self.cache_dir), "NPM_CONFIG_REGISTRY": self.registry_url}

    def install(self, deno: str, requested: Sequence[str],
                have: Sequence[str] = ()) -> InstallResult:
        """Fetch what is not cached yet; the result reports a cache hit when nothing was."""
        t0 = time.perf_counter()
        specs = parse_specs(requested)
        missing = [s for s in specs if self.registry.cached_resolution(self._key(s),
                                                                       max_age=1e12) is None]
        timing: dict[str, float] = {}
        if missing:
            t = time.perf_counter()
            self._fetch(deno, missing)
            timing["fetch"] = time.perf_counter() - t
            for spec in missing:
                self.registry.store_resolution(self._key(spec), {"spec": spec})
        timing["total"] = time.perf_counter() - t0
        merged = list(dict.fromkeys([*have, *specs]))
        return InstallResult(requested=specs, layers=[], all_requested=merged,
                             new_packages={s: "" for s in missing}, cache_hit=not missing,
                             timing=timing)

    def _key(self, spec: str) -> str:
        return f"deno:{self.registry_url}:{spec}"

    def _fetch(self, deno: str, specs: list[str]) -> None:
        env = {**os.environ, **self.sandbox_env(), "DENO_NO_UPDATE_CHECK": "1", "NO_COLOR": "1"}
        with open(self.cache_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch at a time into the shared cache
            try:
                proc = subprocess.run([deno, "cache", *specs], env=env, capture_output=True,
                                      text=True, timeout=self.timeout,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                raise SandboxError(f"fetching {', '.join(specs)} took longer than "
                                   f"{self.timeout:g} s") from None
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise SandboxError(f"deno could not fetch {', '.join(specs)}: "
                               f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}")


def parse_specs(specs: Iterable[str] | str) -> list[str]:
    """``npm:name[@range]`` and ``jsr:@scope/name[@range]`` only: no URLs, paths or flags."""
    if isinstance(specs, str):
        specs = [specs]
    out = []
    for spec in specs:
        if not isinstance(spec, str) or not SPEC.match(spec.strip()):
            raise InvalidArgument(
                f"not a Deno package: {spec!r}; use npm:name@version or jsr:@scope/name@version")
        out.append(spec.strip())
    return out
