"""The custodian's returned opinions: which are still held from PACS and which the patient
has not seen yet. The opinion itself is a DICOM instance in the store (its series for
opinions); this file keeps only its state, never its content or author.

One SQLite file, WAL with synchronous=FULL: a row is written (held) before its instance
is committed to the store, so the forwarder never sees an opinion it may send too early.
On PostgreSQL (component "opinions") the same table serves every daemon of the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.store.pg_sql import StateDatabase, open_pg_database, postgresql_schema, script
from node.store.sqlite import LockedDatabase, Migration

FILE_NAME = "opinions.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS opinions (
    sop_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL,
    received REAL NOT NULL, accepted REAL, seen REAL) WITHOUT ROWID;
"""
MIGRATIONS: tuple[Migration, ...] = (SCHEMA,)
# The same table on PostgreSQL (node/store/postgres.py ``migrate``, component "opinions").
PG_MIGRATIONS = (script(postgresql_schema(SCHEMA)),)


@dataclass(frozen=True)
class OpinionState:
    sop_instance_uid: str
    study_instance_uid: str
    received: float
    accepted: float | None
    seen: float | None


class OpinionStore:
    """The state of every opinion returned to this node."""

    def __init__(self, db_path: Path) -> None:
        self._database: StateDatabase = LockedDatabase(db_path, MIGRATIONS)

    def close(self) -> None:
        self._database.close()

    def hold(self, sop_uid: str, study_uid: str, now: float) -> None:
        """Keep a new opinion held from PACS (again for the same instance: no change)."""
        with self._database.connection() as db:
            db.execute(
                "INSERT INTO opinions (sop_instance_uid, study_instance_uid, received)"
                " VALUES (?, ?, ?) ON CONFLICT (sop_instance_uid) DO NOTHING",
                (sop_uid, study_uid, now),
            )

    def _update(self, column: str, sop_uid: str, now: float) -> bool:
        with self._database.connection() as db:
            cursor = db.execute(
                f"UPDATE opinions SET {column} = COALESCE({column}, ?) WHERE sop_instance_uid = ?",
                (now, sop_uid),
            )
        return cursor.rowcount > 0

    def accept(self, sop_uid: str, now: float) -> bool:
        """Staff accepted the opinion for PACS; False if there is no such opinion."""
        return self._update("accepted", sop_uid, now)

    def mark_seen(self, sop_uid: str, now: float) -> bool:
        """The patient opened the opinion; False if there is no such opinion."""
        return self._update("seen", sop_uid, now)

    def held(self, sop_uids: list[str]) -> set[str]:
        """Those of ``sop_uids`` that are opinions not yet accepted."""
        if not sop_uids:
            return set()
        marks = ",".join("?" * len(sop_uids))
        with self._database.connection() as db:
            rows = db.execute(
                "SELECT sop_instance_uid FROM opinions WHERE accepted IS NULL"
                f" AND sop_instance_uid IN ({marks})",
                sop_uids,
            ).fetchall()
        return {str(r[0]) for r in rows}

    def states(self, study_uid: str | None = None) -> list[OpinionState]:
        """Every opinion (of one study, if named), newest first."""
        query = (
            "SELECT sop_instance_uid, study_instance_uid, received, accepted, seen FROM opinions"
        )
        args: tuple[str, ...] = ()
        if study_uid is not None:
            query += " WHERE study_instance_uid = ?"
            args = (study_uid,)
        with self._database.connection() as db:
            rows = db.execute(query + " ORDER BY received DESC", args).fetchall()
        return [OpinionState(str(r[0]), str(r[1]), float(r[2]), r[3], r[4]) for r in rows]


class PostgresOpinionStore(OpinionStore):
    """The opinions' state in PostgreSQL, shared by the daemons of the node."""

    def __init__(self, pool: Any) -> None:
        self._database = open_pg_database(pool, PG_MIGRATIONS, "opinions", "opinions")
