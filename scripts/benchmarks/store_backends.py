"""The two instance stores side by side, beside Orthanc on PostgreSQL: the embedded store
(files and SQLite), the large site's (PostgreSQL and an S3-compatible object store, here
moto's server on loopback), and Orthanc with Debian's orthanc-postgresql plugins (its
index and its DICOM files in PostgreSQL), all with databases of one private PostgreSQL.

The reference study (dataplane) goes into a fresh server of each kind by STOW-RS (one
request) and into another by C-STORE (storescu, TCP_NODELAY=1), then is retrieved whole
by WADO-RS (median of a few runs, the servers interleaved). The PostgreSQL node's
retrieve is also timed just after a restart, when every object is fetched from the store
and its SHA-256 checked (afterwards it serves its verified local copies). A node on
SQLite + files holding the reference study is also moved by `imageshare migrate --to
postgresql` and must answer the same after. Moto is a test
server, slower than a production object store, so its figures bound the cost from above.

Run alone: python -m scripts.benchmarks.store_backends [--quick]
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from node.core.entries import Grant
from node.samples import SyntheticStudy
from node.store.ledger import LedgerStore
from scripts.benchmarks.common import BenchContext, Row
from scripts.benchmarks.dataplane import (
    at_most,
    describe,
    reference_study,
    retrieve_study,
    study_directory,
)
from tests.support.nodes import init_node
from tests.support.orthanc import OrthancServer, storescu, storescu_command_text
from tests.support.postgres import PostgresServer, node_store_settings, running_postgres
from tests.support.s3 import S3Server, running_s3

OURS = ("SQLite + files", "PostgreSQL + S3 (moto)")
ORTHANC = "Orthanc on PostgreSQL"
NODE_AE = "IMAGESHARE"
STREAM_CHUNK = 1 << 20

NOTES = [
    "store_backends: each ingest goes into a fresh server: our node on SQLite + files, our"
    " node on PostgreSQL + S3 (moto), and Orthanc with Debian's orthanc-postgresql plugins"
    " (index and DICOM files in PostgreSQL: EnableIndex and EnableStorage), each database in"
    " the same private PostgreSQL. STOW-RS sends the whole study in one"
    ' `multipart/related; type="application/dicom"` request (with Content-Length);'
    " storescu sends it over one association with TCP_NODELAY=1. The Orthanc column is"
    " Orthanc on PostgreSQL in every row, both of our stores compared with it.",
    "store_backends: moto is a test S3 server in Python on the same two cores; a production"
    " object store answers faster, so the PostgreSQL + S3 figures bound its cost from above."
    " The PostgreSQL node's retrieve right after a restart fetches every object from moto"
    " and checks its SHA-256; its other retrieves serve the verified local copies it keeps.",
]


@dataclass
class Receiver:
    """One running server the study is sent to: a node or Orthanc."""

    name: str
    dicomweb_url: str
    headers: dict[str, str]
    dimse_port: int
    ae_title: str
    stop: Callable[[], None]
    restart: Callable[[], None] | None = None  # a node: stop and start its daemon


def _multipart_parts(files: list[Path], boundary: str) -> Iterator[bytes | Path]:
    for path in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield path
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _streamed(parts: list[bytes | Path]) -> Iterator[bytes]:
    for part in parts:
        if isinstance(part, bytes):
            yield part
            continue
        with open(part, "rb") as f:
            while chunk := f.read(STREAM_CHUNK):
                yield chunk


def stow_seconds(receiver: Receiver, study: SyntheticStudy) -> float:
    """POST the whole study by STOW-RS in one request, streamed from the files; raises
    RuntimeError unless the server answers 200 having stored every instance."""
    boundary = uuid.uuid4().hex
    parts = list(_multipart_parts(study.files, boundary))
    length = sum(len(p) if isinstance(p, bytes) else p.stat().st_size for p in parts)
    url = urllib.parse.urlsplit(f"{receiver.dicomweb_url}/studies")
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
    headers = {
        **receiver.headers,
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(length),
        "Accept": "application/dicom+json",
    }
    try:
        started = time.perf_counter()
        connection.request("POST", url.path, body=_streamed(parts), headers=headers)
        response = connection.getresponse()
        answer = response.read()
        seconds = time.perf_counter() - started
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"STOW-RS into {receiver.name}: HTTP {response.status} {answer[:200]!r}")
    _check_stored(receiver, study, "STOW-RS")
    return seconds


def storescu_seconds(receiver: Receiver, study: SyntheticStudy, log: Path) -> float:
    directory = study_directory(study)
    sent = storescu(directory, "127.0.0.1", receiver.dimse_port, receiver.ae_title, log)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu into {receiver.name}: {sent.failure()}")
    _check_stored(receiver, study, "storescu")
    return sent.seconds


def _check_stored(receiver: Receiver, study: SyntheticStudy, how: str) -> None:
    """RuntimeError unless QIDO-RS lists every instance of the study (both servers answer
    one search, up to 10,000 instances)."""
    answer = requests.get(
        f"{receiver.dicomweb_url}/studies/{study.study_uid}/instances",
        headers={**receiver.headers, "Accept": "application/dicom+json"},
        timeout=120,
    )
    found = len(answer.json()) if answer.status_code == 200 else 0
    if found != len(study.files):
        raise RuntimeError(f"{how} into {receiver.name}: {found} of {len(study.files)} stored")


def retrieve_seconds(receiver: Receiver, study: SyntheticStudy) -> float:
    started = time.perf_counter()
    received = retrieve_study(receiver.dicomweb_url, study.study_uid, receiver.headers)
    seconds = time.perf_counter() - started
    if received < sum(path.stat().st_size for path in study.files):
        raise RuntimeError(f"WADO-RS from {receiver.name}: only {received} bytes")
    return seconds


@dataclass
class Servers:
    """What every receiver of the run shares: one PostgreSQL and one S3 server."""

    work: Path
    postgres: PostgresServer
    s3: S3Server

    def node(self, backend: str, label: str) -> Receiver:
        node = init_node(self.work, f"{label}.example/imageshare", label)
        if backend == OURS[1]:
            self.s3.client().create_bucket(Bucket=label)  # type: ignore[attr-defined]
            dsn = self.postgres.create_database(label)
            node.append_config(node_store_settings(node.data_dir, dsn, self.s3, label))
        node.start()

        def restart() -> None:
            node.stop()
            node.start()

        return Receiver(
            backend, node.url + "/dicomweb", node.auth, node.dimse_port, NODE_AE, node.stop, restart
        )

    def orthanc(self, label: str) -> Receiver:
        dsn = self.postgres.create_database(label)
        orthanc = OrthancServer(self.work, label, postgresql_uri=dsn).start()
        return Receiver(
            ORTHANC, orthanc.dicomweb_url, {}, orthanc.dicom_port, orthanc.ae_title, orthanc.stop
        )

    def receivers(self, label: str) -> list[Receiver]:
        """Fresh servers, ours first (in OURS order), then Orthanc; stopped by the caller."""
        started: list[Receiver] = []
        try:
            for number, backend in enumerate(OURS):
                started.append(self.node(backend, f"{label}-node{number}"))
            started.append(self.orthanc(f"{label}-orthanc"))
        except BaseException:
            for receiver in started:
                receiver.stop()
            raise
        return started


MIGRATED_LEDGER_ENTRIES = 300


def _answers(url: str, headers: dict[str, str], study: SyntheticStudy) -> list[Any]:
    """The study's instances as QIDO-RS lists them (sorted), for before/after."""
    answer = requests.get(
        f"{url}/studies/{study.study_uid}/instances",
        headers={**headers, "Accept": "application/dicom+json"},
        timeout=120,
    )
    answer.raise_for_status()
    return sorted(answer.json(), key=json.dumps)


