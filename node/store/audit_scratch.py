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
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Generic, TypeVar

from node.store.entry_spool import EntriesFrom, EntrySpool

V = TypeVar("V")
# Entries of a mapping kept in memory (the most recently used); the rest wait on disk.
SPILL_CACHE = 4096


class Scratch:
    """A temporary directory with one scratch database, removed by ``close``."""

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="imageshare-audit-")
        self.path = Path(self._directory.name)
        # Nothing here outlives the run: no journal, no fsync.
        # One thread at a time (a daemon collects in its loop and judges in a worker).
        self.db = sqlite3.connect(
            self.path / "scratch.sqlite", isolation_level=None, check_same_thread=False
        )
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
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
    in an SQLite table (written when they leave the memory, read back when asked)."""

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
        self._spilled = 0  # rows in the table (an upper bound of the keys only there)
        db.execute(f"CREATE TABLE {table} (key BLOB PRIMARY KEY, value BLOB NOT NULL)")

    def __getitem__(self, key: bytes) -> V:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if not self._spilled:
            raise KeyError(key)
        row = self._db.execute(f"SELECT value FROM {self._table} WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        value = self._decode(row[0])
        self._keep(key, value)
        return value

    def __setitem__(self, key: bytes, value: V) -> None:
        self._keep(key, value)
        self._cache.move_to_end(key)

    def _keep(self, key: bytes, value: V) -> None:
        self._cache[key] = value
        while len(self._cache) > self._capacity:
            old, old_value = self._cache.popitem(last=False)
            self._db.execute(
                f"INSERT OR REPLACE INTO {self._table} VALUES (?, ?)",
                (old, self._encode(old_value)),
            )
            self._spilled += 1

    def __delitem__(self, key: bytes) -> None:
        present = key in self
        self._cache.pop(key, None)
        self._db.execute(f"DELETE FROM {self._table} WHERE key = ?", (key,))
        if not present:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if key in self._cache:
            return True
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[bytes]:
        cached = list(self._cache)
        yield from cached
        rows = self._db.execute(f"SELECT key FROM {self._table}").fetchall()
        yield from (key for (key,) in rows if key not in self._cache)

    def __len__(self) -> int:
        return sum(1 for _ in self)
