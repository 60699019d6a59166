"""The SQLite registry: the one source of truth every process agrees on.

Sessions outlive the processes that create them, so any process (a kernel
after a restart, another notebook, the CLI, a sandbox's supervisor) reads and
changes session state here. WAL lets readers proceed while one writer
commits; status changes are compare-and-set so that two processes racing to
close or mark a session dead cannot both win. Standard library only: the
supervisor imports this module without site-packages.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import RegistryDamaged, StateDirFull, is_disk_full

SCHEMA_VERSION = 6

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    language TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    created REAL NOT NULL,
    last_activity REAL NOT NULL,
    timeout REAL,
    tags TEXT NOT NULL DEFAULT '[]',
    limits TEXT NOT NULL DEFAULT '{}',
    env TEXT NOT NULL DEFAULT '{}',
    isolation TEXT NOT NULL,
    session_dir TEXT NOT NULL,
    connection_file TEXT NOT NULL,
    supervisor_pid INTEGER,
    supervisor_started REAL,
    execution_count INTEGER NOT NULL DEFAULT 0,
    packages TEXT NOT NULL DEFAULT '{}',
    on_timeout TEXT NOT NULL DEFAULT 'pause',
    parent_id TEXT,
    checkpoint_id INTEGER,
    pooled INTEGER NOT NULL DEFAULT 0,
    active_clock REAL NOT NULL DEFAULT 0,
    owner TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS sessions_live_name
    ON sessions(name) WHERE status NOT IN ('closed');
CREATE INDEX IF NOT EXISTS sessions_status ON sessions(status);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    execution_count INTEGER,
    code TEXT NOT NULL,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    timing TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS executions_session ON executions(session_id, id);
CREATE TABLE IF NOT EXISTS resolutions (
    key TEXT PRIMARY KEY,
    pins TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    pins TEXT NOT NULL,
    python TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS session_files (
    session_id TEXT NOT NULL,
    path TEXT NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    PRIMARY KEY (session_id, path)
);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    execution_id INTEGER,
    kind TEXT NOT NULL,
    path TEXT,
    mime TEXT NOT NULL,
    size INTEGER NOT NULL,
    hash TEXT NOT NULL,
    created REAL NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS artifacts_session ON artifacts(session_id, id);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    name TEXT,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    execution_id INTEGER,
    execution_count INTEGER,
    manifest TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_session ON checkpoints(session_id, id);
CREATE TABLE IF NOT EXISTS templates (
    name TEXT PRIMARY KEY,
    recipe TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bindings (
    key TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS renames (
    old_key TEXT NOT NULL,
    new_key TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS renames_old ON renames(old_key, at);
"""

#: Statuses in which a sandbox process is expected to exist.
LIVE_STATUSES = ("starting", "running", "frozen")
#: Every status a session can be in, as info(), the CLI and the dashboard show it.
STATUSES = ("starting", "running", "paused", "frozen", "closed", "dead")
_JSON_COLUMNS = ("tags", "limits", "env", "packages")
#: Changes that CREATE ... IF NOT EXISTS cannot make, by the version that needs them.
_MIGRATIONS = {
    3: ["ALTER TABLE sessions ADD COLUMN packages TEXT NOT NULL DEFAULT '{}'"],
    4: ["ALTER TABLE sessions ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'pause'",
        "ALTER TABLE sessions ADD COLUMN parent_id TEXT",
        "ALTER TABLE sessions ADD COLUMN checkpoint_id INTEGER",
        "ALTER TABLE sessions ADD COLUMN pooled INTEGER NOT NULL DEFAULT 0"],
    5: ["ALTER TABLE sessions ADD COLUMN active_clock REAL NOT NULL DEFAULT 0",
        "UPDATE sessions SET active_clock = last_activity + (:clock_offset)"],
    # The notebook (binding key) that made a session: a notebook reaches its own only.
    # Sessions from before belong to the notebook bound to them, and forks to their
    # parent's; the rest to none (the API and the CLI still reach every session).
    6: ["ALTER TABLE sessions ADD COLUMN owner TEXT",
        "UPDATE sessions SET owner = (SELECT key FROM bindings WHERE session_id = sessions.id "
        "ORDER BY updated DESC LIMIT 1)",
        "WITH RECURSIVE tree(id, owner) AS (SELECT id, owner FROM sessions WHERE owner IS NOT "
        "NULL UNION SELECT s.id, tree.owner FROM sessions s JOIN tree ON s.parent_id = tree.id "
        "WHERE s.owner IS NULL) UPDATE sessions SET owner = (SELECT owner FROM tree WHERE "
        "tree.id = sessions.id) WHERE owner IS NULL AND id IN (SELECT id FROM tree)"],
}


