"""The custodian's consent state: who is enrolled with which key, grants, revocations.

Everything here except two private tables is a cache of this node's own log, rebuilt by
replaying it (``applied_size`` says how far it got), so the log stays the only truth:

- ``subjects`` (subject reference -> patient id) is the private link from the opaque
  reference written in ``enroll`` entries to the local patient. It never leaves the node.
- ``study_refs`` (study reference -> Study Instance UID) remembers keyed references the
  node has computed so that it can resolve them again.

One SQLite file, WAL with synchronous=FULL, safe for several threads and processes; or
the same tables in PostgreSQL (component "consent"), shared by every daemon of the node,
each replaying the log into them under the store's transaction lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.core.consent import decode_delegation, decode_grant, decode_revocation
from node.core.emergency import decode_policy
from node.core.entries import (
    BreakGlass,
    DelegationEntry,
    DeskDelegation,
    EmergencyPolicyEntry,
    Enroll,
    EntryBody,
    Grant,
    Revoke,
)
from node.errors import BadInput
from node.store.pg_sql import (
    SqlConnection,
    StateDatabase,
    open_pg_database,
    postgresql_schema,
    script,
)
from node.store.sqlite import LockedDatabase, Migration

FILE_NAME = "consent.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS subjects (
    subject BLOB PRIMARY KEY, patient_id TEXT NOT NULL UNIQUE) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS study_refs (
    ref BLOB PRIMARY KEY, study_uid TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS patient_keys (
    public_key BLOB PRIMARY KEY, subject BLOB NOT NULL, enrolled_index INTEGER NOT NULL,
    retired_index INTEGER) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS patient_keys_by_subject ON patient_keys (subject);
CREATE TABLE IF NOT EXISTS grants (
    token_id BLOB PRIMARY KEY, patient_key BLOB NOT NULL, token BLOB NOT NULL,
    ledger_index INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS grants_by_key ON grants (patient_key);
CREATE TABLE IF NOT EXISTS revocations (
    patient_key BLOB NOT NULL, token_id BLOB NOT NULL, ledger_index INTEGER NOT NULL,
    PRIMARY KEY (patient_key, token_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS replay (
    name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
# Break-glass (node.core.emergency): each key's signed policies, and the requests served;
# delegations (node.core.consent.Delegation) by id.
ROUND_TWO_SCHEMA = """
CREATE TABLE IF NOT EXISTS delegations (
    delegation_id BLOB PRIMARY KEY, patient_key BLOB NOT NULL, delegation BLOB NOT NULL,
    ledger_index INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS emergency_policies (
    patient_key BLOB NOT NULL, ledger_index INTEGER NOT NULL, policy BLOB NOT NULL,
    PRIMARY KEY (patient_key, ledger_index)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS break_glass (
    request BLOB PRIMARY KEY, requester TEXT NOT NULL, studies BLOB NOT NULL,
    ledger_index INTEGER NOT NULL) WITHOUT ROWID;
"""
# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (SCHEMA, ROUND_TWO_SCHEMA)


# The same tables on PostgreSQL (node/store/postgres.py ``migrate``, component "consent").
PG_MIGRATIONS = (script(postgresql_schema(SCHEMA + ROUND_TWO_SCHEMA)),)


@dataclass(frozen=True)
class KeyRecord:
    public_key: bytes
    subject: bytes
    enrolled_index: int
    retired_index: int | None

    @property
    def retired(self) -> bool:
        return self.retired_index is not None


@dataclass(frozen=True)
class PolicyRow:
    policy: bytes
    ledger_index: int


@dataclass(frozen=True)
class BreakGlassRow:
    request: bytes
    requester: str
    studies: bytes
    ledger_index: int


@dataclass(frozen=True)
class GrantRow:
    token_id: bytes
    patient_key: bytes
    token: bytes
    ledger_index: int


class ConsentState:
    """The consent tables of one node."""

    def __init__(self, db_path: Path) -> None:
        self._database: StateDatabase = LockedDatabase(db_path, MIGRATIONS)

    def close(self) -> None:
        self._database.close()

    def _one(self, sql: str, args: Iterable[Any] = ()) -> Any:
        with self._database.connection() as db:
            return db.execute(sql, tuple(args)).fetchone()

    def _all(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        with self._database.connection() as db:
            return db.execute(sql, tuple(args)).fetchall()

    # -- private mappings ----------------------------------------------------------------

    def bind_subject(self, subject: bytes, patient_id: str) -> None:
        with self._database.connection() as db:
            # No conflict target: a subject or a patient already bound keeps its binding.
            db.execute(
                "INSERT INTO subjects (subject, patient_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (subject, patient_id),
            )

    def patient_of_subject(self, subject: bytes) -> str | None:
        row = self._one("SELECT patient_id FROM subjects WHERE subject = ?", (subject,))
        return None if row is None else str(row[0])

    def remember_study_refs(self, refs: Mapping[bytes, str]) -> None:
        with self._database.connection() as db:
            db.executemany(
                "INSERT INTO study_refs (ref, study_uid) VALUES (?, ?)"
                " ON CONFLICT (ref) DO NOTHING",
                list(refs.items()),
            )

    def study_of_ref(self, ref: bytes) -> str | None:
        row = self._one("SELECT study_uid FROM study_refs WHERE ref = ?", (ref,))
        return None if row is None else str(row[0])

    # -- replay of the log ---------------------------------------------------------------

    @property
    def applied_size(self) -> int:
        with self._database.connection() as db:
            return self._applied_size(db)

    @staticmethod
    def _applied_size(db: SqlConnection) -> int:
        row = db.execute("SELECT value FROM replay WHERE name = 'applied_size'").fetchone()
        return 0 if row is None else int(row[0])

    def apply(self, start: int, entries: Sequence[EntryBody]) -> None:
        """Apply own-log entries ``start, start+1, ...`` (their bodies) in one transaction.

        Entries already applied are skipped; a gap before ``start`` raises ValueError.
        Kinds other than enroll, grant, revoke, delegation, emergency_policy and break_glass
        only advance the replay position.
        """
        if start + len(entries) <= self.applied_size:
            return  # nothing new: no write lock taken
        with self._database.transaction() as db:
            # Read again under the lock: another daemon may have applied them meanwhile.
            applied = self._applied_size(db)
            if start > applied:
                raise ValueError(f"consent replay gap: entry {start} before entry {applied}")
            fresh = entries[applied - start :]
            if not fresh:
                return
            for offset, body in enumerate(fresh):
                self._apply_one(db, applied + offset, body)
            db.execute(
                "INSERT INTO replay (name, value) VALUES ('applied_size', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (applied + len(fresh),),
            )

    def _apply_one(self, db: SqlConnection, index: int, body: EntryBody) -> None:
        if isinstance(body, Enroll):
            if body.replaces is not None:
                db.execute(
                    "UPDATE patient_keys SET retired_index = ? WHERE public_key = ?"
                    " AND retired_index IS NULL",
                    (index, body.replaces),
                )
            db.execute(
                "INSERT INTO patient_keys (public_key, subject, enrolled_index)"
                " VALUES (?, ?, ?)"
                " ON CONFLICT (public_key) DO NOTHING",
                (body.key, body.subject, index),
            )
        elif isinstance(body, Grant):
            try:
                token = decode_grant(body.token)
            except BadInput:
                return  # never written by this node; a bad entry must not stall the replay
            db.execute(
                "INSERT INTO grants (token_id, patient_key, token, ledger_index)"
                " VALUES (?, ?, ?, ?)"
                " ON CONFLICT (token_id) DO NOTHING",
                (token.token_id, token.patient_key, token.raw, index),
            )
        elif isinstance(body, Revoke):
            try:
                revocation = decode_revocation(body.revocation)
            except BadInput:
                return
            db.execute(
                "INSERT INTO revocations (patient_key, token_id, ledger_index)"
                " VALUES (?, ?, ?)"
                " ON CONFLICT (patient_key, token_id) DO NOTHING",
                (revocation.patient_key, revocation.token_id, index),
            )

        elif isinstance(body, EmergencyPolicyEntry):
            try:
                policy = decode_policy(body.policy)
            except BadInput:
                return
            db.execute(
                "INSERT INTO emergency_policies (patient_key, ledger_index, policy)"
                " VALUES (?, ?, ?)"
                " ON CONFLICT (patient_key, ledger_index) DO NOTHING",
                (policy.patient_key, index, policy.raw),
            )
        elif isinstance(body, DelegationEntry | DeskDelegation):
            try:
                delegation = decode_delegation(body.delegation)
            except BadInput:
                return
            db.execute(
                "INSERT INTO delegations"
                " (delegation_id, patient_key, delegation, ledger_index) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (delegation_id) DO NOTHING",
                (delegation.delegation_id, delegation.patient_key, delegation.raw, index),
            )
        elif isinstance(body, BreakGlass):
            db.execute(
                "INSERT INTO break_glass (request, requester, studies, ledger_index)"
                " VALUES (?, ?, ?, ?)"
                " ON CONFLICT (request) DO NOTHING",
                (body.request, body.requester, body.studies, index),
            )

    # -- queries -------------------------------------------------------------------------

    def latest_policy(self, public_key: bytes) -> PolicyRow | None:
        """The last emergency policy recorded for ``public_key``, or None."""
        row = self._one(
            "SELECT policy, ledger_index FROM emergency_policies WHERE patient_key = ?"
            " ORDER BY ledger_index DESC LIMIT 1",
            (public_key,),
        )
        return None if row is None else PolicyRow(*row)

    def delegation_index(self, delegation_id: bytes) -> int | None:
        """The log index of a recorded delegation, or None."""
        row = self._one(
            "SELECT ledger_index FROM delegations WHERE delegation_id = ?", (delegation_id,)
        )
        return None if row is None else int(row[0])

    def delegation(self, delegation_id: bytes) -> bytes | None:
        """The signed bytes of a recorded delegation, or None."""
        row = self._one(
            "SELECT delegation FROM delegations WHERE delegation_id = ?", (delegation_id,)
        )
        return None if row is None else bytes(row[0])

    def delegations_of_key(self, public_key: bytes) -> list[tuple[bytes, int]]:
        """A patient key's recorded delegations: (signed bytes, log index), oldest first."""
        rows = self._all(
            "SELECT delegation, ledger_index FROM delegations WHERE patient_key = ?"
            " ORDER BY ledger_index",
            (public_key,),
        )
        return [(bytes(r[0]), int(r[1])) for r in rows]

    def recent_break_glass(self, limit: int) -> list[BreakGlassRow]:
        """The last ``limit`` served emergency requests, newest first."""
        rows = self._all(
            "SELECT request, requester, studies, ledger_index FROM break_glass"
            " ORDER BY ledger_index DESC LIMIT ?",
            (limit,),
        )
        return [BreakGlassRow(*r) for r in rows]

    def break_glass(self, request: bytes) -> BreakGlassRow | None:
        """The served emergency request with this id, or None."""
        row = self._one(
            "SELECT request, requester, studies, ledger_index FROM break_glass WHERE request = ?",
            (request,),
        )
        return None if row is None else BreakGlassRow(*row)

    def key(self, public_key: bytes) -> KeyRecord | None:
        row = self._one(
            "SELECT public_key, subject, enrolled_index, retired_index FROM patient_keys"
            " WHERE public_key = ?",
            (public_key,),
        )
        return None if row is None else KeyRecord(*row)

    def active_key_of_subject(self, subject: bytes) -> KeyRecord | None:
        row = self._one(
            "SELECT public_key, subject, enrolled_index, retired_index FROM patient_keys"
            " WHERE subject = ? AND retired_index IS NULL ORDER BY enrolled_index DESC",
            (subject,),
        )
        return None if row is None else KeyRecord(*row)

    def grant(self, token_id: bytes) -> GrantRow | None:
        row = self._one(
            "SELECT token_id, patient_key, token, ledger_index FROM grants WHERE token_id = ?",
            (token_id,),
        )
        return None if row is None else GrantRow(*row)

    def grants_of_key(self, public_key: bytes) -> list[GrantRow]:
        rows = self._all(
            "SELECT token_id, patient_key, token, ledger_index FROM grants"
            " WHERE patient_key = ? ORDER BY ledger_index",
            (public_key,),
        )
        return [GrantRow(*r) for r in rows]

    def revocation_index(self, public_key: bytes, token_id: bytes) -> int | None:
        row = self._one(
            "SELECT ledger_index FROM revocations WHERE patient_key = ? AND token_id = ?",
            (public_key, token_id),
        )
        return None if row is None else int(row[0])


class PostgresConsentState(ConsentState):
    """The consent tables in PostgreSQL, shared by every daemon of the node."""

    def __init__(self, pool: Any) -> None:
        self._database = open_pg_database(pool, PG_MIGRATIONS, "consent", "consent state")
