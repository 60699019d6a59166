"""The ``sandbox-kernel`` command (also ``jupyter sandbox``).

Built as Jupyter applications with subcommands, like ``jupyter kernelspec``,
so the same configuration (``jupyter_sandbox_config.py``, ``--SessionManager.*``
flags) reaches the manager from the command line. Errors print as one line
and exit with status 1. Text that can come from a sandbox (file names, MIME
types, labels, variable names, reasons, errors quoting them) is printed
through :func:`~sandbox_kernel.shown.shown`, escaped; only ``run`` relays a
cell's own output as it is, like a terminal running the code would.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from jupyter_core.application import JupyterApp
from traitlets import Bool, Float, Int, List, Unicode

from .commands import ago, not_saved, report_text
from .errors import SandboxError
from .manager import SessionManager
from .packages import PackageInstaller
from .sandbox.launcher import BwrapLauncher
from .shown import shown, shown_stream

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: What ``list`` shows unless asked for --all or a --status: every session not closed.
LISTED = ("starting", "running", "paused", "frozen", "dead")


class _Command(JupyterApp):
    """Shared by the subcommands: the manager, JSON output, one-line errors."""

    name = "jupyter-sandbox"
    version = "0.1.0"
    classes = [SessionManager, BwrapLauncher, PackageInstaller]
    json = Bool(False, help="Print JSON instead of text.").tag(config=True)
    flags = {
        **JupyterApp.flags,
        "json": ({"_Command": {"json": True}}, "Print JSON instead of text."),
    }
    usage = ""

    def manager(self) -> SessionManager:
        return SessionManager(parent=self)

    def positional(self, count: int, names: str) -> list[str]:
        if len(self.extra_args) != count:
            self.fail(f"usage: sandbox-kernel {self.usage or self.name.split()[-1]} {names}")
        return list(self.extra_args)

    def fail(self, message: str) -> None:
        print(f"sandbox-kernel: error: {shown(message)}", file=sys.stderr)
        self.exit(1)

    def start(self) -> None:
        try:
            self.run()
        except SandboxError as exc:
            self.fail(str(exc))
        except KeyboardInterrupt:
            self.exit(130)

    def run(self) -> None:
        raise NotImplementedError


class ListCommand(_Command):
    description = ("List the sessions that are not closed (--all: closed ones too): name, id, "
                   "status, language, isolation, age, last activity.")
    usage = "list"
    status = Unicode(None, allow_none=True, help="Only sessions with this status.").tag(
        config=True)
    tags = List(Unicode(), help="Only sessions with all these tags.").tag(config=True)
    include_closed = Bool(False, help="Closed sessions too (they are kept for their "
                          "history).").tag(config=True)
    aliases = {"status": "ListCommand.status", "tag": "ListCommand.tags"}
    flags = {**_Command.flags,
             "all": ({"ListCommand": {"include_closed": True}}, "Closed sessions too.")}

    def run(self) -> None:
        self.positional(0, "")
        # Closed sessions stay in the registry for their history; a list of every session
        # ever made buries the few that can still run.
        status = self.status or (None if self.include_closed else LISTED)
        infos = [s.info() for s in self.manager().list(status=status, tags=self.tags or None)]
        if self.json:
            print(json.dumps(infos, indent=2))
            return
        if not infos:
            print("no sessions; create one with `sandbox-kernel create NAME`")
            return
        rows = [("NAME", "ID", "STATUS", "LANGUAGE", "ISOLATION", "AGE", "IDLE", "LEASE",
                 "RUNS")]
        now = time.time()
        for i in infos:
            lease = (ago(i["expires_at"] - now) if i["status"] in ("running", "frozen",
                                                                     "starting") else "-")
            rows.append((shown(i["name"]), i["id"], shown(i["status"]), shown(i["language"]),
                         shown(i["isolation"]), ago(now - i["created"]),
                         ago(now - i["last_activity"]), lease, str(i["execution_count"])))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


class InfoCommand(_Command):
    description = "Show one session's details."
    usage = "info"

    def run(self) -> None:
        (key,) = self.positional(1, "NAME")
        info = self.manager().get_info(key)
        if self.json:
            print(json.dumps(info, indent=2))
            return
        for k, v in info.items():
            if v is None:
                v = "-"
            elif isinstance(v, dict):
                v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
            elif isinstance(v, list):
                v = ", ".join(map(str, v)) or "-"
            elif k in ("created", "last_activity", "expires_at") and v:
                v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
            print(f"{k + ':':16}{shown(v)}")  # the reason quotes a dead kernel's log


class CreateCommand(_Command):
    description = "Create a session and wait until its kernel answers."
    usage = "create"
    language = Unicode(None, allow_none=True, help="The kernel (a kernelspec name).").tag(
        config=True)
    tags = List(Unicode(), help="Tags for the session.").tag(config=True)
    template = Unicode(None, allow_none=True, help="Start from this saved template.").tag(
        config=True)
    timeout = Float(None, allow_none=True, help="The lease, in seconds.").tag(config=True)
    on_timeout = Unicode(None, allow_none=True, help="On expiry: pause or close.").tag(
        config=True)
    aliases = {"language": "CreateCommand.language", "tag": "CreateCommand.tags",
               "template": "CreateCommand.template", "timeout": "CreateCommand.timeout",
               "on-timeout": "CreateCommand.on_timeout"}

    def run(self) -> None:
        name = self.extra_args[0] if self.extra_args else None
        if len(self.extra_args) > 1:
            self.fail("usage: sandbox-kernel create [NAME] [--language L] [--tag T] "
                      "[--template T] [--timeout S] [--on-timeout pause|close]")
        session = self.manager().create(name=name, language=self.language,
                                        tags=self.tags or None, template=self.template,
                                        timeout=self.timeout, on_timeout=self.on_timeout)
        info = session.info()
        print(json.dumps(info, indent=2) if self.json else
              f"created {shown(info['name'])} ({info['id']}, isolation: {info['isolation']})")


class RunCommand(_Command):
    description = "Run code in a session: sandbox-kernel run NAME CODE, or -f FILE (- for stdin)."
    usage = "run"
    file = Unicode(None, allow_none=True, help="Read the code from this file ('-': stdin).").tag(
        config=True)
    timeout = Float(None, allow_none=True, help="Interrupt the code after this many seconds."
                    ).tag(config=True)
    aliases = {("f", "file"): "RunCommand.file", "timeout": "RunCommand.timeout"}

    def run(self) -> None:
        if self.file is not None:
            (key,) = self.positional(1, "NAME -f FILE")
            try:
                code = sys.stdin.read() if self.file == "-" else Path(self.file).read_text()
            except OSError as exc:
                self.fail(f"cannot read {self.file}: {exc.strerror}")
        else:
            key, code = self.positional(2, "NAME CODE")
        session = self.manager().get(key)
        color = sys.stderr.isatty()

        def show(out: dict[str, Any]) -> None:
            kind = out["output_type"]
            if kind == "stream":
                stream = sys.stdout if out["name"] == "stdout" else sys.stderr
                stream.write(shown_stream(out["text"]))
                stream.flush()
            elif kind in ("execute_result", "display_data") and "text/plain" in out["data"]:
                print(shown_stream(out["data"]["text/plain"]), flush=True)
            elif kind == "error":
                text = "\n".join(out["traceback"]) or f"{out['ename']}: {out['evalue']}"
                text = shown_stream(text)
                print(text if color else _ANSI.sub("", text), file=sys.stderr, flush=True)

        result = session.run(code, timeout=self.timeout, on_output=show)
        if not result.ok:
            self.exit(1)


class CloseCommand(_Command):
    description = "Close a session: stop its sandbox and delete its files."
    usage = "close"

    def run(self) -> None:
        (key,) = self.positional(1, "NAME")
        self.manager().close(key)
        print(f"closed {shown(key)}")


class PauseCommand(_Command):
    description = ("Pause a session: its variables go to the store and the sandbox exits "
                   "(--freeze: stop it in place, memory kept).")
    usage = "pause"
    freeze = Bool(False, help="Freeze (SIGSTOP) instead of saving a snapshot.").tag(config=True)
    flags = {**_Command.flags,
             "freeze": ({"PauseCommand": {"freeze": True}}, "Freeze instead of a snapshot.")}

    def run(self) -> None:
        (key,) = self.positional(1, "NAME [--freeze]")
        out = self.manager().get(key).pause("freeze" if self.freeze else "snapshot")
        if self.json:
            print(json.dumps(out, indent=1))
            return
        if out.get("already"):
            print(f"{shown(key)} is already {out['status']}")
            return
        line = f"{out['status']} {shown(key)} in {out['timing']['total']:.2f} s"
        if out["status"] == "paused":
            line += f" (checkpoint {out['checkpoint']}, {out['size']} bytes of variables)"
        print(line)
        for note in not_saved(out.get("skipped", {}), out.get("inexact")):
            print(note)


class ResumeCommand(_Command):
    description = "Resume a paused or frozen session (runs resume it on their own, too)."
    usage = "resume"
    checkpoint = Int(None, allow_none=True, help="Resume from this checkpoint instead.").tag(
        config=True)
    aliases = {"checkpoint": "ResumeCommand.checkpoint"}

    def run(self) -> None:
        (key,) = self.positional(1, "NAME [--checkpoint ID]")
        report = self.manager().get(key).resume(self.checkpoint)
        if self.json:
            print(json.dumps(report.__dict__, indent=1))
            return
        print(report_text(report))


class CheckpointCommand(_Command):
    description = ("Save a checkpoint of a session (variables, imports, files), or list them "
                   "with --list.")
    usage = "checkpoint"
    label = Unicode(None, allow_none=True, help="A name for the checkpoint.").tag(config=True)
    list_them = Bool(False, help="List the checkpoints instead.").tag(config=True)
    aliases = {"name": "CheckpointCommand.label"}
    flags = {**_Command.flags,
             "list": ({"CheckpointCommand": {"list_them": True}}, "List the checkpoints.")}

    def run(self) -> None:
        (key,) = self.positional(1, "NAME [--name LABEL] [--list]")
        session = self.manager().get(key)
        checkpoints = session.checkpoints() if self.list_them else [
            session.checkpoint(self.label)]
        if self.json:
            print(json.dumps([c.__dict__ for c in checkpoints], indent=1))
            return
        for c in checkpoints:
            when = time.strftime("%H:%M:%S", time.localtime(c.created))
            print(f"{c.id:5}  {c.kind:10}  {shown(c.name or '-'):16}  {when}  "
                  f"{len(c.variables)} names, {c.size} bytes, "
                  f"{'-' if c.files is None else c.files} files, "
                  f"{c.stats.get('chunks_new', 0)} new chunks")


class RestoreCommand(_Command):
    description = "Restore a session to a checkpoint: sandbox-kernel restore NAME CHECKPOINT."
    usage = "restore"

    def run(self) -> None:
        key, checkpoint = self.positional(2, "NAME CHECKPOINT")
        print(report_text(self.manager().get(key).restore(
            int(checkpoint) if checkpoint.isdigit() else checkpoint)))


class ForkCommand(_Command):
    description = ("Fork a session into a new one: sandbox-kernel fork NAME [NEW] "
                   "[--checkpoint ID].")
    usage = "fork"
    checkpoint = Unicode(None, allow_none=True, help="Fork from this checkpoint (id or name)."
                         ).tag(config=True)
    aliases = {"checkpoint": "ForkCommand.checkpoint"}

    def run(self) -> None:
        if len(self.extra_args) not in (1, 2):
            self.fail("usage: sandbox-kernel fork NAME [NEW] [--checkpoint ID]")
        key, new = self.extra_args[0], (self.extra_args[1:] or [None])[0]
        cp: Any = self.checkpoint
        if isinstance(cp, str) and cp.isdigit():
            cp = int(cp)
        child = self.manager().get(key).fork(cp, new)
        print(f"forked {shown(key)} into {shown(child.name)} ({child.id})")


class HistoryCommand(_Command):
    description = "Show a session's recorded runs."
    usage = "history"

    def run(self) -> None:
        (key,) = self.positional(1, "NAME")
        history = self.manager().get_history(key)
        if self.json:
            print(json.dumps(history, indent=1))
            return
        for h in history:
            first = h["code"].strip().splitlines()[0] if h["code"].strip() else ""
            print(f"[{h['execution_count'] or ' '}] {h['status']:7} "
                  f"{h['timing'].get('total', 0) * 1000:8.1f} ms  {shown(first[:70])}")


class ReplayCommand(_Command):
    description = ("Run a session's recorded cells again in a new session (or --into another): "
                   "sandbox-kernel replay NAME [--until N] [--into OTHER].")
    usage = "replay"
    until = Int(None, allow_none=True, help="Stop after this execution count.").tag(config=True)
    into = Unicode(None, allow_none=True, help="Replay into this existing session.").tag(
        config=True)
    aliases = {"until": "ReplayCommand.until", "into": "ReplayCommand.into"}

    def run(self) -> None:
        (key,) = self.positional(1, "NAME [--until N] [--into OTHER]")
        target = self.manager().get(key).replay(self.into, self.until)
        print(f"replayed {shown(key)} into {shown(target.name)} ({target.id})")


class TimeoutCommand(_Command):
    description = ("Set a session's lease: sandbox-kernel timeout NAME SECONDS "
                   "[--on-timeout pause|close].")
    usage = "timeout"
    on_timeout = Unicode(None, allow_none=True, help="On expiry: pause or close.").tag(
        config=True)
    aliases = {"on-timeout": "TimeoutCommand.on_timeout"}

    def run(self) -> None:
        key, seconds = self.positional(2, "NAME SECONDS")
        try:
            value = float(seconds)
        except ValueError:
            self.fail(f"SECONDS must be a number, got {seconds!r}")
        info = self.manager().get(key).set_timeout(value, self.on_timeout)
        print(f"{shown(key)}: lease {info['timeout']:g} s, expires "
              f"{time.strftime('%H:%M:%S', time.localtime(info['expires_at']))}, "
              f"then {info['on_timeout']}")


class InstallCommand(_Command):
    description = ("Install packages into a session: sandbox-kernel install NAME PKG...; "
                   "with no NAME, install the 'Python 3 (sandbox)' kernelspec "
                   "[--user | --sys-prefix | --prefix P].")
    usage = "install"
    user = Bool(False, help="Install for this user only.").tag(config=True)
    sys_prefix = Bool(False, help="Install into sys.prefix (the active venv).").tag(config=True)
    prefix = Unicode(None, allow_none=True, help="Install under this prefix.").tag(config=True)
    flags = {
        **_Command.flags,
        "user": ({"InstallCommand": {"user": True}}, "Install for this user only."),
        "sys-prefix": ({"InstallCommand": {"sys_prefix": True}}, "Install into sys.prefix."),
    }
    aliases = {"prefix": "InstallCommand.prefix"}

    def run(self) -> None:
        if self.extra_args:
            self.install_packages()
        else:
            self.install_kernelspec()

    def install_packages(self) -> None:
        if len(self.extra_args) < 2:
            self.fail("usage: sandbox-kernel install NAME PKG [PKG ...]")
        key, *packages = self.extra_args
        result = self.manager().get(key).install(packages)
        if self.json:
            print(json.dumps(result.__dict__, indent=2, default=str))
            return
        print(shown(result.summary()))
        for insight in result.insights:
            print(f"insight: {shown(insight)}")

    def install_kernelspec(self) -> None:
        from .kernelspec import enable_server_extension, install

        if sum([self.user, self.sys_prefix, self.prefix is not None]) > 1:
            self.fail("choose one of --user, --sys-prefix and --prefix")
        prefix = sys.prefix if self.sys_prefix else self.prefix
        try:
            where = install(user=self.user, prefix=prefix)
            config = enable_server_extension(user=self.user, prefix=prefix)
        except OSError as exc:
            self.fail(f"cannot install the kernelspec: {exc}")
        for path in where:
            print(f"installed kernelspec {Path(path).name} in {path}")
        print(f"enabled the Jupyter Server extension that keeps a renamed notebook's session "
              f"({config})")


class UploadCommand(_Command):
    description = ("Upload files or directories into a session's work directory: "
                   "sandbox-kernel upload NAME PATH... [--dest D] [--manifest M.json].")
    usage = "upload"
    dest = Unicode(None, allow_none=True, help="Destination in the work directory (one PATH)."
                   ).tag(config=True)
    manifest = Unicode(None, allow_none=True, help="Write the commit's manifest here.").tag(
        config=True)
    aliases = {"dest": "UploadCommand.dest", "manifest": "UploadCommand.manifest"}

    def run(self) -> None:
        if len(self.extra_args) < 2:
            self.fail("usage: sandbox-kernel upload NAME PATH [PATH ...] [--dest D]")
        key, *paths = self.extra_args
        if self.dest is not None and len(paths) != 1:
            self.fail("--dest takes exactly one PATH")
        commit = self.manager().get(key).upload_commit()
        for path in paths:
            commit.add(path, self.dest)
        manifest = commit.commit(self.manifest)
        if self.json:
            print(json.dumps(manifest, indent=1))
            return
        st = manifest["stats"]
        print(f"uploaded {len(manifest['files'])} file(s): {st['bytes_moved']} bytes placed, "
              f"{st['bytes_stored']} stored, {st['chunks_reused']} chunks reused, "
              f"{st['files_skipped']} unchanged, {st['stat_cache_hits']} stat-cache hits")


class DownloadCommand(_Command):
    description = ("Download from a session: sandbox-kernel download NAME PATH... --to DIR, "
                   "or --manifest M.json --to DIR.")
    usage = "download"
    to = Unicode(".", help="Local directory to write to.").tag(config=True)
    manifest = Unicode(None, allow_none=True, help="Download the files of this manifest.").tag(
        config=True)
    aliases = {"to": "DownloadCommand.to", "manifest": "DownloadCommand.manifest"}

    def run(self) -> None:
        if not self.extra_args or (len(self.extra_args) < 2 and self.manifest is None):
            self.fail("usage: sandbox-kernel download NAME PATH... --to DIR")
        key, *paths = self.extra_args
        sources: list[Any] = list(paths)
        if self.manifest is not None:
            try:
                sources += json.loads(Path(self.manifest).read_text())["files"]
            except (OSError, ValueError, KeyError) as exc:
                self.fail(f"cannot read the manifest {self.manifest}: {exc}")
        results = self.manager().get(key).download(sources, self.to)
        if self.json:
            print(json.dumps(results, indent=1))
            return
        for r in results:
            print(f"{shown(r['source'])} -> {shown(r['dest'])} ({r['size']} bytes, "
                  f"blake3 {r['hash'][:16]}…, verified)")


class ArtifactsCommand(_Command):
    description = ("List a session's artifacts, or save one: sandbox-kernel artifacts NAME "
                   "[--tag T] [--save ID --to DEST].")
    usage = "artifacts"
    tag = Unicode(None, allow_none=True, help="Only artifacts with this tag.").tag(config=True)
    save = Int(None, allow_none=True, help="Save the artifact with this id.").tag(config=True)
    to = Unicode(".", help="Where --save writes.").tag(config=True)
    aliases = {"tag": "ArtifactsCommand.tag", "save": "ArtifactsCommand.save",
               "to": "ArtifactsCommand.to"}

    def run(self) -> None:
        (key,) = self.positional(1, "NAME [--tag T] [--save ID --to DEST]")
        artifacts = self.manager().get(key).artifacts(tag=self.tag)
        if self.save is not None:
            chosen = [a for a in artifacts if a.id == self.save]
            if not chosen:
                self.fail(f"session {key!r} has no artifact {self.save}")
            print(f"saved {shown(chosen[0].save(self.to))}")  # named after the sandbox's file
            return
        if self.json:
            print(json.dumps([{k: v for k, v in a.__dict__.items() if not k.startswith("_")}
                              for a in artifacts], indent=1))
            return
        if not artifacts:
            print("no artifacts yet")
        for a in artifacts:
            print(f"{a.id:5}  {shown(a.kind):6}  {shown(a.mime):24}  {a.size:10}  "
                  f"{shown(a.path or '-'):30}  {shown(','.join(a.tags) or '-')}")


class GcCommand(_Command):
    description = ("Remove package layers no session uses, stored data nothing references, "
                   "and directories of sessions the registry lost in a crash.")
    usage = "gc"

    def run(self) -> None:
        self.positional(0, "")
        removed = self.manager().gc()
        print(f"removed {len(removed)} layer{'s' if len(removed) != 1 else ''} and "
              "session director" + ("y" if len(removed) == 1 else "ies")
              + (": " + ", ".join(map(shown, removed)) if removed else ""))


class SandboxKernelApp(_Command):
    description = "Persistent sandbox sessions for Jupyter."
    subcommands = {
        "list": (ListCommand, ListCommand.description),
        "info": (InfoCommand, InfoCommand.description),
        "create": (CreateCommand, CreateCommand.description),
        "run": (RunCommand, RunCommand.description),
        "close": (CloseCommand, CloseCommand.description),
        "pause": (PauseCommand, PauseCommand.description),
        "resume": (ResumeCommand, ResumeCommand.description),
        "checkpoint": (CheckpointCommand, CheckpointCommand.description),
        "restore": (RestoreCommand, RestoreCommand.description),
        "fork": (ForkCommand, ForkCommand.description),
        "history": (HistoryCommand, HistoryCommand.description),
        "replay": (ReplayCommand, ReplayCommand.description),
        "timeout": (TimeoutCommand, TimeoutCommand.description),
        "install": (InstallCommand, InstallCommand.description),
        "gc": (GcCommand, GcCommand.description),
        "upload": (UploadCommand, UploadCommand.description),
        "download": (DownloadCommand, DownloadCommand.description),
        "artifacts": (ArtifactsCommand, ArtifactsCommand.description),
    }

    def start(self) -> None:
        if self.subapp is None:
            print("sandbox-kernel: choose a subcommand: " + ", ".join(self.subcommands),
                  file=sys.stderr)
            self.print_subcommands()
            self.exit(2)
        self.subapp.start()


def main(argv: list[str] | None = None) -> None:
    try:
        SandboxKernelApp.launch_instance(argv)
    except BrokenPipeError:  # `sandbox-kernel list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


if __name__ == "__main__":
    main()
