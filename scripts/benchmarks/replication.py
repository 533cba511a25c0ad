"""Replication: a federation of 20 node processes on loopback.

Every node lists the 19 others in its roster (static URLs, no discovery, no DIMSE) and
polls each of them every REPLICATE_INTERVAL seconds; an append is pushed by a signed
notify, after which every peer fetches the checkpoint and the new entry, verifies and
stores it, and hands back its cosignature.

Measured per round: an enrollment is appended at one node through its admin API (the
product path of `imageshare enroll`); the clock runs from just before that request until
every one of the 20 nodes holds the entry durably in its ledger (read from each node's
SQLite file, so measuring adds no HTTP load), and until the log's node holds the 19
cosignatures. Traffic is what the nodes' replication clients count (HTTP headers and
bodies, both directions), minus the idle polling measured over a quiet window first.

Run alone: python -m scripts.benchmarks.replication [--quick]
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from node.core.roster import make_member
from node.store.federation_state import roster_path, write_roster_file
from scripts.benchmarks.common import BenchContext, Row
from tests.support.nodes import NodeProcess, init_node, wait_until

NODES = 20
REPLICATE_INTERVAL = 5.0
TARGET_SECONDS = 10.0
COMMAND = "python -m scripts.benchmarks.replication"


def build(workdir: Path, count: int) -> list[NodeProcess]:
    """``count`` initialised, lean nodes that all know each other; not started."""
    with ThreadPoolExecutor(4) as pool:
        nodes = list(
            pool.map(
                lambda i: init_node(workdir, f"n{i:02d}.bench.example/imageshare", f"n{i:02d}"),
                range(count),
            )
        )
    for node in nodes:
        text = node.config.read_text().replace("[dimse]\n", "[dimse]\nenabled = false\n")
        node.config.write_text(text)
        node.append_config(
            f"[federation]\ndiscovery = false\nreplicate_interval = {REPLICATE_INTERVAL}"
        )
        others = [make_member(o.origin, o.url, o.vkey) for o in nodes if o is not node]
        write_roster_file(roster_path(node.data_dir), others)
    return nodes


def held_size(node: NodeProcess, origin: str) -> int:
    """How many entries of ``origin``'s log ``node`` holds durably (its SQLite, read-only)."""
    uri = f"file:{node.data_dir / 'ledger.sqlite'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=5) as db:
        row = db.execute("SELECT size FROM logs WHERE origin=?", (origin,)).fetchone()
    return int(row[0]) if row else -1


def cosignature_count(node: NodeProcess) -> int:
    uri = f"file:{node.data_dir / 'ledger.sqlite'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=5) as db:
        row = db.execute("SELECT checkpoint FROM logs WHERE own=1").fetchone()
    note = row[0] if row and row[0] else ""
    return max(note.count("\n— ") - 1, 0)


def traffic(nodes: list[NodeProcess]) -> int:
    total = 0
    for node in nodes:
        counted = node.get_json("/admin/api/federation")["traffic"]
        total += counted["bytes_out"] + counted["bytes_in"]
    return total


def enroll(node: NodeProcess) -> None:
    key = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    body = json.dumps({"patient_id": f"BENCH-{time.time_ns()}", "key": key}).encode()
    request = urllib.request.Request(
        node.url + "/admin/api/enrollments",
        data=body,
        method="POST",
        headers={**node.auth, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def rss_mb(nodes: list[NodeProcess]) -> float:
    import psutil

    sizes = [psutil.Process(n.process.pid).memory_info().rss for n in nodes if n.process]
    return statistics.mean(sizes) / 1e6


def measure(nodes: list[NodeProcess], rounds: int) -> dict[str, Any]:
    def everyone_mirrors_everyone() -> bool:
        return all(held_size(n, o.origin) >= 0 for n in nodes for o in nodes)

    wait_until(everyone_mirrors_everyone, timeout=120, interval=0.5, message="all mirrors")
    idle_window = 2 * REPLICATE_INTERVAL
    before = traffic(nodes)
    started = time.monotonic()
    time.sleep(idle_window)
    idle_rate = (traffic(nodes) - before) / (time.monotonic() - started)

    latencies, cosigned = [], []
    before, started = traffic(nodes), time.monotonic()
    for r in range(rounds):
        writer = nodes[(r * 7) % len(nodes)]
        expected = held_size(writer, writer.origin) + 1
        t0 = time.monotonic()
        enroll(writer)
        wait_until(
            lambda w=writer, e=expected: all(held_size(n, w.origin) >= e for n in nodes),
            timeout=60,
            interval=0.02,
            message="every node to hold the append",
        )
        latencies.append(time.monotonic() - t0)
        wait_until(
            lambda w=writer: cosignature_count(w) >= len(nodes) - 1,
            timeout=60,
            interval=0.05,
            message="all cosignatures",
        )
        cosigned.append(time.monotonic() - t0)
    # Members compare each other's copies at their next poll: count that traffic too.
    time.sleep(REPLICATE_INTERVAL + 1.0)
    elapsed = time.monotonic() - started
    used = traffic(nodes) - before - idle_rate * elapsed
    return {
        "latencies": latencies,
        "cosigned": cosigned,
        "bytes_per_node_per_append": used / len(nodes) / rounds,
        "idle_bytes_per_node_per_second": idle_rate / len(nodes),
        "rss_mb": rss_mb(nodes),
    }


def run(ctx: BenchContext) -> list[Row]:
    """Replication rows: time until all 20 nodes hold an append, traffic, cosignatures."""
    work = Path(ctx.workdir) / "replication"
    work.mkdir(parents=True, exist_ok=True)
    nodes = build(work, NODES)
    try:
        with ThreadPoolExecutor(NODES) as pool:
            list(pool.map(lambda n: n.start(timeout=120), nodes))
        result = measure(nodes, 3 if ctx.quick else 6)
    finally:
        with ThreadPoolExecutor(NODES) as pool:
            list(pool.map(lambda n: n.stop(), nodes))
    worst = max(result["latencies"])
    rss = f"node {result['rss_mb']:.0f} (mean of {NODES})"
    return [
        Row(
            f"replication: {NODES} nodes on loopback, append held by every node, worst (s)",
            round(worst, 2),
            target=f"<= {TARGET_SECONDS:.0f} s",
            met=worst <= TARGET_SECONDS,
            peak_rss_mb=rss,
            command=COMMAND,
        ),
        Row(
            f"replication: {NODES} nodes, append held by every node, median (s)",
            round(statistics.median(result["latencies"]), 2),
            command=COMMAND,
        ),
        Row(
            f"replication: {NODES} nodes, all {NODES - 1} cosignatures collected, median (s)",
            round(statistics.median(result["cosigned"]), 2),
            command=COMMAND,
        ),
        Row(
            "replication: bytes sent per node per append (HTTP, beyond idle polling)",
            round(result["bytes_per_node_per_append"]),
            command=COMMAND,
        ),
        Row(
            f"replication: idle polling bytes per node per second (interval "
            f"{REPLICATE_INTERVAL:.0f} s)",
            round(result["idle_bytes_per_node_per_second"]),
            command=COMMAND,
        ),
    ]


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
