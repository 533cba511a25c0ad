"""A consented fetch over an emulated wide-area link that keeps dropping: it completes,
compressed on the wire, and nothing that arrived is sent again.

Two nodes on loopback: custodian A and grantee B, which reaches A only through the link
emulator (tests/support/wan.py): a round trip of 10 ms, 80 Mbit/s, and a cut of the
connection after every MiB.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from node.core.entries import LedgerEntry, decode_entry
from node.core.origins import log_id
from node.samples import SyntheticStudy, make_ct_study
from node.services.wallet import Wallet
from tests.support.nodes import NodeProcess, init_node, wait_until
from tests.support.wan import LinkEmulator, LinkSettings

DROP_EVERY = 1024 * 1024
FLAKY = LinkSettings(rtt=0.01, mbit_per_s=80, drop_every_bytes=DROP_EVERY)


@dataclass
class Sites:
    base: Path
    a: NodeProcess
    b: NodeProcess
    link: LinkEmulator
    study: SyntheticStudy
    wallet: Wallet


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    base = tmp_path_factory.mktemp("wan")
    a = init_node(base, "a.example/imageshare", "a")
    b = init_node(base, "b.example/imageshare", "b")
    link = LinkEmulator("127.0.0.1", a.http_port, FLAKY).start()
    settings = "[federation]\ndiscovery = false\nreplicate_interval = 0.3\n"
    a.append_config(settings + b.peer_table)
    b.append_config(settings + a.peer_table.replace(a.url, link.url))
    study = make_ct_study(
        base / "study", series=1, slices=30, rows=256, columns=256, phantom=True, seed=5
    )
    a.cli("import", str(base / "study"))
    nodes = [a, b]
    try:
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(NodeProcess.start, nodes))
        wallet = Wallet.create(base / "wallet", None)
        a.cli(
            "enroll",
            "--patient-id",
            study.patient_id,
            f"--key={wallet.key_for(a.origin).public_key_text}",
        )
        yield Sites(base, a, b, link, study, wallet)
    finally:
        for node in nodes:
            node.stop()
        link.stop()


def _grant(sites: Sites) -> dict[str, Any]:
    async def grant() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            return await sites.wallet.grant(session, sites.a.url, sites.b.origin, None, 3600)

    return asyncio.run(grant())


def _admin(node: NodeProcess, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        node.url + path,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={**node.auth, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _entries(node: NodeProcess, origin: str) -> list[LedgerEntry]:
    wanted = log_id(origin)
    size = next(
        g["size"] for g in node.get_json("/ledger/logs", auth=False) if g["log_id"] == wanted
    )
    path = f"/ledger/logs/{wanted}/entries?start=0&end={size}"
    with urllib.request.urlopen(node.url + path, timeout=10) as response:
        return [decode_entry(raw) for raw in msgpack.unpackb(response.read())]


def test_fetch_over_a_link_that_drops_completes_compressed_without_resending(
    sites: Sites,
) -> None:
    grant = _grant(sites)
    raw_bytes = sum(p.stat().st_size for p in sites.study.files)
    job = _admin(sites.b, "/admin/api/fetch", {"token": grant["token"]})
    job = wait_until(
        lambda: (
            (j := _admin(sites.b, f"/admin/api/transfers/{job['id']}"))["state"] != "running" and j
        ),
        timeout=60,
        message="the fetch over the flaky link to finish",
    )
    assert job["state"] == "done", job
    assert job["instances_total"] == job["instances_done"] == len(sites.study.files)
    for path in sites.study.files:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        assert (sites.b.data_dir / "objects" / digest[:2] / f"{digest}.dcm").read_bytes() == data

    counters = sites.link.counters
    assert counters.drops >= 1 and job["attempts"] >= 2
    # Compressed on the wire: even with the instances cut short and sent again whole,
    # fewer bytes crossed the link than the study holds.
    assert counters.bytes_down < 0.8 * raw_bytes
    # Every instance arrived in exactly one stream: resuming asked only for what lacked.
    receipts = [
        e.fields
        for e in _entries(sites.b, sites.b.origin)
        if e.kind == "receipt" and e.fields["token_id"].hex() == grant["token_id"]
    ]
    assert len(receipts) >= 2
    assert sum(r["instances"] for r in receipts) == len(sites.study.files)
    sent = _admin(sites.a, "/admin/api/transfers")["sent"]
    assert sent and all(stream["compression"] == "zstd" for stream in sent)
