"""Schema versions of the node's SQLite databases: upgrades at open, refusals of newer ones."""

from __future__ import annotations

import contextlib
import io
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from node.errors import ConfigError
from node.samples import make_ct_study
from node.store import (
    audit_queue,
    consent_state,
    federation_state,
    forward_state,
    instances,
    ledger,
    nonces,
    pacs_cache,
    transfers,
)
from node.store.instances import SqliteInstanceStore
from node.store.sqlite import Migration, open_database, schema_version
from tests.support.nodes import init_node


def insert_two(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO a VALUES (2)")


STEPS: tuple[Migration, ...] = (
    "CREATE TABLE a (x INTEGER);",
    "CREATE TABLE b (y TEXT DEFAULT ';'); INSERT INTO a VALUES (1);",
    insert_two,
)


def version_of(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return schema_version(conn)


def tables_of(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def set_version(path: Path, version: int) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {version}")


class TestMigrate:
    def test_a_database_at_an_older_version_gets_only_the_missing_steps(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "x.sqlite"
        open_database(path, STEPS[:1]).close()
        assert version_of(path) == 1
        conn = open_database(path, STEPS)
        try:
            assert schema_version(conn) == 3
            assert [r[0] for r in conn.execute("SELECT x FROM a ORDER BY x")] == [1, 2]
        finally:
            conn.close()
        # Opening again at the latest version changes nothing.
        open_database(path, STEPS).close()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT COUNT(*) FROM a").fetchone()[0] == 2

    def test_a_failing_step_leaves_the_database_at_its_old_version_untouched(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "x.sqlite"
        open_database(path, STEPS[:1]).close()

        def broken(conn: sqlite3.Connection) -> None:
            raise RuntimeError("step failed")

        with pytest.raises(RuntimeError, match="step failed"):
            open_database(path, (*STEPS, broken))
        assert version_of(path) == 1
        assert tables_of(path) == {"a"}  # step 2's table was rolled back with the rest

    def test_a_database_from_a_newer_node_is_refused_in_one_sentence(self, tmp_path: Path) -> None:
        path = tmp_path / "x.sqlite"
        open_database(path, STEPS).close()
        set_version(path, 7)
        with pytest.raises(ConfigError) as refused:
            open_database(path, STEPS)
        message = str(refused.value)
        assert message == (
            "x.sqlite is at schema version 7, newer than the 3 this node knows;"
            " run the newer ImageShare release that wrote it"
        )
        assert version_of(path) == 7

    def test_an_incomplete_statement_in_a_migration_is_an_error_not_skipped(
        self, tmp_path: Path
    ) -> None:
        with pytest.raises(ValueError, match="incomplete SQL statement"):
            open_database(tmp_path / "x.sqlite", ("CREATE TABLE a (x TEXT DEFAULT 'open",))
        assert version_of(tmp_path / "x.sqlite") == 0


# Every SQLite database the node owns: how to open it in a directory, and its migrations.
DATABASES: list[tuple[str, Callable[[Path], Any], Sequence[Migration]]] = [
    ("index.sqlite", SqliteInstanceStore, instances.MIGRATIONS),
    (ledger.LEDGER_FILE, ledger.LedgerStore, ledger.MIGRATIONS),
    (
        consent_state.FILE_NAME,
        lambda d: consent_state.ConsentState(d / consent_state.FILE_NAME),
        consent_state.MIGRATIONS,
    ),
    (
        federation_state.STATE_FILE,
        lambda d: federation_state.FederationState(d / federation_state.STATE_FILE),
        federation_state.MIGRATIONS,
    ),
    (nonces.FILE_NAME, lambda d: nonces.NonceStore(d / nonces.FILE_NAME), nonces.MIGRATIONS),
    ("transfers.sqlite", transfers.TransferStore, transfers.MIGRATIONS),
    (
        forward_state.FILE_NAME,
        lambda d: forward_state.ForwardState(d / forward_state.FILE_NAME),
        forward_state.MIGRATIONS,
    ),
    (
        audit_queue.FILE_NAME,
        lambda d: audit_queue.AuditQueue(d, 10, 1000),
        audit_queue.MIGRATIONS,
    ),
    (
        f"{pacs_cache.DIRECTORY_NAME}/{pacs_cache.FILE_NAME}",
        pacs_cache.PacsCache,
        pacs_cache.MIGRATIONS,
    ),
]


Database = tuple[str, Callable[[Path], Any], Sequence[Migration]]


@pytest.fixture(params=DATABASES, ids=[d[0] for d in DATABASES])
def database(request: pytest.FixtureRequest) -> Database:
    described: Database = request.param
    return described


class TestEveryNodeDatabase:
    def test_a_new_database_is_at_the_latest_version(
        self, tmp_path: Path, database: Database
    ) -> None:
        name, opener, migrations = database
        opener(tmp_path).close()
        assert version_of(tmp_path / name) == len(migrations) >= 1

    def test_a_database_from_before_versions_is_adopted_unchanged(
        self, tmp_path: Path, database: Database
    ) -> None:
        name, opener, migrations = database
        opener(tmp_path).close()
        with contextlib.closing(sqlite3.connect(tmp_path / name)) as conn:
            before = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
        set_version(tmp_path / name, 0)  # what every database written before versions holds
        opener(tmp_path).close()
        with contextlib.closing(sqlite3.connect(tmp_path / name)) as conn:
            after = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
        assert after == before
        assert version_of(tmp_path / name) == len(migrations)

    def test_a_newer_database_is_refused(self, tmp_path: Path, database: Database) -> None:
        name, opener, migrations = database
        opener(tmp_path).close()
        set_version(tmp_path / name, len(migrations) + 1)
        with pytest.raises(ConfigError, match=f"^{Path(name).name} is at schema version"):
            opener(tmp_path)


class TestInstanceIndex:
    def test_an_index_written_by_sqlite_utils_is_adopted_and_still_answers(
        self, tmp_path: Path
    ) -> None:
        study = make_ct_study(tmp_path / "study", series=1, slices=2, rows=8, columns=8)
        store = SqliteInstanceStore(tmp_path / "node")
        store.commit([store.stage(io.BytesIO(p.read_bytes())) for p in study.files])
        store.close()
        path = tmp_path / "node" / "index.sqlite"
        # Rewrite the schema as sqlite-utils wrote it (bracketed names), version 0.
        with contextlib.closing(sqlite3.connect(path)) as conn:
            for table in ("studies", "series", "instances"):
                sql = conn.execute(
                    "SELECT sql FROM sqlite_master WHERE name = ?", (table,)
                ).fetchone()[0]
                columns = sql[sql.index("(") + 1 : sql.rindex(")")].split(", ")
                bracketed = ",\n   ".join(
                    f"[{c.split(' ', 1)[0]}] {c.split(' ', 1)[1]}" for c in columns
                )
                conn.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
                conn.execute(f"CREATE TABLE [{table}] (\n   {bracketed}\n)")
                conn.execute(f"INSERT INTO {table} SELECT * FROM old_{table}")
                conn.execute(f"DROP TABLE old_{table}")
            conn.execute("CREATE INDEX [idx_series_modality] ON [series] ([modality])")
            conn.commit()
        set_version(path, 0)
        store = SqliteInstanceStore(tmp_path / "node")
        try:
            assert version_of(path) == len(instances.MIGRATIONS)
            assert store.counts()["instances"] == 2
            assert [s.series_instance_uid for s in store.series_of_study(study.study_uid)] == [
                study.series_uids[0]
            ]
        finally:
            store.close()

    def test_an_index_lacking_a_declared_column_gains_it_at_open(self, tmp_path: Path) -> None:
        study = make_ct_study(tmp_path / "study", series=1, slices=1, rows=8, columns=8)
        store = SqliteInstanceStore(tmp_path / "node")
        store.commit([store.stage(io.BytesIO(study.files[0].read_bytes()))])
        store.close()
        path = tmp_path / "node" / "index.sqlite"
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("ALTER TABLE series DROP COLUMN body_part_examined")
        set_version(path, 0)
        store = SqliteInstanceStore(tmp_path / "node")
        try:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                columns = {r[1] for r in conn.execute("PRAGMA table_info(series)")}
            assert "body_part_examined" in columns
            assert store.has_instance(study.sop_uids[0])
        finally:
            store.close()


def test_the_command_line_refuses_a_newer_index_in_one_sentence(tmp_path: Path) -> None:
    node = init_node(tmp_path, "newer.example/imageshare")
    SqliteInstanceStore(node.data_dir).close()
    set_version(node.data_dir / "index.sqlite", 99)
    study = make_ct_study(tmp_path / "study", series=1, slices=1, rows=8, columns=8)
    result = node.cli("import", str(study.files[0]), check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    known = len(instances.MIGRATIONS)
    assert f"index.sqlite is at schema version 99, newer than the {known} this node knows" in (
        result.stderr
    )
    assert version_of(node.data_dir / "index.sqlite") == 99


SCHEMAS = Path(__file__).parent / "schemas"


def structure_of(path: Path) -> dict[str, Any]:
    """Each table's columns (name, type, not null, default, key) and each index's columns."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        names = conn.execute(
            "SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite%'"
        ).fetchall()
        described: dict[str, Any] = {}
        for kind, name, table in names:
            if kind == "table":
                # By name, not position: a column a migration adds comes last (ALTER TABLE).
                columns = conn.execute(f"PRAGMA table_info({name})").fetchall()
                described[name] = sorted(c[1:] for c in columns)
            elif kind == "index":
                columns = conn.execute(f"PRAGMA index_info({name})").fetchall()
                described[name] = (table, [c[2] for c in columns])
        return described


def test_upgrading_the_first_version_gives_what_a_new_node_creates(
    tmp_path: Path, database: Database
) -> None:
    """A migration edited in place instead of appended leaves every database in the
    field at version 1 without the change: this catches it."""
    name, opener, migrations = database
    old = tmp_path / "old"
    (old / name).parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(old / name)) as conn:
        conn.executescript((SCHEMAS / f"{name}.v1.sql").read_text())
        conn.execute("PRAGMA user_version = 1")
    opener(old).close()
    new = tmp_path / "new"
    new.mkdir()
    opener(new).close()
    assert version_of(old / name) == version_of(new / name) == len(migrations)
    assert structure_of(old / name) == structure_of(new / name)
