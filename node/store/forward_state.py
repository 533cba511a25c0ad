"""The forwarder's durable state: how far it has read the index, and what is still owed.

Kept in ``forward.sqlite`` beside the index (WAL, synchronous=FULL)::

    cursor(id=1, last_rowid)          highest ``instances`` rowid taken into the queue
    queue(sop_instance_uid, index_rowid, study_instance_uid, attempts, next_try,
          last_error, state)          instances not yet delivered; state pending|failed,
                                      or cancelled from the dashboard (kept, never sent)
    totals(id=1, forwarded, last_success_at, last_error, last_error_at)

Moving new instances into the queue and advancing the cursor is one transaction, so a
crash never skips or loses an instance; a delivered instance leaves the queue. On
PostgreSQL (component "forward") the same tables serve every daemon of the node, each
change one transaction under the store's lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.store.pg_sql import StateDatabase, open_pg_database, postgresql_schema, script
from node.store.sqlite import LockedDatabase, Migration

FILE_NAME = "forward.sqlite"
PENDING = "pending"
FAILED = "failed"
CANCELLED = "cancelled"

_TABLES = """
CREATE TABLE IF NOT EXISTS cursor (id INTEGER PRIMARY KEY CHECK (id = 1), last_rowid INTEGER);
CREATE TABLE IF NOT EXISTS queue (
    sop_instance_uid TEXT PRIMARY KEY,
    index_rowid INTEGER NOT NULL,
    study_instance_uid TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX IF NOT EXISTS queue_due ON queue (state, next_try, index_rowid);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    forwarded INTEGER NOT NULL DEFAULT 0,
    last_success_at REAL,
    last_error TEXT NOT NULL DEFAULT '',
    last_error_at REAL
);
"""
_SCHEMA = (
    _TABLES
    + """INSERT OR IGNORE INTO cursor (id, last_rowid) VALUES (1, 0);
