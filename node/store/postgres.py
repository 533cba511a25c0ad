"""The large-site instance store: the index on PostgreSQL, the files in an S3-compatible
object store (``[store] backend = "postgresql"``, docs/operations.md).

It implements ``node.store.protocols.InstanceStore`` with the embedded backend's
promises (node/store/instances.py):

- acknowledged means durable: an instance's object is acknowledged whole by the object
  store (node/store/objects.py checks it) before its rows are committed, in one
  PostgreSQL transaction per batch (``synchronous_commit`` on: the commit waits for the
  server's WAL flush). A crash between the two leaves at most an unindexed object,
  harmless and written again, to the same key, when the instance is re-sent;
- the index has the SQLite index's tables and columns (node/store/instances.py SCHEMA)
  and answers the one query engine (node/store/queries.py) through ``PostgresDatabase``;
- schema versions: the table ``schema_migrations`` lists the versions applied to each
  component of the database (the instance index is ``index``; every other store on
  PostgreSQL names its own); each daemon brings a component up under an advisory lock,
  so two never migrate at once, and a component newer than this code knows is refused.

Services read a stored instance through ``InstanceRecord.path``, a local file: the store
keeps verified copies of the objects it has written or fetched in ``object-cache/`` of
the data directory. The cache is emptied at start-up (a copy interrupted by a crash is
never served), and a missing copy is fetched again, its SHA-256 checked, when a record
is looked up.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

from node.errors import (
    BadInput,
    ConfigError,
    NotFound,
    PayloadTooLarge,
    StorageFailed,
    StorageFull,
)
from node.store.dicom_header import InflateLimits
from node.store.instances import (
    CHUNK,
    SCHEMA,
    SUPERSEDED_SERIES_INDEX,
    Arrival,
    IngestResult,
    InstanceRecord,
    InstanceStoreBase,
    Outcome,
    StagedInstance,
    StagingFile,
    _result,
    index_name,
    index_values,
)
from node.store.objects import S3Objects

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Advisory lock keys (one number space per database): schema migrations, and the index's
# writers, so that positions (arrivals_after) commit in the order they are handed out.
_MIGRATION_LOCK = 0x1A6E5_0001
_INDEX_WRITE_LOCK = 0x1A6E5_0002

# Objects one store moves to or from the object store at once.
OBJECT_TRANSFERS = 8

# Text compares by code point, as SQLite's does, so orders are the same on both backends.
_SQL_TYPES = {str: 'TEXT COLLATE "C"', int: "BIGINT", float: "DOUBLE PRECISION"}

# The SQLite functions the query engine's SQL uses, for PostgreSQL. Letter case is folded
# by ICU's root locale (lower() under the "C" collation folds ASCII only).
_SQLITE_FUNCTIONS = """
CREATE OR REPLACE FUNCTION instr(haystack text, needle text) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT strpos(haystack, needle) $$;
CREATE OR REPLACE FUNCTION imageshare_fold(value text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT lower(value COLLATE "und-x-icu") $$;
CREATE OR REPLACE FUNCTION imageshare_concat(joined text, value text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN value IS NULL THEN joined WHEN joined IS NULL THEN value
                ELSE joined || ',' || value END $$;
CREATE OR REPLACE AGGREGATE group_concat(text) (SFUNC = imageshare_concat, STYPE = text);
"""

Migration = Callable[[Any], None]  # a step, run on a psycopg connection in the transaction


def _create_index_schema(conn: Any) -> None:
    """The index tables of the SQLite backend's SCHEMA (created where missing, declared
    columns added), the instances' arrival position, and the engine's functions."""
    for table, spec in SCHEMA.items():
        columns = {name: _SQL_TYPES[kind] for name, kind in spec["columns"].items()}
        definitions = [
            f"{name} {kind}{' PRIMARY KEY' if name == spec['pk'] else ''}"
            for name, kind in columns.items()
        ]
        if table == "instances":
            definitions.append("position BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE")
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(definitions)})")
        for name, kind in columns.items():
            conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")
        for indexed in spec["indexes"]:
            conn.execute(
                f"CREATE INDEX IF NOT EXISTS {index_name(table, indexed)}"
                f" ON {table} ({', '.join(indexed)})"
            )
    conn.execute(_SQLITE_FUNCTIONS)


def _index_series_by_study_and_modality(conn: Any) -> None:
    _create_index_schema(conn)
    conn.execute(f"DROP INDEX IF EXISTS {SUPERSEDED_SERIES_INDEX}")


# Position n brings the schema from version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (
    _create_index_schema,
    # 2: series indexed by (study, modality) instead of by study alone, as on SQLite.
    _index_series_by_study_and_modality,
)


INDEX_COMPONENT = "index"


def _versions_per_component(conn: Any) -> None:
    """``schema_migrations`` with a component column; rows from before it are the index's."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    conn.execute(
        "ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS component TEXT NOT NULL"
        f" DEFAULT '{INDEX_COMPONENT}'"
    )
    conn.execute("ALTER TABLE schema_migrations DROP CONSTRAINT IF EXISTS schema_migrations_pkey")
    conn.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS schema_migrations_component_version"
        " ON schema_migrations (component, version)"
    )


