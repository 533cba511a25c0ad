"""Hospital-to-hospital transfer of the reference study: Orthanc peers beside ours.

Orthanc's side: two fresh Orthancs; the sender knows the receiver as an Orthanc peer; the
study is loaded into the sender with storescu, then `POST /peers/{peer}/store` with the
study's Orthanc ID is timed (synchronous: it answers once every instance has arrived).
Our side (consented fetch: token check, end-to-end encryption, digest check, durable
write) is measured by ``imageshare_transfer`` once node-to-node transfer exists.

Run alone: python -m scripts.benchmarks.transfer [--quick]
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from node.samples import SyntheticStudy
from scripts.benchmarks.common import BenchContext, Row
from scripts.benchmarks.dataplane import (
    NOT_AVAILABLE,
    describe,
    fmt_mb,
    node_peak_rss,
    reference_study,
    study_directory,
)
from tests.support.nodes import NodeProcess, init_node, run_cli
from tests.support.orthanc import OrthancServer, storescu

PEER_NAME = "receiver"
FETCH_POLL_SECONDS = 0.01
NOTES = [
    "Transfer, Orthanc: `POST /peers/PEER/store` with the study's Orthanc ID, synchronous;"
    " the sender posts each instance to the receiver's REST API over plain HTTP on loopback,"
    " with no consent check and no encryption; the receiver fsyncs every file. Peak memory"
    " of each Orthanc includes loading the study into the sender by storescu.",
    "Transfer, ours: what `imageshare fetch TOKEN` does at the grantee node, timed through"
    " the daemon's admin API (POST /admin/api/fetch, polled every 10 ms until done) so that"
    " the command's own interpreter start (about 0.5 s) is left out. In that time the"
    " custodian checks the patient's grant and the grantee's signed request and streams"
    " the study encrypted end to end; the grantee checks every digest and stores every"
    " instance durably; both append their ledger entries. Peak memory of each node daemon"
    " covers the whole fetch (the study was imported before the custodian's daemon started).",
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
    """Our consented fetch of the study from a custodian node to a grantee node.

    Set up as people would: two nodes that list each other as peers, the study imported
    at the custodian, a patient wallet enrolled there that grants the grantee all its
    studies. Timed: `imageshare fetch TOKEN` at the grantee, from the request to the
    study durably stored and receipted. Returns a reason instead if a step is refused
    or not available in this build.
    """
    custodian = init_node(work, "custodian.example/imageshare", "custodian")
    grantee = init_node(work, "grantee.example/imageshare", "grantee")
    wallet = ["--wallet", str(work / "wallet")]
    try:
        grantee.cli("peers", "add", custodian.origin, custodian.url, custodian.vkey, input="")
        custodian.cli("peers", "add", grantee.origin, grantee.url, grantee.vkey, input="")
        custodian.cli("import", str(study_directory(study)), input="")
        custodian.start()
        grantee.start()
        enroll_wallet(custodian, study.patient_id, wallet)
        token = json.loads(
            run_cli(
                "patient",
                "grant",
                "--custodian",
                custodian.url,
                "--to",
                grantee.origin,
                "--all",
                *wallet,
                "--json",
                input="",
            ).stdout
        )["token"]
        seconds = timed_fetch(grantee, token, len(study.files))
        if isinstance(seconds, str):
            return seconds
        return Transfer(seconds, node_peak_rss(custodian), node_peak_rss(grantee))
    except AssertionError as exc:  # a set-up command failed: say which, in one line
        return f"{NOT_AVAILABLE} ({_first_line(str(exc))})"
    finally:
        grantee.stop()
        custodian.stop()


@dataclass
class FetchTimes:
    """Seconds from asking for a fetch to its first received byte, and to the job done."""

    first_byte: float
    seconds: float


def enroll_wallet(custodian: NodeProcess, patient_id: str, wallet: list[str]) -> None:
    """A new patient wallet (``--wallet DIR``) whose key is enrolled at ``custodian``."""
    run_cli("patient", "keygen", *wallet, input="")
    pubkey = json.loads(
        run_cli(
            "patient", "pubkey", "--custodian", custodian.url, *wallet, "--json", input=""
        ).stdout
    )["pubkey"]
    custodian.cli("enroll", "--patient-id", patient_id, "--key", pubkey, input="")


def timed_fetch(grantee: NodeProcess, token: str, expected_instances: int) -> float | str:
    """Seconds from asking the grantee's daemon to fetch (what `imageshare fetch` does,
    without the interpreter start) to the job done; a reason string if it did not finish.
    """
    times = timed_fetch_steps(grantee, token, expected_instances)
    return times if isinstance(times, str) else times.seconds


def timed_fetch_steps(
    grantee: NodeProcess, token: str, expected_instances: int
) -> FetchTimes | str:
    """``timed_fetch``, also timing the first byte received (polled every 10 ms)."""

    def call(method: str, path: str, body: object = None) -> dict[str, object]:
        request = urllib.request.Request(
            grantee.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={**grantee.auth, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return dict(json.loads(response.read()))

    started = time.perf_counter()
    first_byte: float | None = None
    try:
        job = call("POST", "/admin/api/fetch", {"token": token})
        while job["state"] == "running":
            time.sleep(FETCH_POLL_SECONDS)
            job = call("GET", f"/admin/api/transfers/{job['id']}")
            if first_byte is None and job.get("bytes_received"):
                first_byte = time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        return f"{NOT_AVAILABLE} (POST /admin/api/fetch: HTTP {exc.code})"
    seconds = time.perf_counter() - started
    if job["state"] != "done":
        return f"failed ({job['state']}: {job.get('error')})"
    if job.get("instances_total") != expected_instances:
        return f"failed ({job.get('instances_total')} of {expected_instances} instances)"
    return FetchTimes(seconds if first_byte is None else first_byte, seconds)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines[:2])[:200]


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
            command="ours: imageshare fetch TOKEN; Orthanc: POST /peers/PEER/store STUDY_ID",
        )
    ]


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
