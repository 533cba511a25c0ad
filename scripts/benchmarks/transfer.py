"""Hospital-to-hospital transfer of the reference study: Orthanc peers beside ours.

Orthanc's side: two fresh Orthancs; the sender knows the receiver as an Orthanc peer; the
study is loaded into the sender with storescu, then `POST /peers/{peer}/store` with the
study's Orthanc ID is timed (synchronous: it answers once every instance has arrived).
Our side (consented fetch: token check, end-to-end encryption, digest check, durable
write) is measured by ``imageshare_transfer`` once node-to-node transfer exists.

Run alone: python -m scripts.benchmarks.transfer [--quick]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.benchmarks.common import BenchContext, Row
from scripts.benchmarks.dataplane import describe, fmt_mb, reference_study, study_directory
from scripts.benchmarks.orthanc import OrthancServer, storescu
from tests.support.studies import SyntheticStudy

PEER_NAME = "receiver"
NOTES = [
    "Transfer, Orthanc: `POST /peers/PEER/store` with the study's Orthanc ID, synchronous;"
    " the sender posts each instance to the receiver's REST API over plain HTTP on loopback,"
    " with no consent check and no encryption; the receiver fsyncs every file. Peak memory"
    " of each Orthanc includes loading the study into the sender by storescu. Ours, once"
    " node-to-node fetch is built, will include the consent check, end-to-end encryption,"
    " digest checks and durable writes.",
]


@dataclass
class Transfer:
    """One timed transfer of the study and the peak RSS of both sides through it."""

    seconds: float
    sender_rss_mb: float | None
    receiver_rss_mb: float | None


def orthanc_peers_transfer(study: SyntheticStudy, work: Path) -> Transfer:
    """Send the study from one Orthanc to another with Orthanc's peer store; raises on failure."""
    receiver = OrthancServer(work, "orthanc-receiver", ae_title="RECEIVER")
    sender = OrthancServer(work, "orthanc-sender", ae_title="SENDER")
    try:
        receiver.start()
        sender.peers = {PEER_NAME: receiver.url}
        sender.start()
        loaded = storescu(
            study_directory(study),
            "127.0.0.1",
            sender.dicom_port,
            sender.ae_title,
            work / "storescu-sender.log",
        )
        if loaded.returncode != 0 or sender.instance_count() != len(study.files):
            raise RuntimeError(f"could not load the study into Orthanc: {loaded.failure()}")
        study_id = sender.study_id(study.study_uid)
        started = time.perf_counter()
        sender.request("POST", f"/peers/{PEER_NAME}/store", study_id.encode())
        seconds = time.perf_counter() - started
        if receiver.instance_count() != len(study.files):
            raise RuntimeError("the receiving Orthanc does not hold every instance")
        return Transfer(seconds, sender.peak_rss_mb(), receiver.peak_rss_mb())
    finally:
        sender.stop()
        receiver.stop()


def imageshare_transfer(study: SyntheticStudy, work: Path) -> Transfer | str:
    """Our consented node-to-node fetch of the study; a reason string while it is not built."""
    return "not built yet"


def run(ctx: BenchContext) -> list[Row]:
    """The transfer row: ours (when built) and Orthanc's peers, with both sides' peak RSS."""
    study = reference_study(ctx)
    work = ctx.workdir / "transfer"
    work.mkdir(parents=True, exist_ok=True)
    orthanc = orthanc_peers_transfer(study, work / "orthanc")
    ours = imageshare_transfer(study, work / "imageshare")

    memory = [
        f"Orthanc sender {fmt_mb(orthanc.sender_rss_mb)}",
        f"Orthanc receiver {fmt_mb(orthanc.receiver_rss_mb)}",
    ]
    if isinstance(ours, Transfer):
        memory = [
            f"node sender {fmt_mb(ours.sender_rss_mb)}",
            f"node receiver {fmt_mb(ours.receiver_rss_mb)}",
            *memory,
        ]
    ours_seconds = ours.seconds if isinstance(ours, Transfer) else ours
    return [
        Row(
            f"hospital-to-hospital transfer of the study ({describe(study)}), s",
            ours_seconds,
            orthanc.seconds,
            target="<= 0.25 x Orthanc",
            met=(ours.seconds <= 0.25 * orthanc.seconds) if isinstance(ours, Transfer) else None,
            peak_rss_mb="; ".join(memory),
            command="Orthanc: POST /peers/PEER/store STUDY_ID; ours: imageshare fetch TOKEN",
        )
    ]


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
