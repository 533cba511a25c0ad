"""The tables and objects `imageshare migrate --to postgresql` moves
(node/services/migrate.py says in what order, and what is checked when): the instance
index and its files, the ledger and the state stores, each copied under the same names
into what the PostgreSQL stores create, and each compared with its source afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from node.config import NodeConfig
from node.errors import ImageShareError
from node.store import (
    backends,
    consent_state,
    federation_state,
    forward_state,
    links,
    nonces,
    opinions,
    transfers,
)
from node.store.instances import SCHEMA, SqliteInstanceStore
from node.store.ledger import LEDGER_FILE, LedgerStore
from node.store.postgres import OBJECT_TRANSFERS, PostgresInstanceStore

ROWS_PER_BATCH = 1000
INDEX_TABLES = ("studies", "series", "instances")


class MigrationUnverified(ImageShareError):
    """The copy does not match the node (the node is left as it was)."""


@dataclass(frozen=True)
class TableCopy:
    table: str
    rows: int
    digest: str  # SHA-256 over the rows in key order, the same on both sides


def index_objects(source: SqliteInstanceStore) -> list[tuple[str, int]]:
    if source.reader.execute("SELECT COUNT(*) AS n FROM unconfirmed").fetchone()["n"]:
        raise MigrationUnverified("the index holds unconfirmed instances; start the node once")
    rows = source.reader.execute("SELECT DISTINCT digest, size FROM instances ORDER BY digest")
    return [(r["digest"], int(r["size"])) for r in rows]


def put_objects(
    source: SqliteInstanceStore, target: PostgresInstanceStore, objects: Sequence[tuple[str, int]]
) -> int:
    def put(item: tuple[str, int]) -> int:
        digest, size = item
        path = source.object_path(digest)
        if _sha256(path) != digest:
            raise MigrationUnverified(
                f"the stored file {path.name} does not match its SHA-256; restore it from a"
                " backup first; nothing was switched"
            )
        target.objects.put(digest, path, size)
        return size

    with ThreadPoolExecutor(OBJECT_TRANSFERS, thread_name_prefix="migrate") as pool:
        return sum(pool.map(put, objects))


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    try:
        with open(path, "rb") as source:
            while chunk := source.read(1 << 20):
                hasher.update(chunk)
    except FileNotFoundError:
        return ""
    return hasher.hexdigest()


def _columns(table: str) -> list[str]:
    return list(SCHEMA[table]["columns"])


def _source_rows(source: SqliteInstanceStore, table: str) -> Iterator[list[Sequence[Any]]]:
    """The table's rows in arrival order (rowid), with the rowid last, in batches."""
    columns = _columns(table)
    cursor = source.reader.execute(
        f"SELECT {', '.join(columns)}, rowid AS arrival FROM {table} ORDER BY rowid"
    )
    while batch := cursor.fetchmany(ROWS_PER_BATCH):
        yield [[row[c] for c in (*columns, "arrival")] for row in batch]


def copy_index_table(
    source: SqliteInstanceStore, target: PostgresInstanceStore, table: str
) -> None:
    columns = _columns(table)
    if table == "instances":  # the arrival position, as the forwarder counted it
        names, overriding = [*columns, "position"], " OVERRIDING SYSTEM VALUE"
    else:
        names, overriding = columns, ""
    statement = (
        f"INSERT INTO {table} ({', '.join(names)}){overriding}"
        f" VALUES ({', '.join(['%s'] * len(names))}) ON CONFLICT DO NOTHING"
    )
    for batch in _source_rows(source, table):
        rows = [row if table == "instances" else row[:-1] for row in batch]
        with target.pool.connection() as conn, conn.transaction():
            conn.cursor().executemany(statement, rows)


def continue_positions(target: PostgresInstanceStore) -> None:
    """New arrivals on PostgreSQL take positions after the copied ones."""
    with target.pool.connection() as conn:
        conn.execute(
            "SELECT setval(pg_get_serial_sequence('instances', 'position'),"
            " GREATEST((SELECT MAX(position) FROM instances), 1))"
        )


def _table_digest(rows: Iterator[Sequence[Any]]) -> tuple[int, str]:
    hasher = hashlib.sha256()
    count = 0
    for row in rows:
        hasher.update(json.dumps(list(row), separators=(",", ":")).encode())
        hasher.update(b"\n")
        count += 1
    return count, hasher.hexdigest()


