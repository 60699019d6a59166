"""Pause and resume, freeze, checkpoints, restore, fork, history and replay.

A session's interpreter state goes into the content-addressed store as a
*checkpoint*: each variable's pickle and raw buffers, or one pickle for a group
of variables that share objects (captured inside the sandbox by
``snapshot.py``; a group's members are always loaded together), plus, for
checkpoints a user asks for, the work directory's files. Everything is stored
by hash, so an unchanged variable or file costs no new storage. Pause is a
checkpoint followed by the sandbox's exit; resume starts a new sandbox and
loads the checkpoint back, rebuilding what could not be pickled by replaying
recorded cells (``replay.py``) and naming whatever still could not come back.
Freeze stops the processes instead (SIGSTOP), which keeps memory and resumes
at once.

Lifecycle changes of one session are serialized across processes by an
advisory lock on ``lifecycle.lock``; running cells hold a shared lock on
``busy.lock``, which a pause takes exclusively, so a pause never captures a
half-run cell and waits at most ``pause_wait`` seconds for one to finish.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from .errors import (
    InvalidArgument,
    SandboxError,
    SessionBusy,
    SessionClosed,
    SessionDead,
    SnapshotDamaged,
    StateDirFull,
    is_disk_full,
)
from .paths import SessionLayout
from .replay import plan_replay
from .report_schema import MAX_REPORT_BYTES, ReportInvalid, capture_report, load_report
from .sandbox import identity, supervisor
from .sandbox.launcher import INSIDE_KERNEL, INSIDE_SNAPSHOTS, INSIDE_VIEWS
from .shown import shown
from .snapshot import REPORT, request_code
from .store import FileRecord
from .timing import Timing
from .workdir import UnsafePath, WorkDir, relative_parts

if TYPE_CHECKING:
    from .session import AsyncSession

#: Variables smaller than this are exported and loaded first, while the large ones export.
_EARLY_BYTES = 16 * 2**20
#: Buffers from this size on are mapped by the kernel (snapshot.py), so worth a view.
_VIEW_BYTES = 1 << 20
#: Chunks of captured buffers (see chunks.cut_fixed): as large as the largest content-defined
#: chunk. Four times fewer than at 64 KiB, which makes verifying a GiB before it is mapped
#: take 0.4 s instead of 0.7 s here; a change in place rewrites 256 KiB around it.
_BUFFER_CHUNK = 256 << 10
#: The files a capture writes: a pickle per variable (vN) or group of variables that share
#: objects (gN), and its out-of-band buffers.
_BLOB = re.compile(r"[vg]\d+\.(?:pkl|b\d+)")
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                              thread_name_prefix="sandbox-kernel-snapshot")
#: Present while a session is frozen or paused (or being paused): attached clients check
#: it before every cell, so a session suspended by another client is resumed, never run
#: on a kernel that is being stopped.
SUSPENDED_MARK = "suspended"


@dataclass
class Checkpoint:
    """A saved state of a session: variables and imports, and files when it was asked for."""

    id: int
    session_id: str
    name: str | None
    kind: str
    created: float
    execution_count: int | None
    variables: list[str]
    skipped: dict[str, str]
    files: int | None
    size: int
    stats: dict[str, Any] = field(default_factory=dict)
    #: Variables saved, but not exactly as they were -> what differs (see snapshot.capture).
    inexact: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Checkpoint:
        m = row["manifest"]
        return cls(
            id=row["id"], session_id=row["session_id"], name=row["name"], kind=row["kind"],
            created=row["created"], execution_count=row["execution_count"],
            variables=sorted(m["variables"]) + sorted(m["imports"]), skipped=m["skipped"],
            files=None if m.get("files") is None else len(m["files"]),
            size=_state_bytes(m["variables"]), stats=m.get("stats", {}),
            inexact=m.get("inexact", {}),
        )


@dataclass
class SnapshotDir:
    """A directory both the host and the kernel see: ``base`` on the host, ``inside`` in it."""

    base: WorkDir
    name: str
    inside: str
    #: Host-only, on the same filesystem: files are written here, then renamed in.
    staging: Path
    #: The session's views directory (host, inside), when its kernel can read it.
    views: tuple[Path, str] | None = None

    def view(self, pack: Path, name: str) -> str | None:
        """Show the kernel a stored pack (by a link in the read-only views directory);
        the path it reads it by, or None where the pack cannot be linked there."""
        if self.views is None:
            return None
        host, inside = self.views
        link = f"{self.name}-{name}"
        try:
            os.link(pack, host / link)
        except OSError:
            return None  # another filesystem, say: the caller exports a copy
        return f"{inside}/{link}"

    def remove(self) -> None:
        with contextlib.suppress(OSError, SandboxError):  # the sandbox may have removed it
            self.base.remove_tree((self.name,))
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.views is not None:  # mappings the kernel made stay; the names go
            for link in self.views[0].glob(f"{self.name}-*"):
                link.unlink(missing_ok=True)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class ResumeReport:
    """What came back after a resume or restore, and how; nothing lost goes unnamed."""

    checkpoint: int | None
    restored: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    #: Variables rebuilt by replay -> the execution counts of the cells that were run again.
    replayed: dict[str, list[int | None]] = field(default_factory=dict)
    #: Variables that could not come back -> why.
    lost: dict[str, str] = field(default_factory=dict)
    #: Variables that came back, but not exactly as they were -> what differs.
    inexact: dict[str, str] = field(default_factory=dict)
    files: int = 0
    #: Bytes the kernel mapped from the store's packs rather than receiving a copy.
    mapped: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    thawed: bool = False
    #: Started again with no variables (restart()): there was no checkpoint to load.
    restarted: bool = False

    def __str__(self) -> str:
        if self.thawed:
            return "resumed from freeze: memory was kept, nothing to restore"
        if self.restarted:
            return ("started again with no variables; the files in its work directory and "
                    "its packages are kept")
        if self.checkpoint is None:  # neither paused, frozen nor dead: nothing was done
            return "the session is running already: nothing to resume"
        lines = [f"restored {len(self.restored)} variables and {len(self.imports)} imports "
                 f"from checkpoint {self.checkpoint}"] if self.restored or self.imports else [
                 f"resumed from checkpoint {self.checkpoint}"]
        # Names and reasons come from the sandbox: each is escaped on its own (see shown).
        by_cells: dict[str, list[str]] = {}  # one line per replay, not per variable it made
        for name, cells in self.replayed.items():
            by_cells.setdefault(str(cells), []).append(shown(name))
        for cells, names in by_cells.items():
            lines.append(f"rebuilt {', '.join(names)} by replaying cells {cells}")
        for name, why in self.lost.items():
            lines.append(f"could not restore {shown(name)}: {shown(why)}")
        for name, why in self.inexact.items():
            lines.append(f"restored {shown(name)}, but not exactly: {shown(why)}")
        return "\n".join(lines)


def _pickles(variables: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each pickle of a manifest once (by its first file): a group's members share theirs."""
    return {v["files"][0][0] if isinstance(v["files"][0], list) else v["files"][0]: v
            for v in variables.values()}


