"""QIDO-RS latency of a node whose index holds 10^6 instances, on each instance store.

The index of a fresh node is filled directly, in bulk, with the rows the store would
write (node/store/instances.py SCHEMA, at the store's latest schema version): 10^4
studies of 5,000 patients, 4 series of 25 instances each, with distinct UIDs, names,
dates over 16 years and a modality per study. No instance file exists: a search reads
the index only. Then the running node answers typical searches over HTTP, each several
times with a different value (another patient, month, name or study): median and p95.

Run alone: python -m scripts.benchmarks.qido_scale [--quick]   (quick: 10^4 instances)
"""

from __future__ import annotations

import datetime
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests

from scripts.benchmarks.common import BenchContext, Row
from tests.support.nodes import NodeProcess, init_node
from tests.support.postgres import node_store_settings, running_postgres
from tests.support.s3 import running_s3

INSTANCES, QUICK_INSTANCES = 1_000_000, 10_000
SERIES_PER_STUDY, INSTANCES_PER_SERIES = 4, 25
STUDIES_PER_PATIENT = 2
REPETITIONS = 25
LIMIT = 50
# The QIDO-RS answer a search must be back within, at 10^6 instances.
TARGET_SECONDS = 0.5
MODALITIES = ("CT", "MR", "CR", "US", "PT", "NM", "MG", "XA")
SYLLABLES = ("KA", "LO", "MI", "RE", "SU", "TA", "NE", "VO", "BI", "DU")
GIVEN = ("ANNA", "BEN", "CLARA", "DAVID", "EVA", "FELIX", "GRETA", "HUGO", "IDA", "JONAS")
FIRST_DAY = datetime.date(2010, 1, 1)
DAYS = 16 * 365
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

NOTES = [
    "qido_scale: the index is filled in bulk before the node starts (SQLite: one"
    " transaction of inserts into index.sqlite; PostgreSQL: COPY, then ANALYZE, as"
    " autovacuum would after such a load), with realistic values; no instance file is"
    " behind the rows, since a search reads the index alone. Each search runs"
    f" {REPETITIONS} times over HTTP with a different value; the figure is the median, and"
    " p95 the 95th percentile, of the whole request (parse, SQL, DICOM JSON, loopback)."
    f" Study searches ask limit={LIMIT} and return the default attributes, among them the"
    " series and instance counts and ModalitiesInStudy of each study. The PostgreSQL node"
    " stores objects in moto, which no search reads. Series are indexed by (study,"
    " modality): without it (index.sqlite before schema version 4) SQLite took 2 to 17 s"
    " for a ModalitiesInStudy search at this scale.",
]