def check_index_table(
    source: SqliteInstanceStore, target: PostgresInstanceStore, table: str
) -> TableCopy:
    columns = _columns(table)
    key = SCHEMA[table]["pk"]
    position = ", rowid" if table == "instances" else ""
    ours = source.reader.execute(
        f"SELECT {', '.join(columns)}{position} FROM {table} ORDER BY {key}"
    )
    mine = _table_digest(tuple(row) for row in ours)
    position = ", position" if table == "instances" else ""
    with target.pool.connection() as conn:
        theirs = conn.execute(f"SELECT {', '.join(columns)}{position} FROM {table} ORDER BY {key}")
        copied = _table_digest(tuple(row.values()) for row in theirs)
    if mine != copied:
        raise MigrationUnverified(
            f"the {table} table differs after the copy ({mine[0]} rows here, {copied[0]} in"
            " PostgreSQL): migrate into an empty PostgreSQL database; nothing was switched"
        )
    return TableCopy(table, mine[0], mine[1])


def read_back(
    target: PostgresInstanceStore, objects: Sequence[tuple[str, int]], max_bytes: int
) -> None:
    """Every object fetched from the bucket and its SHA-256 checked (fetch does)."""
    with tempfile.TemporaryDirectory(dir=target.tmp_dir) as scratch:

        def fetch(item: tuple[str, int]) -> None:
            copy = Path(scratch) / f"{item[0]}.dcm"
            try:
                target.objects.fetch(item[0], copy, max_bytes)
            except ImageShareError as exc:
                raise MigrationUnverified(
                    f"an instance file read back from the bucket failed: {exc}; nothing was"
                    " switched"
                ) from exc
            copy.unlink()

        with ThreadPoolExecutor(OBJECT_TRANSFERS, thread_name_prefix="migrate") as pool:
            list(pool.map(fetch, objects))


# The state stores, by their file in the data directory and how the node opens them
# (opening brings a SQLite file, or the PostgreSQL tables, to the latest schema).
def _open_ledger_tables(config: NodeConfig) -> Any:
    """The ledger on ``config``'s engine, its schema created; on PostgreSQL without the
    refusal to start beside a fuller ``ledger.sqlite``: that is what is being moved."""
    if config.store.backend == "sqlite":
        return LedgerStore(config.data_dir)
    from node.store.pg_ledger import PostgresLedgerStore
    from node.store.postgres import PostgresSettings

    return PostgresLedgerStore(PostgresSettings(config.store.dsn, 1))


STATE_STORES: tuple[tuple[str, Callable[[NodeConfig], Any]], ...] = (
    (LEDGER_FILE, _open_ledger_tables),
    (nonces.FILE_NAME, backends.open_nonce_store),
    (consent_state.FILE_NAME, backends.open_consent_state),
    (links.FILE_NAME, backends.open_link_store),
    (transfers.FILE_NAME, backends.open_transfer_store),
    (forward_state.FILE_NAME, backends.open_forward_state),
    (federation_state.STATE_FILE, backends.open_federation_state),
    (opinions.FILE_NAME, backends.open_opinion_store),
)


def copy_state(config: NodeConfig, target_config: NodeConfig) -> list[tuple[str, str]]:
    """Copy every state store the node has into PostgreSQL; the (file, table) pairs."""
    copied: list[tuple[str, str]] = []
    pool = backends.state_pool(target_config)
    for file_name, open_store in STATE_STORES:
        if not (config.data_dir / file_name).exists():
            continue  # a store the node never used
        for engine in (config, target_config):
            open_store(engine).close()
        with _sqlite_file(config, file_name) as db:
            for table in _sqlite_tables(db):
                _copy_state_table(db, pool, file_name, table)
                copied.append((file_name, table))
    return copied


@contextlib.contextmanager
def _sqlite_file(config: NodeConfig, file_name: str) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(f"file:{config.data_dir / file_name}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()


def _sqlite_tables(db: sqlite3.Connection) -> list[str]:
    rows = db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name"
    )
    return [row[0] for row in rows]


@dataclass(frozen=True)
class _PgColumn:
    name: str
    data_type: str
    identity: bool