def migrate(
    pool: Any, migrations: Sequence[Migration] = MIGRATIONS, component: str = INDEX_COMPONENT
) -> int:
    """Apply the migrations ``component`` lacks, in one transaction under an advisory
    lock; return the version it is at. ConfigError, changing nothing, for a component at a
    newer version than ``migrations`` reach."""
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        _versions_per_component(conn)
        row = conn.execute(
            "SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations WHERE component = %s",
            (component,),
        ).fetchone()
        version, latest = int(row["v"]), len(migrations)
        if version > latest:
            raise ConfigError(
                f"the PostgreSQL {component} schema is at version {version}, newer than the"
                f" {latest} this node knows; run the newer ImageShare release that wrote it"
            )
        for number, step in enumerate(migrations[version:], start=version + 1):
            step(conn)
            conn.execute(
                "INSERT INTO schema_migrations (component, version) VALUES (%s, %s)",
                (component, number),
            )
        return latest


def _plain(value: Any) -> Any:
    # SUM over BIGINT is NUMERIC in PostgreSQL; the SQLite index answers an integer.
    return int(value) if isinstance(value, Decimal) else value


def _wildcard_pattern(pattern: str) -> str:
    """A DICOM wildcard pattern (* and ?) as a LIKE pattern, escaped with backslash."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


class PostgresDatabase:
    """The pool's PostgreSQL as the query engine's ``queries.Database``."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def wildcard(self, sql: str, pattern: str) -> tuple[str, str]:
        return f"{sql} LIKE ? ESCAPE '\\'", _wildcard_pattern(pattern)

    def order(self, terms: str) -> str:
        placed = []
        for term in terms.split(","):
            term = term.strip()
            placed.append(f"{term} NULLS LAST" if term.endswith(" DESC") else f"{term} NULLS FIRST")
        return ", ".join(placed)

    def fetch(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        import psycopg

        statement = sql.replace("%", "%%").replace("?", "%s")
        try:
            with self.pool.connection() as conn:
                rows = conn.execute(statement, list(args)).fetchall()
        except (psycopg.errors.ProgramLimitExceeded, psycopg.errors.StatementTooComplex) as exc:
            raise BadInput(f"query cannot be answered: {exc}") from exc
        except psycopg.Error as exc:
            raise StorageFailed(f"the PostgreSQL index failed: {exc}") from exc
        return [{k: _plain(v) for k, v in row.items()} for row in rows]


@dataclass(frozen=True)
class PostgresSettings:
    dsn: str  # a libpq connection string; its password, if any, from a passfile or PGPASSWORD
    pool_size: int = 8


def _durable_commits(conn: Any) -> None:
    # A commit returns once the server's WAL is flushed, whatever the database's or the
    # role's default: "acknowledged" means on disk, as SQLite's synchronous=FULL.
    conn.execute("SET synchronous_commit = on")


def open_pool(settings: PostgresSettings) -> Any:
    """A connection pool (autocommit, rows as dicts), open and checked: ConfigError when
    the server cannot be reached or refuses the node, without the connection string (it
    may name secrets)."""
    import psycopg
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool

    try:  # one connection first: a pool would retry a refused login until its timeout
        psycopg.connect(settings.dsn, connect_timeout=30).close()
    except psycopg.Error as exc:
        raise ConfigError(f"cannot reach the PostgreSQL index: {exc}") from None
    pool = ConnectionPool(
        settings.dsn,
        min_size=1,
        max_size=settings.pool_size,
        kwargs={"autocommit": True, "row_factory": dict_row},
        configure=_durable_commits,
        open=False,
        name="imageshare-index",
    )
    try:
        pool.open(wait=True, timeout=30)
    except Exception as exc:
        pool.close()
        raise ConfigError(f"cannot reach the PostgreSQL index: {exc}") from None
    return pool


class PostgresInstanceStore(InstanceStoreBase):
    """Instances indexed in PostgreSQL, their files in an object store (see the module
    docstring). Safe to use from several threads, and from several daemons of one node."""

    def __init__(
        self,
        data_dir: Path,
        postgres: PostgresSettings,
        objects: S3Objects,
        max_instance_bytes: int = 1024**3,
        max_inflation_ratio: float = 100.0,
    ) -> None:
        self.max_instance_bytes = max_instance_bytes
        self.inflate_limits = InflateLimits(max_instance_bytes, max_inflation_ratio)
        self.tmp_dir = data_dir / "tmp"
        self.cache_dir = data_dir / "object-cache"
        for scratch in (self.tmp_dir, self.cache_dir):
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
        self.objects = objects
        self.pool = open_pool(postgres)
        try:
            migrate(self.pool)
            objects.check_bucket()
        except BaseException:
            self.pool.close()
            raise
        self.db = PostgresDatabase(self.pool)
        self._write_lock = threading.Lock()
        # Object uploads and downloads run here, several at once (boto3 is thread-safe).
        self._transfers = ThreadPoolExecutor(OBJECT_TRANSFERS, thread_name_prefix="objects")

    def close(self) -> None:
        self._transfers.shutdown(wait=True)
        self.pool.close()

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self.db.fetch(sql, args)

    def _order(self, terms: str) -> str:
        return self.db.order(terms)

    # -- ingest ------------------------------------------------------------------------

    def open_staging(self) -> StagingFile:
        return StagingFile(self.tmp_dir / f"{uuid.uuid4().hex}.part", self.inflate_limits)

    def stage(self, source: IO[bytes], declared_size: int | None = None) -> StagedInstance:
        if declared_size is not None and declared_size > self.max_instance_bytes:
            raise PayloadTooLarge(f"instance of {declared_size} bytes is over the limit")
        staging = self.open_staging()
        try:
            while chunk := source.read(CHUNK):
                staging.write(chunk)
        except BaseException:
            staging.abort()
            raise
        return staging.finish()

    def cache_path(self, digest: str) -> Path:
        return self.cache_dir / digest[:2] / f"{digest}.dcm"

    def commit(self, staged: Sequence[StagedInstance], source: str = "local") -> list[IngestResult]:
        """Upload the new instances' objects, then index them all in one transaction; one
        result each, in order (an instance already indexed, by this daemon or another, is
        a duplicate)."""
        if not staged:
            return []
        try:
            with self._write_lock:
                return self._commit_locked(staged, source)
        finally:
            self.discard(staged)

    def _commit_locked(self, staged: Sequence[StagedInstance], source: str) -> list[IngestResult]:
        uids = [s.header.sop_instance_uid for s in staged]
        known = {
            r["sop_instance_uid"]
            for r in self._rows(
                "SELECT sop_instance_uid FROM instances WHERE sop_instance_uid = ANY(?)", [uids]
            )
        }
        fresh: dict[str, StagedInstance] = {}
        for item in staged:
            uid = item.header.sop_instance_uid
            if uid not in known and uid not in fresh:
                fresh[uid] = item
        # Durable in the object store before any row; a batch's objects go up side by side.
        uploads = [(i.digest, i.tmp_path, i.size) for i in fresh.values()]
        list(self._transfers.map(lambda upload: self.objects.put(*upload), uploads))
        stored = self._index(list(fresh.values()), source) if fresh else set()
        for uid in stored:
            item = fresh[uid]
            cached = self.cache_path(item.digest)
            cached.parent.mkdir(exist_ok=True)
            item.tmp_path.replace(cached)
        results: list[IngestResult] = []
        for item in staged:
            uid = item.header.sop_instance_uid
            first = uid in stored and fresh[uid] is item
            results.append(_result(item, Outcome.STORED if first else Outcome.DUPLICATE))
        return results

    def _index(self, fresh: Sequence[StagedInstance], source: str) -> set[str]:
        """Insert the rows of ``fresh`` in one transaction; the SOP Instance UIDs that
        were new (another daemon may have indexed some meanwhile)."""
        import psycopg

        now = time.time()
        stored: set[str] = set()
        try:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INDEX_WRITE_LOCK,))
                for item in fresh:
                    h = index_values(item, source, now)
                    for table in ("studies", "series", "instances"):
                        columns = list(SCHEMA[table]["columns"])
                        returning = " RETURNING sop_instance_uid" if table == "instances" else ""
                        row = conn.execute(
                            f"INSERT INTO {table} ({', '.join(columns)})"
                            f" VALUES ({', '.join(['%s'] * len(columns))})"
                            f" ON CONFLICT DO NOTHING{returning}",
                            [h[c] for c in columns],
                        )
                    if row.fetchone() is not None:
                        stored.add(item.header.sop_instance_uid)
        except psycopg.errors.DiskFull as exc:
            raise StorageFull("the PostgreSQL index is out of room; nothing was stored") from exc
        except psycopg.Error as exc:
            raise StorageFailed(f"the PostgreSQL index failed: {exc}") from exc
        return stored

    # -- the index ---------------------------------------------------------------------

    def _records(self, rows: Sequence[Any]) -> list[InstanceRecord]:
        # The copies this daemon lacks (a study first read since start-up) come in
        # side by side: one at a time, a study's objects would take a round trip each.
        missing = {r["digest"] for r in rows if not self.cache_path(r["digest"]).exists()}
        list(self._transfers.map(self.stored_path, sorted(missing)))
        return super()._records(rows)

    def stored_path(self, digest: str) -> Path:
        """The verified local copy of an object, fetched if this daemon has none."""
        path = self.cache_path(digest)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            self.objects.fetch(digest, path, self.max_instance_bytes)
        return path

    def study_row(self, study_uid: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM studies WHERE study_instance_uid = ?", [study_uid])
        if not rows:
            raise NotFound("no such study on this node")
        return rows[0]

    def counts(self) -> dict[str, int]:
        row = self._rows(
            "SELECT (SELECT COUNT(*) FROM studies) AS studies,"
            " (SELECT COUNT(*) FROM series) AS series,"
            " (SELECT COUNT(*) FROM instances) AS instances,"
            " (SELECT COALESCE(SUM(size), 0) FROM instances) AS bytes"
        )[0]
        return {name: int(value) for name, value in row.items()}

    def study_uids(self) -> list[str]:
        return [
            r["study_instance_uid"] for r in self._rows("SELECT study_instance_uid FROM studies")
        ]

    def instance_count(self, study_uid: str) -> int:
        rows = self._rows(
            "SELECT COUNT(*) AS n FROM instances WHERE study_instance_uid = ?", [study_uid]
        )
        return int(rows[0]["n"])

    def digests_present(self, digests: Sequence[str]) -> set[str]:
        rows = self._rows("SELECT digest FROM instances WHERE digest = ANY(?)", [list(digests)])
        return {r["digest"] for r in rows}

    def studies_with_digests(self, digests: Sequence[str]) -> list[str]:
        rows = self._rows(
            "SELECT study_instance_uid, MIN(position) AS first FROM instances"
            " WHERE digest = ANY(?) GROUP BY study_instance_uid ORDER BY first",
            [list(digests)],
        )
        return [r["study_instance_uid"] for r in rows]

    def arrivals_after(self, position: int, limit: int) -> list[Arrival]:
        rows = self._rows(
            "SELECT position, sop_instance_uid, study_instance_uid FROM instances"
            " WHERE position > ? ORDER BY position LIMIT ?",
            [position, limit],
        )
        return [
            Arrival(r["position"], r["sop_instance_uid"], r["study_instance_uid"]) for r in rows
        ]

    def _query_database(self) -> PostgresDatabase:
        return self.db