def migrate_row(servers: Servers, study: SyntheticStudy) -> Row:
    """A node on SQLite + files holding the reference study and a few hundred ledger
    entries, moved by `imageshare migrate --to postgresql` (timed), then started: it must
    list the same instances and serve the whole study by WADO-RS."""
    node = init_node(servers.work, "migrated.example/imageshare", "migrated")
    ledger = LedgerStore(node.data_dir)
    try:
        entries = [
            (Grant(token=i.to_bytes(4, "big")), 1_700_000_000 + i)
            for i in range(MIGRATED_LEDGER_ENTRIES)
        ]
        ledger.own_log(node.origin, node.vkey).append_many(entries)
    finally:
        ledger.close()
    node.cli("import", str(study_directory(study)), timeout=600)
    node.start()
    before = _answers(node.url + "/dicomweb", node.auth, study)
    node.stop()
    servers.s3.client().create_bucket(Bucket="migrated")  # type: ignore[attr-defined]
    settings = servers.work / "migrated-store.toml"
    dsn = servers.postgres.create_database("migrated")
    settings.write_text(node_store_settings(node.data_dir, dsn, servers.s3, "migrated"))
    started = time.perf_counter()
    node.cli("migrate", "--to", "postgresql", "--settings", str(settings), timeout=1800)
    seconds = time.perf_counter() - started
    node.start()
    try:
        receiver = Receiver(OURS[1], node.url + "/dicomweb", node.auth, 0, NODE_AE, node.stop)
        same = _answers(receiver.dicomweb_url, node.auth, study) == before
        retrieve_seconds(receiver, study)  # raises unless every byte comes back
    finally:
        node.stop()
    return Row(
        f"imageshare migrate --to postgresql of a node holding the reference study and"
        f" {MIGRATED_LEDGER_ENTRIES} ledger entries (verified: row digests, every object read"
        " back from moto, ledger verify), then the same QIDO-RS answers and the whole study by"
        " WADO-RS, s",
        round(seconds, 2),
        target="verifies, same answers",
        met=same,
        command="imageshare migrate --to postgresql --settings store.toml",
    )


