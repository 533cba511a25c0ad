"""Content-addressed DICOM Part 10 files on disk, indexed in SQLite.

Layout under the data directory::

    objects/ab/<sha256>.dcm    one file per instance, named by the SHA-256 of its bytes
    tmp/                       files being received; emptied at start-up
    index.sqlite               patients, studies, series, instances (WAL, synchronous=FULL)

Durability rule (the one place it is written): an instance is acknowledged only after
its file is fsynced in its final place and its index row is committed. The two flushes
run at once (the device sees them together rather than one after the other), so for
that moment a committed row may point to a file not yet durable: the same transaction
that indexes an instance names it in ``unconfirmed``, and the entry is removed once the
file's fsync has returned. At start-up every instance still named there (a stop between
the commit and the end of the fsync: never acknowledged) has its file checked against
its digest: a good file is fsynced and kept, a missing or bad one (a power cut) loses
its index row, logged. A crash before the commit leaves at most an unindexed object
file, which is harmless and is indexed again when the instance is re-sent. So after
start-up no index row points to a file that is not durable, and no instance that was
acknowledged is ever missing. ``arrivals_after`` never reaches an unconfirmed row, so a
position it hands out is never taken back.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

from pydicom.dataset import FileDataset

from node.errors import BadInput, ImageShareError, NotFound, PayloadTooLarge, StorageFull
from node.store.attributes import INDEXED, TABLES, UNIQUE_KEYS, Level
from node.store.dicom_header import (
    InflateLimits,
    InstanceHeader,
    parse_header,
    read_dataset,
    read_to_pixels,
)
from node.store.off_loop import run_off_loop
from node.store.queries import (
    Database,
    Filter,
    Query,
    QueryResult,
    StudyPage,
    matching_instance_uids,
    run_query,
    study_list,
)
from node.store.sqlite import (
    Migration,
    add_missing_columns,
    connect_durable,
    is_disk_full,
    open_database,
)

CHUNK = 1024 * 1024
# Values bound in one ``IN (...)`` list: far below SQLite's limit on bound parameters.
_IN_LIST_LIMIT = 500
# Above every rowid: what ``arrivals_after`` stops at when no row is unconfirmed.
_NO_ROWID = 2**63 - 1

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class StagedInstance:
    """A received file, hashed and parsed, not yet durable or indexed."""

    tmp_path: Path
    digest: str
    size: int
    header: InstanceHeader


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    digest: str
    size: int


@dataclass(frozen=True)
class InstanceRecord:
    """One indexed instance and where its bytes are."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    digest: str
    size: int
    path: Path


@dataclass(frozen=True)
class IndexedSeries:
    """One series of a study as the index holds it."""

    series_instance_uid: str
    modality: str
    description: str
    number: int | None = None  # Series Number, where the files give one


@dataclass(frozen=True)
class Arrival:
    """An indexed instance, with its place in the order instances were indexed."""

    position: int  # increases with every instance indexed; never reused
    sop_instance_uid: str
    study_instance_uid: str


def fsync_path(path: Path) -> None:
    """Make a file's bytes durable, or a rename or creation in directory ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_writeback(fd: int) -> None:
    """Start writing a staged file's bytes to the device without waiting, so that its
    fsync at commit finds them written or on their way (Linux; elsewhere nothing)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the file system holding ``path`` in one call."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _raise_if_disk_full(exc: OSError) -> None:
    if exc.errno in (28, 122):  # ENOSPC, EDQUOT
        raise StorageFull("the node's disk is full; nothing was stored") from exc


@contextlib.contextmanager
def _removed_on_failure(tmp_path: Path) -> Iterator[None]:
    """Staging into ``tmp_path``: on any failure the file is removed, and a full disk is
    StorageFull."""
    try:
        yield
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        _raise_if_disk_full(exc)
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


