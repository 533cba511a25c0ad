"""The two instance stores side by side: the embedded one (files and SQLite) and the large
site's (PostgreSQL and an S3-compatible object store, here moto's server on loopback).

One CT study (64x64 slices) goes into a node of each kind by C-STORE (storescu), then is
retrieved whole by WADO-RS; the PostgreSQL node's retrieve is timed twice: just after a
restart (every object fetched from the store and its SHA-256 checked) and again (its
verified local copies). The figures compare backends within one run; moto is a test
server, slower than a production object store, so they bound the cost from above.

Run alone: python -m scripts.benchmarks.store_backends [--quick]
"""

from __future__ import annotations

import sys
import time

import requests

from node.samples import make_ct_study
from scripts.benchmarks.common import BenchContext, Row
from tests.support.nodes import NodeProcess, init_node
from tests.support.orthanc import storescu, storescu_command_text
from tests.support.postgres import node_store_settings, running_postgres
from tests.support.s3 import running_s3

SLICES, QUICK_SLICES = 400, 100


def _retrieve_seconds(node: NodeProcess, study_uid: str) -> float:
    started = time.perf_counter()
    answer = requests.get(
        f"{node.url}/dicomweb/studies/{study_uid}",
        headers={**node.auth, "Accept": 'multipart/related; type="application/dicom"'},
        timeout=600,
    )
    answer.raise_for_status()
    return time.perf_counter() - started


def run(ctx: BenchContext) -> list[Row]:
    work = ctx.workdir / "store_backends"
    work.mkdir(parents=True, exist_ok=True)
    slices = QUICK_SLICES if ctx.quick else SLICES
    study = make_ct_study(work / "study", series=2, slices=slices // 2, rows=64, columns=64)
    count = len(study.files)
    rates: dict[str, float] = {}
    retrieve: dict[str, float] = {}
    with running_postgres() as postgres, running_s3("moto") as s3:
        s3.client().create_bucket(Bucket="bench")  # type: ignore[attr-defined]
        for kind in ("sqlite", "postgresql"):
            node = init_node(work, f"{kind}.example/imageshare", f"node-{kind}")
            if kind == "postgresql":
                dsn = postgres.create_database("bench")
                node.append_config(node_store_settings(node.data_dir, dsn, s3, "bench"))
            node.start()
            try:
                sent = storescu(
                    study.files[0].parent,
                    "127.0.0.1",
                    node.dimse_port,
                    "IMAGESHARE",
                    work / f"storescu-{kind}.log",
                )
                if sent.returncode != 0:
                    raise RuntimeError(f"storescu into the {kind} node: {sent.failure()}")
                rates[kind] = count / sent.seconds
                if kind == "postgresql":
                    node.stop()
                    node.start()  # its local copies are gone: every object is fetched
                    retrieve["postgresql, objects fetched"] = _retrieve_seconds(
                        node, study.study_uid
                    )
                retrieve[kind] = _retrieve_seconds(node, study.study_uid)
            finally:
                node.stop()
    ratio = rates["postgresql"] / rates["sqlite"]
    command = storescu_command_text("IMAGESHARE")
    return [
        Row(
            f"C-STORE ingest of {count} CT instances, SQLite store, instances/s",
            round(rates["sqlite"], 1),
            command=command,
        ),
        Row(
            f"C-STORE ingest of {count} CT instances, PostgreSQL + S3 (moto) store, instances/s",
            round(rates["postgresql"], 1),
            target=">= 0.5 x the SQLite store",
            met=ratio >= 0.5,
            command=command,
        ),
        Row(
            f"WADO-RS retrieve of the {count}-instance study, SQLite store, s",
            round(retrieve["sqlite"], 3),
            command="GET /dicomweb/studies/UID",
        ),
        Row(
            f"WADO-RS retrieve of the {count}-instance study, PostgreSQL + S3, after a restart"
            " (every object fetched and verified), s",
            round(retrieve["postgresql, objects fetched"], 3),
            command="GET /dicomweb/studies/UID",
        ),
        Row(
            f"WADO-RS retrieve of the {count}-instance study, PostgreSQL + S3, again, s",
            round(retrieve["postgresql"], 3),
            command="GET /dicomweb/studies/UID",
        ),
    ]


NOTES = [
    "store_backends: moto is a test S3 server in Python on the same two cores; a production"
    " object store answers faster, so the PostgreSQL + S3 figures bound its cost from above.",
]


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as scratch:
        for row in run(BenchContext(Path(scratch), quick="--quick" in sys.argv)):
            print(f"{row.figure}: {row.ours} {row.target}")
