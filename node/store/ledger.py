"""The ledger on disk: this node's own log and every mirrored peer log, in one database.

``ledger.sqlite`` in the data directory (WAL, synchronous=FULL; ``LedgerStore``), or the
same tables in PostgreSQL (node/store/pg_ledger.py), holds:

    logs      one row per log: origin, log_id = SHA-256(origin), vkey, own?, size, and the
              latest signed checkpoint note (with the cosignatures collected for it)
    entries   (log, idx) -> raw entry bytes and their RFC 6962 leaf hash
    subtrees  (log, level, n) -> hash of the complete subtree of leaves
              [n * 2**level, (n + 1) * 2**level), for every level >= 1
    log_keys  (log, first_size) -> the public key that signs the log's checkpoints of
              size >= first_size (its key history; rows only once a log has rotated)
    witnessed (log_id) -> what this node, as a C2SP tlog-witness, last cosigned of a log

Because every complete subtree hash is stored, any root or proof is O(log n) reads.

Durability rule (the one place it is written): an append is acknowledged only after the
transaction holding its entry, its new subtree hashes and the new size has committed,
which with synchronous=FULL means the WAL is fsynced (on PostgreSQL, flushed). Concurrent
appends share one commit (group commit): the first waiting thread becomes the writer,
takes every append queued so far, commits them together, and wakes the others. The log's
size and tail are read inside the write transaction, so writers in other processes (other
daemons of the node) stay in the one chain.

One implementation of the logic serves both engines (``LedgerStoreBase``): its SQL is
what SQLite and PostgreSQL both speak; an engine gives its connections and its locks.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from node.core.chain import Link, LogChain
from node.core.entries import EntryBody, KeyRotation, LedgerEntry, encode_entry
from node.core.key_rotation import KeyChain, KeyEpoch
from node.core.keys import NodeIdentity, VerifierKey, verifier_key_string
from node.core.merkle import (
    EMPTY_ROOT,
    ZERO_HASH,
    MerkleFrontier,
    SubtreeIndex,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    subtree_indexes,
    tree_root,
)
from node.core.notes import (
    Checkpoint,
    NoteSignature,
    parse_note,
    parse_vkey,
    sign_note,
    verify_cosignature,
    verify_note,
)
from node.core.origins import log_id_bytes
from node.core.tiles import TILE_WIDTH, TileRef, encode_entry_bundle
from node.core.witness import AddCheckpoint, Witnessed, judge, with_cosignature
from node.errors import (
    BadInput,
    Conflict,
    ImageShareError,
    NotFound,
    Unauthorized,
)
from node.store.pg_sql import PgConnection
from node.store.sqlite import Migration, add_missing_columns, connect_durable, migrate

LEDGER_FILE = "ledger.sqlite"
# A connection of either engine: the store's SQL is what both speak (node/store/pg_sql.py).
Connection = sqlite3.Connection | PgConnection
VERIFY_BATCH = 4096

SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY,
    log_id BLOB NOT NULL UNIQUE,
    origin TEXT NOT NULL UNIQUE,
    vkey TEXT NOT NULL,
    own INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    checkpoint TEXT,
    checkpoint_size INTEGER,
    checkpoint_time INTEGER
);
CREATE TABLE IF NOT EXISTS entries (
    log INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    PRIMARY KEY (log, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subtrees (
    log INTEGER NOT NULL,
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (log, level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_keys (
    log INTEGER NOT NULL,
    first_size INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    PRIMARY KEY (log, first_size)
) WITHOUT ROWID;
"""
# What this node, as a C2SP tlog-witness, last cosigned of each log (node.core.witness),
# and the latest checkpoint of the own log that met its witness policy.
WITNESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS witnessed (
    log_id BLOB PRIMARY KEY,
    origin TEXT NOT NULL,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    checkpoint TEXT NOT NULL
) WITHOUT ROWID;
"""


def _add_witness_state(conn: sqlite3.Connection) -> None:
    for statement in WITNESS_SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    add_missing_columns(conn, "logs", {"published": "TEXT"})


# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (SCHEMA, _add_witness_state)


class LedgerCorrupt(ImageShareError):
    """The stored ledger lacks a row it must hold: the store was damaged or tampered with."""


class KeyRotated(ImageShareError):
    """The log's key rotated: the signing key offered is not the one in force."""


@dataclass(frozen=True)
class LogInfo:
    """One stored log as /ledger/logs lists it (log_id in lowercase hex, root at size)."""

    origin: str
    log_id: str
    vkey: str
    size: int
    own: bool = False
    root: bytes = EMPTY_ROOT

    def as_json(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "log_id": self.log_id,
            "vkey": self.vkey,
            "size": self.size,
            "root": base64.b64encode(self.root).decode(),
        }


@dataclass(frozen=True)
class AppendResult:
    """An acknowledged (durable) append: where the entry is and what it is."""

    index: int
    leaf_hash: bytes
    entry: bytes


@dataclass(frozen=True)
class Problem:
    """One integrity problem; ``index`` is the first entry it concerns, if any."""

    index: int | None
    message: str