def _state_bytes(variables: dict[str, Any]) -> int:
    """The bytes a manifest's variables take, a group's pickle counted once."""
    return sum(v["size"] for v in _pickles(variables).values())


def _with_groups(variables: dict[str, Any], names: Iterable[str]) -> set[str]:
    """``names`` and every variable pickled with one of them: loaded apart, a group's
    members would no longer share what they shared."""
    wanted = set(names)
    groups = {variables[n]["group"] for n in wanted if variables[n].get("group")}
    return wanted | {n for n, v in variables.items() if v.get("group") in groups}


def _names_present(value: Any, asked: set[str]) -> list[str]:
    """The kernel's answer to "which of these names are defined", taken as hostile text:
    bounded, parsed as JSON (never evaluated), and only names that were asked about."""
    try:
        text = value["data"]["text/plain"] if value.get("status") == "ok" else ""
        if not isinstance(text, str) or len(text) > 2 * sum(len(n) + 4 for n in asked) + 64:
            return []
        names = json.loads(ast.literal_eval(text) if text[:1] in "'\"" else text)
    except (ValueError, TypeError, KeyError, AttributeError, SyntaxError, RecursionError,
            MemoryError):
        return []
    return [n for n in names if isinstance(n, str) and n in asked] if isinstance(
        names, list) else []


def _requested(variables: dict[str, Any], names: Iterable[str], shown: dict[str, str]
               ) -> dict[str, Any]:
    """The load request for ``names``: each variable's files, by view where it has one."""
    return {v: {"files": [shown.get(f, f) for f, _, _ in variables[v]["files"]],
                **({"group": variables[v]["group"]} if variables[v].get("group") else {})}
            for v in names}