def _patient_name(patient: int) -> str:
    family = "".join(SYLLABLES[(patient // 10**k) % len(SYLLABLES)] for k in range(3))
    return f"{family}^{GIVEN[patient % len(GIVEN)]}"


@dataclass(frozen=True)
class SyntheticIndex:
    """The index rows of ``instances`` instances, by table, in SCHEMA column names."""

    instances: int
    seed: int = 20

    @property
    def studies(self) -> int:
        return self.instances // (SERIES_PER_STUDY * INSTANCES_PER_SERIES)

    def study_uid(self, study: int) -> str:
        return f"2.25.1{study:012d}"

    def series_uid(self, study: int, series: int) -> str:
        return f"2.25.2{study:012d}{series:03d}"

    def patient_id(self, study: int) -> str:
        return f"MRN-{study // STUDIES_PER_PATIENT:07d}"

    def study_date(self, study: int) -> str:
        day = FIRST_DAY + datetime.timedelta(days=random.Random(study).randrange(DAYS))
        return day.strftime("%Y%m%d")

    def modality(self, study: int) -> str:
        return MODALITIES[random.Random(-study).randrange(len(MODALITIES))]

    def study_rows(self) -> Iterator[dict[str, Any]]:
        now = time.time()
        for study in range(self.studies):
            patient = study // STUDIES_PER_PATIENT
            yield {
                "study_instance_uid": self.study_uid(study),
                "patient_id": self.patient_id(study),
                "patient_name": _patient_name(patient),
                "patient_birth_date": f"{1930 + patient % 80}{1 + patient % 12:02d}15",
                "patient_sex": "FM"[patient % 2],
                "issuer_of_patient_id": "HOSPITAL",
                "study_date": self.study_date(study),
                "study_time": f"{8 + study % 10:02d}{study % 60:02d}00",
                "accession_number": f"ACC-{study:08d}",
                "study_id": str(study),
                "study_description": f"{self.modality(study)} examination",
                "referring_physician_name": _patient_name(patient * 7 + 3),
                "timezone_offset_from_utc": "+0100",
                "source": "local",
                "created_at": now,
            }

    def series_rows(self) -> Iterator[dict[str, Any]]:
        for study in range(self.studies):
            for series in range(SERIES_PER_STUDY):
                # The last series of a study is a structured report beside the images.
                modality = "SR" if series == SERIES_PER_STUDY - 1 else self.modality(study)
                yield {
                    "series_instance_uid": self.series_uid(study, series),
                    "study_instance_uid": self.study_uid(study),
                    "modality": modality,
                    "series_number": series + 1,
                    "series_description": f"{modality} series {series + 1}",
                    "series_date": self.study_date(study),
                    "series_time": "120000",
                    "body_part_examined": "CHEST",
                    "performed_procedure_step_start_date": self.study_date(study),
                    "performed_procedure_step_start_time": "115500",
                }

    def instance_rows(self) -> Iterator[dict[str, Any]]:
        now = time.time()
        number = 0
        for study in range(self.studies):
            study_uid = self.study_uid(study)
            for series in range(SERIES_PER_STUDY):
                series_uid = self.series_uid(study, series)
                for instance in range(INSTANCES_PER_SERIES):
                    yield {
                        "sop_instance_uid": f"2.25.3{number:012d}",
                        "series_instance_uid": series_uid,
                        "study_instance_uid": study_uid,
                        "sop_class_uid": CT_IMAGE,
                        "instance_number": instance + 1,
                        "rows": 512,
                        "columns": 512,
                        "number_of_frames": None,
                        "bits_allocated": 16,
                        "transfer_syntax_uid": EXPLICIT_LITTLE_ENDIAN,
                        "digest": f"{number:064x}",
                        "size": 526_000,
                        "received_at": now,
                    }
                    number += 1

    def rows(self) -> Iterator[tuple[str, Iterator[dict[str, Any]]]]:
        yield "studies", self.study_rows()
        yield "series", self.series_rows()
        yield "instances", self.instance_rows()


def _values(table: str, rows: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, ...]]:
    from node.store.instances import SCHEMA

    columns = list(SCHEMA[table]["columns"])
    return (tuple(row[c] for c in columns) for row in rows)


def fill_sqlite(node: NodeProcess, index: SyntheticIndex) -> None:
    """The rows into the node's index.sqlite, brought to the store's schema first."""
    from node.store.instances import MIGRATIONS, SCHEMA
    from node.store.sqlite import open_database

    conn = open_database(node.data_dir / "index.sqlite", MIGRATIONS)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # a filled scratch index: no need to flush
        conn.execute("BEGIN")
        for table, rows in index.rows():
            columns = list(SCHEMA[table]["columns"])
            conn.executemany(
                f"INSERT INTO {table} ({', '.join(columns)})"
                f" VALUES ({', '.join('?' * len(columns))})",
                _values(table, rows),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def fill_postgres(dsn: str, index: SyntheticIndex) -> None:
    """The rows into the PostgreSQL index (migrated by the store's own code) by COPY."""
    import psycopg

    from node.store.instances import SCHEMA
    from node.store.postgres import PostgresSettings, migrate, open_pool

    pool = open_pool(PostgresSettings(dsn, pool_size=1))
    try:
        migrate(pool)
    finally:
        pool.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table, rows in index.rows():
            columns = ", ".join(SCHEMA[table]["columns"])
            with (
                conn.cursor() as cursor,
                cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy,
            ):
                for values in _values(table, rows):
                    copy.write_row(values)
        conn.execute("ANALYZE")


@dataclass(frozen=True)
class Search:
    """One kind of QIDO-RS search: its name and the path of its n-th repetition."""

    name: str
    path: Callable[[int], str]


def searches(index: SyntheticIndex) -> list[Search]:
    studies = index.studies

    def pick(n: int) -> int:  # studies spread over the index, not neighbours
        return (n * 7919 + 13) % studies

    def month(n: int) -> str:
        first = FIRST_DAY + datetime.timedelta(days=(n * 211) % (DAYS - 31))
        last = first + datetime.timedelta(days=30)
        return f"{first:%Y%m%d}-{last:%Y%m%d}"

    def name_prefix(n: int) -> str:
        return _patient_name(pick(n) // STUDIES_PER_PATIENT)[:4].lower() + "*"

    return [
        Search(
            "study search by PatientID", lambda n: f"studies?PatientID={index.patient_id(pick(n))}"
        ),
        Search(
            f"study search by a 31-day StudyDate range, limit={LIMIT}",
            lambda n: f"studies?StudyDate={month(n)}&limit={LIMIT}",
        ),
        Search(
            f"study search by PatientName prefix (e.g. kalo*, any case), limit={LIMIT}",
            lambda n: f"studies?PatientName={name_prefix(n)}&limit={LIMIT}",
        ),
        Search(
            f"study search by ModalitiesInStudy, limit={LIMIT}",
            lambda n: f"studies?ModalitiesInStudy={MODALITIES[n % len(MODALITIES)]}&limit={LIMIT}",
        ),
        Search(
            f"series of one study ({SERIES_PER_STUDY})",
            lambda n: f"studies/{index.study_uid(pick(n))}/series",
        ),
        Search(
            f"instances of one study ({SERIES_PER_STUDY * INSTANCES_PER_SERIES})",
            lambda n: f"studies/{index.study_uid(pick(n))}/instances",
        ),
    ]


@dataclass(frozen=True)
class Latency:
    median: float
    p95: float


def time_search(node: NodeProcess, search: Search, session: requests.Session) -> Latency:
    """The search's latency over REPETITIONS requests (after one not timed); raises
    RuntimeError on an answer other than 200, or if no repetition matched anything."""
    seconds = []
    matched = 0
    for n in range(-1, REPETITIONS):
        started = time.perf_counter()
        answer = session.get(f"{node.url}/dicomweb/{search.path(n)}", timeout=120)
        elapsed = time.perf_counter() - started
        if answer.status_code not in (200, 204):  # 204: nothing matched this value
            raise RuntimeError(f"{search.name}: HTTP {answer.status_code}, {answer.text[:200]}")
        matched += len(answer.json()) if answer.status_code == 200 else 0
        if n >= 0:
            seconds.append(elapsed)
    if not matched:
        raise RuntimeError(f"{search.name}: no repetition matched anything")
    return Latency(statistics.median(seconds), statistics.quantiles(seconds, n=20)[-1])


def run(ctx: BenchContext) -> list[Row]:
    index = SyntheticIndex(QUICK_INSTANCES if ctx.quick else INSTANCES)
    work = ctx.workdir / "qido_scale"
    work.mkdir(parents=True, exist_ok=True)
    latencies: dict[str, dict[str, Latency]] = {}
    fill_seconds: dict[str, float] = {}
    with running_postgres() as postgres, running_s3("moto") as s3:
        for backend in ("SQLite", "PostgreSQL"):
            node = init_node(work, f"qido-{backend.lower()}.example/imageshare")
            started = time.perf_counter()
            if backend == "PostgreSQL":
                s3.client().create_bucket(Bucket="qido")  # type: ignore[attr-defined]
                dsn = postgres.create_database("qido")
                node.append_config(node_store_settings(node.data_dir, dsn, s3, "qido"))
                fill_postgres(dsn, index)
            else:
                fill_sqlite(node, index)
            fill_seconds[backend] = time.perf_counter() - started
            node.start()
            try:
                with requests.Session() as session:
                    session.headers.update({**node.auth, "Accept": "application/dicom+json"})
                    latencies[backend] = {
                        s.name: time_search(node, s, session) for s in searches(index)
                    }
            finally:
                node.stop()
    rows = []
    scale = f"{index.instances:,} instances ({index.studies:,} studies)"
    for search in searches(index):
        for backend, found in latencies.items():
            latency = found[search.name]
            rows.append(
                Row(
                    f"QIDO-RS {search.name}, {backend} index of {scale}, median ms"
                    f" (p95 {latency.p95 * 1000:.1f} ms)",
                    round(latency.median * 1000, 1),
                    target=f"p95 <= {TARGET_SECONDS * 1000:.0f} ms",
                    met=latency.p95 <= TARGET_SECONDS,
                    command=f"GET /dicomweb/{search.path(0)}",
                )
            )
    for backend, seconds in fill_seconds.items():
        rows.append(Row(f"bulk fill of the {backend} index with {scale}, s", round(seconds, 1)))
    return rows


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
