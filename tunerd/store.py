"""The state store: SQLite under ``state_dir``, the source of truth for everything tunerd did.

WAL mode lets the CLI read (and briefly write) while the daemon runs; every write is one short
``BEGIN IMMEDIATE`` transaction with a busy timeout, and ``synchronous=FULL`` makes a committed
transaction survive a crash. The schema carries a version and is migrated forward on open.

Applying a change to a target is a small write-ahead protocol (see ``Applier``): the intent and the
rollback point are committed *before* the file is touched, and the outcome after; ``recover``
settles any intent a crash left behind by looking at what the file actually holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunerd.faults import storage_fault
from tunerd.timeparse import iso

SCHEMA: list[str] = [
    # version 1
    """
    CREATE TABLE rollback_points (
        id INTEGER PRIMARY KEY,
        target TEXT NOT NULL,
        content BLOB,             -- NULL: the file did not exist
        sha256 TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE changes (
        id INTEGER PRIMARY KEY,
        cron TEXT NOT NULL,
        param TEXT NOT NULL,
        old_value INTEGER,
        new_value INTEGER,
        action TEXT NOT NULL,     -- experiment_start | flip | commit | rollback
                                  -- | manual_rollback | refused | dry_run
        state TEXT NOT NULL,      -- applying | applied | aborted | conflict | recorded
        target TEXT,
        actor TEXT NOT NULL,      -- tunerd | operator
        reason TEXT NOT NULL,
        evidence TEXT,            -- JSON
        rollback_point INTEGER REFERENCES rollback_points(id),
        new_sha256 TEXT,
        experiment INTEGER,
        created_at REAL NOT NULL,
        settled_at REAL
    );
    CREATE TABLE experiments (
        id INTEGER PRIMARY KEY,
        cron TEXT NOT NULL,
        param TEXT NOT NULL,
        control INTEGER NOT NULL,
        treatment INTEGER NOT NULL,
        mode TEXT NOT NULL,       -- ab | switchback (sequential: before issue 11)
        split REAL NOT NULL,
        target TEXT NOT NULL,
        state TEXT NOT NULL,      -- starting | running | committed | rolled_back | aborted
        reason TEXT NOT NULL,
        started_at REAL NOT NULL,
        verify_at REAL NOT NULL,
        extensions INTEGER NOT NULL DEFAULT 0,
        ended_at REAL,
        verdict TEXT              -- JSON
    );
    CREATE UNIQUE INDEX one_running_experiment_per_cron
        ON experiments(cron) WHERE state IN ('starting', 'running');
    CREATE TABLE reviews (
        id INTEGER PRIMARY KEY,
        cron TEXT NOT NULL,
        param TEXT NOT NULL,
        current INTEGER NOT NULL,
        proposed INTEGER NOT NULL,
        reason TEXT NOT NULL,
        why_manual TEXT NOT NULL,
        evidence TEXT,
        state TEXT NOT NULL,      -- pending | approved | rejected | superseded
        created_at REAL NOT NULL,
        decided_at REAL,
        decided_by TEXT
    );
    CREATE UNIQUE INDEX one_pending_review_per_change
        ON reviews(cron, param, proposed) WHERE state = 'pending';
    CREATE TABLE cooldowns (
        cron TEXT NOT NULL,
        param TEXT NOT NULL,
        value INTEGER NOT NULL,
        until REAL NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (cron, param, value)
    );
    """,
    # version 2: the notification outbox
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,    -- the webhook body, JSON
        state TEXT NOT NULL,      -- pending | delivered | dead
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        rate_limited INTEGER NOT NULL DEFAULT 0,  -- next_attempt_at is Discord's own retry_after
        created_at REAL NOT NULL,
        delivered_at REAL,
        message_id TEXT,
        last_error TEXT
    );
    CREATE INDEX outbox_pending ON outbox(state, id);
    """,
    # version 3: the daemon's read position with the statistics it produced, and its status
    """
    CREATE TABLE tail (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        checkpoint TEXT,          -- JSON: path, identity, offset, offset marker
        stats BLOB NOT NULL,      -- the rolling statistics but the crons', as of that offset
        saved_at REAL NOT NULL
    );
    CREATE TABLE tail_crons (    -- each cron's statistics, rewritten only when it changed
        cron TEXT PRIMARY KEY,
        stats BLOB NOT NULL
    );
    CREATE TABLE daemon_status (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        document TEXT NOT NULL,   -- JSON: tail and per-cron runs, for tunerd status
        updated_at REAL NOT NULL
    );
    """,
    # version 4: switchback experiments (issue 11): the design's seed, and how long a look lasts
    """
    ALTER TABLE experiments ADD COLUMN seed TEXT;
    ALTER TABLE experiments ADD COLUMN period REAL;
    """,
    # version 5: an experiment's changes found without reading them all (5,000 experiments:
    # `tunerd status` looked up each one's start in 3 s)
    """
    CREATE INDEX changes_by_experiment ON changes(experiment, action);
    """,
]