def _damage(exc: sqlite3.Error) -> bool:
    """SQLite's words for a damaged file (as opposed to a busy or full one)."""
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_CORRUPT,
                                                       sqlite3.SQLITE_NOTADB)


def lease_clock() -> float:
    """The clock leases run on: seconds since boot (CLOCK_BOOTTIME), shared by every process.

    Setting the wall clock does not move it, so a lease neither expires at once
    when the clock jumps ahead nor lasts for ever when it is set back; the wall
    clock is kept for display only.
    """
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def lease_left(row: dict[str, Any]) -> float:
    """Seconds until a session's lease runs out (negative once it has)."""
    return row["active_clock"] + row["timeout"] - lease_clock()


class Registry:
    """A thread-safe handle on the registry database of one state directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(self.path), timeout=30, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # A torn write-ahead log is cut at its last good frame by SQLite itself;
            # damage in the database file is found here, before anything is written.
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and not _damage(exc):
                raise
            self._db.close()
            raise RegistryDamaged(self.path, str(exc)) from None
        if problems != ["ok"]:
            self._db.close()
            raise RegistryDamaged(self.path, "; ".join(problems))
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                # Wall-clock times of old rows translate to the lease clock by today's offset.
                offset = repr(lease_clock() - time.time())
                steps = [sql.replace(":clock_offset", offset)
                         for v, sqls in sorted(_MIGRATIONS.items()) if version and v > version
                         for sql in sqls]
                # executescript manages its own transaction: make it one, all or nothing.
                self._db.executescript(
                    f"BEGIN IMMEDIATE; {''.join(s + ';' for s in steps)} {_SCHEMA} "
                    f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: take the write lock up front so check-then-write is atomic."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if is_disk_full(exc):
                    raise StateDirFull(self.path.parent,
                                       "the registry could not record a change") from None
                raise

    # -- sessions ---------------------------------------------------------

    def insert_session(self, row: dict[str, Any]) -> None:
        """Insert a new session; raises sqlite3.IntegrityError when the name is taken."""
        row = _encode({"active_clock": lease_clock(), **row})
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.transaction() as db:
            db.execute(f"INSERT INTO sessions ({cols}) VALUES ({marks})", tuple(row.values()))

    def session(self, session_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
        return _decode(row)

    def find(self, key: str) -> dict[str, Any] | None:
        """A session by id, else the live session of that name, else the newest of that name."""
        rows = self.matches(key, limit=1)
        return rows[0] if rows else None

    def matches(self, key: str, limit: int = -1) -> list[dict[str, Any]]:
        """Every session ``key`` could mean (at most ``limit``), best first: the session of
        that id, then live sessions of that name, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM sessions WHERE id=? OR name=? "
                "ORDER BY id=? DESC, status='closed' ASC, created DESC LIMIT ?",
                (key, key, key, limit),
            ).fetchall()
        return [_decode(r) for r in rows]

    def set_owner(self, session_id: str, owner: str) -> None:
        """Record the notebook (binding key) a session belongs to: the one that made it."""
        with self.transaction() as db:
            db.execute("UPDATE sessions SET owner=? WHERE id=?", (owner, session_id))

    def sessions(
        self, status: str | Iterable[str] | None = None, tags: Iterable[str] | None = None,
        pooled: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Sessions, oldest first; ``pooled`` True/False: only warm-pool ones / only users'."""
        where, args = [], []
        if pooled is not None:
            where.append("pooled=?")
            args.append(int(pooled))
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(f"status IN ({', '.join('?' for _ in statuses)})")
            args += statuses
        for tag in tags or ():
            where.append("EXISTS (SELECT 1 FROM json_each(sessions.tags) WHERE value=?)")
            args.append(tag)
        sql = "SELECT * FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created", args).fetchall()
        return [_decode(r) for r in rows]

    def update(self, session_id: str, **fields: Any) -> None:
        fields = _encode(fields)
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE sessions SET {sets} WHERE id=?", (*fields.values(), session_id))

    def transition(
        self,
        session_id: str,
        to: str,
        *,
        allowed_from: Iterable[str],
        reason: str | None = None,
    ) -> bool:
        """Move a session to ``to`` only if it is in one of ``allowed_from``; True if it moved."""
        allowed = list(allowed_from)
        marks = ", ".join("?" for _ in allowed)
        with self.transaction() as db:
            cur = db.execute(
                f"UPDATE sessions SET status=?, reason=? WHERE id=? AND status IN ({marks})",
                (to, reason, session_id, *allowed),
            )
            return cur.rowcount == 1

    def renew(self, session_id: str) -> None:
        """Activity: the lease runs ``timeout`` seconds from now again."""
        with self.transaction() as db:
            db.execute("UPDATE sessions SET last_activity=?, active_clock=MAX(active_clock, ?) "
                       "WHERE id=?", (time.time(), lease_clock(), session_id))

    def claim_pooled(self, language: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Take one warm sandbox of ``language`` out of the pool, renamed; None if none is ready.

        One transaction, so two processes creating at once never get the same sandbox.
        """
        fields = _encode(fields)
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as db:
            row = db.execute(
                "SELECT id FROM sessions WHERE pooled=1 AND language=? AND status='running' "
                "ORDER BY created LIMIT 1", (language,)).fetchone()
            if row is None:
                return None
            db.execute(f"UPDATE sessions SET pooled=0, {sets} WHERE id=?",
                       (*fields.values(), row[0]))
        return self.session(row[0])

    def count_live(self) -> int:
        """Sessions that hold a sandbox process for a user (the warm pool does not count)."""
        marks = ", ".join("?" for _ in LIVE_STATUSES)
        with self._lock:
            return self._db.execute(
                f"SELECT COUNT(*) FROM sessions WHERE pooled=0 AND status IN ({marks})",
                LIVE_STATUSES).fetchone()[0]

    # -- checkpoints: captured interpreter state, by reference into the store ----------

    def add_checkpoint(self, session_id: str, name: str | None, kind: str,
                       execution_id: int | None, execution_count: int | None,
                       manifest: dict[str, Any]) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO checkpoints (session_id, name, kind, created, execution_id, "
                "execution_count, manifest) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session_id, name, kind, time.time(), execution_id, execution_count,
                 json.dumps(manifest)))
            return int(cur.lastrowid or 0)

    def checkpoints(self, session_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM checkpoints WHERE session_id=? ORDER BY id",
                                    (session_id,)).fetchall()
        return [dict(r) | {"manifest": json.loads(r["manifest"])} for r in rows]

    def last_checkpoint_id(self, session_id: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM checkpoints WHERE session_id=?",
                                   (session_id,)).fetchone()
        return row[0]

    def checkpoint(self, checkpoint_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM checkpoints WHERE id=?",
                                   (checkpoint_id,)).fetchone()
        return dict(row) | {"manifest": json.loads(row["manifest"])} if row else None

    def delete_checkpoint(self, checkpoint_id: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM checkpoints WHERE id=?", (checkpoint_id,))

    # -- templates: named recipes for new sessions -----------------------------------

    def save_template(self, name: str, recipe: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO templates (name, recipe, created) VALUES (?, ?, ?)",
                       (name, json.dumps(recipe), time.time()))

    def template(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT recipe FROM templates WHERE name=?",
                                   (name,)).fetchone()
        return json.loads(row[0]) if row else None

    def templates(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT name, recipe FROM templates ORDER BY name").fetchall()
        return {n: json.loads(r) for n, r in rows}

    # -- files the host placed in a session's work directory -------------------

    def set_session_file(self, session_id: str, path: str, digest: str, size: int,
                         mtime_ns: int) -> str | None:
        """Record a placed file; the hash it replaces at that path, for the store to release
        (read and replaced in one transaction, so two uploads never release it twice)."""
        with self.transaction() as db:
            old = db.execute("SELECT hash FROM session_files WHERE session_id=? AND path=?",
                             (session_id, path)).fetchone()
            db.execute("INSERT OR REPLACE INTO session_files VALUES (?, ?, ?, ?, ?)",
                       (session_id, path, digest, size, mtime_ns))
        return old[0] if old else None

    def forget_session_files(self, session_id: str) -> list[str]:
        """Drop a session's placed files; their hashes, one per reference they held."""
        with self.transaction() as db:
            rows = db.execute("SELECT hash FROM session_files WHERE session_id=?",
                              (session_id,)).fetchall()
            db.execute("DELETE FROM session_files WHERE session_id=?", (session_id,))
        return [r[0] for r in rows]

    def session_files(self, session_id: str) -> dict[str, dict[str, Any]]:
        """Every file the host placed in a session: path -> hash, size."""
        with self._lock:
            rows = self._db.execute("SELECT path, hash, size FROM session_files "
                                    "WHERE session_id=?", (session_id,)).fetchall()
        return {r[0]: {"hash": r[1], "size": r[2]} for r in rows}

    def session_file(self, session_id: str, path: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM session_files WHERE session_id=? AND path=?",
                                   (session_id, path)).fetchone()
        return dict(row) if row else None

    # -- bindings: which session a notebook (or a kernel's connection file) uses ----

    def bind(self, key: str, session_id: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO bindings (key, session_id, updated) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET session_id=excluded.session_id, "
                "updated=excluded.updated",
                (key, session_id, time.time()),
            )

    def bound(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT session_id FROM bindings WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def rename_notebook(self, old: str, new: str) -> list[str]:
        """A notebook (or a directory of them) moved from path ``old`` to ``new``: its
        binding and the sessions it owns go with it, and the move is recorded for a
        kernel still running under the old name. The names of the sessions kept."""
        old_key, new_key = f"notebook:{old}", f"notebook:{new}"
        below = old_key.rstrip("/") + "/"
        now = time.time()
        with self.transaction() as db:
            keys = {r[0] for r in db.execute(
                "SELECT key FROM bindings WHERE key=? OR substr(key, 1, ?)=? UNION "
                "SELECT owner FROM sessions WHERE owner=? OR substr(owner, 1, ?)=?",
                (old_key, len(below), below, old_key, len(below), below))}
            for key in sorted(keys):
                moved = new_key + key[len(old_key):]
                if moved not in keys and db.execute(
                        "SELECT 1 FROM bindings WHERE key=? UNION ALL "
                        "SELECT 1 FROM sessions WHERE owner=? LIMIT 1", (moved, moved)
                ).fetchone():
                    # The new path was a notebook's (deleted, its kernel maybe still
                    # running): its binding and sessions go to a key no path has, which
                    # its kernels follow (recorded first), so that neither notebook is
                    # handed the other's sessions.
                    gone = db.execute("SELECT 'replaced:' || lower(hex(randomblob(8))) || ':' "
                                      "|| ?", (moved,)).fetchone()[0]
                    db.execute("UPDATE bindings SET key=? WHERE key=?", (gone, moved))
                    db.execute("UPDATE sessions SET owner=? WHERE owner=?", (gone, moved))
                    db.execute("INSERT INTO renames (old_key, new_key, at) VALUES (?, ?, ?)",
                               (moved, gone, now))
                db.execute("DELETE FROM bindings WHERE key=?", (moved,))
                # ``updated`` kept: the kernel that opens it next tells of the rename.
                db.execute("UPDATE bindings SET key=? WHERE key=?", (moved, key))
                db.execute("UPDATE sessions SET owner=? WHERE owner=?", (moved, key))
                db.execute("INSERT INTO renames (old_key, new_key, at) VALUES (?, ?, ?)",
                           (key, moved, now))
            names = [r[0] for r in db.execute(
                "SELECT name FROM sessions WHERE id IN (SELECT session_id FROM bindings WHERE "
                "key=? OR substr(key, 1, ?)=?) ORDER BY name",
                (new_key, len(new_key) + 1, new_key + "/"))]
        return names

    def renamed(self, key: str, since: float) -> str:
        """Where the notebook of ``key`` is now, following the renames made after ``since``
        (a kernel's start: a kernel started later under an old name is a new notebook).
        Renames are taken in the order they were recorded, each after the one before, so
        ``p -> q -> p`` ends at p (a walk that stopped at a key seen before ended at q)."""
        with self._lock:
            row = self._db.execute(
                "SELECT rowid, new_key FROM renames WHERE old_key=? AND at>=? "
                "ORDER BY rowid LIMIT 1", (key, since)).fetchone()
            while row is not None:
                key = row[1]
                row = self._db.execute(
                    "SELECT rowid, new_key FROM renames WHERE old_key=? AND rowid>? "
                    "ORDER BY rowid LIMIT 1", (key, row[0])).fetchone()
        return key

    def renamed_from(self, key: str, after: float) -> str | None:
        """The old key of the latest rename to ``key`` made after ``after``, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT old_key FROM renames WHERE new_key=? AND at>? ORDER BY at DESC LIMIT 1",
                (key, after)).fetchone()
        return row[0] if row else None

    def notebook_key_of(self, session_id: str) -> str | None:
        """The notebook key bound to a session most recently, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT key FROM bindings WHERE session_id=? AND key LIKE 'notebook:%' "
                "ORDER BY updated DESC LIMIT 1", (session_id,)).fetchone()
        return row[0] if row else None

    def binding_updated(self, key: str) -> float | None:
        """When ``key`` was last bound (a kernel opened its session, or a rename moved it)."""
        with self._lock:
            row = self._db.execute("SELECT updated FROM bindings WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    # -- packages: cached resolutions and built layers ------------------------

    def cached_resolution(self, key: str, max_age: float) -> dict[str, str] | None:
        with self._lock:
            row = self._db.execute("SELECT pins, created FROM resolutions WHERE key=?",
                                   (key,)).fetchone()
        if row is None or time.time() - row[1] > max_age:
            return None
        return json.loads(row[0])

    def store_resolution(self, key: str, pins: dict[str, str]) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO resolutions (key, pins, created) VALUES (?, ?, ?)",
                       (key, json.dumps(pins), time.time()))

    def layer(self, layer_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM layers WHERE id=?", (layer_id,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["pins"] = json.loads(d["pins"])
        return d

    def store_layer(self, layer_id: str, pins: dict[str, str], python: str, size: int) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO layers (id, pins, python, size, created, last_used) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (layer_id, json.dumps(pins), python, size, now, now))

    def touch_layer(self, layer_id: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE layers SET last_used=? WHERE id=?", (time.time(), layer_id))

    def forget_layer(self, layer_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM layers WHERE id=?", (layer_id,))

    def layers_in_use(self) -> set[str]:
        """Layers of every session that is not closed (a dead one may still be inspected)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT packages FROM sessions WHERE status != 'closed'").fetchall()
        return {layer for (p,) in rows for layer in json.loads(p).get("layers", [])}

    # -- executions -------------------------------------------------------

    # -- artifacts ----------------------------------------------------------------

    def add_artifact(self, session_id: str, execution_id: int | None, kind: str,
                     path: str | None, mime: str, size: int, digest: str,
                     created: float) -> int | None:
        """The new artifact's id; None, and nothing recorded, once the session is closed
        (its close released its artifacts: one recorded after it would never be)."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO artifacts (session_id, execution_id, kind, path, mime, size, hash, "
                "created, tags) SELECT ?, ?, ?, ?, ?, ?, ?, ?, '[]' WHERE EXISTS "
                "(SELECT 1 FROM sessions WHERE id=? AND status != 'closed')",
                (session_id, execution_id, kind, path, mime, size, digest, created, session_id))
            return int(cur.lastrowid or 0) if cur.rowcount == 1 else None

    def artifacts(self, session_id: str, tag: str | None = None, path: str | None = None,
                  since: float | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM artifacts WHERE session_id=?", [session_id]
        if tag is not None:
            sql += " AND EXISTS (SELECT 1 FROM json_each(artifacts.tags) WHERE value=?)"
            args.append(tag)
        if path is not None:
            sql += " AND path=?"
            args.append(path)
        if since is not None:
            sql += " AND created>=?"
            args.append(since)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [dict(r) | {"tags": json.loads(r["tags"])} for r in rows]

    def artifact(self, artifact_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM artifacts WHERE id=?", (artifact_id,)).fetchone()
        return dict(row) | {"tags": json.loads(row["tags"])} if row else None

    def set_artifact_tags(self, artifact_id: int, tags: list[str]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE artifacts SET tags=? WHERE id=?", (json.dumps(tags), artifact_id))

    def delete_artifact(self, artifact_id: int) -> bool:
        """Whether there was such an artifact (its reference is then the caller's to release)."""
        with self.transaction() as db:
            return db.execute("DELETE FROM artifacts WHERE id=?", (artifact_id,)).rowcount == 1

    def prune_artifact_versions(self, session_id: str, path: str, keep: int) -> list[str]:
        """Drop the file artifacts of ``path`` older than its newest ``keep``, tagged ones
        excepted; their hashes, one per reference they held."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id, hash, tags FROM artifacts WHERE session_id=? AND kind='file' "
                "AND path=? ORDER BY id DESC", (session_id, path)).fetchall()
            old = [r for r in rows[keep:] if not json.loads(r["tags"])]
            db.executemany("DELETE FROM artifacts WHERE id=?", [(r["id"],) for r in old])
        return [r["hash"] for r in old]

    def release_artifacts(self, session_id: str, keep_tag: str) -> list[str]:
        """Drop a session's artifacts but those tagged ``keep_tag``; their hashes, one per
        reference they held."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id, hash FROM artifacts WHERE session_id=? AND NOT EXISTS "
                "(SELECT 1 FROM json_each(artifacts.tags) WHERE value=?)",
                (session_id, keep_tag)).fetchall()
            db.executemany("DELETE FROM artifacts WHERE id=?", [(r[0],) for r in rows])
        return [r[1] for r in rows]

    def artifact_bytes(self, session_id: str) -> int:
        """What a session's artifacts hold in the store (by their sizes), for its disk limit."""
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(size), 0) FROM artifacts "
                                    "WHERE session_id=?", (session_id,)).fetchone()[0]

    def count_artifacts(self, session_id: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM artifacts WHERE session_id=?",
                                    (session_id,)).fetchone()[0]

    def record_execution(
        self,
        session_id: str,
        code: str,
        status: str,
        execution_count: int | None,
        started: float,
        timing: dict[str, float],
    ) -> int:
        now = time.time()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO executions (session_id, execution_count, code, status, started, "
                "timing) VALUES (?, ?, ?, ?, ?, ?)",
                (session_id, execution_count, code, status, started, json.dumps(timing)),
            )
            execution_id = int(cur.lastrowid or 0)
            db.execute(
                "UPDATE sessions SET last_activity=?, active_clock=MAX(active_clock, ?), "
                "execution_count=MAX(execution_count, COALESCE(?, 0)) WHERE id=?",
                (now, lease_clock(), execution_count, session_id),
            )
        return execution_id

    def raise_execution_count(self, session_id: str, count: int) -> None:
        """A notebook numbered a cell ``count`` that the session did not run (a %session
        command): its numbers go on from there, after a kernel restart too."""
        with self.transaction() as db:
            db.execute("UPDATE sessions SET execution_count=MAX(execution_count, ?) WHERE id=?",
                       (count, session_id))

    def last_execution(self, session_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, execution_count FROM executions WHERE session_id=? "
                "ORDER BY id DESC LIMIT 1", (session_id,)).fetchone()
        return dict(row) if row else None

    def executions(self, session_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM executions WHERE session_id=? ORDER BY id", (session_id,)
            ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["timing"] = json.loads(d["timing"])
            out.append(d)
        return out


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in fields.items()}


def _decode(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    d = dict(row)
    for k in _JSON_COLUMNS:
        d[k] = json.loads(d[k])
    return d