def run(ctx: BenchContext) -> list[Row]:
    study = reference_study(ctx)
    work = ctx.workdir / "store_backends"
    work.mkdir(parents=True, exist_ok=True)
    runs = 3 if ctx.quick else 5
    stow: dict[str, float] = {}
    dimse: dict[str, float] = {}
    retrieve: dict[str, list[float]] = {}
    with running_postgres() as postgres, running_s3("moto") as s3:
        servers = Servers(work, postgres, s3)
        receivers = servers.receivers("dimse")
        try:
            for receiver in receivers:
                log = work / f"storescu-{receiver.name.split()[0]}.log"
                dimse[receiver.name] = storescu_seconds(receiver, study, log)
        finally:
            for receiver in receivers:
                receiver.stop()
        migrated = migrate_row(servers, study)
        receivers = servers.receivers("stow")
        try:
            for receiver in receivers:
                stow[receiver.name] = stow_seconds(receiver, study)
            postgres_node = next(r for r in receivers if r.name == OURS[1])
            assert postgres_node.restart is not None
            postgres_node.restart()  # its local copies are gone: every object is fetched
            fetched = retrieve_seconds(postgres_node, study)
            for _ in range(runs):  # interleaved, so that a busy moment hits each alike
                for receiver in receivers:
                    retrieve.setdefault(receiver.name, []).append(retrieve_seconds(receiver, study))
        finally:
            for receiver in receivers:
                receiver.stop()
    wado = {name: statistics.median(seconds) for name, seconds in retrieve.items()}
    workload = describe(study)
    wado_command = "GET /dicomweb/studies/UID (Accept multipart/related; application/dicom)"
    rows: list[Row] = []
    for figures, what, command in (
        (stow, f"STOW-RS ingest of the reference study ({workload})", "POST /dicomweb/studies"),
        (dimse, "DIMSE ingest with storescu", storescu_command_text("AE")),
        (wado, f"WADO-RS whole-study retrieve (median of {runs})", wado_command),
    ):
        for backend in OURS:
            rows.append(
                Row(
                    f"{what}, our node on {backend}, beside {ORTHANC}, s",
                    round(figures[backend], 3),
                    round(figures[ORTHANC], 3),
                    target="<= Orthanc",
                    met=at_most(figures[backend], figures[ORTHANC]),
                    command=command,
                )
            )
    rows.append(
        Row(
            f"WADO-RS whole-study retrieve, our node on {OURS[1]} just after a restart"
            " (every object fetched and verified), s",
            round(fetched, 3),
            round(wado[ORTHANC], 3),
            target="<= Orthanc",
            met=at_most(fetched, wado[ORTHANC]),
            command=wado_command,
        )
    )
    rows.append(migrated)
    return rows


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
