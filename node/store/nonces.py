"""Nonces of signed requests already accepted, so that each request is accepted once.

A signed request is fresh only within ``max_age`` seconds of its timestamp, so a nonce
needs remembering only that long; older rows are pruned. Rows are committed durably
(WAL, synchronous=FULL; on PostgreSQL, synchronous_commit) before the request is served,
so a replay is refused even after the node restarts. On PostgreSQL every daemon of the
node shares the table: a nonce one daemon accepted is a replay at every other, and of two
daemons inserting the same nonce at once one wins (the primary key decides, in the
server, not a check in Python).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from node.store.pg_sql import StateDatabase, open_pg_database, postgresql_schema, script
from node.store.sqlite import LockedDatabase, Migration

FILE_NAME = "nonces.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nonces (
    signer TEXT NOT NULL, nonce BLOB NOT NULL, timestamp INTEGER NOT NULL,
    PRIMARY KEY (signer, nonce)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nonces_by_time ON nonces (timestamp);
"""
# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (_SCHEMA,)

# The same table on PostgreSQL (node/store/postgres.py ``migrate``, component "nonces").
PG_MIGRATIONS = (script(postgresql_schema(_SCHEMA)),)

NONCES_FILE = "nonces.sqlite"
# Prune at most this often: one DELETE per interval keeps the table small and cheap.
PRUNE_INTERVAL = 60.0


class NonceStore:
    """Durable memory of (signer, nonce) pairs seen within the freshness window."""

    def __init__(self, db_path: Path, max_age: int = 300) -> None:
        self._database: StateDatabase = LockedDatabase(db_path, MIGRATIONS)
        self.max_age = max_age
        self._last_prune = 0.0

    def remember(self, signer: str, nonce: bytes, timestamp: int, now: float | None = None) -> bool:
        """Record the nonce; False if this signer already used it (a replay)."""
        now = time.time() if now is None else now
        with self._database.connection() as db:
            if now - self._last_prune > PRUNE_INTERVAL:
                # A request older than max_age is refused as stale before its nonce is
                # looked at, so forgetting older nonces cannot let a replay through.
                db.execute("DELETE FROM nonces WHERE timestamp < ?", (now - self.max_age,))
                self._last_prune = now
            cursor = db.execute(
                "INSERT INTO nonces (signer, nonce, timestamp) VALUES (?, ?, ?)"
                " ON CONFLICT (signer, nonce) DO NOTHING",
                (signer, nonce, timestamp),
            )
            return cursor.rowcount == 1

    def count(self) -> int:
        with self._database.connection() as db:
            return int(db.execute("SELECT count(*) FROM nonces").fetchone()[0])

    def close(self) -> None:
        self._database.close()


class PostgresNonceStore(NonceStore):
    """The nonces in PostgreSQL, shared by every daemon of the node."""

    def __init__(self, pool: Any, max_age: int = 300) -> None:
        self._database = open_pg_database(pool, PG_MIGRATIONS, "nonces", "nonces")
        self.max_age = max_age
        self._last_prune = 0.0