# Columns the store keeps beside the indexed attributes, per table.
_BOOKKEEPING: dict[str, dict[str, type]] = {
    "studies": {"source": str, "created_at": float},
    "series": {},
    "instances": {"digest": str, "size": int, "received_at": float},
}
_INDEXES = {
    "studies": [["patient_id"], ["study_date"], ["accession_number"]],
    # By study and modality, not study alone: ModalitiesInStudy's per-study EXISTS then
    # reads one index entry. With the study's index apart, SQLite (which keeps no
    # statistics) took the modality's instead and read every series of the modality for
    # each study: seconds at 10^6 instances.
    "series": [["study_instance_uid", "modality"], ["modality"]],
    "instances": [["series_instance_uid"], ["study_instance_uid"], ["digest"]],
}


def index_name(table: str, columns: Sequence[str]) -> str:
    """The name of the index of ``table`` on ``columns``, on every backend."""
    return f"idx_{table}_{'_'.join(columns)}"


# The series' index by study alone, which (study_instance_uid, modality) replaced.
SUPERSEDED_SERIES_INDEX = index_name("series", ["study_instance_uid"])


def _table_spec(level: Level) -> dict[str, Any]:
    """A table's columns, from the indexed attributes: its level's unique key, the
    unique keys of the levels above it (not the patient's: studies hold that), its
    attributes, then the store's own columns."""
    table = TABLES[level]
    keys = [UNIQUE_KEYS[level]] + [UNIQUE_KEYS[k] for k in (Level.SERIES, Level.STUDY) if k < level]
    mine = [a for a in INDEXED if TABLES[a.level] == table]
    columns: dict[str, type] = {}
    for attribute in [*keys, *mine]:
        columns.setdefault(str(attribute.column), int if attribute.integer else str)
    return {
        "columns": {**columns, **_BOOKKEEPING[table]},
        "pk": UNIQUE_KEYS[level].column,
        "indexes": _INDEXES[table],
    }


SCHEMA: dict[str, dict[str, Any]] = {
    TABLES[level]: _table_spec(level) for level in (Level.STUDY, Level.SERIES, Level.INSTANCE)
}
_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL"}


def create_declared_schema(conn: sqlite3.Connection) -> None:
    """Create the index tables and indexes the declaration calls for, where missing, and
    add the declared columns an older table lacks (new ones hold NULL until re-indexed).

    Idempotent: it is the first migration, and is appended again to MIGRATIONS when an
    attribute is declared (the version-1 snapshot in tests/schemas fails until it is).
    Names and types are those the index has always had.
    """
    for table, spec in SCHEMA.items():
        columns = {name: _SQL_TYPES[kind] for name, kind in spec["columns"].items()}
        definitions = [
            f"{name} {kind}{' PRIMARY KEY' if name == spec['pk'] else ''}"
            for name, kind in columns.items()
        ]
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(definitions)})")
        add_missing_columns(conn, table, columns)
        for indexed in spec["indexes"]:
            conn.execute(
                f"CREATE INDEX IF NOT EXISTS {index_name(table, indexed)}"
                f" ON {table} ({', '.join(indexed)})"
            )


def _index_series_by_study_and_modality(conn: sqlite3.Connection) -> None:
    create_declared_schema(conn)
    conn.execute(f"DROP INDEX IF EXISTS {SUPERSEDED_SERIES_INDEX}")


# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (
    create_declared_schema,
    # 2: series gain Timezone Offset From UTC and Performed Procedure Step Start Date/Time.
    create_declared_schema,
    # 3: instances indexed whose file's fsync had not yet returned (module docstring).
    "CREATE TABLE IF NOT EXISTS unconfirmed (sop_instance_uid TEXT PRIMARY KEY)",
    # 4: series indexed by (study, modality) instead of by study alone (_INDEXES).
    _index_series_by_study_and_modality,
)


