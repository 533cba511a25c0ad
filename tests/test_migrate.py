"""`imageshare migrate --to postgresql` of a real node (SQLite and files, a study and a
few hundred ledger entries) to a real PostgreSQL and S3 server: verified, switched, and
serving the same answers; refused, changing nothing, while the node runs, when a stored
file is damaged, when the target holds another node's rows, and for bad settings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dicomweb_client.api import DICOMwebClient

from node.config import load_config
from node.core.entries import EntryBody, Grant
from node.errors import ConfigError
from node.samples import SyntheticStudy, make_ct_study
from node.services.migrate import BACKUP_SUFFIX, STATE_STORES, with_store_settings
from node.store.backends import open_link_store, open_nonce_store
from node.store.ledger import LedgerStore
from node.store.links import LinkRecord, LinkStore
from node.store.nonces import NonceStore
from node.store.run_lock import RunLock
from tests.support.nodes import NodeProcess, init_node
from tests.support.postgres import PostgresServer, node_store_settings
from tests.support.s3 import S3Server, running_s3

LEDGER_ENTRIES = 300


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3("moto") as server:
        yield server


def _answers(node: NodeProcess, study_uid: str) -> dict[str, Any]:
    """What the node serves of a study: QIDO-RS at each level and, by WADO-RS, the
    SHA-256 of every instance's pixel data."""
    client = DICOMwebClient(url=node.url + "/dicomweb", headers=node.auth)
    instances = client.search_for_instances(study_uid)
    pixels = {}
    for found in instances:
        uid = found["00080018"]["Value"][0]
        series_uid = found["0020000E"]["Value"][0]
        dataset = client.retrieve_instance(study_uid, series_uid, uid)
        pixels[uid] = hashlib.sha256(dataset.PixelData).hexdigest()
    return {
        "studies": client.search_for_studies(),
        "series": sorted(client.search_for_series(study_uid), key=json.dumps),
        "instances": sorted(instances, key=json.dumps),
        "pixels": pixels,
    }


def _ledger_size(node: NodeProcess) -> int:
    report = json.loads(node.cli("ledger", "verify", "--json").stdout)
    assert report["problems"] == []
    return int(report["size"])


def _migrate(node: NodeProcess, settings: Path, *more: str, check: bool = True) -> Any:
    arguments = ("migrate", "--to", "postgresql", "--settings", str(settings), *more)
    return node.cli(*arguments, check=check)


def _grants(count: int) -> list[tuple[EntryBody, int]]:
    return [(Grant(token=f"grant-{i}".encode()), 1_700_000_000 + i) for i in range(count)]


def _stopped_node(base: Path, origin: str, study: SyntheticStudy) -> NodeProcess:
    """A node on SQLite holding ``study`` and LEDGER_ENTRIES grants in its own log."""
    node = init_node(base, origin)
    store = LedgerStore(node.data_dir)
    try:
        store.own_log(node.origin, node.vkey).append_many(_grants(LEDGER_ENTRIES))
    finally:
        store.close()
    node.cli("import", *map(str, study.files))
    return node


@dataclass
class Moved:
    node: NodeProcess
    study: SyntheticStudy
    dsn: str
    before: dict[str, Any]
    ledger_before: int
    refused_while_running: Any
    report: dict[str, Any]


@pytest.fixture(scope="module")
def moved(
    postgres: PostgresServer, s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Moved]:
    base = tmp_path_factory.mktemp("migrate")
    study = make_ct_study(base / "study", series=2, slices=3)
    node = _stopped_node(base, "moving.example/imageshare", study)
    dsn = postgres.create_database("moving")
    s3.client().create_bucket(Bucket="moving")  # type: ignore[attr-defined]
    settings = base / "store.toml"
    settings.write_text(node_store_settings(node.data_dir, dsn, s3, "moving"))
    node.start()
    try:
        before = _answers(node, study.study_uid)
        refused = _migrate(node, settings, check=False)
        node.stop()
        ledger_before = _ledger_size(node)
        result = _migrate(node, settings, "--json")
        node.start()
        yield Moved(node, study, dsn, before, ledger_before, refused, json.loads(result.stdout))
    finally:
        node.stop()


