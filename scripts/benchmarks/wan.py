"""Hospital-to-hospital transfer over an emulated wide-area link: ours and Orthanc's peers.

Both run through the same user-space link emulator on loopback (tests/support/wan.py: a
one-way delay each way and a bandwidth cap in each direction), at 40 ms round trip with
100 Mbit/s and at 100 ms with 20 Mbit/s. The workload is the first WAN_SLICES slices of
each series of the reference study (the phantom CT), so that a run takes seconds, not
minutes, with instances of the reference size (the per-instance round trips weigh as
they would with the whole study).

Each row also gives the link's physical time for what crossed it: the bytes delivered
over the bandwidth plus the round trips the protocol needs (a TCP handshake per
connection; ours: the open and the instances request; Orthanc: one POST per instance).

Ours is measured with compression on (the default) and off (the grantee does not offer
it), and once more over a link that cuts the connection after every DROP_EVERY_BYTES,
with the fetch's retries resuming it.

Run alone: python -m scripts.benchmarks.wan [--quick]
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from node.samples import SyntheticStudy
from node.services.wallet import Wallet
from scripts.benchmarks.common import BenchContext, Row
from scripts.benchmarks.dataplane import reference_study, study_directory
from scripts.benchmarks.transfer import timed_fetch
from tests.support.nodes import NodeProcess, init_node
from tests.support.orthanc import OrthancServer, storescu
from tests.support.wan import LinkCounters, LinkEmulator, LinkSettings

WAN_SLICES = 20
QUICK_WAN_SLICES = 4
LINKS = [LinkSettings(rtt=0.04, mbit_per_s=100), LinkSettings(rtt=0.1, mbit_per_s=20)]
DROP_EVERY_BYTES = 4 * 1024 * 1024
CUSTODIAN = "custodian.wan.example/imageshare"
# Round trips of our fetch beyond each connection's handshake: open, instances.
OUR_REQUESTS = 2
NOTES = [
    "WAN: both transfers run through the same user-space link emulator on loopback (a"
    " proxy with a one-way delay each way and a bandwidth cap in each direction; no slow"
    " start or loss), over the first 20 slices of each series of the reference study."
    " Physical time = bytes delivered over the link / its bandwidth + the round trips the"
    " protocol needs (a handshake per TCP connection; ours: the open and the instances"
    " request; Orthanc's peers: one POST per instance). Orthanc: `POST /peers/PEER/store`,"
    " synchronous, as in the loopback row. Ours: a fresh grantee for each run, timed"
    " through its admin API as in the loopback row; compression off = the grantee does"
    ' not offer it (`transfer.compression = "off"`).',
    "Bad link: the emulator cuts every connection once 4 MiB have crossed it; the fetch"
    " retries after 0.25 s and asks only for the instances it lacks. Overhead = its time"
    " and bytes over those of the same fetch on the clean link.",
]


def counters_since(link: LinkEmulator, before: LinkCounters) -> LinkCounters:
    """What crossed ``link`` since ``before`` was taken (a copy of its counters then)."""
    now = link.counters
    return LinkCounters(
        now.connections - before.connections,
        now.drops - before.drops,
        now.bytes_up - before.bytes_up,
        now.bytes_down - before.bytes_down,
        now.by_connection[len(before.by_connection) :],
    )


def snapshot(link: LinkEmulator) -> LinkCounters:
    now = link.counters
    return LinkCounters(
        now.connections, now.drops, now.bytes_up, now.bytes_down, list(now.by_connection)
    )


@dataclass
class Crossing:
    """One timed transfer over a link, and what crossed it."""

    seconds: float
    counters: LinkCounters
    settings: LinkSettings
    round_trips: int  # the protocol's, handshakes included

    @property
    def wire_bytes(self) -> int:
        return self.counters.bytes_up + self.counters.bytes_down

    @property
    def physical_seconds(self) -> float:
        rate = self.settings.bytes_per_second or float("inf")
        heavier = max(self.counters.bytes_up, self.counters.bytes_down)
        return heavier / rate + self.round_trips * self.settings.rtt


def wan_study(ctx: BenchContext) -> SyntheticStudy:
    """The first slices of each series of the reference study, in a directory of their own."""
    study = reference_study(ctx)
    directory = ctx.workdir / "wan" / "study"
    slices = QUICK_WAN_SLICES if ctx.quick else WAN_SLICES
    chosen = [p for p in study.files if int(p.stem.split("_i")[1]) <= slices]
    if not directory.exists():
        directory.mkdir(parents=True)
        for path in chosen:
            shutil.copy(path, directory / path.name)
    return SyntheticStudy(
        study.study_uid,
        study.patient_id,
        study.patient_name,
        [directory / p.name for p in chosen],
        study.series_uids,
    )


def orthanc_crossings(study: SyntheticStudy, work: Path) -> list[Crossing | str]:
    """Orthanc's peer store of the study, once over each link (a fresh receiver each)."""
    receivers = [
        OrthancServer(work, f"orthanc-receiver-{n}", ae_title=f"RECEIVER{n}")
        for n in range(len(LINKS))
    ]
    sender = OrthancServer(work, "orthanc-sender", ae_title="SENDER")
    links: list[LinkEmulator] = []
    try:
        for receiver, settings in zip(receivers, LINKS, strict=True):
            receiver.start()
            links.append(LinkEmulator("127.0.0.1", receiver.http_port, settings).start())
        sender.peers = {f"peer{n}": link.url for n, link in enumerate(links)}
        sender.start()
        loaded = storescu(
            study_directory(study), "127.0.0.1", sender.dicom_port, sender.ae_title,
            work / "storescu-sender.log",
        )  # fmt: skip
        if loaded.returncode != 0:
            raise RuntimeError(f"could not load the study into Orthanc: {loaded.failure()}")
        study_id = sender.study_id(study.study_uid)
        results: list[Crossing | str] = []
        for n, (receiver, link) in enumerate(zip(receivers, links, strict=True)):
            before = snapshot(link)
            started = time.perf_counter()
            sender.request("POST", f"/peers/peer{n}/store", study_id.encode())
            seconds = time.perf_counter() - started
            if receiver.instance_count() != len(study.files):
                results.append("failed (the receiving Orthanc lacks instances)")
                continue
            crossed = counters_since(link, before)
            trips = len(study.files) + crossed.connections
            results.append(Crossing(seconds, crossed, link.settings, trips))
        return results
    finally:
        for link in links:
            link.stop()
        sender.stop()
        for receiver in receivers:
            receiver.stop()