class LifecycleMixin:
    """The lifecycle half of AsyncSession (kept apart: one concept per module)."""

    # Provided by AsyncSession.
    manager: Any
    id: str
    name: str
    _row: dict[str, Any]
    _conn: Any

    # -- locks -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _flock(self, name: str, mode: int, wait: float, what: str) -> AsyncIterator[None]:
        fd = os.open(Path(self._row["session_dir"]) / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SessionBusy(what) from None
                    await asyncio.sleep(0.01)
            yield
        finally:
            os.close(fd)

    def _lifecycle_lock(self) -> Any:
        return self._flock(
            "lifecycle.lock", fcntl.LOCK_EX, self.manager.pause_wait + 60,
            f"session {self.name!r}: another client is pausing, resuming or checkpointing it "
            "and did not finish in time; try again")

    def _quiet(self) -> Any:
        """No cell running (in any client), and none starting, while this is held."""
        wait = self.manager.pause_wait
        return self._flock(
            "busy.lock", fcntl.LOCK_EX, wait,
            f"session {self.name!r} is running a cell; waited {wait:g} s for it to finish. "
            "Interrupt it (session.interrupt()) or try again when it is done")

    # -- pause and resume ------------------------------------------------------------

    async def pause(self, mode: str = "snapshot") -> dict[str, Any]:
        """Stop the sandbox, keeping variables, files and packages; ``resume()`` brings it back.

        ``mode="snapshot"`` saves the variables to the store and ends the sandbox
        process (no CPU, no memory). ``mode="freeze"`` stops its processes with
        SIGSTOP instead: memory is kept and resume is instant.
        """
        if mode not in ("snapshot", "freeze"):
            raise InvalidArgument(f"mode must be 'snapshot' or 'freeze', got {mode!r}")
        timing = Timing()
        async with self._lifecycle_lock():
            row = self._usable_row()
            if row["status"] == "paused" or (row["status"] == "frozen" and mode == "freeze"):
                return {"status": row["status"], "already": True, "timing": dict(timing.finish())}
            if row["status"] == "frozen":
                self._thaw(row)
            await self._ensure_attached(timing)  # type: ignore[attr-defined]
            async with self._quiet():
                if mode == "freeze":
                    with timing.stage("pause"):
                        self._freeze(self.manager._refresh(self.id))
                    return {"status": "frozen", "timing": dict(timing.finish())}
                with timing.stage("pause"):
                    checkpoint = await self._capture("pause", None, files=False)
                    self.manager.registry.update(self.id, checkpoint_id=checkpoint.id)
                    self._mark_suspended(True)
                    if not self.manager.registry.transition(
                            self.id, "paused", allowed_from=("running",),
                            reason="paused; resume() or any run brings it back"):
                        raise self._dead(self.manager._refresh(self.id)["reason"])
                    await self._stop_sandbox()
        return {"status": "paused", "checkpoint": checkpoint.id, "skipped": checkpoint.skipped,
                "inexact": checkpoint.inexact, "size": checkpoint.size,
                "timing": dict(timing.finish())}

    async def resume(self, checkpoint: int | None = None,
                     timing: Timing | None = None) -> ResumeReport:
        """Bring a paused or frozen session back (runs and attaches do this on their own).

        A dead session (its sandbox killed or crashed) with a checkpoint starts
        again from that checkpoint, and the cells that succeeded after it are
        replayed; a dead session without one stays dead.
        """
        timing = timing if timing is not None else Timing()
        t = time.perf_counter()
        async with self._lifecycle_lock():
            row = self.manager._refresh(self.id)
            if row["status"] != "dead":
                row = self._usable_row()
            if row["status"] == "dead":
                report = await self._revive(row, checkpoint)
            elif row["status"] == "frozen":
                self._thaw(row)
                report = ResumeReport(checkpoint=None, thawed=True)
            elif row["status"] != "paused":
                report = ResumeReport(checkpoint=None)
            else:
                chosen = checkpoint if checkpoint is not None else row["checkpoint_id"]
                cp = self._checkpoint_row(chosen)
                try:
                    report = await self._restore_from(cp, reset=False, files=False,
                                                      relaunch=row)
                except SnapshotDamaged:
                    await self._back_to_paused()
                    raise
        timing["resume"] = timing.get("resume", 0.0) + time.perf_counter() - t
        report.timing = dict(timing)
        self.last_resume = report
        return report

    async def restart(self) -> ResumeReport:
        """Start a dead session's kernel again with no variables, as Jupyter restarts a
        kernel that died: its work directory, packages, limits and history stay.

        For a dead session that ``resume()`` cannot bring back (it has no checkpoint,
        or its checkpoint failed to load): what its cells made in memory is gone,
        what they wrote to files is not. The same session, not a new one, so that a
        notebook whose kernel ran out of memory finds its files where they were. A
        session that is not dead (another client brought it back first) is resumed
        as ``resume()`` would.
        """
        async with self._lifecycle_lock():
            row = self.manager._refresh(self.id)
            dead = row["status"] == "dead"
            if dead:
                self._row = row
                await self._relaunch(row)
        if not dead:
            return await self.resume()
        report = ResumeReport(checkpoint=None, restarted=True)
        self.last_resume = report
        return report

    async def _revive(self, row: dict[str, Any], checkpoint: int | str | None) -> ResumeReport:
        """A dead session back from a checkpoint, plus the good cells run after it."""
        self._row = row
        chosen = checkpoint if checkpoint is not None else \
            self.manager.registry.last_checkpoint_id(self.id)
        if chosen is None:
            raise self._dead(row["reason"])
        cp = self._checkpoint_row(chosen)
        try:
            report = await self._restore_from(cp, reset=False, files=False, relaunch=row)
        except SnapshotDamaged:
            await self._back_to_paused()
            raise
        later = [e for e in self.manager.registry.executions(self.id)
                 if e["status"] == "ok"
                 and (cp["execution_id"] is None or e["id"] > cp["execution_id"])]
        if later:
            await self._replay_into(
                report, f"the state of the cells run after checkpoint {cp['id']}", later)
        return report

    async def _replay_into(self, report: ResumeReport, what: str,
                           cells: list[dict[str, Any]]) -> None:
        """Run recorded cells again, in order; the report says which, and what failed again."""
        failed = await self._replay_cells(cells)
        report.replayed[what] = [c["execution_count"] for c in cells]
        if failed:
            report.lost["state of the cells that failed again"] = "; ".join(failed)

    async def _replay_cells(self, cells: list[dict[str, Any]]) -> list[str]:
        """Run recorded cells again, in order; what each one that failed said."""
        failed = []
        for cell in cells:
            result = await self._run_internal(cell["code"], check=False)
            if not result.ok:
                failed.append(f"cell [{cell['execution_count']}]: {result.error['ename']}: "
                              f"{result.error['evalue']}")
        return failed

    async def _relaunch(self, row: dict[str, Any]) -> None:
        old = self.manager._supervisor_pid(row)
        if old is not None:
            from .manager import _stop_process

            await _stop_process(old, self.manager.close_timeout)
        self._detach()  # type: ignore[attr-defined]
        self.manager._relaunch(row)
        self._mark_suspended(False)
        self._row = self.manager._refresh(self.id)
        await self._ensure_attached(Timing())  # type: ignore[attr-defined]

    async def _back_to_paused(self) -> None:
        """A resume that failed: stop the new sandbox, so nothing runs without its state."""
        self._mark_suspended(True)
        self.manager.registry.transition(self.id, "paused", allowed_from=("running", "starting"),
                                         reason="paused; its last resume failed")
        await self._stop_sandbox()

    async def _stop_sandbox(self) -> None:
        from .manager import _stop_process

        row = self.manager.registry.session(self.id) or self._row
        pid = self.manager._supervisor_pid(row)
        self._detach()  # type: ignore[attr-defined]
        if pid is not None:
            await _stop_process(pid, self.manager.close_timeout)

    def _mark_suspended(self, on: bool) -> None:
        mark = Path(self._row["session_dir"]) / SUSPENDED_MARK
        if on:
            mark.touch()
        else:
            mark.unlink(missing_ok=True)

    def _usable_row(self) -> dict[str, Any]:
        row = self.manager._refresh(self.id)
        self._row = row
        if row["status"] == "closed":
            raise SessionClosed(self.name)
        if row["status"] == "dead":
            raise self._dead(row["reason"])
        return row

    def _dead(self, reason: str | None) -> SessionDead:
        """The error for a dead session, naming the checkpoint resume() would start from."""
        return SessionDead(self.name, reason, self.manager.registry.last_checkpoint_id(self.id))

    # -- freeze ------------------------------------------------------------------

    def _sandbox_processes(self, row: dict[str, Any]) -> list[psutil.Process]:
        try:
            state = json.loads((Path(row["session_dir"]) / supervisor.STATE_FILE).read_text())
            top = psutil.Process(state["sandbox_pid"])
            return [top, *top.children(recursive=True)]
        except (OSError, ValueError, KeyError, psutil.Error):
            raise SessionDead(self.name, "its sandbox process is gone") from None

    def usage(self) -> dict[str, float] | None:
        """CPU seconds and resident memory of the sandbox's processes; None when none runs."""
        row = self.manager.registry.session(self.id) or self._row
        if row["status"] not in ("starting", "running", "frozen"):
            return None
        try:
            procs = self._sandbox_processes(row)
        except SessionDead:
            return None
        cpu = memory = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                cpu += times.user + times.system
                memory += proc.memory_info().rss
        return {"cpu_seconds": cpu, "memory": memory}

    def _freeze(self, row: dict[str, Any]) -> None:
        for proc in self._sandbox_processes(row):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGSTOP)
        self._mark_suspended(True)
        self.manager.registry.transition(self.id, "frozen", allowed_from=("running",),
                                         reason="frozen: memory kept; resume() continues it")

    def _thaw(self, row: dict[str, Any]) -> None:
        for proc in self._sandbox_processes(row):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)
        self._mark_suspended(False)
        self.manager.registry.transition(self.id, "running", allowed_from=("frozen",))
        self.manager.registry.renew(self.id)

    # -- checkpoints -------------------------------------------------------------

    async def checkpoint(self, name: str | None = None) -> Checkpoint:
        """Save the variables, imports and work-directory files; restore() or fork() from it."""
        if name is not None and (not isinstance(name, str) or not name or len(name) > 128):
            raise InvalidArgument(
                f"a checkpoint name is a string of 1-128 characters, got {name!r}")
        await self._wake()  # type: ignore[attr-defined]  # a paused session resumes first
        async with self._lifecycle_lock():
            self._usable_row()
            await self._ensure_attached(Timing())  # type: ignore[attr-defined]
            async with self._quiet():
                return await self._capture("checkpoint", name, files=True)

    def checkpoints(self) -> list[Checkpoint]:
        """This session's checkpoints (pauses included), oldest first."""
        return [Checkpoint.from_row(r) for r in self.manager.registry.checkpoints(self.id)]

    async def restore(self, checkpoint: int | str | Checkpoint) -> ResumeReport:
        """Put the session back to a checkpoint: variables replaced, its files put back.

        Files created after the checkpoint are kept (nothing is deleted); the
        report counts the files restored.
        """
        cp = self._checkpoint_row(checkpoint)
        async with self._lifecycle_lock():
            row = self._usable_row()
            if cp["manifest"].get("replay") and row["status"] in ("running", "frozen"):
                # Replay needs a fresh kernel: stop this one as a pause would.
                if row["status"] == "frozen":
                    self._thaw(row)
                await self._ensure_attached(Timing())  # type: ignore[attr-defined]
                async with self._quiet():
                    self._mark_suspended(True)
                    self.manager.registry.transition(self.id, "paused", allowed_from=("running",),
                                                     reason="restoring a checkpoint")
                    await self._stop_sandbox()
                row = self._usable_row()
            if row["status"] == "paused":
                await self._relaunch(row)
            elif row["status"] == "frozen":
                self._thaw(row)
            await self._ensure_attached(Timing())  # type: ignore[attr-defined]
            async with self._quiet():
                return await self._restore_from(cp, reset=True, files=True)

    def _checkpoint_row(self, key: int | str | Checkpoint | None) -> dict[str, Any]:
        registry = self.manager.registry
        if isinstance(key, Checkpoint):
            key = key.id
        row = None
        if isinstance(key, int) and not isinstance(key, bool):
            row = registry.checkpoint(key)
        elif isinstance(key, str):
            named = [c for c in registry.checkpoints(self.id) if c["name"] == key]
            row = named[-1] if named else None
        if row is None:
            raise InvalidArgument(
                f"session {self.name!r} has no checkpoint {key!r}; checkpoints() lists them")
        return row

    # -- capture: inside the sandbox, then into the store ------------------------------

    def _snapshot_dir(self, in_memory_bytes: int | None = None) -> SnapshotDir:
        """A fresh directory the kernel reads or writes, seen from both sides.

        Snapshots go through the session's shared-memory directory when it was
        bound at launch and has room for ``in_memory_bytes``: writing there is
        several times faster than the disk's page cache (and steady, where the
        disk's speed swings with its writeback), and on restore the kernel maps
        the files copy-on-write, so the arrays it loads share those pages.
        Otherwise (``None``, or no room) the kernel's directory on disk is used.
        """
        layout = SessionLayout(Path(self._row["session_dir"]))
        bwrap = self._row["isolation"] == "bwrap"
        name = f"snap-{secrets.token_hex(6)}"
        shm = layout.snapshots
        if (in_memory_bytes is not None and shm is not None and shm.is_dir()
                and layout.snapshots_mark.exists()
                and _free_bytes(shm) > 1.25 * in_memory_bytes + (256 << 20)):
            base, inside_base = shm, INSIDE_SNAPSHOTS if bwrap else str(shm)
            staging = shm.with_name(shm.name + ".staging")
        else:
            base, inside_base = layout.kernel, INSIDE_KERNEL if bwrap else str(layout.kernel)
            staging = layout.root / "staging"
        # The lifecycle lock is held: any other snapshot directory was left by a client
        # killed mid-pause or mid-resume, and is garbage now.
        for where in (layout.kernel, layout.snapshots, layout.views):
            if where is not None and where.is_dir():
                stale_dir = WorkDir(where)
                with stale_dir.directory(()) as fd:
                    names = [n for n in os.listdir(fd) if n.startswith("snap-")]
                for stale in names:  # by descriptors: the sandbox writes these directories
                    with contextlib.suppress(OSError, SandboxError):
                        stale_dir.remove_tree((stale,))
        (base / name).mkdir(mode=0o700)
        identity.hand_over(base / name, identity.load(layout.root))
        views = None
        if layout.views_mark.exists():
            views = layout.views, INSIDE_VIEWS if bwrap else str(layout.views)
        return SnapshotDir(base=WorkDir(base), name=name, inside=f"{inside_base}/{name}",
                           staging=staging / name, views=views)

    async def _run_snapshot(self, request: dict[str, Any]) -> Any:
        """Run a capture, load or restore in the kernel, within ``snapshot_timeout``: the
        code there can be replaced by the notebook's (a shadowed ``exec`` that sleeps), and
        a pause, above all one by the lease with no client, must not wait for ever."""
        return await self._run_internal(request_code(request),
                                        timeout=self.manager.snapshot_timeout or None)

    async def _run_internal(self, code: str, check: bool = True,
                            expressions: dict[str, str] | None = None,
                            timeout: float | None = None) -> Any:
        """Run code of ours: silent, out of the history, not an artifact-producing run."""
        try:
            reply, result = await asyncio.wait_for(self.execute(  # type: ignore[attr-defined]
                {"code": code, "silent": True, "store_history": False,
                 "user_expressions": expressions or {}, "allow_stdin": False,
                 "stop_on_error": False}, record=False, gate=False), timeout)
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self.interrupt()  # type: ignore[attr-defined]
            raise SandboxError(
                f"session {self.name!r}: saving or loading its state took longer than "
                f"{timeout:g} s (SessionManager.snapshot_timeout) and was interrupted; the "
                "session keeps running") from None
        if check and not result.ok:
            raise SandboxError(f"session {self.name!r}: the sandbox could not save or load its "
                               f"state: {result.error['ename']}: {result.error['evalue']}")
        result.expressions = reply["content"].get("user_expressions", {})
        return result

    def _read_report(self, snap: SnapshotDir) -> dict[str, Any]:
        try:
            with snap.base.open_file((snap.name, REPORT)) as (fd, st):
                if st.st_size > MAX_REPORT_BYTES:
                    raise SandboxError("the sandbox's snapshot report is implausibly large")
                return json.loads(os.pread(fd, st.st_size, 0))
        except (OSError, ValueError, UnsafePath, RecursionError) as exc:
            raise SandboxError(f"session {self.name!r}: no usable snapshot report ({exc})"
                               ) from None

    def _capture_estimate(self) -> int | None:
        """How much memory a capture may take in shared memory, or None to use the disk.

        The files a capture writes are charged to the sandbox's memory cgroup when they
        live in memory, and a pickle is about as large as what it pickles. So memory is
        used only when the sandbox uses less than 40% of its limit: even a pickle one
        and a half times its resident size then fits beside it.
        """
        usage = self.usage()
        if usage is None:
            return None
        resident = int(usage["memory"])
        limit = (self._row.get("limits") or {}).get("memory")
        if limit and resident > 0.4 * limit:
            return None
        return int(1.5 * resident)

    async def _capture(self, kind: str, name: str | None, files: bool) -> Checkpoint:
        try:
            return await self._capture_state(kind, name, files)
        except Exception as exc:
            if is_disk_full(exc):
                raise StateDirFull(self.manager.home, f"the {kind} of session {self.name!r} was "
                                   "not taken; the session keeps running, with its state"
                                   ) from None
            raise

    async def _capture_state(self, kind: str, name: str | None, files: bool) -> Checkpoint:
        if self._row["language"] != "python":
            return await self._capture_by_replay(kind, name, files)
        snap = self._snapshot_dir(in_memory_bytes=self._capture_estimate())
        started = time.perf_counter()
        storing: dict[str, concurrent.futures.Future[FileRecord]] = {}
        capturing = asyncio.ensure_future(self._run_snapshot(
            {"op": "capture", "dir": snap.inside, "timeout": self.manager.variable_timeout}))
        try:
            # Each file goes into the store as soon as the kernel has written it, while
            # the kernel pickles and writes the next: the two take about as long.
            while not capturing.done():
                self._store_written(snap, storing)
                await asyncio.wait([capturing], timeout=0.005)
            await capturing
            captured = time.perf_counter()
            report = capture_report(self._read_report(snap))
            names = list(dict.fromkeys(  # a group's files once, though each member names them
                f for v in report["variables"].values() for f in v["files"]))
            with snap.base.directory((snap.name,)) as fd:
                written = set(os.listdir(fd))
            unwritten = [f for f in names if f not in storing and f not in written]
            if unwritten:  # nothing is stored for names the kernel never wrote
                raise ReportInvalid(f"the sandbox's snapshot report is not valid (it names "
                                    f"{len(unwritten)} files the capture did not write); "
                                    "the state was not saved, and the session keeps it")
            self._store_written(snap, storing, names)
            records = {f: await asyncio.wrap_future(storing[f]) for f in names}
            variables = {
                var: {"files": [[f, records[f].hash, records[f].size] for f in v["files"]],
                      "type": v["type"], "size": v["size"], "pickler": v["pickler"],
                      **({"group": v["group"]} if v.get("group") else {})}
                for var, v in report["variables"].items()
            }
            work_files = await asyncio.to_thread(self._ingest_work_dir) if files else None
        finally:
            capturing.cancel()
            if storing:  # none may still read from the directory being removed
                waited = [asyncio.wrap_future(f) for f in storing.values()]
                await asyncio.wait(waited)
                for f in waited:  # retrieved: a failure is the capture's, not a log line each
                    if not f.cancelled():
                        f.exception()
            snap.remove()
        stats = {"capture_seconds": round(captured - started, 6),
                 "store_seconds": round(time.perf_counter() - captured, 6)}
        manifest = {
            "variables": variables, "imports": report["imports"], "skipped": report["skipped"],
            "inexact": report["inexact"], "execution_count": report["execution_count"],
        }
        return self._save_checkpoint(kind, name, manifest, list(records.values()), work_files,
                                     stats, count=report["execution_count"] - 1)

    async def _capture_by_replay(self, kind: str, name: str | None, files: bool) -> Checkpoint:
        """Kernels we cannot pickle (Deno's): the checkpoint is the recorded cells up to now,
        plus the files; restoring it replays those cells in a fresh kernel."""
        work_files = await asyncio.to_thread(self._ingest_work_dir) if files else None
        last = self.manager.registry.last_execution(self.id)
        manifest = {"variables": {}, "imports": {}, "skipped": {}, "replay": True,
                    "execution_count": (last["execution_count"] or 0) + 1 if last else 1}
        return self._save_checkpoint(kind, name, manifest, [], work_files, {},
                                     count=last["execution_count"] if last else None)

    def _save_checkpoint(self, kind: str, name: str | None, manifest: dict[str, Any],
                         records: list[FileRecord],
                         work_files: dict[str, tuple[int, FileRecord]] | None,
                         stats: dict[str, Any], count: int | None) -> Checkpoint:
        """Record a checkpoint: its files in the manifest, its figures, a reference per blob."""
        every = records + [r for _, r in (work_files or {}).values()]
        manifest["files"] = None if work_files is None else {
            p: {"hash": r.hash, "size": r.size} for p, (_, r) in work_files.items()}
        manifest["stats"] = {
            **stats,
            "bytes": sum(r.size for r in every),
            "chunks_new": sum(r.new_chunks for r in every),
            "chunks_reused": sum(r.reused_chunks for r in every),
            "bytes_written": sum(r.bytes_written for r in every),
            "stat_cache_hits": sum(1 for r in every if r.stat_cache_hit),
        }
        for r in every:
            self.manager.store.add_ref(r.hash)
        registry = self.manager.registry
        last = registry.last_execution(self.id)
        checkpoint_id = registry.add_checkpoint(
            self.id, name, kind, last["id"] if last else None, count, manifest)
        return Checkpoint.from_row(registry.checkpoint(checkpoint_id) or {})

    def _cells_until(self, cp: dict[str, Any]) -> list[dict[str, Any]]:
        """The recorded runs of the checkpoint's session up to the checkpoint, oldest first."""
        if cp["execution_id"] is None:
            return []
        return [e for e in self.manager.registry.executions(cp["session_id"])
                if e["id"] <= cp["execution_id"]]

    async def _restore_by_replay(self, cp: dict[str, Any], files: bool) -> ResumeReport:
        report = ResumeReport(checkpoint=cp["id"])
        if files and cp["manifest"].get("files"):
            report.files = await asyncio.to_thread(self._place_files, cp["manifest"]["files"], cp)
        cells = [e for e in self._cells_until(cp) if e["status"] == "ok"]
        await self._replay_into(report, f"{self._row['language']} state (not serializable)",
                                cells)
        self.manager.registry.renew(self.id)
        return report

    def _store_written(self, snap: SnapshotDir,
                       storing: dict[str, concurrent.futures.Future[FileRecord]],
                       names: list[str] | None = None) -> None:
        """Start storing the snapshot's files not yet being stored: ``names``, or those the
        kernel has finished writing so far (see snapshot.capture)."""
        if names is None:
            with snap.base.directory((snap.name,)) as fd:
                names = [n for n in os.listdir(fd) if _BLOB.fullmatch(n)]
        for name in names:
            if name not in storing:
                storing[name] = _POOL.submit(self._store_blob, snap, name)

    def _store_blob(self, snap: SnapshotDir, name: str) -> FileRecord:
        with snap.base.open_file((snap.name, name)) as (fd, _):
            # One pack per blob: a large buffer's pack is then the buffer itself,
            # which a resume shows the kernel instead of copying it (_export_snapshot).
            # Buffers (".bN", next to their variable's ".pkl") are cut at fixed offsets.
            fixed = None if name.endswith(".pkl") else _BUFFER_CHUNK
            record = self.manager.store.ingest(f"/proc/self/fd/{fd}", one_pack=True,
                                               fixed_chunks=fixed)
        snap.base.unlink((snap.name, name))  # frees its memory now, not after the rest
        return record

    def _ingest_work_dir(self) -> dict[str, tuple[int, FileRecord]]:
        """Every regular file of the work directory, into the store (unchanged ones by stat)."""
        work = WorkDir(Path(self._row["session_dir"]) / "work")
        store = self.manager.store

        def one(path: str) -> tuple[int, FileRecord] | None:
            host = f"{work.root}/{path}"
            try:
                with work.open_file(relative_parts(path)) as (fd, st):
                    known = store.stat_lookup(host, st)
                    if known is not None:
                        record = store.file(known)
                        if record is not None:
                            record.stat_cache_hit = True
                            return st.st_size, record
                    record = store.ingest(f"/proc/self/fd/{fd}")
                    store.stat_store(host, st, record.hash)
                    return st.st_size, record
            except (OSError, SandboxError):
                return None  # gone or swapped for a link meanwhile: not part of the state

        paths = sorted(work.scan())
        found = dict(zip(paths, _POOL.map(one, paths), strict=True))
        return {p: v for p, v in found.items() if v is not None}

    # -- restore: from the store, into the sandbox ---------------------------------------

    async def _restore_from(self, cp: dict[str, Any], reset: bool, files: bool,
                            relaunch: dict[str, Any] | None = None) -> ResumeReport:
        """Load a checkpoint; with ``relaunch`` (a paused session's row), start its sandbox
        while the snapshot is exported, since each takes about as long as the other."""
        manifest = cp["manifest"]
        if manifest.get("replay"):
            if relaunch is not None:
                await self._relaunch(relaunch)
            return await self._restore_by_replay(cp, files)
        report = ResumeReport(checkpoint=cp["id"])
        variables = manifest["variables"]
        snap = self._snapshot_dir(in_memory_bytes=_state_bytes(variables))
        # A group's members carry its whole size, so they land in one batch together.
        early = {var for var, v in variables.items() if v["size"] < _EARLY_BYTES}
        try:
            loaded, shown = await self._load_exported(cp, snap, relaunch, reset, early)
            report.mapped = sum(size for v in _pickles(variables).values()
                                for f, _, size in v["files"] if f in shown)
            if files and manifest.get("files"):
                report.files = await asyncio.to_thread(self._place_files, manifest["files"], cp)
            report.restored, report.imports = loaded["restored"], loaded["imports"]
            report.inexact = {n: why for n, why in manifest.get("inexact", {}).items()
                              if n in report.restored}
            missing = {**manifest["skipped"], **loaded["failed"]}
            clobbered = await self._replay_missing(cp, missing, report)
            if clobbered:  # replayed cells overwrote restored variables: load them again
                await self._run_snapshot({
                    "op": "load", "dir": snap.inside,
                    "variables": _requested(
                        variables, _with_groups(variables, clobbered & variables.keys()), shown)})
        finally:
            snap.remove()
        self.manager.registry.renew(self.id)
        return report

    async def _load_exported(self, cp: dict[str, Any], snap: SnapshotDir,
                             relaunch: dict[str, Any] | None, reset: bool,
                             early: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """Export and load in two batches, small variables first: the kernel imports and
        unpickles them while the large arrays are still being exported (those are then
        only mapped). With ``relaunch``, the sandbox starts meanwhile too. Returns the
        kernel's report and the files it was shown in the store's packs (see
        :meth:`_export_snapshot`)."""
        manifest = cp["manifest"]
        variables = manifest["variables"]
        late = [var for var in variables if var not in early]
        exporting_early = asyncio.ensure_future(
            asyncio.to_thread(self._export_snapshot, cp, snap, early, "early"))

        async def export_late() -> dict[str, str]:
            await exporting_early
            return await asyncio.to_thread(self._export_snapshot, cp, snap, late, "late")

        exporting = asyncio.ensure_future(export_late())
        await asyncio.sleep(0)  # let the export start before the relaunch holds the loop
        try:
            if relaunch is not None:
                await self._relaunch(relaunch)
            shown = dict(await exporting_early)
            asked = _requested(variables, early, shown)
            await self._run_snapshot({
                "op": "restore", "dir": snap.inside, "imports": manifest["imports"],
                "variables": asked,
                "execution_count": manifest["execution_count"], "reset": reset})
            loaded = load_report(self._read_report(snap), {*asked, *manifest["imports"]})
        finally:
            await asyncio.wait([exporting])
            if not exporting.cancelled():
                exporting.exception()  # seen: a failed early batch fails this task too
        shown.update(exporting.result())
        if late:
            asked = _requested(variables, late, shown)
            await self._run_snapshot({
                "op": "load", "dir": snap.inside, "variables": asked})
            more = load_report(self._read_report(snap), set(asked))
            loaded["restored"] += more["restored"]
            loaded["failed"].update(more["failed"])
        return loaded, shown

    async def _replay_missing(self, cp: dict[str, Any], missing: dict[str, str],
                              report: ResumeReport) -> set[str]:
        """Replay what rebuilds ``missing``; name what stays lost. The names replay overwrote."""
        history = self._cells_until(cp)
        available = set(report.restored) | set(report.imports)
        plan = plan_replay(history, missing, available)
        failures = await self._replay_cells(plan.cells)
        names = list(missing)
        present: list[str] = []
        if names:
            probe = await self._run_internal(
                "", expressions={"present": f"__import__('json').dumps([n for n in {names!r} "
                                            "if n in get_ipython().user_ns])"})
            present = _names_present(probe.expressions.get("present", {}), set(names))
        for name in names:
            if name in present and name in plan.rebuilds:
                report.replayed[name] = plan.rebuilds[name]
            else:
                why = missing[name]
                if name in plan.unknown:
                    why += f"; {plan.unknown[name]}"
                elif failures:
                    why += ("; replay did not rebuild it (failed again: "
                            + "; ".join(failures) + ")")
                report.lost[name] = why
        return plan.clobbered

    def _export_snapshot(self, cp: dict[str, Any], snap: SnapshotDir, variables: Iterable[str],
                         batch: str) -> dict[str, str]:
        """Those variables' blobs, verified, into the snapshot directory (never through a
        link); or, for a large buffer that a pack of the store holds exactly, a view of
        that pack, which the kernel maps copy-on-write: nothing is copied, and the
        resumed arrays share the page cache until they are written to. Returns the
        files shown by views, with the path the kernel reads each by."""
        staging = snap.staging / batch
        staging.mkdir(parents=True, exist_ok=True)
        store = self.manager.store
        every = cp["manifest"]["variables"]
        items = list(dict.fromkeys(  # a group's files once, though each member names them
            (f, h, size) for v in variables for f, h, size in every[v]["files"]))

        def one(item: tuple[str, str, int]) -> tuple[str, str] | None:
            name, digest, size = item
            if size >= _VIEW_BYTES and snap.views is not None:
                pack = store.pack_holding(digest)
                shown = snap.view(pack, name) if pack is not None else None
                if shown is not None:
                    return name, shown
            staged = staging / name
            store.export(digest, staged, fsync=False)
            snap.base.place(staged, (snap.name, name))
            return None

        try:
            return dict(r for r in _POOL.map(one, items) if r is not None)
        except SandboxError as exc:
            raise SnapshotDamaged(self._damaged(cp, exc)) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _damaged(self, cp: dict[str, Any], exc: Exception) -> str:
        earlier = [c["id"] for c in self.manager.registry.checkpoints(cp["session_id"])
                   if c["id"] < cp["id"]]
        offer = (f"resume from the previous checkpoint with resume(checkpoint={earlier[-1]}) "
                 f"(or restore({earlier[-1]}))" if earlier else
                 "there is no earlier checkpoint; close the session or restore its files by "
                 "replay(into=...)")
        return (f"session {self.name!r}: checkpoint {cp['id']} cannot be loaded: {exc}. "
                f"The session stays paused; {offer}")

    def _place_files(self, files: dict[str, dict[str, Any]],
                     cp: dict[str, Any] | None = None) -> int:
        """Put stored files into the work directory (skipping those already there); how many."""
        work = WorkDir(Path(self._row["session_dir"]) / "work")
        staging = Path(self._row["session_dir"]) / "staging" / f"files-{secrets.token_hex(4)}"
        staging.mkdir(parents=True, exist_ok=True)
        store = self.manager.store
        placed = 0
        try:
            for path, entry in files.items():
                parts = relative_parts(path)
                st = work.lstat(parts)
                if st is not None and st.st_size == entry["size"]:
                    with contextlib.suppress(OSError, SandboxError), \
                            work.open_file(parts) as (fd, fst):
                        if store.stat_lookup(f"{work.root}/{path}", fst) == entry["hash"]:
                            continue  # already the checkpoint's content
                staged = staging / secrets.token_hex(8)
                try:
                    store.export(entry["hash"], staged)
                except SandboxError as exc:
                    why = self._damaged(cp, exc) if cp else f"a stored file is damaged: {exc}"
                    raise SnapshotDamaged(why) from None
                work.place(staged, parts)
                placed += 1
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return placed

    # -- history and replay ------------------------------------------------------

    def history(self) -> list[dict[str, Any]]:
        """Every recorded run: execution count, code, status, start time and timing."""
        return self.manager.registry.executions(self.id)

    async def fork(self, checkpoint: int | str | Checkpoint | None = None,
                   name: str | None = None) -> AsyncSession:
        """A new session from a checkpoint of this one (a new checkpoint by default).

        The fork gets the same language, packages, limits, environment and
        tags, the checkpoint's variables and files, and a link to its parent
        (``info()["parent"]``). From then on the two do not affect each other.
        """
        if checkpoint is None:
            cp = self._checkpoint_row((await self.checkpoint()).id)
        else:
            cp = self._checkpoint_row(checkpoint)
        row = self.manager._refresh(self.id)
        child = await self.manager._async_create(
            name=name, language=row["language"], timeout=row["timeout"], tags=row["tags"],
            env=row["env"], limits=row["limits"],
            packages=row["packages"].get("requested") or None, on_timeout=row["on_timeout"],
            parent_id=self.id)
        try:
            child.last_resume = await child.restore(cp["id"])
        except BaseException:
            await self.manager._async_close(child.id)
            raise
        return child

    async def replay(self, into: str | AsyncSession | None = None,
                     until: int | None = None) -> AsyncSession:
        """Run this session's recorded cells again, in order, in a new session (or ``into``).

        Files uploaded into this session are placed in the target first, so
        cells that read them find them. ``until`` stops after that execution
        count. Stops at the first cell that fails, saying which.
        """
        cells = [e for e in self.history() if e["status"] == "ok"
                 and (until is None or (e["execution_count"] or 0) <= until)]
        if into is None:
            row = self.manager._refresh(self.id)
            target = await self.manager._async_create(
                language=row["language"], env=row["env"], limits=row["limits"],
                packages=row["packages"].get("requested") or None, tags=row["tags"],
                parent_id=self.id)
        elif isinstance(into, str):
            target = await self.manager._async_get(into)
        else:
            target = into
        uploaded = self.manager.registry.session_files(self.id)
        if uploaded:
            await asyncio.to_thread(target._place_files, uploaded)
        for cell in cells:
            result = await target.run(cell["code"])
            if not result.ok:
                raise SandboxError(
                    f"replay into {target.name!r} stopped at cell [{cell['execution_count']}]: "
                    f"{result.error['ename']}: {result.error['evalue']}")
        return target
