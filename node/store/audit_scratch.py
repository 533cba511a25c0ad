"""The auditor's scratch space for one run: spooled copies of logs and the consent state
that grows with the patients, on disk in a temporary directory removed after the run.

What the consent rules remember (grants, enrolled keys) grows with the patients a log
serves, and the receipt halves waiting for their other side with the entries; a
SpilledMap keeps the recently used part of such a mapping in memory and the rest in an
SQLite table, so an audit's memory stays bounded however large the federation.
"""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from node.store.entry_spool import EntriesFrom, EntrySpool

V = TypeVar("V")
# Entries of a mapping kept in memory (the most recently used); the rest wait on disk.
SPILL_CACHE = 2048
# Rows written or read per statement (entries leaving the memory, saving, loading).
SPILL_BATCH = 2000
# The Bloom filter of a mapping's keys on disk: 2**22 bits (512 KiB), 3 bits a key; at a
# million keys, about 1 lookup in 7 of a key never stored still asks SQLite (1 in
# 1,000 at 140,000).
FILTER_BITS = 1 << 22
_HALF = (1 << 32) - 1
_FILTER_MASK = FILTER_BITS - 1  # FILTER_BITS is a power of two
_MISSING = object()  # what a lookup of a key not in the mapping finds


class Scratch:
    """A temporary directory with one scratch database, removed by ``close``."""

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="imageshare-audit-")
        self.path = Path(self._directory.name)
        # Nothing here outlives the run: no journal, no fsync, and one transaction for
        # the run, begun by the first write and never committed (committing each
        # statement would write its pages out once per row).
        # One thread at a time (a daemon collects in its loop and judges in a worker).
        self.db = sqlite3.connect(
            self.path / "scratch.sqlite", isolation_level="DEFERRED", check_same_thread=False
        )
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        # Its one connection holds the file's lock for the run: taking and dropping it
        # per statement costs more than the statement on some file systems.
        self.db.execute("PRAGMA locking_mode = EXCLUSIVE")
        self._names = itertools.count()

    def spool(self, prefix: EntriesFrom | None = None, prefix_size: int = 0) -> EntrySpool:
        return EntrySpool(self.path / f"copy-{next(self._names)}", prefix, prefix_size)

    def mapping(self, encode: Callable[[V], bytes], decode: Callable[[bytes], V]) -> SpilledMap[V]:
        return SpilledMap(self.db, f"map_{next(self._names)}", encode, decode)

    def close(self) -> None:
        self.db.close()
        self._directory.cleanup()


class SpilledMap(MutableMapping[bytes, V], Generic[V]):
    """A mapping by bytes keys: the SPILL_CACHE most recently used in memory, the others
    in an SQLite table (written in batches as they leave the memory, read back when
    asked). A Bloom filter of the keys on disk answers most lookups of a key never
    stored (a new grant, a newly enrolled key) without asking SQLite."""

    def __init__(
        self,
        db: sqlite3.Connection,
        table: str,
        encode: Callable[[V], bytes],
        decode: Callable[[bytes], V],
        cache: int = SPILL_CACHE,
    ) -> None:
        self._db, self._table = db, table
        self._encode, self._decode = encode, decode
        self._cache: OrderedDict[bytes, V] = OrderedDict()
        self._capacity = cache
        self._evicted: dict[bytes, bytes] = {}  # left the memory, not yet written
        self._on_disk = bytearray(FILTER_BITS // 8)
        # Without rowid: one tree by key, so rows() reads it in key order as it lies.
        db.execute(
            f"CREATE TABLE {table} (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"
        )

    @staticmethod
    def _bits(key: bytes) -> tuple[int, ...]:
        # Python's hash of bytes is keyed afresh in every process (SipHash), so a node
        # cannot choose keys whose bits collide (were they to, lookups would ask SQLite:
        # slower, never wrong); its two halves give the key's bits (double hashing),
        # without a digest object per lookup.
        digest = hash(key)
        first, step = digest & _HALF, (digest >> 32) | 1
        return (
            first & _FILTER_MASK,
            (first + step) & _FILTER_MASK,
            (first + 2 * step) & _FILTER_MASK,
        )

    def _mark(self, key: bytes) -> None:
        on_disk = self._on_disk
        for bit in self._bits(key):
            on_disk[bit >> 3] |= 1 << (bit & 7)

    def _maybe_on_disk(self, key: bytes) -> bool:
        on_disk = self._on_disk
        return all(on_disk[bit >> 3] & (1 << (bit & 7)) for bit in self._bits(key))

    def __getitem__(self, key: bytes) -> V:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = self._load(key)
        if value is _MISSING:
            raise KeyError(key)
        return value  # type: ignore[return-value]

    def get(self, key: bytes, default: Any = None) -> Any:
        # Not Mapping's get: a key never stored (most lookups of a new patient's) would
        # raise and catch a KeyError on the way.
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = self._load(key)
        return default if value is _MISSING else value

    def _load(self, key: bytes) -> V | object:
        """The value of ``key``, not in memory, brought back into it; or _MISSING."""
        encoded = self._evicted.pop(key, None)
        if encoded is None:
            if not self._maybe_on_disk(key):
                return _MISSING
            row = self._db.execute(
                f"SELECT value FROM {self._table} WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                return _MISSING
            encoded = row[0]
        found = self._decode(encoded)
        self._keep(key, found)
        return found

    def __setitem__(self, key: bytes, value: V) -> None:
        self._evicted.pop(key, None)  # the newer value wins over one waiting to be written
        self._keep(key, value)
        self._cache.move_to_end(key)

    def _keep(self, key: bytes, value: V) -> None:
        self._cache[key] = value
        while len(self._cache) > self._capacity:
            old, old_value = self._cache.popitem(last=False)
            self._evicted[old] = self._encode(old_value)
            self._mark(old)
        if len(self._evicted) >= SPILL_BATCH:
            self._write()

    def _write(self) -> None:
        self._db.executemany(
            f"INSERT OR REPLACE INTO {self._table} VALUES (?, ?)", self._evicted.items()
        )
        self._evicted.clear()

    def __delitem__(self, key: bytes) -> None:
        present = key in self
        self._cache.pop(key, None)
        self._evicted.pop(key, None)
        self._db.execute(f"DELETE FROM {self._table} WHERE key = ?", (key,))
        if not present:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._cache or self._load(key) is not _MISSING  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[bytes]:
        self._write()
        cached = list(self._cache)
        yield from cached
        rows = self._db.execute(f"SELECT key FROM {self._table}").fetchall()
        yield from (key for (key,) in rows if key not in self._cache)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def rows(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, encoded value), by key (``load`` takes them back): a store keyed
        by them inserts in order, appending pages, instead of splitting them at random."""
        for key, value in self._cache.items():
            self._evicted[key] = self._encode(value)
            self._mark(key)
        self._cache.clear()
        self._write()
        cursor = self._db.execute(f"SELECT key, value FROM {self._table} ORDER BY key")
        while batch := cursor.fetchmany(SPILL_BATCH):
            yield from batch

    def load(self, rows: Iterable[tuple[bytes, bytes]]) -> None:
        """Add the rows ``rows`` gave (keys not yet in the mapping)."""
        rows = iter(rows)
        while batch := list(itertools.islice(rows, SPILL_BATCH)):
            self._db.executemany(f"INSERT INTO {self._table} VALUES (?, ?)", batch)
            for key, _ in batch:
                self._mark(key)