@dataclass(frozen=True, slots=True)
class Experiment:
    id: int
    cron: str
    param: str
    control: int
    treatment: int
    mode: str
    split: float
    target: str
    state: str
    reason: str
    started_at: float
    verify_at: float
    extensions: int
    ended_at: float | None
    verdict: str | None
    seed: str | None = None
    """A switchback experiment's design (``switchback``): which hours take which value."""
    period: float | None = None
    """Seconds of each look, as planned at the start (extensions last as long)."""


@dataclass(frozen=True, slots=True)
class Review:
    id: int
    cron: str
    param: str
    current: int
    proposed: int
    reason: str
    why_manual: str
    evidence: str | None
    state: str
    created_at: float
    decided_at: float | None
    decided_by: str | None

    def as_json(self) -> dict[str, Any]:
        """What ``status``, ``history`` and ``simulate`` show of a review."""
        return {
            "id": self.id,
            "cron": self.cron,
            "param": self.param,
            "current": self.current,
            "proposed": self.proposed,
            "reason": self.reason,
            "why_manual": self.why_manual,
            "state": self.state,
            "at": iso(self.created_at),
            "decided_at": iso(self.decided_at) if self.decided_at is not None else None,
            "decided_by": self.decided_by,
        }


@dataclass(frozen=True, slots=True)
class Change:
    id: int
    cron: str
    param: str
    old_value: int | None
    new_value: int | None
    action: str
    state: str
    target: str | None
    actor: str
    reason: str
    evidence: str | None
    rollback_point: int | None
    new_sha256: str | None
    experiment: int | None
    created_at: float
    settled_at: float | None


@dataclass(frozen=True, slots=True)
class RollbackPoint:
    id: int
    target: str
    content: bytes | None
    sha256: str | None
    created_at: float


LAST_CHANGES = (
    "SELECT cron, MAX(COALESCE(settled_at, created_at)) AS at FROM changes"
    " WHERE state = 'applied' GROUP BY cron"
)


def last_changes_of(state_dir: Path) -> dict[str, float]:
    """``Store.last_changes`` for a command that only reads (``analyze``): the database opened
    read-only, nothing created where there is none."""
    path = state_dir / "tunerd.sqlite3"
    if not path.is_file():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return {cron: at for cron, at in db.execute(LAST_CHANGES)}
    except sqlite3.Error:
        return {}  # an older or broken store: the window as it is


class StoreError(Exception):
    """The state store cannot be opened, cannot be trusted, or is newer than this tunerd.
    ``transient``: it may pass on its own (a full disk), else a person must act."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def store_error(path: Path, exc: Exception) -> StoreError:
    """One line for a database that cannot be used, with what to do, and whether it may pass
    on its own. SQLite says ``disk I/O error`` or ``unable to open database file`` for a full
    disk or a read-only mount as well as for a real fault: the directory is asked which."""
    text = str(exc)
    try:
        room = os.statvfs(path.parent)
        full = room.f_bavail * room.f_frsize < 64 * 1024
    except OSError:
        full = False
    if "full" in text or (full and isinstance(exc, sqlite3.OperationalError | OSError)):
        return StoreError(f"cannot write the state store {path}: the disk is full", True)
    unwritable = not os.access(path.parent, os.W_OK) or (
        path.exists() and not os.access(path, os.W_OK)
    )
    if "readonly" in text or isinstance(exc, PermissionError) or unwritable:
        return StoreError(
            f"cannot write the state store {path} ({text}): check its owner and mode, and that"
            " its file system is mounted read-write"
        )
    if isinstance(exc, sqlite3.OperationalError | OSError):
        return StoreError(f"cannot use the state store {path}: {text} (check the disk)", True)
    if isinstance(exc, sqlite3.DatabaseError):
        return StoreError(
            f"the state store {path} is damaged ({text}): restore it from a backup, or move it"
            " aside to start afresh (tunerd then checks its targets for experiments it forgot)"
        )
    return StoreError(f"cannot use the state store {path}: {text}")


OPENED: list[Path] = []
"""The state stores this process opened: a command that meets an SQLite error outside the
store's own code names the database with ``store_error``."""


