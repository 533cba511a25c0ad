"""How the node opens its SQLite databases: the one place their durability is set, and
the one place their schemas are versioned.

Every database is in WAL mode (readers run beside the one writer), in autocommit mode
(transactions are explicit BEGIN ... COMMIT), usable from several threads behind the
caller's own lock, and waits for another process's write lock instead of failing at
once. With ``synchronous=FULL`` a COMMIT returns only after the WAL is fsynced: that is
what "committed" means wherever the node acknowledges something.

Schema versions: each database's module declares its migrations, a list whose position
``n`` brings the schema from version ``n`` to ``n + 1``; ``PRAGMA user_version`` holds
the version a database is at. ``open_database`` applies the missing steps in one
transaction, so a database is at one version or the next, never between. A database
written by a newer node (a higher version than this code knows) is refused, never
guessed at. Version 0 is a database from before versions were kept (or a new file):
every first migration creates its tables only where they are missing, so it adopts one.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Self

from node.errors import ConfigError, ImageShareError, StorageFailed, StorageFull

Synchronous = Literal["FULL", "NORMAL"]
# One step of a schema: an SQL script (statements separated by ';') or a function that
# changes the database through the connection it is given (inside the transaction).
Migration = str | Callable[[sqlite3.Connection], None]


def is_disk_full(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed for want of disk space."""
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def storage_error(exc: sqlite3.Error, database: str) -> ImageShareError:
    """The node's error for a failure of ``database``: StorageFull for a full disk, else
    StorageFailed (services handle these, never sqlite3's own errors)."""
    if is_disk_full(exc):
        return StorageFull(f"no room left for the {database}; nothing was stored")
    return StorageFailed(f"the {database} database failed: {exc}")


class NodeErrorCursor(sqlite3.Cursor):
    """A cursor whose statements and fetches raise ``storage_error`` instead of sqlite3's
    errors; ``database`` names the database in the message. (Plain try blocks, not a
    context manager: every read of a proof passes here, and a context manager costs more.)"""

    database = "node's"

    def execute(self, sql: str, parameters: Any = (), /) -> Self:
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as exc:
            raise storage_error(exc, self.database) from exc

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> Self:
        try:
            return super().executemany(sql, seq_of_parameters)
        except sqlite3.Error as exc:
            raise storage_error(exc, self.database) from exc

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.Error as exc:
            raise storage_error(exc, self.database) from exc

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.Error as exc:
            raise storage_error(exc, self.database) from exc

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.Error as exc:
            raise storage_error(exc, self.database) from exc


class NodeErrorConnection(sqlite3.Connection):
    """A connection whose ``execute`` and ``executemany`` run on a NodeErrorCursor, so
    that the store that opened it raises only the node's errors (``node_errors=True``)."""

    database = "node's"  # the file's name without .sqlite, set by connect_durable

    def _cursor(self) -> NodeErrorCursor:
        cursor = self.cursor(NodeErrorCursor)
        cursor.database = self.database
        return cursor

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return self._cursor().execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> sqlite3.Cursor:
        return self._cursor().executemany(sql, seq_of_parameters)


def connect_durable(
    path: Path,
    synchronous: Synchronous = "FULL",
    busy_timeout: float = 10.0,
    rows_as_dicts: bool = False,
    node_errors: bool = False,
) -> sqlite3.Connection:
    """Open ``path`` with the node's settings (see the module docstring).

    ``synchronous="NORMAL"`` is for state that a killed process must keep but that may
    lose its last commits on a power cut (WAL still survives a killed process).
    ``node_errors``: statements raise StorageFull or StorageFailed, never sqlite3's errors
    (a NodeErrorConnection), for a store whose callers are services.
    """
    conn = sqlite3.connect(
        path,
        check_same_thread=False,
        isolation_level=None,
        timeout=busy_timeout,
        factory=NodeErrorConnection if node_errors else sqlite3.Connection,
    )
    if isinstance(conn, NodeErrorConnection):
        conn.database = path.stem
    if rows_as_dicts:
        conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    return conn


def open_database(
    path: Path,
    migrations: Sequence[Migration],
    synchronous: Synchronous = "FULL",
    busy_timeout: float = 10.0,
    rows_as_dicts: bool = False,
    node_errors: bool = False,
) -> sqlite3.Connection:
    """``connect_durable``, then bring the schema to the latest version (``migrate``)."""
    conn = connect_durable(path, synchronous, busy_timeout, rows_as_dicts, node_errors)
    try:
        migrate(conn, path.name, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version the database is at (``PRAGMA user_version``)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, name: str, migrations: Sequence[Migration]) -> None:
    """Apply the migrations the database lacks, all in one transaction.

    Raises ConfigError, changing nothing, if the database is at a newer version than
    ``migrations`` reach (it was written by a newer node).
    """
    latest = len(migrations)
    if _refuse_newer(name, schema_version(conn), latest) == latest:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        version = _refuse_newer(name, schema_version(conn), latest)
        for step in migrations[version:]:
            if isinstance(step, str):
                for statement in _statements(step):
                    conn.execute(statement)
            else:
                step(conn)
        conn.execute(f"PRAGMA user_version = {latest}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _refuse_newer(name: str, version: int, latest: int) -> int:
    if version > latest:
        raise ConfigError(
            f"{name} is at schema version {version}, newer than the {latest} this node"
            " knows; run the newer ImageShare release that wrote it"
        )
    return version


def _statements(script: str) -> list[str]:
    """The statements of an SQL script, one by one (``executescript`` would commit)."""
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        # A ';' inside a quoted string or a trigger body does not end the statement.
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n\t;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \n\t;"):
        raise ValueError(f"incomplete SQL statement in a migration: {pending.strip()[:60]}")
    return statements


def add_missing_columns(conn: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """Add each ``name: declaration`` column that ``table`` lacks (a migration step)."""
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    for column, declaration in columns.items():
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


class LockedDatabase:
    """One SQLite file opened as above at its latest schema version, used by several
    threads behind one lock (``_lock`` guards ``_db``): the SQLite engine of the node's
    small state stores (their PostgreSQL engine is node/store/pg_sql.py ``PgDatabase``,
    which answers the same two calls)."""

    def __init__(
        self,
        path: Path,
        migrations: Sequence[Migration],
        synchronous: Synchronous = "FULL",
        node_errors: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        self._db = open_database(path, migrations, synchronous, node_errors=node_errors)

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """The connection, for statements that each commit on their own."""
        with self._lock:
            yield self._db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection in one transaction, committed when the block ends and rolled back
        on any error; BEGIN IMMEDIATE, so that writers of the file go one at a time."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (a full disk) leaves the transaction open: end it too.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
