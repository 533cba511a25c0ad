"""The consent ledger: durable appends, proof latency on a large log, local verification.

- Durable appends: many threads call OwnLog.append at once; each call returns only once
  its entry is committed and fsynced, and concurrent calls share a commit (group commit).
- Proofs: a log of 1,000,000 entries (100,000 with --quick) is built through the bulk
  path (append_many, the same durable code in large transactions); then inclusion and
  consistency proofs are served from stored subtree hashes, as the HTTP API does.
- Verify: OwnLog.verify re-derives every leaf, the hash chain, every stored subtree hash
  and the checkpoint root, as `imageshare ledger verify` does.

Run alone: python -m scripts.benchmarks.ledger [--quick]
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from pathlib import Path

from node.config import LedgerConfig
from node.core.entries import Access
from node.core.keys import NodeIdentity
from node.core.merkle import verify_consistency, verify_inclusion
from node.core.notes import verify_note
from node.store.ledger import LedgerStore, OwnLog
from node.store.pg_ledger import PostgresLedgerStore
from node.store.postgres import PostgresSettings
from scripts.benchmarks.common import BenchContext, Row
from tests.support.postgres import running_postgres

ORIGIN = "bench.example/imageshare"
WRITERS = 32
NOTES = [
    "Ledger appends: each append is acknowledged only after its SQLite transaction is"
    " committed with synchronous=FULL (WAL fsynced); concurrent appends share one commit"
    " (a writer waits at most ledger.group_commit_ms for others while appends are concurrent).",
    "Proof latency: median over random requests against the stored subtree hashes of the"
    " large log, in the benchmark process (no HTTP).",
]


def _access(i: int) -> Access:
    digest = i.to_bytes(32, "big")
    return Access(
        token_id=digest,
        grantee="b.example/imageshare",
        study=digest,
        instances=400,
        bytes=200_000_000,
        digest=digest,
    )


def concurrent_append_rate(own: OwnLog, writers: int, per_writer: int) -> float:
    """Durable entries per second with ``writers`` threads appending at once."""

    def work(thread: int) -> None:
        for i in range(per_writer):
            own.append(_access(thread * per_writer + i), 1_700_000_000)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(writers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return writers * per_writer / (time.perf_counter() - started)


def build_log(own: OwnLog, size: int, batch: int = 20_000) -> float:
    """Grow the log to ``size`` entries through append_many; returns entries per second."""
    started, start_size = time.perf_counter(), own.size()
    while own.size() < size:
        count = min(batch, size - own.size())
        base = own.size()
        own.append_many([(_access(base + i), 1_700_000_000) for i in range(count)])
    return (size - start_size) / (time.perf_counter() - started)


def proof_latency_ms(own: OwnLog, size: int, samples: int = 1000) -> tuple[float, float]:
    """Median milliseconds for an inclusion and a consistency proof at ``size`` (checked)."""
    rng = random.Random(7)
    root = own.root(size)
    inclusion, consistency = [], []
    for _ in range(samples):
        index = rng.randrange(size)
        t = time.perf_counter()
        proof = own.inclusion_proof(index, size)
        inclusion.append(time.perf_counter() - t)
        assert verify_inclusion(proof, own.leaf_hash(index), index, size, root)
    for _ in range(samples // 10):
        old = rng.randrange(1, size)
        t = time.perf_counter()
        proof = own.consistency_proof(old, size)
        consistency.append(time.perf_counter() - t)
        assert verify_consistency(proof, old, size, own.root(old), root)
    return statistics.median(inclusion) * 1e3, statistics.median(consistency) * 1e3


def postgres_append_rows(identity: NodeIdentity, single_count: int, per_writer: int) -> list[Row]:
    """The append rows on the PostgreSQL ledger (a server of the benchmark's own, on the
    same cores): one transaction per group commit, under the ledger's writers' lock."""
    with running_postgres() as postgres:
        settings = PostgresSettings(postgres.create_database("ledger_appends"), WRITERS + 1)
        store = PostgresLedgerStore(settings)
        try:
            own = store.own_log(identity.origin, identity.vkey)
            own.group_commit_wait = LedgerConfig().group_commit_ms / 1000
            single = concurrent_append_rate(own, 1, single_count)
            rate = concurrent_append_rate(own, WRITERS, per_writer)
            assert own.verify().ok
        finally:
            store.close()
    command = "python -m scripts.benchmarks.ledger"
    return [
        Row(
            f"ledger append on PostgreSQL, durable, {WRITERS} concurrent writers (entries/s)",
            round(rate),
            command=command,
        ),
        Row(
            "ledger append on PostgreSQL, durable, 1 writer, one commit each (entries/s)",
            round(single),
            command=command,
        ),
    ]


def run(ctx: BenchContext) -> list[Row]:
    """Ledger rows: durable append rate, proof latency on a large log, verify rate."""
    work = Path(ctx.workdir) / "ledger"
    work.mkdir(parents=True, exist_ok=True)
    identity = NodeIdentity.generate(ORIGIN)
    large_size = 100_000 if ctx.quick else 1_000_000

    rows: list[Row] = []
    appends_dir = work / "appends"
    appends_dir.mkdir(exist_ok=True)
    store = LedgerStore(appends_dir)
    try:
        own = store.own_log(identity.origin, identity.vkey)
        own.group_commit_wait = LedgerConfig().group_commit_ms / 1000  # as the node runs it
        single = concurrent_append_rate(own, 1, 200 if ctx.quick else 1000)
        per_writer = 60 if ctx.quick else 300
        rate = concurrent_append_rate(own, WRITERS, per_writer)
        assert own.verify().ok
    finally:
        store.close()
    rows.append(
        Row(
            f"ledger append, durable, {WRITERS} concurrent writers (entries/s)",
            round(rate),
            target=">= 2000/s",
            met=rate >= 2000,
            command="python -m scripts.benchmarks.ledger",
        )
    )
    rows.append(
        Row(
            "ledger append, durable, 1 writer, one commit each (entries/s)",
            round(single),
            command="python -m scripts.benchmarks.ledger",
        )
    )
    rows += postgres_append_rows(identity, 200 if ctx.quick else 1000, per_writer)

    large_dir = work / "large"
    large_dir.mkdir(exist_ok=True)
    store = LedgerStore(large_dir)
    try:
        own = store.own_log(identity.origin, identity.vkey)
        bulk = build_log(own, large_size)
        note = own.publish_checkpoint(identity, int(time.time()))
        assert verify_note(note, identity.vkey).size == large_size
        inclusion_ms, consistency_ms = proof_latency_ms(own, large_size)
        started = time.perf_counter()
        report = own.verify(identity.vkey)
        verify_rate = report.checked / (time.perf_counter() - started)
        assert report.ok, report.problems
    finally:
        store.close()
    label = f"{large_size:,} entries"
    rows += [
        Row(
            f"ledger bulk build (append_many, durable), {label} (entries/s)",
            round(bulk),
            command="python -m scripts.benchmarks.ledger",
        ),
        Row(
            f"ledger inclusion proof at {label}, median (ms)",
            round(inclusion_ms, 3),
            command="GET /ledger/logs/ID/proof/inclusion",
        ),
        Row(
            f"ledger consistency proof at {label}, median (ms)",
            round(consistency_ms, 3),
            command="GET /ledger/logs/ID/proof/consistency",
        ),
        Row(
            f"ledger local verify (imageshare ledger verify), {label} (entries/s)",
            round(verify_rate),
            target=">= 5000/s",
            met=verify_rate >= 5000,
            command="imageshare ledger verify",
        ),
    ]
    return rows


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
