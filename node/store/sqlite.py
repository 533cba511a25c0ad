"""How the node opens its SQLite databases: the one place their durability is set.

Every database is in WAL mode (readers run beside the one writer), in autocommit mode
(transactions are explicit BEGIN ... COMMIT), usable from several threads behind the
caller's own lock, and waits for another process's write lock instead of failing at
once. With ``synchronous=FULL`` a COMMIT returns only after the WAL is fsynced: that is
what "committed" means wherever the node acknowledges something.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Literal

Synchronous = Literal["FULL", "NORMAL"]


def connect_durable(
    path: Path,
    synchronous: Synchronous = "FULL",
    busy_timeout: float = 10.0,
    rows_as_dicts: bool = False,
) -> sqlite3.Connection:
    """Open ``path`` with the node's settings (see the module docstring).

    ``synchronous="NORMAL"`` is for state that a killed process must keep but that may
    lose its last commits on a power cut (WAL still survives a killed process).
    """
    conn = sqlite3.connect(
        path, check_same_thread=False, isolation_level=None, timeout=busy_timeout
    )
    if rows_as_dicts:
        conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    return conn


class LockedDatabase:
    """One SQLite file opened as above with its schema, used by several threads behind one
    lock (``_lock`` guards ``_db``): the base of the node's small state databases."""

    def __init__(self, path: Path, schema: str) -> None:
        self._lock = threading.Lock()
        self._db = connect_durable(path)
        self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()
