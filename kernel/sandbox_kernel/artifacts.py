"""Artifacts: what the code produced, recorded with metadata and tags, stored by content.

After every run, the files the run created or changed in the work directory,
and every rich output it displayed (images, HTML, …; not plain text), go
into the content-addressed store and are recorded: session, execution, path,
MIME type, size, hash, time, tags. Unchanged content costs no new storage.
Recording happens on a worker thread, in order, so a run returns as soon as
its kernel has answered; queries wait for what is still being recorded.

The store is shared by every session, so what a session keeps there is
bounded: a file rewritten in every cell keeps only its latest versions
(``keep_versions``), a session's artifacts count against its ``disk`` limit
(an artifact that would take them over it is not stored, and the next run's
result says so), and a closed session's artifacts are released, except those
tagged ``keep_tag``, for ``sandbox-kernel gc`` to free.
"""

from __future__ import annotations

import base64
import concurrent.futures
import fnmatch
import json
import mimetypes
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from traitlets import Bool, Int, List, Unicode
from traitlets.config import LoggingConfigurable

from .errors import InvalidArgument, SandboxError
from .limits import format_size
from .shown import shown
from .workdir import WorkDir

TAG_PATTERN = re.compile(r"[\w.:/=+@-]{1,64}")  # fullmatch: "$" would let "tag\n" in

if TYPE_CHECKING:
    from .registry import Registry
    from .store import ContentStore

_SKIPPED_MIME = {"text/plain", "application/vnd.jupyter.widget-view+json"}


class ArtifactPolicy(LoggingConfigurable):
    """What is recorded as an artifact, and how much (llmspell-style limits)."""

    record_files = Bool(True, help="Record files each run creates or changes.").tag(config=True)
    record_outputs = Bool(True, help="Record rich outputs (images, HTML, ...).").tag(config=True)
    max_per_session = Int(10_000, help="Artifacts kept per session; past it, new ones are "
                          "not recorded (and a warning is logged).").tag(config=True)
    max_size = Int(4 * 1024**3, help="Files larger than this (bytes) are not recorded.").tag(
        config=True)
    max_scan_files = Int(100_000, help="Entries of the work directory (files and "
                         "directories alike) looked at per run.").tag(config=True)
    max_scan_depth = Int(64, help="Directories deeper than this in the work directory are "
                         "not looked into.").tag(config=True)
    keep_versions = Int(1, help="Versions of a file kept per session and path: recording a "
                        "newer one releases the older ones past this number, unless they are "
                        "tagged. 0 keeps every version (each one stored and counted against "
                        "the disk limit).").tag(config=True)
    keep_tag = Unicode("keep", help="Artifacts with this tag outlive their session: closing "
                       "it releases the others, whose content `sandbox-kernel gc` then frees."
                       ).tag(config=True)
    ignore = List(Unicode(), default_value=[".ipynb_checkpoints/*", "*/.ipynb_checkpoints/*",
                                            "__pycache__/*", "*/__pycache__/*", "*.pyc"],
                  help="Work-directory paths (glob) that are never artifacts.").tag(config=True)


@dataclass
class Artifact:
    id: int
    session_id: str
    execution_id: int | None
    kind: str  # "file" or "output"
    path: str | None
    mime: str
    size: int
    hash: str
    created: float
    tags: list[str] = field(default_factory=list)
    _store: Any = field(default=None, repr=False)
    _registry: Any = field(default=None, repr=False)

    def read(self) -> bytes:
        """The content, every chunk verified against its hash."""
        record = self._store.file(self.hash)
        if record is None:
            raise SandboxError(f"artifact {self.id}: its content is no longer in the store")
        return b"".join(self._store.read_chunk(h) for h, _ in record.chunks)

    @property
    def file_name(self) -> str:
        """The name :meth:`save` gives the file in a directory: the sandbox file's own."""
        return (Path(self.path).name if self.path else
                f"artifact-{self.id}{mimetypes.guess_extension(self.mime) or ''}")

    def save(self, dest: str | os.PathLike[str]) -> Path:
        """Write the content to ``dest`` (a file, or a directory to put it in), verified."""
        target = Path(dest)
        if target.is_dir():
            target = target / self.file_name
        self._store.export(self.hash, target)
        return target

    def tag(self, *tags: str) -> Artifact:
        self.tags = sorted({*self.tags, *(check_tag(t) for t in tags)})
        self._registry.set_artifact_tags(self.id, self.tags)
        return self

    def untag(self, *tags: str) -> Artifact:
        self.tags = [t for t in self.tags if t not in tags]
        self._registry.set_artifact_tags(self.id, self.tags)
        return self

    def delete(self) -> None:
        # Released once, by whoever removed the record: a second delete, or one after the
        # session's close released it, must not take a reference another record holds.
        if self._registry.delete_artifact(self.id):
            self._store.release(self.hash)


