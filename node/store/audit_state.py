"""The auditor's state between runs: per log, the last checkpoint it verified and the
entries that checkpoint covers.

One SQLite database in the state directory. A log's checkpoint and the entries it
covers are replaced in one transaction (WAL, synchronous=FULL), so a crash mid-save
leaves the old state or the new one, never a checkpoint without its entries. The store
only keeps rows; the service (node.services.audit_state) checks that they still prove
what they claim before an audit trusts them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.store.entry_spool import EntrySource, entries_from
from node.store.sqlite import Migration, open_database

STATE_FILE = "audit-state.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    origin TEXT PRIMARY KEY, vkey TEXT NOT NULL, size INTEGER NOT NULL,
    root BLOB NOT NULL, note TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    origin TEXT NOT NULL, idx INTEGER NOT NULL, raw BLOB NOT NULL,
    PRIMARY KEY (origin, idx)) WITHOUT ROWID;
"""
# What judging a log left (node.services.audit): its walkers' state, the mappings they
# keep (grants, keys...) by name, and its receipt halves, so a rerun judges only what
# follows the saved checkpoint.
_JUDGED = """
CREATE TABLE judged (origin TEXT PRIMARY KEY, state BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE judged_maps (
    origin TEXT NOT NULL, name TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (origin, name, key)) WITHOUT ROWID;
CREATE TABLE judged_halves (origin TEXT NOT NULL, half BLOB NOT NULL);
CREATE INDEX judged_halves_origin ON judged_halves (origin);
"""
# The right edge of the tree of a log's kept entries (its Merkle frontier's subtree
# hashes, 32 bytes each, largest first), so a rerun need not hash them all again.
_EDGE = "ALTER TABLE logs ADD COLUMN edge BLOB;"
# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (_SCHEMA, _JUDGED, _EDGE)
# Rows fetched from SQLite per round trip while reading a log's entries back.
READ_BATCH = 10_000


@dataclass(frozen=True)
class JudgedRows:
    """What judging a log left, as stored: its state, its mappings' rows by name, its
    receipt halves (each row opaque to the store)."""

    state: bytes
    maps: Mapping[str, Iterable[tuple[bytes, bytes]]]
    halves: Iterable[bytes]


@dataclass(frozen=True)
class LogRow:
    """One log's saved checkpoint as stored, unchecked, and how many entries are kept."""

    origin: str
    vkey: str
    size: int
    root: bytes
    note: str
    entries_kept: int
    edge: bytes | None = None  # None: saved without it (by an earlier version)


