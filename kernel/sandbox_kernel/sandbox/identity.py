"""Which host user a sandbox runs as: never the manager's root.

bubblewrap started by root maps the sandbox's user to host uid 0, and the
kernel then checks the sandbox's writes to host-wide files (``/proc/sys``,
anything bound in) against root. So when the manager is root, each session
gets a host uid of its own from a range no account uses, claimed machine-wide
by a file named after the uid (two sessions, even of two state directories,
are two users to the kernel), and kept for the session's life so that its
files keep their owner across pause and resume. A manager that is an
ordinary user has no other uid to give (that would take a setuid helper):
its sandboxes run as that user, and ``info()`` says so.

Standard library only: the supervisor imports the names it needs from here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: The first uid of the range, and its size: above the ranges that useradd gives
#: to accounts (<60000) and to their subordinate ids (100000 + 65536 per account).
UID_BASE = 1_000_000
UID_COUNT = 1_000_000
#: Root-only, machine-wide: one file per uid in use, naming the session that holds it.
CLAIMS = Path("/run/sandbox-kernel/uids")
#: The file in a session's (host-only) directory that says which uid it runs as.
IDENTITY_FILE = "identity.json"


@dataclass(frozen=True)
class Identity:
    """The host uid and gid a session's sandbox runs as."""

    uid: int
    gid: int
    #: True when the uid is the session's own (the manager is root), False when it is
    #: the manager's (an ordinary user cannot give another).
    separate: bool

    def describe(self) -> dict[str, object]:
        """For ``info()``: which host user the sandbox is, in words a user can act on."""
        return {"uid": self.uid, "gid": self.gid,
                "separate": self.separate,
                "note": "a host uid of this session's own" if self.separate else
                "the manager's own uid: an ordinary user has no other to give; run the "
                "manager as root to give each session its own"}


def _claim_dir() -> Path | None:
    """The claims directory, made root-only; None where it cannot be trusted."""
    try:
        CLAIMS.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(CLAIMS)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        return None
    return CLAIMS


def _claim_is_stale(path: Path) -> bool:
    """A claim whose session directory is gone (deleted state, a test's home) and whose uid
    no process runs as (a supervisor can outlive its deleted directory) frees its uid."""
    try:
        holder = json.loads(path.read_text())
        gone = not Path(holder["session_dir"]).is_dir()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return gone and not _uid_in_use(int(path.name))


def _uid_in_use(uid: int) -> bool:
    """Whether any process runs as ``uid`` (its real uid), by /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            return True
                        break
        except (OSError, ValueError, IndexError):
            continue
    return False


def _subordinate_ranges() -> list[tuple[int, int]]:
    """The uid ranges /etc/subuid gives to accounts' user namespaces: never handed out."""
    ranges = []
    with contextlib.suppress(OSError):
        for line in Path("/etc/subuid").read_text().splitlines():
            parts = line.split(":")
            with contextlib.suppress(ValueError, IndexError):
                ranges.append((int(parts[1]), int(parts[1]) + int(parts[2])))
    return ranges


@contextlib.contextmanager
def _claims_locked(claims: Path) -> Iterator[None]:
    """One claimer at a time, machine-wide: checking a claim stale and taking its uid over
    is two steps, and two managers must not both take the same uid."""
    fd = os.open(claims.parent / "uids.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim(session_dir: Path, session_id: str) -> Identity:
    """This session's identity: the one it has, else a new one (claimed now, and the
    session's work directory handed over to it, for sessions older than identities)."""
    known = load(session_dir)
    if known is not None:
        return known
    if os.geteuid() != 0:
        ident = Identity(os.getuid(), os.getgid(), separate=False)
    else:
        claims = _claim_dir()
        if claims is None:
            raise OSError(f"{CLAIMS} is not a root-owned directory; cannot give the session "
                          "a uid of its own")
        start = int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=8).digest(),
                               "big") % UID_COUNT
        record = json.dumps({"session_dir": str(session_dir), "session": session_id}).encode()
        subordinate = _subordinate_ranges()
        with _claims_locked(claims):
            for step in range(UID_COUNT):
                uid = UID_BASE + (start + step) % UID_COUNT
                if any(low <= uid < high for low, high in subordinate):
                    continue
                path = claims / str(uid)
                if path.exists() and _claim_is_stale(path):
                    path.unlink(missing_ok=True)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o600)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "wb") as f:
                    f.write(record)
                ident = Identity(uid, uid, separate=True)
                break
            else:  # pragma: no cover - a million live sessions
                raise OSError("no free sandbox uid left")
    work = session_dir / "work"
    if work.is_dir() and any(work.iterdir()):
        hand_over_tree(work, ident)
    tmp = session_dir / f".{IDENTITY_FILE}.tmp"
    tmp.write_text(json.dumps({"uid": ident.uid, "gid": ident.gid, "separate": ident.separate}))
    os.replace(tmp, session_dir / IDENTITY_FILE)
    return ident


def load(session_dir: Path) -> Identity | None:
    """The identity recorded for a session (in its host-only directory), if any."""
    try:
        data = json.loads((session_dir / IDENTITY_FILE).read_text())
        uid, gid, separate = data["uid"], data["gid"], data["separate"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (uid, gid)):
        return None
    if separate and not UID_BASE <= uid < UID_BASE + UID_COUNT:
        return None  # a root sandbox must never come of a damaged file
    return Identity(uid, gid, bool(separate))


def release(session_dir: Path, ident: Identity | None = None) -> None:
    """Give a closed session's uid back, once its files are gone (``ident``: the identity
    read before they went, since its record goes with them)."""
    ident = ident or load(session_dir)
    if ident is None or not ident.separate:
        return
    path = CLAIMS / str(ident.uid)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if json.loads(path.read_text())["session_dir"] == str(session_dir):
            path.unlink()


def gc_claims() -> int:
    """Remove claims whose session directory is gone (a state directory deleted without
    closing its sessions); how many. Their uids are free again either way (see claim)."""
    removed = 0
    if os.geteuid() != 0 or _claim_dir() is None:
        return removed
    with _claims_locked(CLAIMS):
        for path in CLAIMS.iterdir():
            if _claim_is_stale(path):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def hand_over(path: Path, ident: Identity | None) -> None:
    """Make a directory the host created for the sandbox belong to the sandbox's user."""
    if ident is not None and ident.separate:
        os.chown(path, ident.uid, ident.gid, follow_symlinks=False)


def hand_over_tree(path: Path, ident: Identity) -> None:
    """Give a whole directory to the sandbox's user: for a session made before sandboxes had
    uids of their own, whose files root owned. Only while no sandbox of it runs (at its
    resume), so nothing can be swapped during the walk; links are changed, never followed."""
    if not ident.separate:
        return
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), ident.uid, ident.gid, follow_symlinks=False)
    os.chown(path, ident.uid, ident.gid, follow_symlinks=False)