INSERT OR IGNORE INTO totals (id) VALUES (1);
"""
)
# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (_SCHEMA,)
# The same tables on PostgreSQL (node/store/postgres.py ``migrate``, component "forward").
PG_MIGRATIONS = (
    script(
        postgresql_schema(_TABLES)
        + """
        INSERT INTO cursor (id, last_rowid) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
        INSERT INTO totals (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
        """
    ),
)
# Moves the cursor forward only: (position, position).
_ADVANCE = "UPDATE cursor SET last_rowid = ? WHERE last_rowid < ?"
# What the summary tells of each failing instance.
_PROBLEM_COLUMNS = (
    "study_instance_uid",
    "sop_instance_uid",
    "attempts",
    "next_try",
    "last_error",
    "state",
)


@dataclass(frozen=True)
class QueuedInstance:
    sop_instance_uid: str
    study_instance_uid: str
    attempts: int


class ForwardState:
    """The forward queue; safe to use from several threads (one lock, one connection)."""

    def __init__(self, path: Path) -> None:
        self._database: StateDatabase = LockedDatabase(path, MIGRATIONS)

    def close(self) -> None:
        self._database.close()

    def _transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> int:
        """Run ``statements`` as one durable transaction; the rows they changed."""
        with self._database.transaction() as db:
            return sum(db.execute(sql, args).rowcount for sql, args in statements)

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        with self._database.connection() as db:
            return db.execute(sql, args).fetchone()

    @property
    def last_rowid(self) -> int:
        return int(self._one("SELECT last_rowid FROM cursor")[0])

    def enqueue(self, rows: Sequence[tuple[int, str, str]], now: float) -> None:
        """Queue new index rows ``(rowid, sop_instance_uid, study_instance_uid)``, due now,
        and move the cursor past them, in one durable step."""
        if not rows:
            return
        statements: list[tuple[str, Sequence[Any]]] = [
            (
                "INSERT INTO queue (sop_instance_uid, index_rowid, study_instance_uid, next_try)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO NOTHING",
                (sop_uid, rowid, study_uid, now),
            )
            for rowid, sop_uid, study_uid in rows
        ]
        last = max(r[0] for r in rows)
        statements.append((_ADVANCE, (last, last)))
        self._transaction(statements)

    def advance(self, rowid: int) -> None:
        """Move the cursor past ``rowid`` (rows taken but held, not queued)."""
        self._transaction([(_ADVANCE, (rowid, rowid))])

    def due(self, now: float, limit: int) -> list[QueuedInstance]:
        """Pending instances whose next try has come, oldest arrival first."""
        with self._database.connection() as db:
            rows = db.execute(
                "SELECT sop_instance_uid, study_instance_uid, attempts FROM queue"
                " WHERE state = ? AND next_try <= ? ORDER BY index_rowid LIMIT ?",
                (PENDING, now, limit),
            ).fetchall()
        return [QueuedInstance(r[0], r[1], r[2]) for r in rows]

    def next_due_at(self) -> float | None:
        row = self._one("SELECT MIN(next_try) FROM queue WHERE state = ?", (PENDING,))
        return None if row[0] is None else float(row[0])

    def delivered(self, sop_instance_uids: Sequence[str], now: float) -> None:
        """Drop delivered instances from the queue and count them."""
        if not sop_instance_uids:
            return
        statements: list[tuple[str, Sequence[Any]]] = [
            ("DELETE FROM queue WHERE sop_instance_uid = ?", (uid,)) for uid in sop_instance_uids
        ]
        statements.append(
            (
                "UPDATE totals SET forwarded = forwarded + ?, last_success_at = ?",
                (len(sop_instance_uids), now),
            )
        )
        self._transaction(statements)

    def attempt_failed(
        self,
        items: Sequence[QueuedInstance],
        error: str,
        now: float,
        max_attempts: int,
        initial_backoff: float,
    ) -> None:
        """Record a failed attempt: retry after an exponential backoff, or give up at the
        attempt limit (state failed)."""
        if not items:
            return
        statements: list[tuple[str, Sequence[Any]]] = []
        for item in items:
            attempts = item.attempts + 1
            state = FAILED if attempts >= max_attempts else PENDING
            next_try = now + initial_backoff * 2 ** (attempts - 1)
            statements.append(
                (
                    "UPDATE queue SET attempts = ?, next_try = ?, last_error = ?, state = ?"
                    " WHERE sop_instance_uid = ? AND state != ?",
                    (attempts, next_try, error, state, item.sop_instance_uid, CANCELLED),
                )
            )
        statements.append(("UPDATE totals SET last_error = ?, last_error_at = ?", (error, now)))
        self._transaction(statements)

    def retry_now(self, sop_instance_uid: str, now: float) -> bool:
        """Make a queued instance (retrying or failed) due now with its attempts counted
        afresh; False if it is not queued or was cancelled."""
        statement = (
            "UPDATE queue SET attempts = 0, next_try = ?, state = ?"
            " WHERE sop_instance_uid = ? AND state != ?",
            (now, PENDING, sop_instance_uid, CANCELLED),
        )
        return self._transaction([statement]) == 1

    def cancel(self, sop_instance_uid: str) -> bool:
        """Take a queued instance out of delivery for good, kept as cancelled; False if
        it is not queued (delivered, or never taken in)."""
        statement = (
            "UPDATE queue SET state = ? WHERE sop_instance_uid = ?",
            (CANCELLED, sop_instance_uid),
        )
        return self._transaction([statement]) == 1

    def state_of(self, sop_instance_uid: str) -> str | None:
        """A queued instance's state; None if it is not in the queue."""
        row = self._one("SELECT state FROM queue WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return None if row is None else str(row[0])

    def forget(self, sop_instance_uids: Sequence[str]) -> None:
        """Drop queued instances that are no longer on the node."""
        self._transaction(
            [("DELETE FROM queue WHERE sop_instance_uid = ?", (u,)) for u in sop_instance_uids]
        )

    def summary(self, failure_limit: int = 20) -> dict[str, Any]:
        """Counts, last outcome, and the instances that are failing or have failed."""
        with self._database.connection() as db:
            forwarded, last_success_at, last_error, last_error_at = db.execute(
                "SELECT forwarded, last_success_at, last_error, last_error_at FROM totals"
            ).fetchone()
            counts = dict(db.execute("SELECT state, COUNT(*) FROM queue GROUP BY state").fetchall())
            problems = db.execute(
                f"SELECT {', '.join(_PROBLEM_COLUMNS)} FROM queue"
                " WHERE attempts > 0 AND state != ? ORDER BY index_rowid LIMIT ?",
                (CANCELLED, failure_limit),
            ).fetchall()
            last_rowid = db.execute("SELECT last_rowid FROM cursor").fetchone()[0]
        return {
            "forwarded": forwarded,
            "pending": counts.get(PENDING, 0),
            "failed": counts.get(FAILED, 0),
            "cancelled": counts.get(CANCELLED, 0),
            "last_success_at": last_success_at,
            "last_error": last_error or None,
            "last_error_at": last_error_at,
            "index_position": last_rowid,
            "problems": [dict(zip(_PROBLEM_COLUMNS, row, strict=True)) for row in problems],
        }


class PostgresForwardState(ForwardState):
    """The forward queue in PostgreSQL, shared by the daemons of the node."""

    def __init__(self, pool: Any) -> None:
        self._database = open_pg_database(pool, PG_MIGRATIONS, "forward", "forward state")