class TestMigrateToPostgresql:
    def test_a_running_node_is_refused_and_left_on_sqlite(self, moved: Moved) -> None:
        refused = moved.refused_while_running
        assert refused.returncode == 2
        assert "the node is running" in refused.stderr

    def test_the_report_counts_every_row_and_object_and_the_verified_log(
        self, moved: Moved
    ) -> None:
        report = moved.report
        assert report["verified"] is True
        assert report["tables"]["instances"]["rows"] == len(moved.study.files)
        assert report["tables"]["series"]["rows"] == 2
        assert report["tables"]["studies"]["rows"] == 1
        assert report["objects"] == len(moved.study.files)
        assert report["object_bytes"] == sum(f.stat().st_size for f in moved.study.files)
        assert report["ledger_entries"] == moved.ledger_before >= LEDGER_ENTRIES

    def test_every_state_store_of_the_node_is_copied_table_by_table(self, moved: Moved) -> None:
        state_files = {name for name, _ in STATE_STORES if (moved.node.data_dir / name).exists()}
        assert {"federation.sqlite", "transfers.sqlite"} <= state_files  # what a start makes
        for name in state_files:
            with sqlite3.connect(moved.node.data_dir / name) as db:
                tables = [
                    row[0]
                    for row in db.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table'"
                        " AND name NOT LIKE 'sqlite_%'"
                    )
                ]
                for table in tables:
                    rows = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                    copied = moved.report["tables"][f"{name.removesuffix('.sqlite')}.{table}"]
                    assert copied["rows"] == rows, (name, table)

    def test_the_node_is_switched_and_its_rows_are_in_postgresql(self, moved: Moved) -> None:
        text = moved.node.config.read_text()
        assert 'backend = "postgresql"' in text
        backup = moved.node.config.with_name("node.toml" + BACKUP_SUFFIX).read_text()
        assert 'backend = "postgresql"' not in backup and "[federation]" in backup
        assert "[federation]" in text  # the rest of node.toml is kept
        with psycopg.connect(moved.dsn) as conn:
            count = conn.execute("SELECT COUNT(*) FROM instances").fetchone()
        assert count == (len(moved.study.files),)

    def test_the_moved_node_serves_the_same_answers(self, moved: Moved) -> None:
        assert _answers(moved.node, moved.study.study_uid) == moved.before

    def test_the_moved_node_s_own_log_verifies_at_the_same_size(self, moved: Moved) -> None:
        assert _ledger_size(moved.node) == moved.ledger_before

    def test_new_arrivals_take_positions_after_the_copied_ones(
        self, moved: Moved, tmp_path: Path
    ) -> None:
        extra = make_ct_study(tmp_path / "extra", series=1, slices=1, patient_id="MRN-0002")
        moved.node.cli("import", *map(str, extra.files))
        with psycopg.connect(moved.dsn) as conn:
            rows = conn.execute(
                "SELECT study_instance_uid, position FROM instances ORDER BY position"
            ).fetchall()
        assert rows[-1][0] == extra.study_uid
        assert len({position for _, position in rows}) == len(rows)

    def test_migrating_again_is_refused(self, moved: Moved, tmp_path: Path) -> None:
        moved.node.stop()
        try:
            again = _migrate(moved.node, tmp_path / "x", check=False)
        finally:
            moved.node.start()
        assert again.returncode == 2
        assert "already on postgresql" in again.stderr


class TestStateSurvivesTheMove:
    def test_a_share_link_is_still_there_and_a_seen_nonce_is_still_a_replay(
        self, postgres: PostgresServer, s3: S3Server, tmp_path: Path
    ) -> None:
        study = make_ct_study(tmp_path / "study", series=1, slices=1)
        node = _stopped_node(tmp_path, "stateful.example/imageshare", study)
        link = LinkRecord("grantee-1", b"m" * 32, b"t" * 16, b"h" * 32, 1, False, [], opinions=True)
        links = LinkStore(node.data_dir / "links.sqlite")
        seen = NonceStore(node.data_dir / "nonces.sqlite", 300)
        try:
            links.add(dataclasses.replace(link, failures=0))
            assert links.count_failure("grantee-1", 5) == (1, False)
            assert seen.remember("signer", b"n" * 16, int(time.time()))
        finally:
            links.close()
            seen.close()
        dsn = postgres.create_database("stateful")
        s3.client().create_bucket(Bucket="stateful")  # type: ignore[attr-defined]
        settings = tmp_path / "store.toml"
        settings.write_text(node_store_settings(node.data_dir, dsn, s3, "stateful"))
        report = json.loads(_migrate(node, settings, "--json").stdout)
        assert report["tables"]["links.links"]["rows"] == 1
        moved = load_config(node.config)
        assert moved.store.backend == "postgresql"
        assert open_link_store(moved).by_grantee("grantee-1") == link
        assert not open_nonce_store(moved).remember("signer", b"n" * 16, int(time.time()))