class ArtifactRecorder:
    """Per session and process: the work directory as last seen, and a worker to record."""

    def __init__(self, session_id: str, work_dir: Path, store: ContentStore,
                 registry: Registry, policy: ArtifactPolicy):
        self.session_id = session_id
        self.workdir = WorkDir(work_dir)
        self.store = store
        self.registry = registry
        self.policy = policy
        self._seen = self._scan() if policy.record_files else {}
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sandbox-kernel-artifacts")
        self._pending: list[concurrent.futures.Future[None]] = []
        self._warnings: list[str] = []

    def after_run(self, execution_id: int | None, outputs: list[dict[str, Any]]) -> list[str]:
        """Record the run's artifacts on the worker; return what earlier runs could not store.

        Recording is asynchronous (a run returns when its kernel answers), so an
        artifact refused for the disk quota is logged at once and its warning is
        returned here, for the next run's result to carry.
        """
        self._pending = [f for f in self._pending if not f.done()]
        # Stamped with the run's end, not with when the worker gets to it.
        self._pending.append(self._worker.submit(self._record, execution_id, outputs,
                                                 time.time()))
        return self.take_warnings()

    def take_warnings(self) -> list[str]:
        """Warnings about artifacts not stored since the last call (each said once)."""
        taken, self._warnings = self._warnings, []
        return taken

    def forget(self, path: str, st: os.stat_result) -> None:
        """A file the host placed (an upload) is not something the code produced."""
        self._worker.submit(self._seen.__setitem__, path,
                            (st.st_size, st.st_mtime_ns, st.st_ino))

    def flush(self, timeout: float | None = 60) -> None:
        concurrent.futures.wait(self._pending, timeout=timeout)

    def list(self, tag: str | None = None, path: str | None = None,
             since: float | None = None) -> list[Artifact]:
        self.flush()
        return [Artifact(**row, _store=self.store, _registry=self.registry)
                for row in self.registry.artifacts(self.session_id, tag, path, since)]

    def _record(self, execution_id: int | None, outputs: list[dict[str, Any]],
                when: float) -> None:
        refused: list[tuple[str, int]] = []
        try:
            quota = self._quota()
            if self.policy.record_files:
                now = self._scan()
                changed = [p for p, sig in now.items()
                           if self._seen.get(p) != sig and not self._ignored(p)]
                self._seen = now
                for path in sorted(changed):
                    self._record_file(execution_id, path, when, quota, refused)
            if self.policy.record_outputs:
                for out in outputs:
                    for mime, value in out.get("data", {}).items():
                        if mime not in _SKIPPED_MIME:
                            self._record_output(execution_id, mime, value, when, quota,
                                                refused)
        except Exception:  # recording must never break the session
            import traceback

            traceback.print_exc()
        if refused:
            self._refused(refused, quota)

    def _scan(self) -> dict[str, tuple[int, int, int]]:
        return self.workdir.scan(self.policy.max_scan_files, self.policy.max_scan_depth)

    def _quota(self) -> int | None:
        """The session's disk limit, which its stored artifacts count against."""
        row = self.registry.session(self.session_id)
        return (row or {}).get("limits", {}).get("disk") or None

    def _fits(self, size: int, path: str | None, quota: int | None) -> bool:
        """Whether storing ``size`` more bytes keeps the session's artifacts within ``quota``,
        counting the versions of ``path`` that recording this one will release."""
        if quota is None:
            return True
        held = self.registry.artifact_bytes(self.session_id)
        keep = self.policy.keep_versions
        if path is not None and keep > 0:
            versions = [a for a in self.registry.artifacts(self.session_id, path=path)
                        if a["kind"] == "file"]
            older = versions[:-(keep - 1)] if keep > 1 else versions
            held -= sum(a["size"] for a in older if not a["tags"])
        return held + size <= quota

    def _refused(self, refused: list[tuple[str, int]], quota: int | None) -> None:
        names = ", ".join(shown(name) for name, _ in refused[:5]) + (", ..." if len(refused) > 5
                                                              else "")
        warning = (f"{len(refused)} artifact(s) of a run were not stored ({names}; "
                   f"{format_size(sum(size for _, size in refused))}): the session's "
                   f"artifacts would go over its disk limit of {format_size(quota or 0)}. "
                   "The files stay in the work directory; delete artifacts you do not "
                   "need (Artifact.delete()) or create the session with a larger "
                   "limits={'disk': ...}")
        self.policy.log.warning("session %s: %s", self.session_id, warning)
        self._warnings.append(warning)

    def _ignored(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) for pattern in self.policy.ignore)

    def _room(self) -> bool:
        return self.registry.count_artifacts(self.session_id) < self.policy.max_per_session

    def _record_file(self, execution_id: int | None, path: str, when: float,
                     quota: int | None, refused: list[tuple[str, int]]) -> None:
        parts = tuple(path.split("/"))
        try:
            with self.workdir.open_file(parts) as (fd, st):
                if st.st_size > self.policy.max_size or not self._room():
                    return
                if not self._fits(st.st_size, path, quota):  # checked before storing a byte
                    refused.append((path, st.st_size))
                    return
                record = self.store.ingest(f"/proc/self/fd/{fd}")
            if record.size > st.st_size and not self._fits(record.size, path, quota):
                refused.append((path, record.size))  # grew while read: unreferenced, gc'd
                return
        except (OSError, SandboxError):
            return  # gone, or a link: never followed, never recorded
        mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
        self._add(execution_id, "file", path, mime, record.size, record.hash, when)

    def _record_output(self, execution_id: int | None, mime: str, value: Any,
                       when: float, quota: int | None, refused: list[tuple[str, int]]) -> None:
        if not self._room():
            return
        if isinstance(value, str):
            binary = mime.startswith(("image/", "audio/", "video/")) and mime != "image/svg+xml"
            data = base64.b64decode(value) if binary else value.encode()
        else:
            data = json.dumps(value).encode()
        if not self._fits(len(data), None, quota):
            refused.append((mime, len(data)))
            return
        with tempfile.NamedTemporaryFile(dir=self.store.root, prefix=".output-") as tmp:
            tmp.write(data)
            tmp.flush()
            record = self.store.ingest(tmp.name)
        self._add(execution_id, "output", None, mime, record.size, record.hash, when)

    def _add(self, execution_id: int | None, kind: str, path: str | None, mime: str,
             size: int, digest: str, when: float) -> None:
        """Reference first, record second: the store never has a record without its
        reference. A session closed meanwhile takes no new record (its artifacts were
        released at close), so the reference goes back; older versions of the path past
        ``keep_versions`` are released once the new one is recorded."""
        self.store.add_ref(digest)
        if self.registry.add_artifact(self.session_id, execution_id, kind, path, mime, size,
                                      digest, when) is None:
            self.store.release(digest)
            return
        if kind == "file" and path is not None and self.policy.keep_versions > 0:
            for old in self.registry.prune_artifact_versions(self.session_id, path,
                                                             self.policy.keep_versions):
                self.store.release(old)


def check_tag(tag: str) -> str:
    """A session's or an artifact's tag, as given, or InvalidArgument."""
    if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag):
        raise InvalidArgument(f"invalid tag {tag!r}: 1-64 letters, digits or . : / = + @ -")
    return tag
