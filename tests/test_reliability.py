"""Reliability of a running node: kill -9 during ingest, ledger appends and replication,
a full disk during ingest, and a peer down during a transfer.

Every test records what the node acknowledged as it goes (a 200 from STOW-RS, a success
status from C-STORE, a 200 with a ledger index), kills the daemon with SIGKILL, restarts
it, and checks that everything acknowledged is there, exactly, and that the node works on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import io
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from node.config import load_config
from node.core.entries import Enroll
from node.core.keys import NodeIdentity
from node.core.origins import log_id
from node.samples import make_ct_study
from node.services.roster import add_peer
from node.services.wallet import Wallet
from node.store.ledger import LedgerStore
from node.store.secrets import read_seed
from tests.support import faults
from tests.support.nodes import NodeProcess, init_node, wait_until
from tests.support.patients import call, enroll_new_key, make_grant
from tests.support.proxy import TcpProxy

Factory = Callable[..., NodeProcess]
BOUNDARY = "reliability-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def lean(node: NodeProcess, dimse: bool = False, interval: float = 0.3) -> NodeProcess:
    """No LAN discovery (static URLs), a short replication interval, DIMSE only if asked."""
    if not dimse:
        text = node.config.read_text().replace("[dimse]\n", "[dimse]\nenabled = false\n")
        node.config.write_text(text)
    node.append_config(f"[federation]\ndiscovery = false\nreplicate_interval = {interval}")
    return node


def multipart(*instances: bytes) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in instances
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


def stow(node: NodeProcess, *instances: bytes, timeout: float = 30) -> tuple[int, Any]:
    """POST instances to /dicomweb/studies; returns (status, JSON answer)."""
    request = urllib.request.Request(
        node.url + "/dicomweb/studies",
        data=multipart(*instances),
        method="POST",
        headers={**node.auth, "Content-Type": STOW_TYPE, "Accept": "application/dicom+json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _json(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())


def _json(body: bytes) -> Any:
    return json.loads(body) if body else None


def healthy(node: NodeProcess) -> bool:
    try:
        with urllib.request.urlopen(node.url + "/healthz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def own_entries(node: NodeProcess, origin: str | None = None) -> list[bytes]:
    """Every raw entry of ``origin``'s log (default: the node's own) as the node serves it."""
    wanted = log_id(origin or node.origin)
    size = next(
        (g["size"] for g in node.get_json("/ledger/logs", auth=False) if g["log_id"] == wanted), 0
    )
    raw: list[bytes] = []
    while len(raw) < size:
        path = f"/ledger/logs/{wanted}/entries?start={len(raw)}&end={size}"
        with urllib.request.urlopen(node.url + path, timeout=30) as response:
            raw += msgpack.unpackb(response.read())
    return raw


def c_store(node: NodeProcess, dataset: pydicom.Dataset) -> pydicom.Dataset:
    """One C-STORE over a fresh association; returns the status data set."""
    ae = AE(ae_title="RELIABILITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = wait_until(
        lambda: (a := ae.associate("127.0.0.1", node.dimse_port)).is_established and a,
        message="an association",
    )
    try:
        return assoc.send_c_store(dataset)
    finally:
        assoc.release()


def dimse_node(node_factory: Factory) -> NodeProcess:
    """A started node that takes C-STORE (no LAN discovery)."""
    node = node_factory()
    node.append_config("[federation]\ndiscovery = false")
    return node.start()


def assert_stored_as_sent(node: NodeProcess, digest: str, sent: pydicom.Dataset) -> None:
    """The node's file of ``digest`` holds ``sent``: every element, pixel data included
    (the file meta is the node's own)."""
    stored = pydicom.dcmread(node.data_dir / "objects" / digest[:2] / f"{digest}.dcm")
    assert stored == sent
    assert stored.PixelData == sent.PixelData


def restart_holding(node: NodeProcess, acknowledged: Iterable[tuple[str, pydicom.Dataset]]) -> None:
    """Start the killed node again: its store is sound, and each acknowledged (SOP
    Instance UID, data set sent) is held as it was sent."""
    node.start()
    assert faults.store_problems(node.data_dir) == []
    held = faults.indexed_digests(node.data_dir)
    for uid, sent in acknowledged:
        assert_stored_as_sent(node, held[uid], sent)


class Burst:
    """Worker threads that repeat an acknowledged action until told to stop (or the node dies)."""

    def __init__(self, workers: int, action: Callable[[int, int], Any]) -> None:
        self.acknowledged: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._action = action
        self._pool = ThreadPoolExecutor(workers)
        self._futures = [self._pool.submit(self._work, w) for w in range(workers)]

    def _work(self, worker: int) -> None:
        round_ = 0
        while not self._stop.is_set():
            try:
                result = self._action(worker, round_)
            except (OSError, ValueError, http.client.HTTPException):
                return  # the node was killed under us: whatever was not answered is not ours
            if result is not None:
                with self._lock:
                    self.acknowledged.append(result)
            round_ += 1

    def count(self) -> int:
        with self._lock:
            return len(self.acknowledged)

    def stop(self) -> list[Any]:
        """Stop the workers; re-raises a worker's failure (a wrong answer before the kill)."""
        self._stop.set()
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()
        return list(self.acknowledged)


# -- kill -9 during ingest -------------------------------------------------------------


class TestKilledDuringIngest:
    def test_stow_burst_killed_keeps_every_acknowledged_instance_byte_for_byte(
        self, node_factory: Factory, tmp_path: Path
    ) -> None:
        node = lean(node_factory()).start()
        study = make_ct_study(tmp_path / "stow", series=1, slices=160, rows=96, columns=96)
        files = [p.read_bytes() for p in study.files]

        def send_one(worker: int, round_: int) -> tuple[str, str] | None:
            index = round_ * 4 + worker
            if index >= len(files):
                time.sleep(0.01)
                return None
            status, answer = stow(node, files[index])
            assert status == 200, answer
            return study.sop_uids[index], sha256(files[index])

        burst = Burst(4, send_one)
        try:
            wait_until(lambda: burst.count() >= 40, timeout=60, message="40 acknowledged")
            node.kill9()
        finally:
            acknowledged = burst.stop()
        assert len(acknowledged) < len(files), "the burst ended before the kill"

        node.start()
        held = faults.indexed_digests(node.data_dir)
        for uid, digest in acknowledged:
            assert held.get(uid) == digest, uid
        assert faults.store_problems(node.data_dir) == []
        # Ingest works again: the whole study goes in, what is held counts as duplicate.
        status, _ = stow(node, *files)
        assert status == 200
        assert set(faults.indexed_digests(node.data_dir)) >= set(study.sop_uids)

    def test_c_store_burst_killed_keeps_every_acknowledged_dataset(
        self, node_factory: Factory, tmp_path: Path
    ) -> None:
        node = dimse_node(node_factory)
        study = make_ct_study(tmp_path / "dimse", series=1, slices=160, rows=96, columns=96)
        datasets = [pydicom.dcmread(p) for p in study.files]
        acknowledged: list[str] = []
        stop = threading.Event()

        def send_all() -> None:
            ae = AE(ae_title="RELIABILITY")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = wait_until(
                lambda: (a := ae.associate("127.0.0.1", node.dimse_port)).is_established and a,
                message="an association",
            )
            for ds in datasets:
                if stop.is_set():
                    break
                status = assoc.send_c_store(ds)
                if "Status" not in status or status.Status != 0x0000:
                    break  # no answer (the node died) or a failure: not acknowledged
                acknowledged.append(ds.SOPInstanceUID)
            if assoc.is_established:
                assoc.abort()

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        try:
            wait_until(lambda: len(acknowledged) >= 40, timeout=60, message="40 C-STORE successes")
            node.kill9()
        finally:
            stop.set()
            sender.join(30)
        done = list(acknowledged)
        assert len(done) < len(datasets)

        by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
        restart_holding(node, [(uid, by_uid[uid]) for uid in done])
        status, _ = stow(node, study.files[-1].read_bytes())
        assert status == 200

    def test_storescu_burst_killed_keeps_every_instance_it_saw_acknowledged(
        self, node_factory: Factory, tmp_path: Path
    ) -> None:
        node = dimse_node(node_factory)
        study = make_ct_study(tmp_path / "dimse", series=1, slices=160, rows=96, columns=96)
        wait_until(
            lambda: c_store(node, pydicom.dcmread(study.files[0])).Status == 0, message="DIMSE"
        )
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", "IMAGESHARE", "+sd", "127.0.0.1", str(node.dimse_port)]
            + [str(p) for p in study.files[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        acknowledged: list[Path] = [study.files[0]]
        assert sender.stdout is not None
        sending: Path | None = None
        for line in sender.stdout:  # storescu's own log: which file, then its answer
            if line.startswith("I: Sending file: "):
                sending = Path(line.removeprefix("I: Sending file: ").strip())
            elif "Received Store Response (Success)" in line and sending is not None:
                acknowledged.append(sending)
                if len(acknowledged) == 40:
                    node.kill9()
        assert sender.wait(30) != 0, "storescu sent the whole study before the kill"
        assert len(acknowledged) >= 40

        uid_of = dict(zip(study.files, study.sop_uids, strict=True))
        restart_holding(node, [(uid_of[path], pydicom.dcmread(path)) for path in acknowledged])

    def test_an_instance_whose_file_never_reached_the_disk_loses_its_row_at_restart(
        self, node_factory: Factory, tmp_path: Path
    ) -> None:
        node = dimse_node(node_factory)
        study = make_ct_study(tmp_path / "dimse", series=1, slices=3, rows=64, columns=64)
        datasets = [pydicom.dcmread(p) for p in study.files]
        for ds in datasets:
            assert c_store(node, ds).Status == 0x0000
        acknowledged = faults.indexed_digests(node.data_dir)
        node.kill9()
        # Where a power cut after the last instance's index commit, before its file was on
        # the disk (so before its C-STORE was answered), would leave it.
        lost = study.sop_uids[-1]
        lost_file = faults.leave_unconfirmed(node.data_dir, lost, damage=True)

        node.start()
        assert not lost_file.exists()
        assert faults.indexed_digests(node.data_dir) == {
            uid: digest for uid, digest in acknowledged.items() if uid != lost
        }
        assert faults.store_problems(node.data_dir) == []
        assert f"instance {lost} was indexed but its file" in node.log_path.read_text()
        assert c_store(node, datasets[-1]).Status == 0x0000
        assert faults.indexed_digests(node.data_dir) == acknowledged


# -- kill -9 during ledger appends ------------------------------------------------------


class TestKilledDuringLedgerAppends:
    def test_acknowledged_grant_submissions_survive_and_the_log_verifies(
        self, node_factory: Factory, tmp_path: Path
    ) -> None:
        node = lean(node_factory())
        make_ct_study(tmp_path / "study", series=1, slices=1, rows=16, columns=16)
        node.cli("import", str(tmp_path / "study"))
        patient = enroll_new_key(node, "MRN-0001")
        node.start()

        def submit(worker: int, round_: int) -> tuple[int, str]:
            grant = make_grant(patient, node.origin, "b.example/imageshare")
            status, answer = call(node, patient, "POST", "/patient/grants", grant)
            assert status == 200, answer
            return answer["index"], answer["entry"]

        burst = Burst(6, submit)
        try:
            wait_until(lambda: burst.count() >= 60, timeout=60, message="60 recorded grants")
            node.kill9()
        finally:
            acknowledged = burst.stop()

        node.start()
        entries = own_entries(node)
        for index, entry in acknowledged:
            assert base64.b64encode(entries[index]).decode() == entry, index
        assert '"ok": true' in node.cli("ledger", "verify", "--json").stdout
        # Appends resume on the log the crash left.
        status, answer = call(
            node, patient, "POST", "/patient/grants", make_grant(patient, node.origin, "b.x/y")
        )
        assert status == 200 and answer["index"] == len(entries)


# -- kill -9 during replication ---------------------------------------------------------


def append_offline(node: NodeProcess, count: int) -> None:
    """Append ``count`` enroll entries to a stopped node's own log and sign a checkpoint."""
    identity = NodeIdentity(node.origin, read_seed(node.data_dir / "node.key"))
    store = LedgerStore(node.data_dir)
    try:
        own = store.own_log(node.origin, node.vkey)
        now = int(time.time())
        items = [
            (Enroll(key=i.to_bytes(32, "big"), replaces=None, subject=bytes(32)), now)
            for i in range(count)
        ]
        own.append_many(items)
        own.publish_checkpoint(identity, now)
    finally:
        store.close()


class TestKilledDuringReplication:
    def test_mirror_killed_mid_fetch_converges_and_verifies_after_restart(
        self, node_factory: Factory
    ) -> None:
        a = lean(node_factory("a.example/imageshare"))
        b = lean(node_factory("b.example/imageshare"))
        count = 6000
        append_offline(a, count)
        proxy = TcpProxy(a.http_port, rate=300_000)
        try:
            add_peer(load_config(a.config), b.origin, b.url, b.vkey)
            # b reaches a only through the slow proxy, so its catch-up takes seconds.
            add_peer(load_config(b.config), a.origin, proxy.url, a.vkey)
            a.start()
            b.start()
            wait_until(
                lambda: proxy.downstream_bytes > 200_000,
                timeout=30,
                message="b to be fetching a's entries",
            )
            b.kill9()
            proxy.rate = 50_000_000
            b.start()
            wait_until(
                lambda: (
                    {g["origin"]: g["size"] for g in b.get_json("/ledger/logs", auth=False)}.get(
                        a.origin
                    )
                    == count
                ),
                timeout=30,
                message="b to mirror all of a's log",
            )
        finally:
            proxy.stop()
        assert own_entries(b, a.origin) == own_entries(a)
        store = LedgerStore(b.data_dir)
        try:
            mirror = store.log_by_id(log_id(a.origin))
            assert mirror is not None
            report = mirror.verify(a.vkey)
            assert report.ok, report.as_json()
            assert report.size == count
        finally:
            store.close()


# -- the disk filling up --------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    try:
        with faults.small_filesystem(tmp_path / "small", 8 * 1024 * 1024) as mount:
            yield mount
    except faults.MountImpossible as exc:
        pytest.skip(f"cannot mount a small file system here: {exc}")


class TestDiskFull:
    def test_full_disk_refuses_with_507_stores_nothing_half_and_recovers(
        self, small_disk: Path, tmp_path: Path
    ) -> None:
        node = lean(init_node(small_disk, "full.example/imageshare"), dimse=True)
        # Ever smaller instances, so that the disk runs out at every step of an ingest:
        # while the upload is staged, and while its index row is committed.
        studies = [
            make_ct_study(tmp_path / f"s{side}", series=1, slices=25, rows=side, columns=side)
            for side in (128, 48, 16, 4)
        ]
        node.start()
        try:
            filler = small_disk / "filler"
            faults.fill_until(filler, 400 * 1024)
            stored: dict[str, bytes] = {}
            refused: dict[str, bytes] = {}
            for study in studies:
                for uid, path in zip(study.sop_uids, study.files, strict=True):
                    data = path.read_bytes()
                    status, answer = stow(node, data)
                    if status == 200:
                        stored[uid] = data
                        continue
                    assert status == 507, answer
                    assert "disk is full" in answer["error"]
                    refused[uid] = data
            assert stored, "nothing fitted before the disk was full"
            assert len(refused) > 50, "the disk never filled up"
            # A modality pushing by C-STORE is told the same, as "out of resources".
            data = next(iter(refused.values()))
            answer = c_store(node, pydicom.dcmread(io.BytesIO(data)))
            assert answer.Status == 0xA700
            assert "disk is full" in answer.ErrorComment

            # Still up, still serving what it has, nothing half-stored.
            assert healthy(node)
            assert faults.store_problems(node.data_dir) == []
            held = faults.indexed_digests(node.data_dir)
            assert set(held) == set(stored)
            study = studies[0]
            first = study.sop_uids[0]
            request = urllib.request.Request(
                f"{node.url}/dicomweb/studies/{study.study_uid}/series/{study.series_uids[0]}"
                f"/instances/{first}",
                headers={**node.auth, "Accept": 'multipart/related; type="application/dicom"'},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert stored[first] in response.read()

            # Room again: ingest works without a restart.
            filler.unlink()
            status, answer = stow(node, *refused.values())
            assert status == 200, answer
            held = faults.indexed_digests(node.data_dir)
            assert all(held[uid] == sha256(data) for uid, data in refused.items())
            assert faults.store_problems(node.data_dir) == []
        finally:
            node.stop()


# -- a peer down ------------------------------------------------------------------------


class TestPeerDown:
    def test_transfer_and_replication_between_two_members_go_on_while_a_third_is_down(
        self, node_factory: Factory, tmp_path: Path
    ) -> None:
        a = lean(node_factory("a.example/imageshare"))
        b = lean(node_factory("b.example/imageshare"))
        c = node_factory("c.example/imageshare")  # a member, never started: down
        for node, others in ((a, (b, c)), (b, (a, c))):
            for other in others:
                add_peer(load_config(node.config), other.origin, other.url, other.vkey)
        study = make_ct_study(tmp_path / "study", series=1, slices=4, rows=32, columns=32)
        a.cli("import", str(tmp_path / "study"))
        wallet = Wallet.create(tmp_path / "wallet", None)
        a.cli(
            "enroll",
            "--patient-id",
            study.patient_id,
            f"--key={wallet.key_for(a.origin).public_key_text}",
        )
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(NodeProcess.start, (a, b)))

        async def grant() -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:
                return await wallet.grant(session, a.url, b.origin, None, 3600)

        token = asyncio.run(grant())["token"]
        fetched = json.loads(b.cli("fetch", token, "--json").stdout)
        assert fetched["instances"] == len(study.files)
        held = faults.indexed_digests(b.data_dir)
        for uid, path in zip(study.sop_uids, study.files, strict=True):
            assert held[uid] == sha256(path.read_bytes())

        # Both logs reach the other member; the one that is down is reported as such.
        def mirrored() -> bool:
            return all(own_entries(x, y.origin) == own_entries(y) for x, y in ((a, b), (b, a)))

        wait_until(mirrored, timeout=20, message="a and b to mirror each other")
        peers = {p["origin"]: p["reachable"] for p in a.get_json("/admin/api/federation")["peers"]}
        assert peers == {b.origin: True, c.origin: False}
