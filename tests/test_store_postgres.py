"""The PostgreSQL + object-store backend in a real node process: ingest over STOW-RS and
DIMSE (DCMTK's storescu), QIDO-RS and WADO-RS, an acknowledged instance surviving kill -9,
a corrupted object refused on read, and bad settings refused.

Against a real PostgreSQL (tests/support/postgres.py) and each of two independent S3
servers, moto and s3rver (tests/support/s3.py), so that the node relies on no one
server's behaviour.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import yarl
from dicomweb_client.api import DICOMwebClient

from node.config import load_config
from node.core.keys import NodeIdentity
from node.core.signed_requests import patient_signer
from node.errors import ConfigError, StorageFailed
from node.samples import SyntheticStudy, make_ct_study
from node.services.ingest import import_files
from node.services.peer_client import signed_headers
from node.store.attributes import Level
from node.store.instances import SqliteInstanceStore
from node.store.objects import ObjectCorrupt, ObjectStoreSettings, S3Objects
from node.store.postgres import (
    MIGRATIONS,
    PostgresInstanceStore,
    PostgresSettings,
    migrate,
    open_pool,
)
from node.store.queries import STUDY_LIST_ORDERS, StudyPage, parse_qido
from tests.support.nodes import NodeProcess, init_node, run_cli, wait_until
from tests.support.postgres import PostgresServer, node_store_settings
from tests.support.s3 import SERVERS, S3Server, private_file, running_s3
from tests.test_query_parity import CASES, write_corpus

SCU = "PGTESTSCU"  # any calling AE may store (the default)


@pytest.fixture(scope="module", params=SERVERS)
def s3(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    with running_s3(request.param) as server:
        yield server


@dataclass
class LargeNode:
    node: NodeProcess
    s3: S3Server
    bucket: str
    dsn: str
    client: DICOMwebClient

    def object_key(self, digest: str) -> str:
        return f"{digest[:2]}/{digest}.dcm"

    def restart(self) -> None:
        self.node.start()


@pytest.fixture(scope="module")
def large(
    postgres: PostgresServer, s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LargeNode]:
    name = f"node_{s3.name}"
    dsn = postgres.create_database(name)
    bucket = f"imageshare-{s3.name}"
    s3.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    node = init_node(tmp_path_factory.mktemp(name), f"{s3.name}.example/imageshare")
    node.append_config(node_store_settings(node.data_dir, dsn, s3, bucket))
    node.start()
    client = DICOMwebClient(url=node.url + "/dicomweb", headers=node.auth)
    try:
        yield LargeNode(node, s3, bucket, dsn, client)
    finally:
        node.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    return make_ct_study(tmp_path_factory.mktemp("study"), series=2, slices=2)


@pytest.fixture(scope="module")
def stowed(large: LargeNode, study: SyntheticStudy) -> SyntheticStudy:
    """The study's first series sent with STOW-RS."""
    first = [pydicom.dcmread(f) for f in study.files[:2]]
    large.client.store_instances(first)
    return study


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(large: LargeNode, study_uid: str) -> dict[str, str]:
    """The study's indexed instances, SOP Instance UID -> SHA-256, read from PostgreSQL."""
    import psycopg

    with psycopg.connect(large.dsn) as conn:
        rows = conn.execute(
            "SELECT sop_instance_uid, digest FROM instances WHERE study_instance_uid = %s",
            (study_uid,),
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def _indexed(large: LargeNode, study_uid: str) -> set[str]:
    return set(_digests(large, study_uid))


def _objects(large: LargeNode) -> set[str]:
    listing: Any = large.s3.client().list_objects_v2(Bucket=large.bucket)  # type: ignore[attr-defined]
    return {o["Key"] for o in listing.get("Contents", [])}


class TestIngestAndRetrieve:
    def test_stow_rs_instance_is_indexed_in_postgresql_and_stored_by_content_address(
        self, large: LargeNode, stowed: SyntheticStudy
    ) -> None:
        sent = stowed.files[:2]
        sop_uids = {pydicom.dcmread(f).SOPInstanceUID for f in sent}
        assert sop_uids <= _indexed(large, stowed.study_uid)
        assert {large.object_key(_sha256(f)) for f in sent} <= _objects(large)

    def test_the_node_s_state_stores_are_tables_in_postgresql_not_files(
        self, large: LargeNode, stowed: SyntheticStudy
    ) -> None:
        import psycopg

        with psycopg.connect(large.dsn) as conn:
            rows = conn.execute("SELECT DISTINCT component FROM schema_migrations").fetchall()
        # Replication and transfers open their stores when the daemon starts.
        assert {"index", "federation", "transfers"} <= {row[0] for row in rows}
        state_files = ["consent", "links", "federation", "nonces", "transfers", "forward"]
        assert not [f for f in state_files if (large.node.data_dir / f"{f}.sqlite").exists()]

    def test_storescu_instances_are_indexed_and_stored(
        self, large: LargeNode, stowed: SyntheticStudy
    ) -> None:
        rest = stowed.files[2:]
        result = subprocess.run(
            [
                "storescu",
                "-aet",
                SCU,
                "-aec",
                "IMAGESHARE",
                "127.0.0.1",
                str(large.node.dimse_port),
                *map(str, rest),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        digests = _digests(large, stowed.study_uid)
        assert set(digests) == set(stowed.sop_uids)
        # DIMSE stores the dataset received with the node's own file meta: its address is
        # the digest of those bytes.
        assert {large.object_key(d) for d in digests.values()} <= _objects(large)

    def test_qido_rs_finds_the_study_its_series_and_instances(
        self, large: LargeNode, stowed: SyntheticStudy
    ) -> None:
        studies = large.client.search_for_studies(
            search_filters={"PatientName": "doe^*", "StudyDate": "19000101-"}
        )
        assert [s["0020000D"]["Value"][0] for s in studies] == [stowed.study_uid]
        series = large.client.search_for_series(stowed.study_uid)
        assert len(series) == 2
        found = large.client.search_for_instances(stowed.study_uid)
        assert {i["00080018"]["Value"][0] for i in found} == set(stowed.sop_uids)

    def test_wado_rs_returns_the_stored_bytes(
        self, large: LargeNode, stowed: SyntheticStudy
    ) -> None:
        sent = pydicom.dcmread(stowed.files[0])
        got = large.client.retrieve_instance(
            stowed.study_uid, sent.SeriesInstanceUID, sent.SOPInstanceUID
        )
        assert got.PixelData == sent.PixelData
        assert got.SOPInstanceUID == sent.SOPInstanceUID


class TestLargeInstance:
    def test_instance_over_the_threshold_goes_up_in_parts_and_comes_back_whole(
        self, large: LargeNode, tmp_path: Path
    ) -> None:
        big = make_ct_study(tmp_path, series=1, slices=1, rows=1700, columns=1700)
        assert big.files[0].stat().st_size > 5 * 1024**2  # the threshold: two parts
        large.client.store_instances([pydicom.dcmread(big.files[0])])
        assert large.object_key(_sha256(big.files[0])) in _objects(large)
        sent = pydicom.dcmread(big.files[0])
        got = large.client.retrieve_instance(
            big.study_uid, sent.SeriesInstanceUID, sent.SOPInstanceUID
        )
        assert got.PixelData == sent.PixelData


class TestDurability:
    def test_acknowledged_instance_survives_kill9_and_a_corrupt_object_is_refused(
        self, large: LargeNode, stowed: SyntheticStudy
    ) -> None:
        intact, damaged = (pydicom.dcmread(f) for f in stowed.files[:2])
        large.node.kill9()
        # Damage one object in the bucket itself; the node's local copies are gone with
        # the restart, so each instance read now comes from the object store.
        key = large.object_key(_sha256(stowed.files[1]))
        body = bytearray(stowed.files[1].read_bytes())
        body[-1] ^= 0xFF
        large.s3.client().put_object(Bucket=large.bucket, Key=key, Body=bytes(body))  # type: ignore[attr-defined]
        large.restart()
        got = large.client.retrieve_instance(
            stowed.study_uid, intact.SeriesInstanceUID, intact.SOPInstanceUID
        )
        assert got.PixelData == intact.PixelData
        url = (
            f"{large.node.url}/dicomweb/studies/{stowed.study_uid}/series/"
            f"{damaged.SeriesInstanceUID}/instances/{damaged.SOPInstanceUID}"
        )
        answer = requests.get(
            url,
            headers={**large.node.auth, "Accept": "multipart/related; type=application/dicom"},
            timeout=30,
        )
        assert answer.status_code >= 500
        assert bytes(body[-64:]) not in answer.content
        wait_until(
            lambda: (
                "failed its checksum" in large.node.log_path.read_text()
                or "does not match its SHA-256" in large.node.log_path.read_text()
            ),
            timeout=10,
            message="the checksum failure in the node's log",
        )
        # Sent again, the instance is a duplicate of its index row: the object stays
        # damaged until an operator restores it (docs/operations.md).
        assert _indexed(large, stowed.study_uid) == set(stowed.sop_uids)


def _refusal(daemon: NodeProcess, headers: dict[str, str]) -> str:
    """Why ``daemon`` refuses GET /p2p/whoami with these signature headers."""
    request = urllib.request.Request(daemon.url + "/p2p/whoami", headers=headers)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    return str(json.loads(refused.value.read())["error"])


class TestTwoDaemons:
    def test_a_signed_request_replayed_to_another_daemon_of_the_node_is_refused(
        self, large: LargeNode, tmp_path: Path
    ) -> None:
        # A second daemon of the same node: its key, its PostgreSQL and its bucket.
        second = init_node(tmp_path, large.node.origin, "second")
        shutil.copy(large.node.data_dir / "node.key", second.data_dir / "node.key")
        settings = node_store_settings(second.data_dir, large.dsn, large.s3, large.bucket)
        second.append_config(settings)
        second.start()
        try:
            # A patient's signed request is verified and its nonce spent even though the
            # key is enrolled nowhere: the first answer is "unknown signer".
            patient = NodeIdentity.generate("patient.example/p")
            target = yarl.URL(large.node.url + "/p2p/whoami")

            def signed() -> dict[str, str]:
                signer = patient_signer(patient.public_key)
                return signed_headers(patient.sign, signer, "GET", target, b"", large.node.origin)

            once = signed()
            assert _refusal(large.node, once).startswith("unknown signer")
            assert _refusal(second, signed()).startswith("unknown signer")  # no replay
            assert _refusal(second, once) == "replayed nonce"
            assert _refusal(large.node, once) == "replayed nonce"
        finally:
            second.stop()


class TestHostileObjects:
    """What the object store answers is outside input too: bounded, verified, refused."""

    def _objects(self, s3: S3Server, tmp_path: Path, bucket: str) -> S3Objects:
        credentials = s3.credentials_file(tmp_path / "credentials")
        s3.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        return S3Objects(ObjectStoreSettings(s3.endpoint, bucket, credentials_file=credentials))

    def test_an_object_larger_than_any_instance_is_refused_while_it_streams(
        self, s3: S3Server, tmp_path: Path
    ) -> None:
        objects = self._objects(s3, tmp_path, "oversized")
        digest = hashlib.sha256(b"small").hexdigest()
        s3.client().put_object(  # type: ignore[attr-defined]
            Bucket=objects.settings.bucket, Key=objects.key(digest), Body=b"\0" * (3 * 1024**2)
        )
        destination = tmp_path / "copy.dcm"
        with pytest.raises(ObjectCorrupt):
            objects.fetch(digest, destination, max_bytes=1024**2)
        assert list(tmp_path.glob("copy.dcm*")) == []  # nothing of it kept

    def test_a_missing_object_is_a_storage_failure(self, s3: S3Server, tmp_path: Path) -> None:
        objects = self._objects(s3, tmp_path, "empty")
        with pytest.raises(StorageFailed):
            objects.fetch("00" * 32, tmp_path / "copy.dcm", max_bytes=1024**2)
        assert list(tmp_path.glob("copy.dcm*")) == []


@dataclass
class TwoIndexes:
    sqlite: SqliteInstanceStore
    postgres: PostgresInstanceStore

    @property
    def both(self) -> tuple[SqliteInstanceStore, PostgresInstanceStore]:
        return self.sqlite, self.postgres


@pytest.fixture(scope="module")
def two_indexes(
    postgres: PostgresServer, s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoIndexes]:
    """The query-parity corpus (tests/test_query_parity.py) with odd names added, imported
    into an SQLite store and a PostgreSQL one."""
    base = tmp_path_factory.mktemp("two-indexes")
    write_corpus(base / "in")
    odd = make_ct_study(base / "in" / "odd", series=1, slices=2, rows=8, columns=8, seed=99)
    for path, name in zip(odd.files, ("Under_Score^Ann", "Per%Cent^Ünïcödé"), strict=True):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.SpecificCharacterSet = name, "ISO_IR 192"
        ds.StudyDescription = "100% [sure]"
        ds.save_as(path)
    files = sorted((base / "in").rglob("*.dcm"))
    bucket = f"parity-{s3.name}"
    s3.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    settings = ObjectStoreSettings(
        s3.endpoint,
        bucket,
        credentials_file=s3.credentials_file(base / "credentials"),
    )
    dsn = postgres.create_database(f"parity_{s3.name}")
    stores = TwoIndexes(
        SqliteInstanceStore(base / "sqlite"),
        PostgresInstanceStore(base / "pg", PostgresSettings(dsn), S3Objects(settings)),
    )
    try:
        for store in stores.both:
            import_files(store, files)
        yield stores
    finally:
        stores.sqlite.close()
        stores.postgres.close()


def _both(stores: TwoIndexes, ask: Callable[[Any], Any]) -> tuple[Any, Any]:
    return ask(stores.sqlite), ask(stores.postgres)


class TestSameAnswersAsSqlite:
    @pytest.mark.parametrize("c", CASES, ids=str)
    def test_every_matching_case_returns_the_same_rows_in_the_same_order(
        self, two_indexes: TwoIndexes, c: Any
    ) -> None:
        params = [(c.keyword, ",".join(c.values)), ("includefield", "all")]
        query = parse_qido(c.level, params)
        on_sqlite, on_postgres = _both(two_indexes, lambda s: s.search(query))
        assert on_postgres == on_sqlite

    @pytest.mark.parametrize(
        ("keyword", "value"),
        [
            ("PatientName", "under_score*"),  # _ is a character, not LIKE's wildcard
            ("PatientName", "under?score*"),
            ("PatientName", "per%cent*"),
            ("PatientName", "*ÜNÏCÖDÉ"),  # letter case folded beyond ASCII
            ("StudyDescription", "100% [sure]"),
            ("StudyDescription", "100?*"),
            ("PatientName", "*"),
        ],
    )
    def test_wildcards_and_letter_case_match_alike(
        self, two_indexes: TwoIndexes, keyword: str, value: str
    ) -> None:
        for level in (Level.PATIENT, Level.STUDY, Level.INSTANCE):
            query = parse_qido(level, [(keyword, value)])
            on_sqlite, on_postgres = (s.search(query) for s in two_indexes.both)
            assert on_postgres == on_sqlite, (level, keyword, value)

    @pytest.mark.parametrize("order", sorted(STUDY_LIST_ORDERS))
    def test_the_study_list_is_the_same_in_every_order(
        self, two_indexes: TwoIndexes, order: str
    ) -> None:
        page = StudyPage(words=("chest",), limit=50, order=order)
        on_sqlite, on_postgres = _both(two_indexes, lambda s: s.study_list(page))
        drop = ("created_at",)  # the moment each store indexed the study
        assert on_postgres[0] == on_sqlite[0] > 0
        assert [{k: v for k, v in r.items() if k not in drop} for r in on_postgres[1]] == [
            {k: v for k, v in r.items() if k not in drop} for r in on_sqlite[1]
        ]

    def test_lookups_and_counts_are_the_same(self, two_indexes: TwoIndexes) -> None:
        def lookups(store: Any) -> Any:
            studies = sorted(store.study_uids())
            return (
                store.counts(),
                studies,
                sorted(store.patient_ids()),
                [store.series_of_study(u) for u in studies],
                [
                    [(r.sop_instance_uid, r.digest, r.size) for r in store.instances(u)]
                    for u in studies
                ],
                [store.instance_count(u) for u in studies],
                [store.studies_of_patient(p) for p in sorted(store.patient_ids())],
                [(a.sop_instance_uid, a.study_instance_uid) for a in store.arrivals_after(0, 1000)],
            )

        on_sqlite, on_postgres = _both(two_indexes, lookups)
        assert on_postgres == on_sqlite


class TestSettings:
    def _config(self, tmp_path: Path, store: str) -> Path:
        path = tmp_path / "node.toml"
        path.write_text('origin = "a.example/x"\n' + store)
        return path

    @pytest.mark.parametrize(
        ("store", "sentence"),
        [
            ('[store]\nbackend = "postgresql"\n', "dsn: "),
            ('[store]\nbackend = "postgresql"\ndsn = "host=db"\n', "objects: "),
            (
                '[store]\nbackend = "postgresql"\ndsn = "postgresql://u:secret@db/x"\n'
                '[store.objects]\nbucket = "b-1"\n',
                "dsn: must not hold the password",
            ),
            (
                '[store]\nbackend = "postgresql"\ndsn = "host=\'db"\n'
                '[store.objects]\nbucket = "b-1"\n',
                "dsn: not a PostgreSQL connection string",
            ),
            ('[store]\ndsn = "host=db"\n', "backend: "),
            ('[store]\nbackend = "mysql"\n', "store.backend"),
            ('[store.objects]\nbucket = "Not_A_Bucket"\n', "bucket: "),
            ('[store.objects]\nendpoint = "ftp://x"\n', "endpoint: "),
        ],
    )
    def test_bad_store_settings_are_refused_with_the_key(
        self, tmp_path: Path, store: str, sentence: str
    ) -> None:
        with pytest.raises(ConfigError) as refused:
            load_config(self._config(tmp_path, store))
        assert sentence in str(refused.value)
        assert "secret" not in str(refused.value)

    def test_unreachable_postgresql_stops_the_node_without_showing_the_dsn(
        self, tmp_path: Path, postgres: PostgresServer
    ) -> None:
        node = init_node(tmp_path, "down.example/imageshare")
        passfile = private_file(tmp_path / "pgpass", "*:*:*:*:wrong-password\n")
        node.append_config(
            f'[store]\nbackend = "postgresql"\n'
            f'dsn = "host=127.0.0.1 port={postgres.port} user=imageshare dbname=postgres'
            f' passfile={passfile} connect_timeout=5"\n'
            '[store.objects]\nendpoint = "http://127.0.0.1:9"\nbucket = "b-1"\n'
        )
        result = run_cli("run", config=node.config, check=False, timeout=90)
        assert result.returncode == 2, result.stderr
        assert "cannot reach the PostgreSQL index" in result.stderr
        assert "Traceback" not in result.stderr
        assert "wrong-password" not in result.stderr


class TestSchemaVersions:
    def test_an_index_at_version_1_gains_the_series_index_by_study_and_modality(
        self, postgres: PostgresServer
    ) -> None:
        import psycopg

        dsn = postgres.create_database("at_version_1")
        pool = open_pool(PostgresSettings(dsn, pool_size=1))
        try:
            assert migrate(pool, MIGRATIONS[:1]) == 1
            assert migrate(pool) == len(MIGRATIONS)
        finally:
            pool.close()
        with psycopg.connect(dsn) as conn:
            indexes = {
                row[0]
                for row in conn.execute(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'series'"
                )
            }
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations")]
        assert "idx_series_study_instance_uid_modality" in indexes
        assert "idx_series_study_instance_uid" not in indexes
        assert sorted(versions) == list(range(1, len(MIGRATIONS) + 1))

    def test_versions_from_before_components_are_the_index_and_components_count_apart(
        self, postgres: PostgresServer
    ) -> None:
        import psycopg

        dsn = postgres.create_database("before_components")
        with psycopg.connect(dsn, autocommit=True) as conn:  # the table as version 1 wrote it
            conn.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            conn.execute("INSERT INTO schema_migrations (version) VALUES (1), (2)")
        steps: list[str] = []
        other = (lambda conn: steps.append("other 1"), lambda conn: steps.append("other 2"))
        pool = open_pool(PostgresSettings(dsn, pool_size=1))
        try:
            assert migrate(pool, MIGRATIONS[:2]) == 2  # nothing to apply: already at 2
            assert migrate(pool, other, component="other") == 2
            assert steps == ["other 1", "other 2"]
            with pytest.raises(ConfigError, match="other schema is at version 2, newer than the 1"):
                migrate(pool, other[:1], component="other")
        finally:
            pool.close()
        with psycopg.connect(dsn) as conn:
            rows = sorted(conn.execute("SELECT component, version FROM schema_migrations"))
        assert rows == [("index", 1), ("index", 2), ("other", 1), ("other", 2)]
