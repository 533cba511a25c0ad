"""A store's SQLite-style SQL on a real PostgreSQL (node/store/pg_sql.py): placeholders,
rows as tuples, one transaction per block, and the server's failures as the node's."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from node.errors import StorageFailed
from node.store.pg_sql import PgDatabase, pooled, pooled_transaction, postgresql_schema
from node.store.postgres import PostgresSettings, open_pool
from tests.support.postgres import PostgresServer


@pytest.fixture(scope="module")
def pool(postgres: PostgresServer) -> Iterator[Any]:
    pool = open_pool(PostgresSettings(postgres.create_database("pg_sql_seam"), 2))
    with pooled(pool, "test") as conn:
        conn.execute("CREATE TABLE notes (id BIGINT PRIMARY KEY, body BYTEA, label TEXT)")
    yield pool
    pool.close()


def test_statements_with_sqlite_placeholders_return_tuples(pool: Any) -> None:
    with pooled(pool, "test") as conn:
        conn.executemany(
            "INSERT INTO notes (id, body, label) VALUES (?, ?, ?)",
            [(1, b"\x00\x01", "100%"), (2, b"", "?")],
        )
        rows = conn.execute("SELECT id, body, label FROM notes WHERE id <= ? ORDER BY id", (2,))
        assert rows.fetchall() == [(1, b"\x00\x01", "100%"), (2, b"", "?")]
        assert conn.execute("SELECT label FROM notes WHERE id = ?", (9,)).fetchone() is None
        updated = conn.execute("UPDATE notes SET label = 'x' WHERE id >= ?", (1,))
        assert updated.rowcount == 2
        assert conn.execute("DELETE FROM notes WHERE id = 99").fetchall() == []


def test_a_failed_transaction_keeps_nothing_and_fails_as_the_node_s_error(pool: Any) -> None:
    failing = pytest.raises(StorageFailed, match="PostgreSQL test")
    with failing, pooled_transaction(pool, "test") as conn:
        conn.execute("INSERT INTO notes (id, body, label) VALUES (?, ?, ?)", (10, b"a", "a"))
        assert conn.in_transaction
        conn.execute("INSERT INTO notes (id, body, label) VALUES (?, ?, ?)", (10, b"b", "b"))
    with pooled(pool, "test") as conn:
        assert conn.execute("SELECT count(*) FROM notes WHERE id = 10").fetchone() == (0,)
        assert not conn.in_transaction


def test_a_committed_transaction_is_seen_by_another_connection(pool: Any) -> None:
    with pooled_transaction(pool, "test") as conn:
        conn.execute("INSERT INTO notes (id, body, label) VALUES (?, ?, ?)", (20, b"c", "c"))
    with pool.connection() as other:
        assert other.execute("SELECT label FROM notes WHERE id = 20").fetchone() == {"label": "c"}


def test_read_modify_write_transactions_of_two_daemons_go_one_at_a_time(
    pool: Any, postgres: PostgresServer
) -> None:
    # Two pools, as two daemons; each reads the counter and writes it plus one.
    other = open_pool(PostgresSettings(postgres.dsn("pg_sql_seam"), 2))
    daemons = [PgDatabase(p, "counter", "counter") for p in (pool, other, pool, other)]
    with pooled(pool, "test") as conn:
        conn.execute("CREATE TABLE counter (id BIGINT PRIMARY KEY, value BIGINT NOT NULL)")
        conn.execute("INSERT INTO counter VALUES (1, 0)")

    def increment(database: PgDatabase) -> None:
        for _ in range(25):
            with database.transaction() as conn:
                (value,) = conn.execute("SELECT value FROM counter WHERE id = 1").fetchone()
                conn.execute("UPDATE counter SET value = ? WHERE id = 1", (value + 1,))

    try:
        with ThreadPoolExecutor(4) as threads:
            list(threads.map(increment, daemons))
        with daemons[1].connection() as conn:
            assert conn.execute("SELECT value FROM counter").fetchone() == (100,)
    finally:
        other.close()


def test_a_store_s_sqlite_schema_reads_as_postgresql_s_with_the_same_names() -> None:
    sqlite = (
        "CREATE TABLE IF NOT EXISTS t (k BLOB PRIMARY KEY, n INTEGER NOT NULL, at REAL,"
        " integers TEXT) WITHOUT ROWID;"
    )
    assert postgresql_schema(sqlite) == (
        "CREATE TABLE IF NOT EXISTS t (k BYTEA PRIMARY KEY, n BIGINT NOT NULL,"
        " at DOUBLE PRECISION, integers TEXT);"
    )


def test_commits_wait_for_the_wal_even_where_the_database_says_not_to(
    postgres: PostgresServer,
) -> None:
    dsn = postgres.create_database("pg_sql_lax")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('ALTER DATABASE "pg_sql_lax" SET synchronous_commit = off')
    with psycopg.connect(dsn) as plain:
        assert plain.execute("SHOW synchronous_commit").fetchone() == ("off",)
    durable = open_pool(PostgresSettings(dsn, 2))
    try:
        with pooled(durable, "test") as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    finally:
        durable.close()