class Store:
    """One connection to the state database (open one per process or thread)."""

    def __init__(self, state_dir: Path, timeout: float = 30.0) -> None:
        self.path = state_dir / "tunerd.sqlite3"
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise store_error(self.path, exc) from None
        try:
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            st = self.path.stat()
        except (OSError, sqlite3.Error) as exc:
            self.db.close()
            raise store_error(self.path, exc) from None
        self.identity = (st.st_dev, st.st_ino)
        OPENED.append(self.path)

    def replaced(self) -> str | None:
        """Whether the database file this store opened is still the one at its path: deleted
        or replaced under a running daemon, the daemon and the commands would each keep their
        own history. None when it is."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return f"the state store {self.path} was deleted"
        except OSError as exc:
            return f"the state store {self.path} cannot be seen: {exc.strerror or exc}"
        if (st.st_dev, st.st_ino) != self.identity:
            return f"the state store {self.path} was replaced by another file"
        return None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: taken at once (no upgrade deadlocks), committed or rolled back.
        A COMMIT that fails (a full disk) is rolled back too: the connection stays usable for
        the next try."""
        storage_fault()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise

    def _version(self) -> int:
        with contextlib.suppress(sqlite3.OperationalError):  # no meta table: a new database
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            return int(row["value"]) if row else 0
        return 0

    def _migrate(self) -> None:
        """Bring the schema up to date; a current one is only read (a read-only command works
        on a full disk)."""
        if self._version() == len(SCHEMA):
            return
        with self.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row["value"]) if row else 0
            if version > len(SCHEMA):
                raise StoreError(
                    f"the state store {self.path} has schema version {version}, newer than this "
                    f"tunerd knows ({len(SCHEMA)}): upgrade tunerd"
                )
            for script in SCHEMA[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(len(SCHEMA)),),
            )

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # --- reading ---------------------------------------------------------------------------

    def experiments(self, *states: str) -> list[Experiment]:
        query = "SELECT * FROM experiments"
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
        rows = self.db.execute(query + " ORDER BY id", states).fetchall()
        return [Experiment(**dict(r)) for r in rows]

    def experiment(self, experiment_id: int) -> Experiment | None:
        row = self.db.execute("SELECT * FROM experiments WHERE id = ?", (experiment_id,)).fetchone()
        return Experiment(**dict(row)) if row else None

    def running_experiment(self, cron: str) -> Experiment | None:
        row = self.db.execute(
            "SELECT * FROM experiments WHERE cron = ? AND state IN ('starting', 'running')",
            (cron,),
        ).fetchone()
        return Experiment(**dict(row)) if row else None

    def reviews(self, *states: str) -> list[Review]:
        query = "SELECT * FROM reviews"
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
        return [Review(**dict(r)) for r in self.db.execute(query + " ORDER BY id", states)]

    def review(self, review_id: int) -> Review | None:
        row = self.db.execute("SELECT * FROM reviews WHERE id = ?", (review_id,)).fetchone()
        return Review(**dict(row)) if row else None

    def changes(self) -> list[Change]:
        return [Change(**dict(r)) for r in self.db.execute("SELECT * FROM changes ORDER BY id")]

    def change(self, change_id: int) -> Change | None:
        row = self.db.execute("SELECT * FROM changes WHERE id = ?", (change_id,)).fetchone()
        return Change(**dict(row)) if row else None

    def timeline(self, experiment_id: int) -> list[tuple[float, int]]:
        """(applied at, value) of an experiment's start and each of its flips, in order: what
        its target held, and since when."""
        rows = self.db.execute(
            "SELECT COALESCE(settled_at, created_at) AS at, new_value FROM changes"
            " WHERE experiment = ? AND action IN ('experiment_start', 'flip')"
            " AND state = 'applied' ORDER BY id",
            (experiment_id,),
        )
        return [(float(r["at"]), int(r["new_value"])) for r in rows]

    def start_evidence(self, experiment_id: int) -> dict[str, Any]:
        """The evidence an experiment was started on (runs per hour, baselines)."""
        row = self.db.execute(
            "SELECT evidence FROM changes WHERE experiment = ? AND action = 'experiment_start'"
            " ORDER BY id LIMIT 1",
            (experiment_id,),
        ).fetchone()
        try:
            found = json.loads(row["evidence"]) if row and row["evidence"] else {}
        except ValueError:
            return {}
        return found if isinstance(found, dict) else {}

    def start_of(self, experiment_id: int) -> int | None:
        """The change that started an experiment: the id ``tunerd rollback`` takes to undo it."""
        row = self.db.execute(
            "SELECT id FROM changes WHERE experiment = ? AND action = 'experiment_start'"
            " AND state = 'applied' ORDER BY id DESC LIMIT 1",
            (experiment_id,),
        ).fetchone()
        return int(row["id"]) if row else None

    def rollback_point(self, point_id: int) -> RollbackPoint | None:
        row = self.db.execute("SELECT * FROM rollback_points WHERE id = ?", (point_id,)).fetchone()
        return RollbackPoint(**dict(row)) if row else None

    def last_changes(self) -> dict[str, float]:
        """cron -> when its parameters last changed (an experiment started or ended)."""
        return {r["cron"]: r["at"] for r in self.db.execute(LAST_CHANGES)}

    def cooldowns(self, now: float) -> set[tuple[str, str, int]]:
        rows = self.db.execute("SELECT cron, param, value FROM cooldowns WHERE until > ?", (now,))
        return {(r["cron"], r["param"], r["value"]) for r in rows}

    # --- writing (each call one transaction unless given a connection) ---------------------

    def queue_review(
        self,
        cron: str,
        param: str,
        current: int,
        proposed: int,
        reason: str,
        why_manual: str,
        evidence: dict[str, Any],
        now: float,
    ) -> int | None:
        """A new pending review, or None when the same change already waits for a human."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO reviews (cron, param, current, proposed, reason, why_manual,"
                " evidence, state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                (cron, param, current, proposed, reason, why_manual, json.dumps(evidence), now),
            )
            return cursor.lastrowid if cursor.rowcount else None

    def decide_review(self, review_id: int, state: str, by: str, now: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE reviews SET state = ?, decided_at = ?, decided_by = ? WHERE id = ?",
                (state, now, by, review_id),
            )

    def record(
        self,
        cron: str,
        param: str,
        old: int | None,
        new: int | None,
        action: str,
        actor: str,
        reason: str,
        evidence: dict[str, Any] | None,
        now: float,
    ) -> int:
        """A history row for something that touched no file (a refusal, for instance)."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO changes (cron, param, old_value, new_value, action, state, actor,"
                " reason, evidence, created_at, settled_at)"
                " VALUES (?, ?, ?, ?, ?, 'recorded', ?, ?, ?, ?, ?)",
                (cron, param, old, new, action, actor, reason, _json(evidence), now, now),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def add_cooldown(
        self, cron: str, param: str, value: int, until: float, reason: str, db: sqlite3.Connection
    ) -> None:
        db.execute(
            "INSERT OR REPLACE INTO cooldowns (cron, param, value, until, reason)"
            " VALUES (?, ?, ?, ?, ?)",
            (cron, param, value, until, reason),
        )


