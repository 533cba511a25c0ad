"""One store's SQL on both engines: a PostgreSQL connection that answers as an SQLite one.

A store beside the instance index (the ledger, consent, federation and transfer state)
keeps one implementation of its logic, written against the subset of ``sqlite3``'s
connection it uses (``execute`` and ``executemany`` with ``?`` placeholders, rows as
tuples, ``rowcount``), and runs it on PostgreSQL through ``PgConnection``. What differs is
kept out of the shared SQL: each engine creates its schema in its own migrations (SQLite's
in node/store/sqlite.py, PostgreSQL's through node/store/postgres.py ``migrate`` under the
store's own component), and the shared SQL is what both engines speak alike (``INSERT ...
ON CONFLICT``, ``RETURNING``, no ``INSERT OR REPLACE``, no ``rowid``).

A store holds its database as a ``StateDatabase``: on SQLite a ``LockedDatabase``
(node/store/sqlite.py: one file, one connection behind a lock, transactions BEGIN
IMMEDIATE), on PostgreSQL a ``PgDatabase`` (a pool shared by the stores, each transaction
under an advisory lock of the store's own, so that the daemons of one node write one at a
time as SQLite's writers do). A statement that must be right with several daemons writing
at once is one statement (``ON CONFLICT``) or runs in ``transaction()``.

Errors are the node's, as on SQLite (node/store/sqlite.py ``NodeErrorConnection``):
StorageFull when the server's disk is full, StorageFailed for any other failure of the
server, never psycopg's own.
"""

from __future__ import annotations

import contextlib
import functools
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from node.errors import ImageShareError, StorageFailed, StorageFull


@functools.lru_cache(maxsize=512)
def placeholders(sql: str) -> str:
    """SQLite's ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def storage_error(exc: Exception, database: str) -> ImageShareError:
    """A psycopg error as the node's: StorageFull for a full disk, else StorageFailed."""
    import psycopg

    if isinstance(exc, psycopg.errors.DiskFull):
        return StorageFull(f"the PostgreSQL {database} is out of space: {exc}")
    return StorageFailed(f"the PostgreSQL {database} failed: {exc}")


class PgCursor:
    """The rows of one statement, as ``sqlite3.Cursor`` gives them (tuples)."""

    def __init__(self, cursor: Any, database: str) -> None:
        self._cursor = cursor
        self._database = database

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def fetchone(self) -> Any:
        if self._cursor.description is None:
            return None
        return self._fetch(self._cursor.fetchone)

    def fetchall(self) -> list[Any]:
        if self._cursor.description is None:
            return []
        rows: list[Any] = self._fetch(self._cursor.fetchall)
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())

    def _fetch(self, fetch: Any) -> Any:
        import psycopg

        try:
            return fetch()
        except psycopg.Error as exc:
            raise storage_error(exc, self._database) from exc


class PgConnection:
    """A psycopg connection (from a pool, any row factory) spoken to as ``sqlite3``'s."""

    def __init__(self, conn: Any, database: str) -> None:
        self.conn = conn
        self.database = database  # named in errors: "ledger", "consent state", ...

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> PgCursor:
        return self._run(lambda cur: cur.execute(placeholders(sql), list(parameters)))

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> PgCursor:
        rows = [list(row) for row in seq_of_parameters]
        return self._run(lambda cur: cur.executemany(placeholders(sql), rows) if rows else None)

    @property
    def in_transaction(self) -> bool:
        import psycopg

        return bool(self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE)

    def _run(self, statement: Any) -> PgCursor:
        import psycopg
        from psycopg.rows import tuple_row

        cursor = self.conn.cursor(row_factory=tuple_row)
        try:
            statement(cursor)
        except psycopg.Error as exc:
            raise storage_error(exc, self.database) from exc
        return PgCursor(cursor, self.database)


@contextlib.contextmanager
def pooled(pool: Any, database: str) -> Iterator[PgConnection]:
    """A connection of ``pool`` for statements that each commit on their own (autocommit)."""
    import psycopg

    try:
        with pool.connection() as conn:
            yield PgConnection(conn, database)
    except psycopg.Error as exc:
        raise storage_error(exc, database) from exc


@contextlib.contextmanager
def pooled_transaction(pool: Any, database: str) -> Iterator[PgConnection]:
    """A connection of ``pool`` in one transaction: committed when the block ends (the
    commit waits for the server's WAL flush), rolled back on any error."""
    import psycopg

    try:
        with pool.connection() as conn, conn.transaction():
            yield PgConnection(conn, database)
    except psycopg.Error as exc:
        raise storage_error(exc, database) from exc


class SqlRows(Protocol):
    """What the stores read of a statement's result, alike on both engines."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class SqlConnection(Protocol):
    """``sqlite3.Connection`` or ``PgConnection``, as the stores' shared SQL uses them."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> SqlRows: ...

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> SqlRows: ...


class StateDatabase(Protocol):
    """A state store's database on either engine (see the module docstring)."""

    def connection(self) -> AbstractContextManager[SqlConnection]: ...

    def transaction(self) -> AbstractContextManager[SqlConnection]: ...

    def close(self) -> None: ...


# The first key of the state stores' transaction locks (two-key advisory locks, a key
# space apart from the single-key locks of node/store/postgres.py); the second is the
# store's component.
STATE_LOCK_CLASS = 0x1A6E5


def state_lock_key(component: str) -> int:
    return zlib.crc32(component.encode()) & 0x7FFFFFFF


class PgDatabase:
    """A state store's tables in PostgreSQL, spoken to as ``LockedDatabase``'s SQLite file."""

    def __init__(self, pool: Any, component: str, database: str) -> None:
        self.pool = pool
        self.database = database
        self._lock_key = state_lock_key(component)

    def connection(self) -> AbstractContextManager[PgConnection]:
        return pooled(self.pool, self.database)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        """One transaction, committed at the block's end, its writers one at a time across
        every daemon of the node (the lock is released by the commit or rollback)."""
        with pooled_transaction(self.pool, self.database) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(?, ?)", (STATE_LOCK_CLASS, self._lock_key))
            yield conn

    def close(self) -> None:
        """Nothing: the pool is shared by the stores and closed by its owner."""


def open_pg_database(
    pool: Any, migrations: Sequence[Callable[[Any], None]], component: str, database: str
) -> PgDatabase:
    """A store's tables brought to their latest version (``migrate`` under ``component``)."""
    from node.store.postgres import migrate

    migrate(pool, migrations, component=component)
    return PgDatabase(pool, component, database)


def script(sql: str) -> Callable[[Any], None]:
    """A PostgreSQL migration step that runs ``sql`` (statements separated by ';')."""

    def run(conn: Any) -> None:
        conn.execute(sql)

    return run


# SQLite's column types and table options, and PostgreSQL's for the same columns.
_SQLITE_TYPES = {"BLOB": "BYTEA", "INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION"}


def postgresql_schema(sqlite_schema: str) -> str:
    """A store's SQLite schema script as PostgreSQL's: the same tables, columns and keys."""
    schema = sqlite_schema.replace(" WITHOUT ROWID", "")
    return re.sub(r"\b(BLOB|INTEGER|REAL)\b", lambda m: _SQLITE_TYPES[m.group(1)], schema)
