"""The auditor's state between runs: per log, the last checkpoint it verified and the
entries that checkpoint covers.

One SQLite database in the state directory. A log's checkpoint and the entries it
covers are replaced in one transaction (WAL, synchronous=FULL), so a crash mid-save
leaves the old state or the new one, never a checkpoint without its entries. Entries,
receipt halves and mapping rows are kept in batches (one row holds BATCH of them,
length-prefixed): a row per entry cost more to write than the entry itself. The store
only keeps rows; the service (node.services.audit_state) checks that they still prove
what they claim before an audit trusts them.
"""

from __future__ import annotations

import itertools
import sqlite3
import struct
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
# Entries, receipt halves or mapping rows held by one row (every batch of a log's
# entries but its last is full, so entry i lies in the batch starting at i - i % BATCH).
BATCH = 256
_LENGTH = struct.Struct(">I")
_BATCHED = """
CREATE TABLE entry_batches (
    origin TEXT NOT NULL, first INTEGER NOT NULL, count INTEGER NOT NULL,
    raws BLOB NOT NULL, PRIMARY KEY (origin, first));
DROP TABLE judged_maps;
DROP TABLE judged_halves;
CREATE TABLE judged_maps (
    origin TEXT NOT NULL, name TEXT NOT NULL, seq INTEGER NOT NULL, pairs BLOB NOT NULL,
    PRIMARY KEY (origin, name, seq));
CREATE TABLE judged_halves (
    origin TEXT NOT NULL, seq INTEGER NOT NULL, halves BLOB NOT NULL,
    PRIMARY KEY (origin, seq));
DELETE FROM judged;
"""


def _batch_entries(db: sqlite3.Connection) -> None:
    """Schema 4: entries kept in batches. The kept entries move into them; what judging
    left is dropped (a rerun judges the kept entries again, once, and saves it anew)."""
    for statement in _BATCHED.split(";"):
        if statement.strip():
            db.execute(statement)
    origins = [origin for (origin,) in db.execute("SELECT DISTINCT origin FROM entries")]
    for origin in origins:
        raws = (
            raw
            for (raw,) in db.execute(
                "SELECT raw FROM entries WHERE origin = ? ORDER BY idx", (origin,)
            )
        )
        _insert_entries(db, origin, 0, raws)
    db.execute("DROP TABLE entries")


# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (_SCHEMA, _JUDGED, _EDGE, _batch_entries)
# Rows fetched from SQLite per round trip while reading rows back.
READ_BATCH = 64


def pack_items(items: Iterable[bytes]) -> bytes:
    """Items as one blob, each after its length (4 bytes, big-endian)."""
    pack = _LENGTH.pack
    return b"".join([part for item in items for part in (pack(len(item)), item)])


def unpack_items(blob: object) -> list[bytes]:
    """The items of a blob ``pack_items`` made; ValueError if it is not one."""
    if not isinstance(blob, bytes):
        raise ValueError("a batch is not bytes")
    items, offset, end = [], 0, len(blob)
    unpack = _LENGTH.unpack_from
    while offset < end:
        if end - offset < _LENGTH.size:
            raise ValueError("a batch is cut")
        (length,) = unpack(blob, offset)
        offset += _LENGTH.size
        if end - offset < length:
            raise ValueError("a batch is cut")
        items.append(blob[offset : offset + length])
        offset += length
    return items


def _batches(items: Iterable[bytes]) -> Iterator[bytes]:
    """Items packed BATCH at a time."""
    items = iter(items)
    while batch := list(itertools.islice(items, BATCH)):
        yield pack_items(batch)


def _insert_entries(db: sqlite3.Connection, origin: str, first: int, raws: Iterable[bytes]) -> None:
    """Insert entries ``first``... in full batches (the last one may be short)."""
    rows = []
    raws = iter(raws)
    while batch := list(itertools.islice(raws, BATCH)):
        rows.append((origin, first, len(batch), pack_items(batch)))
        first += len(batch)
        if len(rows) >= READ_BATCH:
            db.executemany("INSERT INTO entry_batches VALUES (?, ?, ?, ?)", rows)
            rows.clear()
    db.executemany("INSERT INTO entry_batches VALUES (?, ?, ?, ?)", rows)


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
                " (SELECT coalesce(sum(e.count), 0) FROM entry_batches e"
                " WHERE e.origin = l.origin), l.edge"
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
        expected = start - start % BATCH  # the first index of the next batch
        try:
            cursor = self._db.execute(
                "SELECT first, count, raws FROM entry_batches"
                " WHERE origin = ? AND first >= ? ORDER BY first",
                (origin, expected),
            )
            while rows := cursor.fetchmany(READ_BATCH):
                for first, count, raws in rows:
                    batch = unpack_items(raws)
                    if first != expected or count != len(batch):
                        raise ValueError(f"entry {expected} is missing")
                    skip = max(0, start - first)
                    expected += count
                    yield from batch[skip:] if skip else batch
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
        for (pairs,) in self._rows(
            "SELECT pairs FROM judged_maps WHERE origin = ? AND name = ? ORDER BY seq",
            (origin, name),
        ):
            items = self._judged_batch(pairs)
            if len(items) % 2:
                raise ValueError("the judged state cannot be read: a key without its value")
            yield from zip(items[::2], items[1::2], strict=True)

    def judged_halves(self, origin: str) -> Iterator[bytes]:
        """A log's saved receipt halves, in the order they were saved."""
        for (halves,) in self._rows(
            "SELECT halves FROM judged_halves WHERE origin = ? ORDER BY seq", (origin,)
        ):
            yield from self._judged_batch(halves)

    @staticmethod
    def _judged_batch(blob: object) -> list[bytes]:
        try:
            return unpack_items(blob)
        except ValueError as exc:
            raise ValueError(f"the judged state cannot be read: {exc}") from exc

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
                self._db.execute("DELETE FROM entry_batches WHERE origin = ?", (origin,))
            else:
                # Full batches within the entries stay; a short last one is written anew.
                self._db.execute(
                    "DELETE FROM entry_batches"
                    " WHERE origin = ? AND (count != ? OR first + count > ?)",
                    (origin, BATCH, len(entries)),
                )
                kept = self._db.execute(
                    "SELECT coalesce(sum(count), 0) FROM entry_batches WHERE origin = ?",
                    (origin,),
                ).fetchone()[0]
                _insert_entries(self._db, origin, kept, entries_from(entries, kept))
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
            items = (item for pair in rows for item in pair)
            self._db.executemany(
                "INSERT INTO judged_maps VALUES (?, ?, ?, ?)",
                ((origin, name, seq, pairs) for seq, pairs in enumerate(_batches(items))),
            )
        self._db.executemany(
            "INSERT INTO judged_halves VALUES (?, ?, ?)",
            ((origin, seq, halves) for seq, halves in enumerate(_batches(judged.halves))),
        )


def is_state_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the state file is not a usable database (garbage, torn)."""
    return isinstance(exc, sqlite3.DatabaseError)