def load_tail(
    store: Store,
) -> tuple[dict[str, Any] | None, bytes | None, dict[str, bytes]]:
    """The checkpoint, the statistics' shell and each cron's statistics (all pickles)."""
    row = store.db.execute("SELECT checkpoint, stats FROM tail WHERE id = 1").fetchone()
    if row is None:
        return None, None, {}
    crons = {r["cron"]: r["stats"] for r in store.db.execute("SELECT cron, stats FROM tail_crons")}
    checkpoint = json.loads(row["checkpoint"]) if row["checkpoint"] else None
    return checkpoint, row["stats"], crons


def save_tail(
    store: Store,
    checkpoint: dict[str, Any] | None,
    shell: bytes,
    changed: dict[str, bytes],
    removed: set[str],
    now: float,
) -> None:
    """The read position and the statistics it produced, in one transaction: a crash keeps both
    or neither, so no line is lost or counted twice. Only the crons that changed are written."""
    with store.transaction() as db:
        db.execute(
            "INSERT OR REPLACE INTO tail (id, checkpoint, stats, saved_at) VALUES (1, ?, ?, ?)",
            (None if checkpoint is None else json.dumps(checkpoint), shell, now),
        )
        db.executemany(
            "INSERT OR REPLACE INTO tail_crons (cron, stats) VALUES (?, ?)", changed.items()
        )
        db.executemany("DELETE FROM tail_crons WHERE cron = ?", [(name,) for name in removed])


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def now() -> float:
    return time.time()