class OurSites:
    """A custodian holding the study, and a fresh grantee per fetch behind its own link."""

    def __init__(self, study: SyntheticStudy, work: Path) -> None:
        self.work = work
        self.custodian = init_node(work, CUSTODIAN, "custodian")
        self.custodian.append_config("[federation]\ndiscovery = false\n")
        self.custodian.cli("import", str(study_directory(study)), input="")
        self.wallet = Wallet.create(work / "wallet", None)
        self.patient_id = study.patient_id
        self.instances = len(study.files)
        self.grantees: list[NodeProcess] = []
        self.links: list[LinkEmulator] = []

    def prepare(self, name: str, settings: LinkSettings, compression: bool) -> NodeProcess:
        """A grantee (not started) that reaches the custodian only through a new link."""
        link = LinkEmulator("127.0.0.1", self.custodian.http_port, settings).start()
        self.links.append(link)
        grantee = init_node(self.work, f"{name}.wan.example/imageshare", name)
        grantee.append_config(
            "[federation]\ndiscovery = false\n\n"
            f'[transfer]\ncompression = "{"auto" if compression else "off"}"\n\n'
            + self.custodian.peer_table.replace(self.custodian.url, link.url)
        )
        self.custodian.append_config(grantee.peer_table)
        self.grantees.append(grantee)
        return grantee

    def start(self) -> None:
        for node in [self.custodian, *self.grantees]:
            node.start()
        key = self.wallet.key_for(CUSTODIAN).public_key_text
        self.custodian.cli("enroll", "--patient-id", self.patient_id, f"--key={key}", input="")

    def fetch(self, grantee: NodeProcess) -> Crossing | str:
        link = self.links[self.grantees.index(grantee)]

        async def grant() -> str:
            async with aiohttp.ClientSession() as session:
                granted = await self.wallet.grant(
                    session, self.custodian.url, grantee.origin, None, 3600
                )
                return str(granted["token"])

        token = asyncio.run(grant())
        before = snapshot(link)
        seconds = timed_fetch(grantee, token, self.instances)
        if isinstance(seconds, str):
            return seconds
        # Replication between the two nodes crosses the link too; it is counted, as it
        # shares the link, but its connections are not the fetch's round trips.
        crossed = counters_since(link, before)
        trips = OUR_REQUESTS + 1
        return Crossing(seconds, crossed, link.settings, trips)

    def stop(self) -> None:
        for node in [*self.grantees, self.custodian]:
            node.stop()
        for link in self.links:
            link.stop()


