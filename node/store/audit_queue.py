"""The security audit export's queue: framed syslog messages not yet handed to the collector.

Kept in ``audit_export.sqlite`` in the data directory (WAL, synchronous=NORMAL: a killed
process keeps its queue; a power cut may lose the last messages)::

    queue(id, message)               oldest first; a message leaves once sent
    totals(id=1, queued_bytes, dropped)

Several processes may add (the daemon, and CLI commands such as `imageshare peers add`);
only the daemon's sender takes messages out. The queue is bounded by message count and
bytes: adding past either bound drops the oldest messages, in the same transaction, and
counts them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from node.store.sqlite import Migration, open_database

FILE_NAME = "audit_export.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, message BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    queued_bytes INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO totals (id) VALUES (1);
"""
# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (_SCHEMA,)


@dataclass(frozen=True)
class QueuedMessage:
    message_id: int
    message: bytes


class AuditQueue:
    """The bounded on-disk queue; safe to use from several threads and processes."""

    def __init__(self, data_dir: Path, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._conn = open_database(data_dir / FILE_NAME, MIGRATIONS, synchronous="NORMAL")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add(self, message: bytes) -> int:
        """Queue ``message``; returns how many old messages were dropped to make room."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT INTO queue (message) VALUES (?)", (message,))
                conn.execute(
                    "UPDATE totals SET queued_bytes = queued_bytes + ? WHERE id = 1",
                    (len(message),),
                )
                dropped = self._drop_over_bounds()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return dropped

    def _drop_over_bounds(self) -> int:
        conn = self._conn
        count, queued_bytes = conn.execute(
            "SELECT (SELECT COUNT(*) FROM queue), queued_bytes FROM totals WHERE id = 1"
        ).fetchone()
        dropped = 0
        # Oldest first, one at a time: the loop ends within the few messages over a bound.
        while count > 1 and (count > self.max_messages or queued_bytes > self.max_bytes):
            oldest, size = conn.execute(
                "SELECT id, length(message) FROM queue ORDER BY id LIMIT 1"
            ).fetchone()
            conn.execute("DELETE FROM queue WHERE id = ?", (oldest,))
            count -= 1
            queued_bytes -= size
            dropped += 1
        if dropped:
            conn.execute(
                "UPDATE totals SET queued_bytes = ?, dropped = dropped + ? WHERE id = 1",
                (queued_bytes, dropped),
            )
        return dropped

    def oldest(self, limit: int, after: int = 0) -> list[QueuedMessage]:
        """Up to ``limit`` messages still in the queue, oldest first, from after the id
        ``after`` (the sender's last message written but not yet confirmed)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, message FROM queue WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
        return [QueuedMessage(int(i), bytes(m)) for i, m in rows]

    def remove(self, sent: list[QueuedMessage]) -> None:
        """Take delivered messages out of the queue."""
        if not sent:
            return
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                for item in sent:
                    cursor = conn.execute("DELETE FROM queue WHERE id = ?", (item.message_id,))
                    removed += len(item.message) if cursor.rowcount else 0
                conn.execute(
                    "UPDATE totals SET queued_bytes = MAX(0, queued_bytes - ?) WHERE id = 1",
                    (removed,),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def counts(self) -> tuple[int, int]:
        """(messages queued, messages dropped so far)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT (SELECT COUNT(*) FROM queue), dropped FROM totals WHERE id = 1"
            ).fetchone()
        return int(row[0]), int(row[1])
