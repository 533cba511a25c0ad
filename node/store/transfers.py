"""What the node remembers about transfers, in ``transfers.sqlite``.

- ``streams`` / ``stream_instances``: the journal of instance streams, both ways. The
  custodian journals an instance once its last byte was handed to the connection (the
  stream's entries are ``access``), the grantee once it is durably stored (``receipt``),
  so that the entries of a stream cut by a crash of this node are still written, at its
  next start, with what had left or arrived. A stream is closed (``recorded``) once its
  entries are in the ledger.
- ``fetches``: the grantee's fetch jobs, for the admin API and the dashboard (state,
  totals, timing, the refusal rule). Progress within a running job is kept in memory and
  written at its end.

The journal needs no fsync of its own: it is only read back after a restart of this
process (WAL survives a killed process), and the ledger entries it leads to are durable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from node.store.off_loop import run_off_loop
from node.store.sqlite import Migration, open_database

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    stream_id TEXT PRIMARY KEY, kind TEXT NOT NULL, token_id BLOB NOT NULL, peer TEXT NOT NULL,
    started REAL NOT NULL, recorded INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS stream_instances (
    stream_id TEXT NOT NULL, study BLOB NOT NULL, digest BLOB NOT NULL, size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS stream_instances_by_stream ON stream_instances (stream_id);
CREATE TABLE IF NOT EXISTS fetches (
    id TEXT PRIMARY KEY, started REAL NOT NULL, document TEXT NOT NULL);
"""
# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (SCHEMA,)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class StreamedInstance:
    study: bytes
    digest: bytes
    size: int


@dataclass(frozen=True)
class OpenStream:
    """A stream whose ledger entries are not written yet."""

    stream_id: str
    kind: str  # the entries it leads to: Access.kind (sent) or Receipt.kind (arrived)
    token_id: bytes
    peer: str  # the grantee of an access, the custodian of a receipt
    instances: list[StreamedInstance]


class TransferStore:
    """The transfer journal and fetch history of one node; safe across threads."""

    def __init__(self, data_dir: Path) -> None:
        self._lock = threading.Lock()
        self._db = open_database(data_dir / "transfers.sqlite", MIGRATIONS, synchronous="NORMAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    async def off_loop(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking call of this store away from the event loop; returns its result."""
        return await run_off_loop(call, *args, **kwargs)

    # -- stream journal -------------------------------------------------------------------

    def open_stream(
        self, stream_id: str, kind: str, token_id: bytes, peer: str, now: float
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO streams (stream_id, kind, token_id, peer, started)"
                " VALUES (?, ?, ?, ?, ?)",
                (stream_id, kind, token_id, peer, now),
            )

    def journal(self, stream_id: str, instances: Iterable[StreamedInstance]) -> None:
        """Instances that left (custodian) or arrived durably (grantee) in a stream."""
        with self._lock:
            self._db.executemany(
                "INSERT INTO stream_instances (stream_id, study, digest, size) VALUES (?, ?, ?, ?)",
                [(stream_id, i.study, i.digest, i.size) for i in instances],
            )

    def unrecorded_streams(self) -> list[OpenStream]:
        """Streams whose ledger entries still have to be written (oldest first)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT stream_id, kind, token_id, peer FROM streams WHERE recorded = 0"
                " ORDER BY started"
            ).fetchall()
            streams = []
            for stream_id, kind, token_id, peer in rows:
                instances = [
                    StreamedInstance(bytes(study), bytes(digest), size)
                    for study, digest, size in self._db.execute(
                        "SELECT study, digest, size FROM stream_instances WHERE stream_id = ?"
                        " ORDER BY rowid",
                        (stream_id,),
                    )
                ]
                streams.append(OpenStream(stream_id, kind, bytes(token_id), peer, instances))
            return streams

    def mark_recorded(self, stream_id: str) -> None:
        """The stream's entries are in the ledger; its per-instance rows can go."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE streams SET recorded = 1 WHERE stream_id = ?", (stream_id,))
            self._db.execute("DELETE FROM stream_instances WHERE stream_id = ?", (stream_id,))
            self._db.execute("COMMIT")

    # -- fetch history (grantee) ------------------------------------------------------------

    def save_fetch(self, job_id: str, started: float, document: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO fetches (id, started, document) VALUES (?, ?, ?)",
                (job_id, started, document),
            )

    def recent_fetches(self, limit: int = 100) -> list[tuple[str, str]]:
        """(job id, JSON document) of the latest fetches, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, document FROM fetches ORDER BY started DESC LIMIT ?", (limit,)
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def fetch(self, job_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT document FROM fetches WHERE id = ?", (job_id,))
            found: Any = row.fetchone()
        return None if found is None else str(found[0])