@dataclass
class IntegrityReport:
    """What a full check of one stored log found."""

    origin: str
    size: int
    checked: int = 0
    checkpoint_size: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_index(self) -> int | None:
        indexes = [p.index for p in self.problems if p.index is not None]
        return min(indexes) if indexes else None

    def as_json(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "size": self.size,
            "checked": self.checked,
            "checkpoint_size": self.checkpoint_size,
            "ok": self.ok,
            "first_bad_index": self.first_bad_index,
            "problems": [{"index": p.index, "message": p.message} for p in self.problems],
        }


class _Reader:
    """HashReader over one log's stored hashes (level 0 from entries, others from subtrees)."""

    def __init__(self, conn: Connection, log: int) -> None:
        self.conn = conn
        self.log = log

    def read_hashes(self, indexes: Sequence[SubtreeIndex]) -> list[bytes]:
        hashes = []
        for level, n in indexes:
            if level == 0:
                row = self.conn.execute(
                    "SELECT leaf_hash FROM entries WHERE log=? AND idx=?", (self.log, n)
                ).fetchone()
            else:
                row = self.conn.execute(
                    "SELECT hash FROM subtrees WHERE log=? AND level=? AND idx=?",
                    (self.log, level, n),
                ).fetchone()
            if row is None:
                raise LedgerCorrupt(f"the ledger store lacks the hash of subtree {level}/{n}")
            hashes.append(bytes(row[0]))
        return hashes


class WriterLock(Protocol):
    """Which one of the daemons of a node runs its replication, witness collection and
    forwarding."""

    def try_take(self) -> bool:
        """True if this daemon holds the lock now (taking it if it is free)."""
        ...

    def release(self) -> None: ...


class SoleWriter:
    """The writer lock of a node with one daemon (the embedded ledger): always held."""

    def try_take(self) -> bool:
        return True

    def release(self) -> None:
        pass


