"""One store's SQL on both engines: a PostgreSQL connection that answers as an SQLite one.

A store beside the instance index (the ledger, consent, federation and transfer state)
keeps one implementation of its logic, written against the subset of ``sqlite3``'s
connection it uses (``execute`` and ``executemany`` with ``?`` placeholders, rows as
tuples, ``rowcount``), and runs it on PostgreSQL through ``PgConnection``. What differs is
kept out of the shared SQL: each engine creates its schema in its own migrations (SQLite's
in node/store/sqlite.py, PostgreSQL's through node/store/postgres.py ``migrate`` under the
store's own component), and the shared SQL is what both engines speak alike (``INSERT ...
ON CONFLICT``, ``RETURNING``, no ``INSERT OR REPLACE``, no ``rowid``).

Errors are the node's, as on SQLite (node/store/sqlite.py ``NodeErrorConnection``):
StorageFull when the server's disk is full, StorageFailed for any other failure of the
server, never psycopg's own.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

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