def _pg_columns(pool: Any, table: str) -> dict[str, _PgColumn]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT column_name, data_type, is_identity FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s",
            (table,),
        ).fetchall()
    return {
        r["column_name"]: _PgColumn(r["column_name"], r["data_type"], r["is_identity"] == "YES")
        for r in rows
    }


def _shared_columns(
    db: sqlite3.Connection, pool: Any, file_name: str, table: str
) -> tuple[list[str], dict[str, _PgColumn]]:
    """The table's columns, each of which PostgreSQL must have (none is left behind)."""
    ours = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
    theirs = _pg_columns(pool, table)
    missing = [c for c in ours if c not in theirs]
    if missing:
        raise MigrationUnverified(
            f"{file_name}: PostgreSQL has no {table} table with {', '.join(missing)};"
            " nothing was switched"
        )
    return ours, theirs


def _copy_state_table(db: sqlite3.Connection, pool: Any, file_name: str, table: str) -> None:
    columns, pg = _shared_columns(db, pool, file_name, table)
    identities = [c for c in columns if pg[c].identity]
    overriding = " OVERRIDING SYSTEM VALUE" if identities else ""
    statement = (
        f"INSERT INTO {table} ({', '.join(columns)}){overriding}"
        f" VALUES ({', '.join(['%s'] * len(columns))}) ON CONFLICT DO NOTHING"
    )
    booleans = [i for i, c in enumerate(columns) if pg[c].data_type == "boolean"]
    cursor = db.execute(f"SELECT {', '.join(columns)} FROM {table}")
    while batch := cursor.fetchmany(ROWS_PER_BATCH):
        rows = [list(row) for row in batch]
        for row in rows:
            for i in booleans:
                row[i] = None if row[i] is None else bool(row[i])
        with pool.connection() as conn, conn.transaction():
            conn.cursor().executemany(statement, rows)
    with pool.connection() as conn:
        for column in identities:  # new rows number on from the copied ones
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
                f" GREATEST((SELECT MAX({column}) FROM {table}), 1))"
            )


def _canonical(value: Any) -> Any:
    """A value as both engines' rows compare: bytes as hex, booleans as 0/1."""
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _rows_digest(rows: Iterator[Sequence[Any]], ordered: bool) -> tuple[int, str]:
    """Rows counted and hashed in a canonical order: as they come when both engines gave
    them in key order, else sorted here (the engines sort text differently)."""
    lines: Iterator[str] = (json.dumps([_canonical(v) for v in row]) for row in rows)
    if not ordered:
        lines = iter(sorted(lines))
    hasher = hashlib.sha256()
    count = 0
    for line in lines:
        hasher.update(line.encode() + b"\n")
        count += 1
    return count, hasher.hexdigest()


def _key_order(db: sqlite3.Connection, table: str) -> str:
    """ORDER BY the table's primary key where it holds no text (numbers and bytes sort
    alike on both engines), else ""."""
    info = list(db.execute(f"PRAGMA table_info({table})"))
    key = sorted((row[5], row[1], str(row[2]).upper()) for row in info if row[5])
    if not key or any("TEXT" in kind or "CHAR" in kind for _, _, kind in key):
        return ""
    return " ORDER BY " + ", ".join(name for _, name, _ in key)


def check_state_table(
    config: NodeConfig, target_config: NodeConfig, file_name: str, table: str
) -> TableCopy:
    pool = backends.state_pool(target_config)
    with _sqlite_file(config, file_name) as db:
        columns, _ = _shared_columns(db, pool, file_name, table)
        select = f"SELECT {', '.join(columns)} FROM {table}{_key_order(db, table)}"
        mine = _rows_digest(iter(db.execute(select)), ordered="ORDER BY" in select)
    with (
        pool.connection() as conn,
        conn.transaction(),  # a named (server-side) cursor streams within one
        conn.cursor(name=f"check_{table}") as found,
    ):
        found.execute(select)
        copied = _rows_digest(
            (tuple(row[c] for c in columns) for row in found), ordered="ORDER BY" in select
        )
    if mine != copied:
        raise MigrationUnverified(
            f"the {table} table of {file_name} differs after the copy ({mine[0]} rows here,"
            f" {copied[0]} in PostgreSQL): migrate into an empty PostgreSQL database;"
            " nothing was switched"
        )
    return TableCopy(f"{file_name.removesuffix('.sqlite')}.{table}", mine[0], mine[1])