def _rows(
    settings: LinkSettings,
    ours: Crossing | str,
    ours_raw: Crossing | str,
    orthanc: Crossing | str,
    megabytes: float,
) -> list[Row]:
    where = settings.describe()
    rows = []
    orthanc_seconds = orthanc.seconds if isinstance(orthanc, Crossing) else orthanc
    for label, run in (("compression on", ours), ("compression off", ours_raw)):
        seconds = run.seconds if isinstance(run, Crossing) else run
        met = None
        if isinstance(run, Crossing) and isinstance(orthanc, Crossing):
            met = run.seconds <= 0.3 * orthanc.seconds and run.seconds <= 1.2 * (
                run.physical_seconds
            )
        rows.append(
            Row(
                f"transfer over {where} ({megabytes:.0f} MB), ours {label}, s",
                seconds,
                orthanc_seconds,
                target="<= 0.3 x Orthanc and <= 1.2 x physical",
                met=met,
                command="ours: imageshare fetch TOKEN; Orthanc: POST /peers/PEER/store STUDY_ID",
            )
        )
        if isinstance(run, Crossing):
            rows.append(
                Row(
                    f"  link's physical time for ours ({label}: {run.wire_bytes / 1e6:.1f} MB"
                    f" on the wire, {run.round_trips} round trips), s; ours / physical"
                    f" {run.seconds / run.physical_seconds:.2f}",
                    round(run.physical_seconds, 2),
                    command="bytes delivered / bandwidth + round trips x RTT",
                )
            )
    if isinstance(orthanc, Crossing):
        rows.append(
            Row(
                f"  link's physical time for Orthanc's peers ({orthanc.wire_bytes / 1e6:.1f} MB"
                f" on the wire, {orthanc.round_trips} round trips), s; Orthanc / physical"
                f" {orthanc.seconds / orthanc.physical_seconds:.2f}",
                round(orthanc.physical_seconds, 2),
                command="bytes delivered / bandwidth + round trips x RTT",
            )
        )
    return rows


def run(ctx: BenchContext) -> list[Row]:
    """Ours (compression on, off) and Orthanc's peers over each link; the bad-link resume."""
    study = wan_study(ctx)
    megabytes = sum(p.stat().st_size for p in study.files) / 1e6
    work = ctx.workdir / "wan"
    orthanc = orthanc_crossings(study, work / "orthanc")
    sites = OurSites(study, work / "imageshare")
    flaky = LinkSettings(LINKS[0].rtt, LINKS[0].mbit_per_s, DROP_EVERY_BYTES)
    try:
        runs = [
            (sites.prepare(f"g{n}on", settings, True), sites.prepare(f"g{n}off", settings, False))
            for n, settings in enumerate(LINKS)
        ]
        resumer = sites.prepare("gflaky", flaky, True)
        # The custodian's first transfer pays for its lazy imports and cold caches.
        warm_up = sites.prepare("gwarm", LinkSettings(), True)
        sites.start()
        sites.fetch(warm_up)
        rows: list[Row] = []
        clean: Crossing | str = "not run"
        for n, (settings, (on, off)) in enumerate(zip(LINKS, runs, strict=True)):
            ours, ours_raw = sites.fetch(on), sites.fetch(off)
            clean = ours if n == 0 else clean
            rows += _rows(settings, ours, ours_raw, orthanc[n], megabytes)
        resumed = sites.fetch(resumer)
    finally:
        sites.stop()
    if isinstance(resumed, Crossing) and isinstance(clean, Crossing):
        drops = resumed.counters.drops
        rows.append(
            Row(
                f"transfer over {flaky.describe()} cut every"
                f" {DROP_EVERY_BYTES // 2**20} MiB ({drops} cuts), resumed, s; overhead"
                f" {resumed.seconds / clean.seconds - 1:+.0%} time,"
                f" {resumed.wire_bytes / clean.wire_bytes - 1:+.0%} bytes",
                resumed.seconds,
                command="imageshare fetch TOKEN (retries by itself)",
            )
        )
    else:
        rows.append(Row("transfer over a link cut every 4 MiB, resumed, s", str(resumed)))
    return rows


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