class TestRefusals:
    def test_a_damaged_file_stops_the_move_and_a_rerun_after_repair_completes(
        self, postgres: PostgresServer, s3: S3Server, tmp_path: Path
    ) -> None:
        study = make_ct_study(tmp_path / "study", series=1, slices=2)
        node = _stopped_node(tmp_path, "damaged.example/imageshare", study)
        original_config = node.config.read_text()
        stored = next((node.data_dir / "objects").rglob("*.dcm"))
        good = stored.read_bytes()
        stored.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        s3.client().create_bucket(Bucket="damaged")  # type: ignore[attr-defined]
        settings = tmp_path / "store.toml"
        dsn = postgres.create_database("damaged")
        settings.write_text(node_store_settings(node.data_dir, dsn, s3, "damaged"))
        refused = _migrate(node, settings, check=False)
        assert refused.returncode == 1
        assert "does not match its SHA-256" in refused.stderr
        assert node.config.read_text() == original_config
        stored.write_bytes(good)
        done = _migrate(node, settings, "--json")
        assert json.loads(done.stdout)["tables"]["instances"]["rows"] == 2

    def test_a_target_holding_another_node_s_rows_is_refused(
        self, postgres: PostgresServer, s3: S3Server, tmp_path: Path
    ) -> None:
        dsn = postgres.create_database("shared_target")
        s3.client().create_bucket(Bucket="shared")  # type: ignore[attr-defined]
        for name in ("first", "second"):
            study = make_ct_study(tmp_path / name / "study", series=1, slices=1, patient_id=name)
            node = _stopped_node(tmp_path / name, f"{name}.example/imageshare", study)
            settings = tmp_path / name / "store.toml"
            settings.write_text(node_store_settings(node.data_dir, dsn, s3, "shared"))
            result = _migrate(node, settings, check=False)
        assert result.returncode == 1
        assert "differs after the copy" in result.stderr
        assert 'backend = "postgresql"' not in node.config.read_text()

    def test_settings_holding_more_than_the_store_tables_are_refused(self, tmp_path: Path) -> None:
        settings = tmp_path / "store.toml"
        settings.write_text('[store]\nbackend = "postgresql"\n\n[http]\nlisten = "0.0.0.0:1"\n')
        with pytest.raises(ConfigError, match="nothing else"):
            with_store_settings("", settings)


class TestStoreSettingsMerge:
    def test_the_store_tables_are_replaced_and_the_rest_kept_with_its_comments(
        self, tmp_path: Path
    ) -> None:
        settings = tmp_path / "store.toml"
        settings.write_text('[store]\nbackend = "postgresql"\n[store.objects]\nbucket = "b"\n')
        node_toml = (
            '# the node\norigin = "a.example/imageshare"\n\n[store]\nbackend = "sqlite"\n'
            "batch_size = 8\n\n[ store.objects ]  # old\nbucket = \"\"\n\n"
            '[http]\n# where it listens\nlisten = "127.0.0.1:8080"\n'
        )
        merged = with_store_settings(node_toml, settings)
        assert 'backend = "sqlite"' not in merged
        assert "batch_size" not in merged
        assert "# where it listens" in merged and "# the node" in merged
        assert merged.count("[store]") == 1
        assert merged.endswith('[store.objects]\nbucket = "b"\n')

    def test_store_keys_outside_a_store_table_are_refused(self, tmp_path: Path) -> None:
        settings = tmp_path / "store.toml"
        settings.write_text('[store]\nbackend = "postgresql"\n')
        with pytest.raises(ConfigError, match="outside a \\[store\\] table"):
            with_store_settings('store.backend = "sqlite"\n', settings)


class TestRunLock:
    def test_a_node_being_migrated_does_not_start(self, tmp_path: Path) -> None:
        node = init_node(tmp_path, "locked.example/imageshare")
        held = RunLock(node.data_dir, exclusive=True)
        try:
            refused = node.cli("run", check=False, timeout=60)
        finally:
            held.release()
        assert refused.returncode == 2
        assert "being migrated" in refused.stderr

    def test_a_killed_holder_leaves_the_node_unlocked(self, tmp_path: Path) -> None:
        node = init_node(tmp_path, "killed.example/imageshare")
        node.start()
        with pytest.raises(ConfigError, match="the node is running"):
            RunLock(node.data_dir, exclusive=True)
        node.kill9()
        RunLock(node.data_dir, exclusive=True).release()