class LedgerStoreBase:
    """The ledger database of one node: its own log and its mirrors of peers' logs.

    One implementation on both engines; an engine gives ``reading`` (a connection for
    reads), ``write_transaction`` (one transaction, serialised with every other writer of
    the ledger, in this process or another) and ``close``.
    """

    def __init__(self) -> None:
        self._logs: dict[str, StoredLog] = {}
        self._roots: dict[int, tuple[int, bytes]] = {}  # log row -> (size, root) last listed

    def reading(self) -> contextlib.AbstractContextManager[Connection]:
        raise NotImplementedError

    def write_transaction(self) -> contextlib.AbstractContextManager[Connection]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def log_writer_lock(self) -> WriterLock:
        """A lock held by one daemon of the node at a time (with SQLite, the only one)."""
        return SoleWriter()

    def snapshot(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection reading one consistent state of the ledger until the block ends."""
        raise NotImplementedError

    def read_one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """The first row one read statement gives (None if none)."""
        with self.reading() as conn:
            return conn.execute(sql, args).fetchone()

    def read_all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Every row one read statement gives."""
        with self.reading() as conn:
            return conn.execute(sql, args).fetchall()

    def _row(self, conn: Connection, origin: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = conn.execute(
            "SELECT id, own, vkey FROM logs WHERE origin=?", (origin,)
        ).fetchone()
        return row

    def own_log(self, origin: str, vkey: str = "") -> OwnLog:
        """This node's own log (created empty on first use); Conflict if it is a mirror."""
        with self.write_transaction() as conn:
            row = self._row(conn, origin)
            if row is None:
                conn.execute(
                    "INSERT INTO logs (log_id, origin, vkey, own) VALUES (?, ?, ?, 1)",
                    (log_id_bytes(origin), origin, vkey),
                )
                row = self._row(conn, origin)
            elif not row[1]:
                raise Conflict(f"{origin} is stored as a mirrored peer log, not this node's")
            elif vkey and row[2] != vkey and not self._has_key_history(conn, row[0]):
                # Once the log has rotated, its entries, not the caller, say its key.
                conn.execute("UPDATE logs SET vkey=? WHERE id=?", (vkey, row[0]))
        assert row is not None
        log = self._logs.get(origin)
        if not isinstance(log, OwnLog):
            log = OwnLog(self, row[0], origin)
            self._logs[origin] = log
        return log

    def mirror(self, origin: str, vkey: str) -> MirrorLog:
        """The mirror of a peer's log (created empty on first use, first key ``vkey``).

        Once created, the mirror's own key chain (its first key and the rotations its
        entries prove) says which key verifies what. Raises BadInput for a malformed vkey
        and Conflict if the origin is this node's own log or ``vkey`` is none of the keys
        the mirror holds (a roster key ahead of the mirror, confirming a compromised-key
        rotation, reaches the mirror through ``log_by_id`` and ``MirrorLog.extend``).
        """
        key = parse_vkey(vkey)
        if key.name != origin:
            raise BadInput(f"verifier key names {key.name!r}, not {origin!r}")
        with self.write_transaction() as conn:
            row = self._row(conn, origin)
            if row is None:
                conn.execute(
                    "INSERT INTO logs (log_id, origin, vkey, own) VALUES (?, ?, ?, 0)",
                    (log_id_bytes(origin), origin, vkey),
                )
                row = self._row(conn, origin)
            elif row[1]:
                raise Conflict(f"{origin} is this node's own log")
            elif row[2] != vkey and not self._holds_key(conn, row[0], key.public_key):
                raise Conflict(f"{origin} is already mirrored under another key")
        assert row is not None
        log = self._logs.get(origin)
        if not isinstance(log, MirrorLog):
            log = MirrorLog(self, row[0], origin)
            self._logs[origin] = log
        return log

    @staticmethod
    def _has_key_history(conn: Connection, rowid: int) -> bool:
        return conn.execute("SELECT 1 FROM log_keys WHERE log=?", (rowid,)).fetchone() is not None

    @staticmethod
    def _holds_key(conn: Connection, rowid: int, public_key: bytes) -> bool:
        """True if ``public_key`` is in the stored key history of log ``rowid``."""
        row = conn.execute(
            "SELECT 1 FROM log_keys WHERE log=? AND public_key=?", (rowid, public_key)
        ).fetchone()
        return row is not None

    def logs(self) -> list[LogInfo]:
        """Every log this node can serve, its own first: a mirror once it holds a checkpoint.

        A mirror is created empty before anything of it is verified; until a signed
        checkpoint of it is stored there is nothing of it to serve, so it is not listed.
        """
        with self.reading() as conn:
            rows = conn.execute(
                "SELECT id, origin, log_id, vkey, size, own FROM logs"
                " WHERE own = 1 OR checkpoint IS NOT NULL ORDER BY own DESC, origin"
            ).fetchall()
            infos = []
            for rowid, origin, log_id, vkey, size, own in rows:
                root = self._roots.get(rowid)
                if root is None or root[0] != size:
                    # Logs only grow: a root at a size never changes, so one per log is kept.
                    root = self._roots[rowid] = (size, tree_root(_Reader(conn, rowid), size))
                infos.append(LogInfo(origin, bytes(log_id).hex(), vkey, size, bool(own), root[1]))
        return infos

    def witnessed(self, origin: str) -> Witnessed | None:
        """What this node last cosigned, as a witness, of the log ``origin`` (None: never)."""
        row = self.read_one(
            "SELECT size, root FROM witnessed WHERE log_id=?", (log_id_bytes(origin),)
        )
        return None if row is None else Witnessed(int(row[0]), bytes(row[1]))

    def witnessed_note(self, origin: str) -> str | None:
        """The note of the checkpoint this node last cosigned of ``origin`` (None: never)."""
        row = self.read_one(
            "SELECT checkpoint FROM witnessed WHERE log_id=?", (log_id_bytes(origin),)
        )
        return None if row is None else str(row[0])

    def witness(self, request: AddCheckpoint, trusted: Sequence[VerifierKey] | None) -> Witnessed:
        """Judge an add-checkpoint request against what was last cosigned for its log and,
        if it holds, remember its checkpoint, in one transaction: of two racing requests
        from one old size, only one moves the witness on. Raises WitnessRefusal.
        """
        origin = request.checkpoint.origin
        with self.write_transaction() as conn:
            row = conn.execute(
                "SELECT size, root FROM witnessed WHERE log_id=?", (log_id_bytes(origin),)
            ).fetchone()
            held = None if row is None else Witnessed(int(row[0]), bytes(row[1]))
            accepted = judge(request, trusted, held)
            conn.execute(
                "INSERT INTO witnessed (log_id, origin, size, root, checkpoint)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (log_id) DO UPDATE SET"
                " size=excluded.size, root=excluded.root, checkpoint=excluded.checkpoint",
                (log_id_bytes(origin), origin, accepted.size, accepted.root, request.note),
            )
        return accepted

    def log_by_id(self, log_id_hex: str) -> StoredLog | None:
        """The stored log with this hex log ID, or None."""
        try:
            log_id = bytes.fromhex(log_id_hex)
        except ValueError:
            return None
        if len(log_id) != 32:
            return None
        row = self.read_one("SELECT id, origin, own FROM logs WHERE log_id=?", (log_id,))
        if row is None:
            return None
        log = self._logs.get(row[1])
        if log is None:
            log = (OwnLog if row[2] else MirrorLog)(self, row[0], row[1])
            self._logs[row[1]] = log
        return log


class LedgerStore(LedgerStoreBase):
    """The ledger in ``ledger.sqlite`` of a data directory (the embedded backend)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__()
        self.path = Path(data_dir) / LEDGER_FILE
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        # Serialises this process's writers; other processes are held off by SQLite's lock.
        self.write_lock = threading.RLock()
        self.writer = self._connect()
        migrate(self.writer, LEDGER_FILE, MIGRATIONS)

    def _connect(self) -> sqlite3.Connection:
        # Statements raise StorageFull or StorageFailed, never sqlite3's errors (a full
        # disk, a damaged file, a lock another process held past the timeout).
        conn = connect_durable(self.path, busy_timeout=30.0, node_errors=True)
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    @property
    def reader(self) -> sqlite3.Connection:
        """This thread's read connection (WAL readers never block the writer)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def reading(self) -> Iterator[Connection]:
        yield self.reader

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Connection]:
        conn = self.reader
        conn.execute("BEGIN")  # deferred: the first read takes the snapshot
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    @contextlib.contextmanager
    def write_transaction(self) -> Iterator[Connection]:
        """BEGIN IMMEDIATE ... COMMIT on the writer connection; rolled back on any error."""
        with self.write_lock:
            conn = self.writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (e.g. disk full during COMMIT).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()


class StoredLog:
    """One log held in the store: read access, roots, proofs and a full integrity check."""

    def __init__(self, store: LedgerStoreBase, rowid: int, origin: str) -> None:
        self.store = store
        self.rowid = rowid
        self.origin = origin
        self.log_id = log_id_bytes(origin)
        self._tail: LogChain | None = None

    @property
    def vkey(self) -> str:
        row = self.store.read_one("SELECT vkey FROM logs WHERE id=?", (self.rowid,))
        return str(row[0])

    def size(self) -> int:
        """The number of committed entries."""
        return int(self.store.read_one("SELECT size FROM logs WHERE id=?", (self.rowid,))[0])

    def _check_size(self, size: int, what: str = "size") -> int:
        current = self.size()
        if not isinstance(size, int) or not 0 <= size <= current:
            raise BadInput(f"{what} {size} is outside the log's size {current}")
        return current

    def entry(self, index: int) -> bytes:
        """Raw bytes of entry ``index``; NotFound if the log is shorter."""
        row = self.store.read_one(
            "SELECT data FROM entries WHERE log=? AND idx=?", (self.rowid, index)
        )
        if row is None or index >= self.size():
            raise NotFound(f"{self.origin} has no entry {index}")
        return bytes(row[0])

    def entries(self, start: int, end: int) -> list[bytes]:
        """Raw bytes of entries start..end-1; BadInput unless 0 <= start <= end <= size."""
        self._check_size(end, "end")
        if not 0 <= start <= end:
            raise BadInput(f"start {start} must be between 0 and end {end}")
        rows = self.store.read_all(
            "SELECT idx, data FROM entries WHERE log=? AND idx>=? AND idx<? ORDER BY idx",
            (self.rowid, start, end),
        )
        if len(rows) != end - start:
            raise LedgerCorrupt(f"the ledger store lacks entries of {self.origin}")
        return [bytes(data) for _, data in rows]

    def leaf_hash(self, index: int) -> bytes:
        """The stored leaf hash of entry ``index``; NotFound if the log is shorter."""
        row = self.store.read_one(
            "SELECT leaf_hash FROM entries WHERE log=? AND idx=?", (self.rowid, index)
        )
        if row is None or index >= self.size():
            raise NotFound(f"{self.origin} has no entry {index}")
        return bytes(row[0])

    def tile(self, ref: TileRef) -> bytes:
        """The bytes of a C2SP tile or entry bundle of this log (node.core.tiles).

        NotFound unless the log holds all ``ref.width`` hashes (or entries) the tile names;
        a narrower partial tile of what is held is served too (its bytes never change).
        """
        available = ref.available_width(self.size())
        if ref.width > available:
            raise NotFound(f"{self.origin} holds {available} of the tile's {ref.width} hashes")
        first = ref.n * TILE_WIDTH
        if ref.level is None:
            return encode_entry_bundle(self.entries(first, first + ref.width))
        if ref.merkle_level == 0:
            query = "SELECT leaf_hash FROM entries WHERE log=? AND idx>=? AND idx<? ORDER BY idx"
            args: tuple[int, ...] = (self.rowid, first, first + ref.width)
        else:
            query = (
                "SELECT hash FROM subtrees WHERE log=? AND level=? AND idx>=? AND idx<? "
                "ORDER BY idx"
            )
            args = (self.rowid, ref.merkle_level, first, first + ref.width)
        hashes = [bytes(row[0]) for row in self.store.read_all(query, args)]
        if len(hashes) != ref.width:
            raise LedgerCorrupt(f"the ledger store lacks hashes of {self.origin}'s {ref.path()}")
        return b"".join(hashes)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[_Reader]:
        with self.store.reading() as conn:
            yield _Reader(conn, self.rowid)

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root at ``size`` (default: the current size)."""
        if size is None:
            size = self.size()
        else:
            self._check_size(size)
        with self._reader() as reader:
            return tree_root(reader, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 inclusion proof of ``index`` in the tree of ``size``; BadInput if invalid."""
        self._check_size(size)
        with self._reader() as reader:
            return inclusion_proof(reader, index, size)

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        """RFC 9162 consistency proof; BadInput unless 0 <= old <= new <= size."""
        self._check_size(new, "new size")
        with self._reader() as reader:
            return consistency_proof(reader, old, new)

    def key_chain(self) -> KeyChain | None:
        """The log's keys in order (None for an own log opened without a key that never
        rotated)."""
        with self.store.reading() as conn:
            return self._load_chain(conn)

    def _load_chain(self, conn: Connection) -> KeyChain | None:
        rows = conn.execute(
            "SELECT first_size, public_key FROM log_keys WHERE log=? ORDER BY first_size",
            (self.rowid,),
        ).fetchall()
        if rows:
            return KeyChain(self.origin, tuple(KeyEpoch(n, bytes(k)) for n, k in rows))
        (vkey,) = conn.execute("SELECT vkey FROM logs WHERE id=?", (self.rowid,)).fetchone()
        if not vkey:
            return None
        return KeyChain.starting_with(self.origin, parse_vkey(vkey).public_key)

    def _store_chain(self, conn: Connection, chain: KeyChain | None) -> None:
        """Keep the epochs of ``chain`` not stored yet, and its current key as the log's vkey."""
        if chain is None or len(chain.epochs) < 2:
            return
        conn.executemany(
            "INSERT INTO log_keys (log, first_size, public_key) VALUES (?, ?, ?)"
            " ON CONFLICT (log, first_size) DO NOTHING",
            [(self.rowid, e.first_size, e.public_key) for e in chain.epochs],
        )
        vkey = verifier_key_string(self.origin, chain.current_key)
        conn.execute("UPDATE logs SET vkey=? WHERE id=?", (vkey, self.rowid))

    def vkey_at(self, size: int, chain: KeyChain | None = None) -> str:
        """The verifier key of the key that signs this log's checkpoints of ``size``."""
        chain = chain or self.key_chain()
        if chain is None:
            return self.vkey
        return verifier_key_string(self.origin, chain.key_at(size))

    def checkpoint_note(self) -> str | None:
        """The latest signed checkpoint note with its cosignatures, or None if never signed."""
        row = self.store.read_one("SELECT checkpoint FROM logs WHERE id=?", (self.rowid,))
        return None if row is None or row[0] is None else str(row[0])

    def _load_tail(self, conn: Connection) -> LogChain:
        """The right edge of the tree as committed, read in the writer's transaction.

        The size and last leaf are always read from the store (another daemon may have
        appended since this one last wrote); the edge cached from this process's last commit
        is used only if both match it (entries never change once committed, so it is then
        the stored edge).
        """
        size = int(conn.execute("SELECT size FROM logs WHERE id=?", (self.rowid,)).fetchone()[0])
        last = _Reader(conn, self.rowid).read_hashes([(0, size - 1)])[0] if size else ZERO_HASH
        if self._tail is not None and self._tail.size == size and self._tail.last_leaf == last:
            return self._tail
        indexes = subtree_indexes(0, size)
        hashes = _Reader(conn, self.rowid).read_hashes(indexes)
        subtrees = [(level, n, h) for (level, n), h in zip(indexes, hashes, strict=True)]
        return LogChain(MerkleFrontier(size, subtrees), last)

    def _store_rows(
        self,
        conn: Connection,
        first: int,
        entries: Sequence[tuple[bytes, bytes]],
        subtrees: Sequence[tuple[int, int, bytes]],
    ) -> None:
        conn.executemany(
            "INSERT INTO entries (log, idx, data, leaf_hash) VALUES (?, ?, ?, ?)",
            [(self.rowid, first + i, data, lh) for i, (data, lh) in enumerate(entries)],
        )
        conn.executemany(
            "INSERT INTO subtrees (log, level, idx, hash) VALUES (?, ?, ?, ?)",
            [(self.rowid, level, n, h) for level, n, h in subtrees],
        )
        conn.execute("UPDATE logs SET size=? WHERE id=?", (first + len(entries), self.rowid))

    def verify(self, vkey: VerifierKey | str | None = None) -> IntegrityReport:
        """Re-derive everything stored for this log from its entries and report what differs.

        Checks that every entry decodes, chains to the one before, has its stored leaf hash,
        that every stored subtree hash is right and none is missing or extra, and that the
        latest checkpoint is signed, over the root re-derived at its size, by the key in
        force at its size (``vkey``, default the stored one, must be one of the log's keys).
        Never raises for a damaged store: it reports. Everything is read from one snapshot,
        so appends committed meanwhile (by another daemon) are neither seen nor reported.
        """
        with self.store.snapshot() as conn:
            return self._verify(conn, vkey)

    def _verify(self, conn: Connection, vkey: VerifierKey | str | None) -> IntegrityReport:
        size, note, stored_vkey = conn.execute(
            "SELECT size, checkpoint, vkey FROM logs WHERE id=?", (self.rowid,)
        ).fetchone()
        report = IntegrityReport(self.origin, size)
        checkpoint: Checkpoint | None = None
        if note is not None:
            try:
                chain = self._load_chain(conn)
                given = vkey if isinstance(vkey, VerifierKey) else parse_vkey(vkey or stored_vkey)
                if chain is not None and not chain.holds(given.public_key):
                    raise Unauthorized(f"{given} is not one of the log's keys")
                claimed = Checkpoint.parse(parse_note(note)[0]).size
                checkpoint = verify_note(note, self.vkey_at(claimed, chain) if chain else given)
                report.checkpoint_size = checkpoint.size
            except (BadInput, Unauthorized) as exc:
                report.problems.append(Problem(None, f"latest checkpoint: {exc}"))
        tail = LogChain()
        checkpoint_root = EMPTY_ROOT if checkpoint is not None and checkpoint.size == 0 else None
        expected_subtrees = 0
        index = 0
        while index < size and not report.problems:
            end = min(size, index + VERIFY_BATCH)
            rows = conn.execute(
                "SELECT idx, data, leaf_hash FROM entries WHERE log=? AND idx>=? AND idx<? "
                "ORDER BY idx",
                (self.rowid, index, end),
            ).fetchall()
            computed: dict[tuple[int, int], bytes] = {}
            for idx, data, stored_leaf in rows:
                if idx != index:
                    break
                link = tail.append(bytes(data))
                found = _link_problems(link, bytes(stored_leaf))
                if found:
                    report.problems += found
                    break
                for level, n, h in link.completed:
                    computed[(level, n)] = h
                if checkpoint is not None and tail.size == checkpoint.size:
                    checkpoint_root = tail.root()
                index += 1
            if report.problems:
                break
            if index < end:
                report.problems.append(Problem(index, f"entry {index} is missing"))
                break
            bad = self._check_subtrees(conn, computed)
            if bad is not None:
                report.problems.append(bad)
            expected_subtrees += len(computed)
        report.checked = index
        if not report.problems:
            extra_entries = conn.execute(
                "SELECT MIN(idx) FROM entries WHERE log=? AND idx>=?", (self.rowid, size)
            ).fetchone()[0]
            if extra_entries is not None:
                report.problems.append(
                    Problem(int(extra_entries), f"entry {extra_entries} lies beyond the log size")
                )
            stored_subtrees = conn.execute(
                "SELECT COUNT(*) FROM subtrees WHERE log=?", (self.rowid,)
            ).fetchone()[0]
            if stored_subtrees != expected_subtrees:
                report.problems.append(
                    Problem(None, f"{stored_subtrees - expected_subtrees} extra subtree hashes")
                )
        if checkpoint is not None and not report.problems:
            if checkpoint.size > size:
                report.problems.append(
                    Problem(size, f"checkpoint size {checkpoint.size} exceeds the log size {size}")
                )
            elif checkpoint_root != checkpoint.root_hash:
                report.problems.append(
                    Problem(
                        None, f"the root at size {checkpoint.size} differs from the checkpoint's"
                    )
                )
        return report

    def _check_subtrees(
        self, conn: Connection, computed: dict[tuple[int, int], bytes]
    ) -> Problem | None:
        for level in sorted({level for level, _ in computed}):
            ns = sorted(n for lv, n in computed if lv == level)
            stored = dict(
                conn.execute(
                    "SELECT idx, hash FROM subtrees "
                    "WHERE log=? AND level=? AND idx BETWEEN ? AND ?",
                    (self.rowid, level, ns[0], ns[-1]),
                ).fetchall()
            )
            for n in ns:
                if stored.get(n) is None or bytes(stored[n]) != computed[(level, n)]:
                    first, last = n << level, ((n + 1) << level) - 1
                    return Problem(
                        first, f"stored hash of entries {first}..{last} is wrong or missing"
                    )
        return None


def _link_problems(link: Link, stored_leaf: bytes) -> list[Problem]:
    """What is wrong with a stored entry, walked on the log's chain."""
    index, problems = link.index, []
    if link.error is not None:
        problems.append(Problem(index, f"entry {index} does not decode: {link.error}"))
    elif not link.chains:
        problems.append(Problem(index, f"entry {index} does not chain to the entry before it"))
    if link.leaf != stored_leaf:
        problems.append(Problem(index, f"entry {index} does not match its stored leaf hash"))
    return problems


@dataclass
class _PendingAppend:
    items: Sequence[tuple[EntryBody, int]]
    results: list[AppendResult] | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.results is not None or self.error is not None


class OwnLog(StoredLog):
    """This node's own append-only log: group-committed appends, signed checkpoints."""

    def __init__(self, store: LedgerStoreBase, rowid: int, origin: str) -> None:
        super().__init__(store, rowid, origin)
        self._queue: list[_PendingAppend] = []
        self._writing = False
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # a commit finished
        self._arrived = threading.Condition(lock)  # an append was queued
        # Seconds a writer may wait for more appends to share its commit, used only when
        # the last commit was shared (so a lone append never waits).
        self.group_commit_wait = 0.0
        self._last_batch = 0
        self.commits = 0  # transactions written, for observing group commit

    def append(self, body: EntryBody, time: int) -> AppendResult:
        """Append one entry holding ``body`` (prev = the last leaf hash); returns once it
        is durable.

        Raises BadInput if the entry is not well-formed for its kind.
        """
        return self.append_many([(body, time)])[0]

    def append_many(self, items: Sequence[tuple[EntryBody, int]]) -> list[AppendResult]:
        """Append several (body, time) entries in order, durably, all or none."""
        pending = _PendingAppend(list(items))
        with self._cond:
            self._queue.append(pending)
            self._arrived.notify()
            while not pending.done and self._writing:
                self._cond.wait()
            if pending.done:
                return self._result(pending)
            self._writing = True
            if self.group_commit_wait > 0 and self._last_batch > 1:
                # Appends are arriving concurrently: let as many as shared the last commit
                # join this one, waiting at most group_commit_wait.
                target = self._last_batch
                self._arrived.wait_for(lambda: len(self._queue) >= target, self.group_commit_wait)
            batch, self._queue = self._queue, []
            self._last_batch = len(batch)
        try:
            self._commit(batch)
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
        return self._result(pending)

    @staticmethod
    def _result(pending: _PendingAppend) -> list[AppendResult]:
        if pending.error is not None:
            raise pending.error
        assert pending.results is not None
        return pending.results

    def _commit(self, batch: list[_PendingAppend]) -> None:
        """Write every pending append of ``batch`` in one transaction (one fsync)."""
        try:
            with self.store.write_transaction() as conn:
                tail = self._load_tail(conn).copy()
                chain = self._load_chain(conn)
                first = tail.size
                rows: list[tuple[bytes, bytes]] = []
                subtrees: list[tuple[int, int, bytes]] = []
                accepted: list[tuple[_PendingAppend, list[AppendResult]]] = []
                for pending in batch:
                    # Build each request on a scratch tail so a bad one leaves no trace.
                    scratch = tail.copy()
                    try:
                        results, new_rows, new_subtrees, new_chain = self._build(
                            pending, scratch, chain, self.origin
                        )
                    except (BadInput, Unauthorized) as exc:
                        pending.error = exc
                        continue
                    tail, chain = scratch, new_chain
                    rows += new_rows
                    subtrees += new_subtrees
                    accepted.append((pending, results))
                if rows:
                    self._store_rows(conn, first, rows, subtrees)
                    self._store_chain(conn, chain)
                    self.commits += 1
            self._tail = tail
            for pending, results in accepted:
                pending.results = results
        except BaseException as exc:
            self._tail = None
            for pending in batch:
                if not pending.done:
                    pending.error = exc
            if not isinstance(exc, Exception):
                raise

    @staticmethod
    def _build(
        pending: _PendingAppend, tail: LogChain, chain: KeyChain | None, origin: str
    ) -> tuple[
        list[AppendResult],
        list[tuple[bytes, bytes]],
        list[tuple[int, int, bytes]],
        KeyChain | None,
    ]:
        results, rows, subtrees = [], [], []
        for body, time in pending.items:
            data = encode_entry(LedgerEntry.of(tail.last_leaf, time, body))
            index = tail.size
            if isinstance(body, KeyRotation):
                # A rotation must start from the key in force when it is written (two
                # racing rotations cannot both); the node's operator confirms its own.
                rotation = body
                start = chain or KeyChain.starting_with(origin, rotation.old_key)
                chain = start.following([(index, rotation)], confirmed_key=rotation.new_key)
            leaf = leaf_hash(data)
            subtrees += tail.push_leaf(leaf)
            rows.append((data, leaf))
            results.append(AppendResult(index, leaf, data))
        return results, rows, subtrees, chain

    def publish_checkpoint(self, identity: NodeIdentity, time: int) -> str:
        """Sign a checkpoint of the current tree head and keep it; returns the note.

        If the latest checkpoint already covers the current size it is returned as is
        (with its cosignatures): the log only ever signs heads of its one append-only tree,
        so no two of its checkpoints are inconsistent. Raises BadInput if ``identity`` is
        not this log's origin, KeyRotated if its key is not the one in force at the size.
        """
        if identity.origin != self.origin:
            raise BadInput(f"{identity.origin} cannot sign checkpoints of {self.origin}")
        with self.store.write_transaction() as conn:
            size, note, note_size = conn.execute(
                "SELECT size, checkpoint, checkpoint_size FROM logs WHERE id=?", (self.rowid,)
            ).fetchone()
            if note is not None and note_size == size:
                return str(note)
            chain = self._load_chain(conn)
            if chain is not None and chain.key_at(size) != identity.public_key:
                raise KeyRotated(
                    f"{self.origin}'s checkpoints of size {size} are signed by another key"
                )
            root = tree_root(_Reader(conn, self.rowid), size)
            note = sign_note(Checkpoint(self.origin, size, root).body(), identity)
            conn.execute(
                "UPDATE logs SET checkpoint=?, checkpoint_size=?, checkpoint_time=? WHERE id=?",
                (note, size, time, self.rowid),
            )
        return str(note)

    def add_cosignature(
        self,
        signature: NoteSignature,
        vkey: VerifierKey | str | None = None,
        checkpoint_body: str | None = None,
        preferred: Collection[str] = (),
    ) -> str:
        """Keep a witness's cosignature of the latest checkpoint; returns the updated note.

        The caller checks that the cosigner is a roster member. With ``vkey`` the signature
        is verified here (Unauthorized if it does not verify). Conflict if there is no
        checkpoint, or ``checkpoint_body`` is given and is no longer the latest one. A note
        holds at most MAX_SIGNATURES signatures: past that, only a cosignature by a
        ``preferred`` witness is kept, in the place of another (node.core.witness).
        """
        with self.store.write_transaction() as conn:
            (note,) = conn.execute(
                "SELECT checkpoint FROM logs WHERE id=?", (self.rowid,)
            ).fetchone()
            if note is None:
                raise Conflict(f"{self.origin} has not published a checkpoint yet")
            body, _ = parse_note(note)
            if checkpoint_body is not None and checkpoint_body != body:
                raise Conflict("that checkpoint is no longer the latest; cosign the new one")
            if vkey is not None and verify_cosignature(body, signature, vkey) is None:
                raise Unauthorized(f"the cosignature by {signature.name} does not verify")
            updated = with_cosignature(note, signature, preferred)
            if updated is None:
                return str(note)
            conn.execute("UPDATE logs SET checkpoint=? WHERE id=?", (updated, self.rowid))
        return updated

    def publish_if(self, note: str, policy_met: bool) -> None:
        """Keep ``note`` as the latest published checkpoint if ``policy_met`` and it is
        no smaller than the one kept (what the witness policy gates, e.g. proof files)."""
        if not policy_met:
            return
        size = Checkpoint.parse(parse_note(note)[0]).size
        with self.store.write_transaction() as conn:
            (kept,) = conn.execute(
                "SELECT published FROM logs WHERE id=?", (self.rowid,)
            ).fetchone()
            if kept is None or Checkpoint.parse(parse_note(kept)[0]).size <= size:
                conn.execute("UPDATE logs SET published=? WHERE id=?", (note, self.rowid))

    def published_note(self) -> str | None:
        """The latest checkpoint note that met the witness policy, with its cosignatures."""
        row = self.store.read_one("SELECT published FROM logs WHERE id=?", (self.rowid,))
        return None if row is None or row[0] is None else str(row[0])


class MirrorLog(StoredLog):
    """A verified copy of a peer's log, extended only by checked entries and checkpoints."""

    def extend(
        self, entries: Sequence[bytes], note: str, roster_vkey: VerifierKey | str | None = None
    ) -> None:
        """Append ``entries`` (the ones after what is held) so the log matches the signed ``note``.

        Verifies, before storing anything: that the checkpoint is for this origin and every
        entry decodes and chains to the one before (BadInput); that every key rotation among
        the entries moves the log's key chain on (node.core.key_rotation; a compromised-key
        rotation only to ``roster_vkey``, the key the roster confirms); the note's signature
        by the key in force at its size (Unauthorized); and that held + new entries give the
        checkpoint's root (Conflict if not: the checkpoint is inconsistent with what is held,
        or the entries are wrong). A checkpoint older than what is held is checked against
        the held root and not kept. Stores entries, hashes, new keys and the note in one
        transaction.
        """
        body, _ = parse_note(note)
        claimed = Checkpoint.parse(body)
        if claimed.origin != self.origin:
            raise BadInput(f"checkpoint is for {claimed.origin}, not {self.origin}")
        confirmed = None
        if roster_vkey is not None:
            confirmed = (
                roster_vkey if isinstance(roster_vkey, VerifierKey) else parse_vkey(roster_vkey)
            ).public_key
        with self.store.write_transaction() as conn:
            tail = self._load_tail(conn).copy()
            chain = self._load_chain(conn)
            assert chain is not None  # a mirror is always created with its first key
            held = tail.size
            if claimed.size <= held:
                if entries:
                    raise BadInput(f"{self.origin} already holds {held} entries")
                checkpoint = verify_note(note, self.vkey_at(claimed.size, chain))
                if tree_root(_Reader(conn, self.rowid), checkpoint.size) != checkpoint.root_hash:
                    raise Conflict(
                        f"{self.origin} signed a checkpoint at size {checkpoint.size} that is "
                        "inconsistent with the log held"
                    )
                if checkpoint.size == held:
                    conn.execute("UPDATE logs SET checkpoint=? WHERE id=?", (note, self.rowid))
                return
            if len(entries) != claimed.size - held:
                raise BadInput(
                    f"expected {claimed.size - held} entries after {held}, got {len(entries)}"
                )
            first = held
            rows: list[tuple[bytes, bytes]] = []
            subtrees: list[tuple[int, int, bytes]] = []
            rotations: list[tuple[int, KeyRotation]] = []
            for raw in entries:
                raw = bytes(raw)
                link = tail.append(raw)
                if link.error is not None:
                    message = f"{self.origin} entry {link.index}: {link.error}"
                    raise BadInput(message) from link.error
                if not link.chains:
                    raise BadInput(
                        f"{self.origin} entry {link.index} does not chain to the entry before"
                    )
                if link.entry is not None and isinstance(link.entry.body, KeyRotation):
                    rotations.append((link.index, link.entry.body))
                subtrees += link.completed
                rows.append((raw, link.leaf))
            chain = chain.following(rotations, confirmed)
            checkpoint = verify_note(note, self.vkey_at(claimed.size, chain))
            if not tail.gives_root_of(checkpoint):
                raise Conflict(
                    f"{self.origin} entries {first}..{checkpoint.size - 1} do not give the root "
                    "of its signed checkpoint: inconsistent with the log held, or wrong entries"
                )
            self._store_rows(conn, first, rows, subtrees)
            self._store_chain(conn, chain)
            conn.execute(
                "UPDATE logs SET checkpoint=?, checkpoint_size=? WHERE id=?",
                (note, checkpoint.size, self.rowid),
            )
        self._tail = tail