class InstanceStoreBase:
    """What every backend does alike: staged files (``tmp_path``) and stored ones
    (``InstanceRecord.path``, on local disk) read within the limits, and the index's
    instance lookups over the backend's ``_rows``."""

    inflate_limits: InflateLimits
    tmp_dir: Path
    _INSTANCE_ORDER = "series_instance_uid, instance_number, sop_instance_uid"

    def stage(self, source: IO[bytes], declared_size: int | None = None) -> StagedInstance:
        raise NotImplementedError

    def _rows(self, sql: str, args: Sequence[Any]) -> list[Any]:
        """The rows (by column name) of a statement with ``?`` placeholders."""
        raise NotImplementedError

    def _order(self, terms: str) -> str:
        """ORDER BY terms in the backend's SQL (NULLs first when ascending, as SQLite)."""
        return terms

    def stored_path(self, digest: str) -> Path:
        """The local file of an indexed instance's bytes."""
        raise NotImplementedError

    def _record(self, row: Any) -> InstanceRecord:
        return InstanceRecord(
            sop_instance_uid=row["sop_instance_uid"],
            series_instance_uid=row["series_instance_uid"],
            study_instance_uid=row["study_instance_uid"],
            sop_class_uid=row["sop_class_uid"],
            transfer_syntax_uid=row["transfer_syntax_uid"],
            instance_number=row["instance_number"],
            digest=row["digest"],
            size=row["size"],
            path=self.stored_path(row["digest"]),
        )

    def instances(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[InstanceRecord]:
        """Instances of a study (optionally one series, or one instance), in a stable order.

        Raises NotFound when nothing matches.
        """
        sql = "SELECT * FROM instances WHERE study_instance_uid = ?"
        args: list[str] = [study_uid]
        if series_uid is not None:
            sql += " AND series_instance_uid = ?"
            args.append(series_uid)
        if sop_instance_uid is not None:
            sql += " AND sop_instance_uid = ?"
            args.append(sop_instance_uid)
        rows = self._rows(f"{sql} ORDER BY {self._order(self._INSTANCE_ORDER)}", args)
        if not rows:
            what = "instance" if sop_instance_uid else "series" if series_uid else "study"
            raise NotFound(f"no such {what} on this node")
        return self._records(rows)

    def _records(self, rows: Sequence[Any]) -> list[InstanceRecord]:
        return [self._record(r) for r in rows]

    def instance(self, sop_instance_uid: str) -> InstanceRecord:
        rows = self._rows("SELECT * FROM instances WHERE sop_instance_uid = ?", [sop_instance_uid])
        if not rows:
            raise NotFound("no such instance on this node")
        return self._record(rows[0])

    def _query_database(self) -> sqlite3.Connection | Database:
        """Where the query engine (node/store/queries.py) runs this backend's queries."""
        raise NotImplementedError

    def search(self, query: Query) -> QueryResult:
        return run_query(self._query_database(), query)

    def instance_uids_matching(self, filters: Sequence[Filter]) -> list[str]:
        return matching_instance_uids(self._query_database(), filters)

    def study_list(self, page: StudyPage) -> tuple[int, list[dict[str, Any]]]:
        return study_list(self._query_database(), page)

    def patient_ids(self) -> list[str]:
        rows = self._rows(
            "SELECT DISTINCT patient_id FROM studies WHERE COALESCE(patient_id, '') != ''", []
        )
        return [r["patient_id"] for r in rows]

    def studies_of_patient(
        self, patient_id: str, unless_source_starts_with: str | None = None
    ) -> list[str]:
        sql = "SELECT study_instance_uid FROM studies WHERE patient_id = ?"
        args: list[Any] = [patient_id]
        if unless_source_starts_with is not None:
            sql += " AND substr(COALESCE(source, ''), 1, ?) != ?"
            args += [len(unless_source_starts_with), unless_source_starts_with]
        order = self._order("study_date, study_instance_uid")
        return [r["study_instance_uid"] for r in self._rows(f"{sql} ORDER BY {order}", args)]

    def series_of_study(self, study_uid: str) -> list[IndexedSeries]:
        order = self._order("series_number, series_instance_uid")
        rows = self._rows(
            "SELECT series_instance_uid, modality, series_description, series_number FROM series"
            f" WHERE study_instance_uid = ? ORDER BY {order}",
            [study_uid],
        )
        return [
            IndexedSeries(
                r["series_instance_uid"],
                r["modality"] or "",
                r["series_description"] or "",
                r["series_number"],
            )
            for r in rows
        ]

    def stage_bytes(self, data: bytes) -> StagedInstance:
        """Stage an instance already in memory (a DIMSE dataset, a small upload): written in
        one call, hashed in one pass, and its header checked from these bytes rather than
        read back from the file. Raises as ``stage``."""
        if len(data) > self.inflate_limits.max_bytes:
            raise PayloadTooLarge(f"instance of {len(data)} bytes is over the limit")
        tmp_path = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        with _removed_on_failure(tmp_path):
            with open(tmp_path, "wb") as out:
                out.write(data)
                out.flush()
                start_writeback(out.fileno())
            header = parse_header(data, self.inflate_limits)
        return StagedInstance(tmp_path, hashlib.sha256(data).hexdigest(), len(data), header)

    def discard(self, staged: Iterable[StagedInstance]) -> None:
        for item in staged:
            item.tmp_path.unlink(missing_ok=True)

    async def off_loop(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        # Each worker thread opens its own connections (a backend's ``reader`` or pool).
        return await run_off_loop(call, *args, **kwargs)

    def read_dataset(
        self,
        record: InstanceRecord,
        defer_size: int | None = None,
        stop_before_pixels: bool = False,
    ) -> FileDataset:
        """A stored instance as a pydicom dataset, a deflated one inflated within the limits.

        A file stored before the limits held (or changed on disk) may not pass them: it is
        then not served. Raises ImageShareError if the file is missing, unreadable, or
        inflates past the instance limit or the ratio limit.
        """
        with _stored_file_errors(record):
            return read_dataset(record.path, self.inflate_limits, defer_size, stop_before_pixels)

    def read_to_pixels(self, record: InstanceRecord, defer_size: int) -> tuple[FileDataset, int]:
        """A stored instance read up to its pixel data, and where that element starts in its
        file; raises as ``read_dataset``."""
        with _stored_file_errors(record):
            return read_to_pixels(record.path, self.inflate_limits, defer_size)

    def iter_file_chunks(self, record: InstanceRecord) -> Iterator[bytes]:
        with open(record.path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


class SqliteInstanceStore(InstanceStoreBase):
    """The node's instances: durable files plus their SQLite index (the embedded
    backend of ``node.store.protocols.InstanceStore``).

    Safe to use from several threads: writes are serialised by a lock, reads use a
    connection per thread (SQLite WAL lets them run beside the writer).
    """

    def __init__(
        self, data_dir: Path, max_instance_bytes: int = 1024**3, max_inflation_ratio: float = 100.0
    ) -> None:
        self.data_dir = data_dir
        self.objects_dir = data_dir / "objects"
        self.tmp_dir = data_dir / "tmp"
        self.db_path = data_dir / "index.sqlite"
        self.max_instance_bytes = max_instance_bytes
        # One bound for a deflated instance, at ingest and at every read of a stored file.
        self.inflate_limits = InflateLimits(max_instance_bytes, max_inflation_ratio)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._clear_tmp()
        self._writer = open_database(self.db_path, MIGRATIONS, rows_as_dicts=True)
        # Flushes a commit's files while its index row is committed (one commit at a time).
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="instance-flush")
        self._recover_unconfirmed()

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        return connect_durable(self.db_path, rows_as_dicts=True)

    @property
    def reader(self) -> sqlite3.Connection:
        """This thread's read connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _clear_tmp(self) -> None:
        for leftover in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    def close(self) -> None:
        self._flusher.shutdown(wait=True)
        self._writer.close()

    def _recover_unconfirmed(self) -> None:
        """Settle the instances indexed before their file's fsync returned (module docstring)."""
        rows = self._writer.execute(
            "SELECT u.sop_instance_uid, i.digest, i.size FROM unconfirmed u"
            " LEFT JOIN instances i ON i.sop_instance_uid = u.sop_instance_uid"
        ).fetchall()
        if not rows:
            return
        lost: list[tuple[str, str]] = []
        kept_dirs: set[Path] = set()
        for uid, digest, size in rows:
            if digest is None:
                continue
            path = self.object_path(digest)
            if _holds(path, digest, size):
                fsync_path(path)
                kept_dirs.add(path.parent)
                continue
            log.error(
                "instance %s was indexed but its file %s is missing or damaged (the node"
                " stopped before it was durable, so it was never acknowledged): its index"
                " row is removed",
                uid,
                path.name,
            )
            path.unlink(missing_ok=True)
            lost.append((uid, digest))
        if kept_dirs:  # each directory once, however many of its files were kept
            for directory in (*kept_dirs, self.objects_dir):
                fsync_path(directory)
        with self._transaction():
            _remove_rows(self._writer, lost)
            self._writer.execute("DELETE FROM unconfirmed")

    # -- ingest ------------------------------------------------------------------------

    def stage(self, source: IO[bytes], declared_size: int | None = None) -> StagedInstance:
        """Copy a stream to a temporary file while hashing it, then parse its header.

        Raises BadInput (not DICOM, truncated, missing UIDs), PayloadTooLarge, StorageFull.
        Nothing is left behind on failure.
        """
        if declared_size is not None and declared_size > self.max_instance_bytes:
            raise PayloadTooLarge(f"instance of {declared_size} bytes is over the limit")
        tmp_path = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        hasher = hashlib.sha256()
        size = 0
        with _removed_on_failure(tmp_path):
            with open(tmp_path, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > self.max_instance_bytes:
                        raise PayloadTooLarge(
                            f"instance is over the limit of {self.max_instance_bytes} bytes"
                        )
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                start_writeback(out.fileno())
            header = parse_header(tmp_path, self.inflate_limits)
        return StagedInstance(tmp_path, hasher.hexdigest(), size, header)

    def open_staging(self) -> StagingFile:
        """A temporary file to fill chunk by chunk (data arriving from a peer), then stage."""
        return StagingFile(self.tmp_dir / f"{uuid.uuid4().hex}.part", self.inflate_limits)

    def digests_present(self, digests: Sequence[str]) -> set[str]:
        """Which of these SHA-256 digests (hex) belong to an indexed instance."""
        return _indexed_values(self.reader, "digest", digests)

    def object_path(self, digest: str) -> Path:
        return self.objects_dir / digest[:2] / f"{digest}.dcm"

    def commit(self, staged: Sequence[StagedInstance], source: str = "local") -> list[IngestResult]:
        """Make staged instances durable and indexed, all in one batch.

        Files are moved into place and flushed with one file-system sync, then every
        index row is committed in one transaction. Returns one result per instance, in
        order; an instance already indexed is reported as a duplicate and its staged
        copy dropped.
        """
        if not staged:
            return []
        with self._write_lock:
            try:
                return self._commit_locked(staged, source)
            except OSError as exc:
                self.discard(staged)
                _raise_if_disk_full(exc)
                raise

    def _commit_locked(self, staged: Sequence[StagedInstance], source: str) -> list[IngestResult]:
        known = _indexed_values(
            self._writer, "sop_instance_uid", [s.header.sop_instance_uid for s in staged]
        )
        fresh: list[StagedInstance] = []
        seen_in_batch: set[str] = set()
        results: list[IngestResult] = []
        touched_dirs: set[Path] = set()
        for item in staged:
            uid = item.header.sop_instance_uid
            duplicate = uid in known or uid in seen_in_batch
            results.append(_result(item, Outcome.DUPLICATE if duplicate else Outcome.STORED))
            if duplicate:
                item.tmp_path.unlink(missing_ok=True)
                continue
            seen_in_batch.add(uid)
            final = self.object_path(item.digest)
            try:
                final.parent.mkdir()
                touched_dirs.add(self.objects_dir)  # the new directory's own entry
            except FileExistsError:
                pass
            os.replace(item.tmp_path, final)
            touched_dirs.add(final.parent)
            fresh.append(item)
        if not fresh:
            return results
        paths = [self.object_path(item.digest) for item in fresh]
        flushed = self._flusher.submit(_flush, paths, touched_dirs)
        try:
            self._index(fresh, source)
        except sqlite3.OperationalError as exc:
            _wait_quietly(flushed)
            if not is_disk_full(exc):
                raise
            # Nothing was indexed: the files just moved in are unreferenced; free their room.
            for item in fresh:
                self.object_path(item.digest).unlink(missing_ok=True)
            raise StorageFull("the node's disk is full; nothing was stored") from exc
        except BaseException:
            _wait_quietly(flushed)
            raise
        try:
            flushed.result()
        except BaseException:
            # Indexed, yet the files are not durable: take the rows back before failing.
            self._unindex(fresh)
            raise
        try:
            self._confirm(fresh)
        except sqlite3.Error as exc:
            # Durable and indexed all the same: start-up settles (keeps) what stays named.
            log.warning("instances left unconfirmed until the next start-up: %s", exc)
        return results

    def _index(self, fresh: Sequence[StagedInstance], source: str) -> None:
        now = time.time()
        conn = self._writer
        with self._transaction():
            for item in fresh:
                h = index_values(item, source, now)
                for table in ("studies", "series", "instances"):
                    columns = list(SCHEMA[table]["columns"])
                    conn.execute(
                        f"INSERT OR IGNORE INTO {table} ({', '.join(columns)})"
                        f" VALUES ({', '.join('?' * len(columns))})",
                        [h[c] for c in columns],
                    )
                conn.execute(
                    "INSERT OR IGNORE INTO unconfirmed (sop_instance_uid) VALUES (?)",
                    (item.header.sop_instance_uid,),
                )

    def _confirm(self, fresh: Sequence[StagedInstance]) -> None:
        """The files of ``fresh`` are durable: their rows leave ``unconfirmed``. Not synced
        (an entry that a power cut brings back is settled, kept, at start-up)."""
        conn = self._writer
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._transaction():
                _delete_unconfirmed(conn, [i.header.sop_instance_uid for i in fresh])
        finally:
            conn.execute("PRAGMA synchronous=FULL")

    def _unindex(self, fresh: Sequence[StagedInstance]) -> None:
        with self._transaction():
            _remove_rows(self._writer, [(i.header.sop_instance_uid, i.digest) for i in fresh])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite has already rolled back after some errors
                conn.execute("ROLLBACK")
            raise

    def ingest(self, source: IO[bytes], origin: str = "local") -> IngestResult:
        """Stage and commit one instance: durable and indexed when this returns."""
        return self.commit([self.stage(source)], origin)[0]

    # -- reads -------------------------------------------------------------------------

    def _rows(self, sql: str, args: Sequence[Any]) -> list[Any]:
        return self.reader.execute(sql, args).fetchall()

    def stored_path(self, digest: str) -> Path:
        return self.object_path(digest)

    def has_instance(self, sop_instance_uid: str) -> bool:
        row = self.reader.execute(
            "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        return row is not None

    def study_row(self, study_uid: str) -> dict[str, Any]:
        row = self.reader.execute(
            "SELECT * FROM studies WHERE study_instance_uid = ?", (study_uid,)
        ).fetchone()
        if row is None:
            raise NotFound("no such study on this node")
        return dict(row)

    def study_uids(self) -> list[str]:
        return [r[0] for r in self.reader.execute("SELECT study_instance_uid FROM studies")]

    def instance_count(self, study_uid: str) -> int:
        row = self.reader.execute(
            "SELECT COUNT(*) FROM instances WHERE study_instance_uid = ?", (study_uid,)
        ).fetchone()
        return int(row[0])

    def studies_with_digests(self, digests: Sequence[str]) -> list[str]:
        found: list[str] = []
        for part in _chunks(digests):
            rows = self.reader.execute(
                "SELECT DISTINCT study_instance_uid FROM instances WHERE digest IN"
                f" ({','.join('?' * len(part))})",
                part,
            )
            for (uid,) in rows:
                if uid not in found:  # a study may span several pieces
                    found.append(uid)
        return found

    def arrivals_after(self, position: int, limit: int) -> list[Arrival]:
        # The rowid of the instances table only grows: the only rows ever deleted are
        # unconfirmed ones (module docstring), and this stops before the first of them.
        rows = self.reader.execute(
            "SELECT rowid, sop_instance_uid, study_instance_uid FROM instances"
            " WHERE rowid > ? AND rowid < COALESCE((SELECT MIN(i.rowid) FROM instances i"
            " JOIN unconfirmed u ON u.sop_instance_uid = i.sop_instance_uid), ?)"
            " ORDER BY rowid LIMIT ?",
            (position, _NO_ROWID, limit),
        )
        return [Arrival(r[0], r[1], r[2]) for r in rows]

    def _query_database(self) -> sqlite3.Connection:
        return self.reader

    def counts(self) -> dict[str, int]:
        conn = self.reader
        return {
            "studies": conn.execute("SELECT COUNT(*) FROM studies").fetchone()[0],
            "series": conn.execute("SELECT COUNT(*) FROM series").fetchone()[0],
            "instances": conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0],
            "bytes": conn.execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()[0],
        }

    def set_study_source(self, study_uid: str, source: str) -> None:
        with self._write_lock:
            self._writer.execute(
                "UPDATE studies SET source = ? WHERE study_instance_uid = ?", (source, study_uid)
            )


class StagingFile:
    """An instance received in pieces: written and hashed as it comes, then parsed.

    ``finish()`` returns the StagedInstance (BadInput if it is not acceptable DICOM);
    ``abort()`` removes the file. Neither leaves anything behind on failure.
    """

    def __init__(self, tmp_path: Path, limits: InflateLimits) -> None:
        self.tmp_path = tmp_path
        self.limits = limits
        self.max_bytes = limits.max_bytes
        self.size = 0
        self._hasher = hashlib.sha256()
        self._file: IO[bytes] | None = open(tmp_path, "wb")  # noqa: SIM115 - closed in finish/abort

    def write(self, chunk: bytes | memoryview) -> None:
        assert self._file is not None, "staging file already closed"
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(f"instance is over the limit of {self.max_bytes} bytes")
        self._hasher.update(chunk)
        try:
            self._file.write(chunk)
        except OSError as exc:
            self.abort()
            _raise_if_disk_full(exc)
            raise

    @property
    def digest(self) -> str:
        return self._hasher.hexdigest()

    def close(self) -> None:
        """Stop writing (the digest is final); ``finish`` may run later, in another thread."""
        if self._file is not None:
            self._file.flush()
            start_writeback(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> StagedInstance:
        try:
            self.close()
            header = parse_header(self.tmp_path, self.limits)
        except BaseException:
            self.abort()
            raise
        return StagedInstance(self.tmp_path, self.digest, self.size, header)

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self.tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _stored_file_errors(record: InstanceRecord) -> Iterator[None]:
    """A stored file that cannot be read is the node's fault, not the caller's: logged,
    and raised as ImageShareError."""
    try:
        yield
    except FileNotFoundError as exc:
        log.error("stored file %s is missing", record.path.name)
        raise ImageShareError("a stored instance file is missing") from exc
    except (BadInput, PayloadTooLarge) as exc:
        log.error("stored file %s is not served: %s", record.path.name, exc)
        raise ImageShareError(f"a stored instance cannot be read: {exc}") from exc


def _indexed_values(conn: sqlite3.Connection, column: str, values: Sequence[str]) -> set[str]:
    """Which of ``values`` an indexed instance holds in ``column`` (a name from this module,
    never from outside)."""
    found: set[str] = set()
    for part in _chunks(values):
        marks = ",".join("?" * len(part))
        rows = conn.execute(f"SELECT {column} FROM instances WHERE {column} IN ({marks})", part)
        found.update(r[0] for r in rows)
    return found


def _flush(paths: Sequence[Path], directories: Iterable[Path]) -> None:
    """Make files just moved into place durable: one file's fsync and its directories',
    or one file-system sync for a batch."""
    if len(paths) == 1:
        fsync_path(paths[0])
        for directory in directories:
            fsync_path(directory)
    else:
        _sync_filesystem(paths[0])


def _wait_quietly(flushed: Future[None]) -> None:
    """Let a flush end before its commit's failure is raised (its own error adds nothing)."""
    with contextlib.suppress(OSError):
        flushed.result()


def _holds(path: Path, digest: str, size: int) -> bool:
    """Whether ``path`` holds exactly the bytes of ``digest`` (``size`` bytes)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                return False
            return hashlib.file_digest(f, "sha256").hexdigest() == digest
    except FileNotFoundError:
        return False


def _delete_unconfirmed(conn: sqlite3.Connection, uids: Sequence[str]) -> None:
    for part in _chunks(uids):
        conn.execute(
            f"DELETE FROM unconfirmed WHERE sop_instance_uid IN ({','.join('?' * len(part))})",
            part,
        )


def _remove_rows(conn: sqlite3.Connection, instances: Sequence[tuple[str, str]]) -> None:
    """Delete the index rows of (SOP instance UID, digest) pairs, and their series and
    study rows where no instance is left; inside the caller's transaction."""
    for uid, digest in instances:
        row = conn.execute(
            "SELECT series_instance_uid, study_instance_uid FROM instances"
            " WHERE sop_instance_uid = ? AND digest = ?",
            (uid, digest),
        ).fetchone()
        if row is None:
            continue
        series_uid, study_uid = row[0], row[1]
        conn.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (uid,))
        conn.execute("DELETE FROM unconfirmed WHERE sop_instance_uid = ?", (uid,))
        conn.execute(
            "DELETE FROM series WHERE series_instance_uid = ? AND NOT EXISTS"
            " (SELECT 1 FROM instances WHERE series_instance_uid = ?)",
            (series_uid, series_uid),
        )
        conn.execute(
            "DELETE FROM studies WHERE study_instance_uid = ? AND NOT EXISTS"
            " (SELECT 1 FROM instances WHERE study_instance_uid = ?)",
            (study_uid, study_uid),
        )


def _chunks(values: Sequence[str]) -> Iterator[list[str]]:
    """``values`` in pieces small enough for one SQL ``IN (...)`` list."""
    for start in range(0, len(values), _IN_LIST_LIMIT):
        yield list(values[start : start + _IN_LIST_LIMIT])


def index_values(item: StagedInstance, source: str, now: float) -> dict[str, Any]:
    """The values of a staged instance's index rows, by column name (SCHEMA)."""
    values: dict[str, Any] = dict(item.header.values)
    values.update(source=source, created_at=now, received_at=now)
    values.update(digest=item.digest, size=item.size)
    return values


def _result(item: StagedInstance, outcome: Outcome) -> IngestResult:
    h = item.header
    return IngestResult(
        outcome=outcome,
        sop_instance_uid=h.sop_instance_uid,
        series_instance_uid=h.series_instance_uid,
        study_instance_uid=h.study_instance_uid,
        sop_class_uid=h.sop_class_uid,
        digest=item.digest,
        size=item.size,
    )


__all__ = [
    "Arrival",
    "BadInput",
    "IndexedSeries",
    "IngestResult",
    "InstanceRecord",
    "InstanceStoreBase",
    "Outcome",
    "SqliteInstanceStore",
    "StagedInstance",
    "StagingFile",
]