class AuditStateStore:
    """The rows of one state directory's database."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / STATE_FILE
        path.touch(mode=0o600)  # SQLite gives its -wal and -shm files the same mode
        self._db = open_database(path, MIGRATIONS)

    def close(self) -> None:
        self._db.close()

    def logs(self) -> list[LogRow]:
        """Every saved log, by origin; raises ValueError if the rows cannot be read."""
        try:
            rows = self._db.execute(
                "SELECT l.origin, l.vkey, l.size, l.root, l.note,"
                " (SELECT count(*) FROM entries e WHERE e.origin = l.origin), l.edge"
                " FROM logs l ORDER BY l.origin"
            ).fetchall()
        except sqlite3.Error as exc:
            raise ValueError(f"the saved logs cannot be read: {exc}") from exc
        result = []
        for origin, vkey, size, root, note, kept, edge in rows:
            if not (
                isinstance(origin, str)
                and isinstance(vkey, str)
                and isinstance(size, int)
                and isinstance(root, bytes)
                and isinstance(note, str)
                and isinstance(edge, bytes | None)
            ):
                raise ValueError(f"the saved row of {origin!r} has mistyped columns")
            result.append(LogRow(origin, vkey, size, root, note, kept, edge))
        return result

    def entries(self, origin: str, start: int = 0) -> Iterator[bytes]:
        """The entries kept for a log from index ``start`` on, in index order, a batch
        at a time; ValueError if they cannot be read or their indexes have gaps."""
        expected = start
        try:
            cursor = self._db.execute(
                "SELECT idx, raw FROM entries WHERE origin = ? AND idx >= ? ORDER BY idx",
                (origin, start),
            )
            while batch := cursor.fetchmany(READ_BATCH):
                for index, raw in batch:
                    if index != expected or not isinstance(raw, bytes):
                        raise ValueError(f"entry {expected} is missing or not bytes")
                    expected += 1
                    yield raw
        except sqlite3.Error as exc:
            raise ValueError(f"entry {expected} cannot be read: {exc}") from exc

    def judged_state(self, origin: str) -> bytes | None:
        """The saved state of judging a log, or None; ValueError if it cannot be read."""
        try:
            row = self._db.execute(
                "SELECT state FROM judged WHERE origin = ?", (origin,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise ValueError(f"the judged state cannot be read: {exc}") from exc
        if row is not None and not isinstance(row[0], bytes):
            raise ValueError("the judged state is not bytes")
        return None if row is None else row[0]

    def judged_map(self, origin: str, name: str) -> Iterator[tuple[bytes, bytes]]:
        """The rows of one saved mapping of a log's judging, a batch at a time."""
        yield from self._rows(
            "SELECT key, value FROM judged_maps WHERE origin = ? AND name = ?", (origin, name)
        )

    def judged_halves(self, origin: str) -> Iterator[bytes]:
        """A log's saved receipt halves, in the order they were saved."""
        for (half,) in self._rows(
            "SELECT half FROM judged_halves WHERE origin = ? ORDER BY rowid", (origin,)
        ):
            yield half

    def _rows(self, query: str, args: tuple[Any, ...]) -> Iterator[Any]:
        try:
            cursor = self._db.execute(query, args)
            while batch := cursor.fetchmany(READ_BATCH):
                yield from batch
        except sqlite3.Error as exc:
            raise ValueError(f"the judged state cannot be read: {exc}") from exc

    def save(
        self,
        origin: str,
        vkey: str,
        size: int,
        root: bytes,
        note: str,
        entries: EntrySource | None,
        judged: JudgedRows | None = None,
        edge: bytes | None = None,
    ) -> None:
        """Replace a log's checkpoint, its kept entries by ``entries`` (exactly the
        checkpoint's; None keeps none), what judging it left (None keeps none) and the
        right edge of the entries' tree, in one durable transaction. Entries already
        kept are not rewritten: only those past the ones kept are inserted."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("judged", "judged_maps", "judged_halves"):
                self._db.execute(f"DELETE FROM {table} WHERE origin = ?", (origin,))
            if judged is not None:
                self._save_judged(origin, judged)
            if entries is None:
                self._db.execute("DELETE FROM entries WHERE origin = ?", (origin,))
            else:
                kept = self._db.execute(
                    "SELECT count(*) FROM entries WHERE origin = ?", (origin,)
                ).fetchone()[0]
                self._db.execute(
                    "DELETE FROM entries WHERE origin = ? AND idx >= ?", (origin, len(entries))
                )
                self._db.executemany(
                    "INSERT INTO entries (origin, idx, raw) VALUES (?, ?, ?)",
                    ((origin, i, raw) for i, raw in enumerate(entries_from(entries, kept), kept)),
                )
            self._db.execute(
                "INSERT OR REPLACE INTO logs (origin, vkey, size, root, note, edge)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (origin, vkey, size, root, note, edge if entries is not None else None),
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _save_judged(self, origin: str, judged: JudgedRows) -> None:
        self._db.execute("INSERT INTO judged VALUES (?, ?)", (origin, judged.state))
        for name, rows in judged.maps.items():
            self._db.executemany(
                "INSERT INTO judged_maps VALUES (?, ?, ?, ?)",
                ((origin, name, key, value) for key, value in rows),
            )
        self._db.executemany(
            "INSERT INTO judged_halves VALUES (?, ?)", ((origin, half) for half in judged.halves)
        )


def is_state_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the state file is not a usable database (garbage, torn)."""
    return isinstance(exc, sqlite3.DatabaseError)
