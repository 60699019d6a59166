"""Artifacts: what the code produced, recorded with metadata and tags, stored by content.

After every run, the files the run created or changed in the work directory,
and every rich output it displayed (images, HTML, …; not plain text), go
into the content-addressed store and are recorded: session, execution, path,
MIME type, size, hash, time, tags. Unchanged content costs no new storage.
Recording happens on a worker thread, in order, so a run returns as soon as
its kernel has answered; queries wait for what is still being recorded.
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
    max_scan_files = Int(100_000, help="Files of the work directory compared per run.").tag(
        config=True)
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

    def save(self, dest: str | os.PathLike[str]) -> Path:
        """Write the content to ``dest`` (a file, or a directory to put it in), verified."""
        target = Path(dest)
        if target.is_dir():
            target = target / (Path(self.path).name if self.path else
                               f"artifact-{self.id}{mimetypes.guess_extension(self.mime) or ''}")
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
        self._registry.delete_artifact(self.id)
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
        self._seen = self.workdir.scan(policy.max_scan_files) if policy.record_files else {}
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sandbox-kernel-artifacts")
        self._pending: list[concurrent.futures.Future[None]] = []

    def after_run(self, execution_id: int | None, outputs: list[dict[str, Any]]) -> None:
        self._pending = [f for f in self._pending if not f.done()]
        # Stamped with the run's end, not with when the worker gets to it.
        self._pending.append(self._worker.submit(self._record, execution_id, outputs,
                                                 time.time()))

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
        try:
            if self.policy.record_files:
                now = self.workdir.scan(self.policy.max_scan_files)
                changed = [p for p, sig in now.items()
                           if self._seen.get(p) != sig and not self._ignored(p)]
                self._seen = now
                for path in sorted(changed):
                    self._record_file(execution_id, path, when)
            if self.policy.record_outputs:
                for out in outputs:
                    for mime, value in out.get("data", {}).items():
                        if mime not in _SKIPPED_MIME:
                            self._record_output(execution_id, mime, value, when)
        except Exception:  # recording must never break the session
            import traceback

            traceback.print_exc()

    def _ignored(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) for pattern in self.policy.ignore)

    def _room(self) -> bool:
        return self.registry.count_artifacts(self.session_id) < self.policy.max_per_session

    def _record_file(self, execution_id: int | None, path: str, when: float) -> None:
        parts = tuple(path.split("/"))
        try:
            with self.workdir.open_file(parts) as (fd, st):
                if st.st_size > self.policy.max_size or not self._room():
                    return
                record = self.store.ingest(f"/proc/self/fd/{fd}")
        except (OSError, SandboxError):
            return  # gone, or a link: never followed, never recorded
        mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
        self._add(execution_id, "file", path, mime, record.size, record.hash, when)

    def _record_output(self, execution_id: int | None, mime: str, value: Any,
                       when: float) -> None:
        if not self._room():
            return
        if isinstance(value, str):
            binary = mime.startswith(("image/", "audio/", "video/")) and mime != "image/svg+xml"
            data = base64.b64decode(value) if binary else value.encode()
        else:
            data = json.dumps(value).encode()
        with tempfile.NamedTemporaryFile(dir=self.store.root, prefix=".output-") as tmp:
            tmp.write(data)
            tmp.flush()
            record = self.store.ingest(tmp.name)
        self._add(execution_id, "output", None, mime, record.size, record.hash, when)

    def _add(self, execution_id: int | None, kind: str, path: str | None, mime: str,
             size: int, digest: str, when: float) -> None:
        self.store.add_ref(digest)
        self.registry.add_artifact(self.session_id, execution_id, kind, path, mime, size, digest,
                                   when)


def check_tag(tag: str) -> str:
    """A session's or an artifact's tag, as given, or InvalidArgument."""
    if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag):
        raise InvalidArgument(f"invalid tag {tag!r}: 1-64 letters, digits or . : / = + @ -")
    return tag
