"""The node in front of the hospital's PACS: a real Orthanc holds studies the node never
stored; the patient lists and grants them, and a second real node fetches them.

Two custodians share one Orthanc: A reaches it by DIMSE Query/Retrieve (C-FIND, C-GET),
W by DICOMweb (QIDO-RS, WADO-RS) through a relay that can stall Orthanc's answers. B is
the grantee of both.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pydicom
import pytest
from aiohttp import web

from node.core.base64url import b64url_decode
from node.core.entries import decode_entry
from node.core.origins import log_id
from node.samples import SyntheticStudy, make_ct_study
from node.services import pacs
from node.services.pacs import PacsSource, PacsUnavailable, single_part
from node.services.runtime import NodeRuntime, open_runtime
from node.services.wallet import Wallet
from node.store.pacs_cache import DIRECTORY_NAME, FILE_NAME
from tests.support.browser import chromium_session
from tests.support.hostile import HostileServer, Received
from tests.support.nodes import NodeProcess, init_node, wait_until
from tests.support.orthanc import OrthancServer

PATIENT = "MRN-PACS-1"
CALLING_AE = "IMAGESHARE"


@dataclass
class Hospital:
    base: Path
    orthanc: OrthancServer
    a: NodeProcess  # [pacs] by DIMSE
    w: NodeProcess  # [pacs] by DICOMweb
    b: NodeProcess  # the grantee
    local: SyntheticStudy  # imported into A and W
    in_pacs: list[SyntheticStudy]  # only in Orthanc
    large: SyntheticStudy  # only in Orthanc, for the retrieve cut off part way
    prefetched: SyntheticStudy  # only in Orthanc, retrieved by A as soon as it is granted
    after_restart: SyntheticStudy  # only in Orthanc, granted at W after it restarts
    wallet_a: Wallet
    wallet_w: Wallet
    cache_limit: int
    relay: HostileServer  # between W and Orthanc's DICOMweb


def _upload(orthanc: OrthancServer, study: SyntheticStudy) -> None:
    for path in study.files:
        orthanc.request("POST", "/instances", path.read_bytes())


def _study_bytes(study: SyntheticStudy) -> int:
    return sum(path.stat().st_size for path in study.files)


def _enroll(node: NodeProcess, directory: Path) -> Wallet:
    wallet = Wallet.create(directory, None)
    node.cli(
        "enroll", "--patient-id", PATIENT, f"--key={wallet.key_for(node.origin).public_key_text}"
    )
    return wallet


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hospital]:
    base = tmp_path_factory.mktemp("pacs")
    local = make_ct_study(base / "local", series=1, slices=2, patient_id=PATIENT, seed=1)
    in_pacs = [
        make_ct_study(base / f"pacs{n}", series=2, slices=2 + n, patient_id=PATIENT, seed=10 + n)
        for n in range(4)
    ]
    large = make_ct_study(
        base / "large", series=4, slices=30, rows=32, columns=32, patient_id=PATIENT, seed=99
    )
    prefetched = make_ct_study(base / "prefetched", series=3, slices=1, patient_id=PATIENT, seed=5)
    after_restart = make_ct_study(base / "restart", series=1, slices=5, patient_id=PATIENT, seed=6)
    other = make_ct_study(base / "other", series=1, slices=1, patient_id="MRN-OTHER", seed=7)
    a = init_node(base, "a.example/imageshare", "a")
    w = init_node(base, "w.example/imageshare", "w")
    b = init_node(base, "b.example/imageshare", "b")
    orthanc = OrthancServer(base).allow_retrieve(CALLING_AE, a.dimse_port)
    relay = HostileServer(forward_to=orthanc.url)
    # Room for the last two small PACS studies, not three: the run of fetches must evict.
    cache_limit = _study_bytes(in_pacs[2]) + _study_bytes(in_pacs[3]) + 1024
    settings = "[federation]\ndiscovery = false\nreplicate_interval = 0.3\n"
    a.append_config(
        settings + b.roster_entry()
        + f'[pacs]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        f"timeout = 10.0\ncache_bytes = {cache_limit}\nprefetch = true\n"
    )  # fmt: skip
    w.append_config(
        settings + b.roster_entry()
        + f'[pacs]\ndicomweb_url = "{relay.url}/dicom-web"\ntimeout = 30.0\n'
        'dicomweb_auth_header = "X-Hospital: imageshare"\n'
    )  # fmt: skip
    b.append_config(settings + a.roster_entry() + w.roster_entry())
    nodes = [a, w, b]
    try:
        orthanc.start()
        for study in [*in_pacs, large, prefetched, after_restart, other]:
            _upload(orthanc, study)
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(NodeProcess.start, nodes))
        a.cli("import", str(base / "local"))
        w.cli("import", str(base / "local"))
        wallet_a = _enroll(a, base / "wallet-a")
        wallet_w = _enroll(w, base / "wallet-w")
        yield Hospital(
            base,
            orthanc,
            a,
            w,
            b,
            local,
            in_pacs,
            large,
            prefetched,
            after_restart,
            wallet_a,
            wallet_w,
            cache_limit,
            relay,
        )
    finally:
        for node in nodes:
            node.stop()
        relay.stop()
        orthanc.stop()


def _studies(wallet: Wallet, node: NodeProcess) -> list[dict[str, Any]]:
    async def listing() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            return await wallet.studies(session, node.url)

    return asyncio.run(listing())


def _grant(wallet: Wallet, node: NodeProcess, to: NodeProcess, refs: list[str]) -> dict[str, Any]:
    async def grant() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            scope = tuple(b64url_decode(ref, "study reference") for ref in refs)
            return await wallet.grant(session, node.url, to.origin, scope, 3600)

    return asyncio.run(grant())


def _ref_of(listing: list[dict[str, Any]], study: SyntheticStudy) -> str:
    """The listed reference of ``study``, found by its instance count (unique here)."""
    (ref,) = [s["ref"] for s in listing if s["instances"] == len(study.files)]
    return str(ref)


def _accesses(node: NodeProcess, token_id: str) -> list[dict[str, Any]]:
    return _deliveries(node, "access", token_id)


def _deliveries(node: NodeProcess, kind: str, token_id: str) -> list[dict[str, Any]]:
    """The ``access`` or ``receipt`` entries of a token in a node's own log, in order."""
    wanted = log_id(node.origin)
    size = next(
        log["size"] for log in node.get_json("/ledger/logs", auth=False) if log["log_id"] == wanted
    )
    with urllib.request.urlopen(
        f"{node.url}/ledger/logs/{wanted}/entries?start=0&end={size}", timeout=10
    ) as response:
        entries = [decode_entry(raw) for raw in msgpack.unpackb(response.read())]
    return [
        e.fields for e in entries
        if e.kind == kind and e.fields["token_id"].hex() == token_id
    ]  # fmt: skip


def _matched(custodian: NodeProcess, grantee: NodeProcess, token_id: str) -> int | None:
    """Instances the custodian's ``access`` entries of a token say were sent, if each is
    matched by a ``receipt`` of the grantee (same study, count, bytes and digest): every
    access happened, and only those. None while they differ."""
    shared = ("study", "instances", "bytes", "digest")
    accesses = [tuple(a[k] for k in shared) for a in _accesses(custodian, token_id)]
    receipts = [tuple(r[k] for k in shared) for r in _deliveries(grantee, "receipt", token_id)]
    return sum(int(a[1]) for a in accesses) if sorted(accesses) == sorted(receipts) else None


def _accounted(custodian: NodeProcess, grantee: NodeProcess, token_id: str) -> int:
    sent = _matched(custodian, grantee, token_id)
    assert sent is not None, "an access without its receipt, or a receipt without its access"
    return sent


def _held_by(node: NodeProcess, data: bytes) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    return (node.data_dir / "objects" / digest[:2] / f"{digest}.dcm").read_bytes()


def _cached_studies(node: NodeProcess, complete_only: bool = False) -> list[str]:
    """The cache's studies, least recently used first."""
    path = node.data_dir / DIRECTORY_NAME / FILE_NAME
    where = " WHERE complete = 1" if complete_only else ""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute(f"SELECT study_uid FROM studies{where} ORDER BY last_used").fetchall()
    return [row[0] for row in rows]


def _pacs_status(node: NodeProcess) -> dict[str, Any]:
    return dict(node.get_json("/admin/api/status")["pacs"])


class TestListing:
    def test_patient_lists_pacs_studies_beside_the_local_one(self, hospital: Hospital) -> None:
        for node, wallet in ((hospital.a, hospital.wallet_a), (hospital.w, hospital.wallet_w)):
            listing = _studies(wallet, node)
            # The local study, the PACS's (never MRN-OTHER's).
            assert len(listing) == 1 + len(hospital.in_pacs) + 3
            refs = {_ref_of(listing, s) for s in [hospital.local, *hospital.in_pacs[:1]]}
            assert len(refs) == 2
            described = next(
                s for s in listing if s["ref"] == _ref_of(listing, hospital.in_pacs[0])
            )
            assert described["modalities"] == ["CT"]
            assert _pacs_status(node)["link"] == "up"

    def test_dashboard_search_by_patient_id_adds_the_studies_only_in_the_pacs(
        self, hospital: Hospital
    ) -> None:
        found = hospital.a.get_json(f"/admin/api/studies?q={PATIENT}")
        pacs_only = [s for s in found["studies"] if s["source"] == "PACS"]
        local = [s for s in found["studies"] if s["source"] != "PACS"]
        assert [s["study_instance_uid"] for s in local] == [hospital.local.study_uid]
        assert {s["study_instance_uid"] for s in pacs_only} == {
            s.study_uid
            for s in [
                *hospital.in_pacs,
                hospital.large,
                hospital.prefetched,
                hospital.after_restart,
            ]
        }
        assert all(s["viewer_url"] is None and s["patient_id"] == PATIENT for s in pacs_only)
        assert found["total"] == len(found["studies"])
        words = hospital.a.get_json(f"/admin/api/studies?q={PATIENT}+CT")
        assert [s["source"] for s in words["studies"]] == ["local"]  # one word only

    def test_listing_stores_nothing_and_the_dashboard_counts_only_local_studies(
        self, hospital: Hospital
    ) -> None:
        _studies(hospital.wallet_a, hospital.a)
        assert hospital.a.get_json("/admin/api/status")["node"]["held"]["studies"] == 1


class TestFetchFromPacs:
    @pytest.mark.parametrize("custodian", ["a", "w"], ids=["dimse", "dicomweb"])
    def test_grantee_fetches_a_pacs_only_study_whole_and_the_custodian_keeps_only_the_cache(
        self, hospital: Hospital, custodian: str
    ) -> None:
        node, wallet = (
            (hospital.a, hospital.wallet_a) if custodian == "a" else (hospital.w, hospital.wallet_w)
        )
        # One study each: B keeps the first copy of an instance it is sent.
        study = hospital.in_pacs[0 if custodian == "a" else 1]
        grant = _grant(wallet, node, hospital.b, [_ref_of(_studies(wallet, node), study)])
        fetched = json.loads(hospital.b.cli("fetch", grant["token"], "--json").stdout)
        assert fetched["study_uid"] == study.study_uid
        assert fetched["instances"] == len(study.files)
        cache = node.data_dir / DIRECTORY_NAME
        for path in study.files:
            original = pydicom.dcmread(path)
            sop = original.SOPInstanceUID
            (cached,) = [p for p in cache.glob("*.dcm") if pydicom.dcmread(p).SOPInstanceUID == sop]
            # What B holds is exactly what the custodian retrieved and its manifest named.
            assert _held_by(hospital.b, cached.read_bytes()) == cached.read_bytes()
            if custodian == "w":  # WADO-RS hands over the PACS's own file, byte for byte
                assert cached.read_bytes() == path.read_bytes()
            assert pydicom.dcmread(cached) == original  # C-GET: same data set, new meta
        assert node.get_json("/admin/api/status")["node"]["held"]["studies"] == 1
        # Sent as it landed, perhaps in several streams: each accounted on both sides.
        assert _accounted(node, hospital.b, grant["token_id"]) == len(study.files)
        assert _pacs_status(node)["cache"]["complete"] >= 1


def _start_fetch(node: NodeProcess, token: str) -> str:
    request = urllib.request.Request(
        node.url + "/admin/api/fetch",
        data=json.dumps({"token": token}).encode(),
        method="POST",
        headers={**node.auth, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["id"])


def _job(node: NodeProcess, job_id: str) -> dict[str, Any]:
    return dict(node.get_json(f"/admin/api/transfers/{job_id}"))


def _finished(node: NodeProcess, job_id: str, message: str) -> dict[str, Any]:
    return dict(
        wait_until(
            lambda: (j := _job(node, job_id))["state"] != "running" and j,
            timeout=90,
            message=message,
        )
    )


def _is_instance_retrieve(got: Received) -> bool:
    return "/series/" in got.path_qs and "/instances/" in got.path_qs


class TestStreamedAsItLands:
    def test_the_grantee_gets_instances_mid_retrieve_and_waits_out_a_stopped_pacs_and_a_restart(
        self, hospital: Hospital
    ) -> None:
        node, wallet, b, relay = hospital.w, hospital.wallet_w, hospital.b, hospital.relay
        study, cached, after_restart = hospital.large, hospital.in_pacs[1], hospital.after_restart
        total = len(study.files)
        listing = _studies(wallet, node)
        first = _start_fetch(b, _grant(wallet, node, b, [_ref_of(listing, cached)])["token"])
        assert _finished(b, first, "the cached study's fetch")["state"] == "done"
        grant = _grant(wallet, node, b, [_ref_of(listing, study)])
        let_through = 40
        # Orthanc's answers stall after the first 40 instances: the retrieve cannot end.
        relay.released.clear()
        relay.hold = lambda got: (
            _is_instance_retrieve(got)
            and sum(1 for r in relay.received if _is_instance_retrieve(r)) > let_through
        )
        try:
            job_id = _start_fetch(b, grant["token"])
            early = wait_until(
                lambda: (j := _job(b, job_id))["instances_done"] > 0 and j,
                timeout=30,
                message="the first instances to reach the grantee",
            )
            assert early["state"] == "running" and early["instances_total"] == total
            assert "retrieving" in early["waiting"]
            (running,) = _pacs_status(node)["retrieving"]
            assert running["instances_listed"] == total
            assert running["instances_held"] <= let_through
            # What reached B is accounted as sent: an access that happened, mid-retrieve.
            sent_early = wait_until(
                lambda: _matched(node, b, grant["token_id"]),
                timeout=30,
                message="the first stream's access and receipt",
            )
            assert 0 < sent_early <= let_through
            # Orthanc stops mid-retrieve; the stalled answers then fail.
            assert hospital.orthanc.process is not None
            hospital.orthanc.process.kill()
            hospital.orthanc.process.wait()
            hospital.orthanc.process = None
        finally:
            relay.hold = None
            relay.released.set()
        try:
            waiting = wait_until(
                lambda: (j := _job(b, job_id))["error"] and "PACS" in j["error"] and j,
                timeout=60,
                message="the fetch to report the PACS failure",
            )
            assert waiting["state"] == "running"  # waiting for the PACS, not done
            assert "PACS" in waiting["waiting"]
            assert _pacs_status(node)["link"] == "down"
            # The failed attempt sent nothing and is in no access entry.
            assert _accounted(node, b, grant["token_id"]) == waiting["instances_done"] < total
            # The custodian restarts while its PACS is down: grants are judged by the
            # listing it stored, a cached study is served, one only in the PACS waits.
            node.stop()
            node.start()
            assert _studies(wallet, node) == listing
            again = _grant(wallet, node, b, [_ref_of(listing, cached)])
            fetched = _finished(b, _start_fetch(b, again["token"]), "the cached study's fetch")
            assert (fetched["state"], fetched["instances_done"]) == ("done", len(cached.files))
            later = _grant(wallet, node, b, [_ref_of(listing, after_restart)])
            later_id = _start_fetch(b, later["token"])
            wait_until(
                lambda: (j := _job(b, later_id))["waiting"] and "PACS" in j["error"],
                timeout=30,
                message="the fetch of a study only in the PACS to wait for it",
            )
            assert _accesses(node, later["token_id"]) == []
        finally:
            hospital.orthanc.start()
        for job, files in ((job_id, study.files), (later_id, after_restart.files)):
            done = _finished(b, job, "the fetches to resume and finish once the PACS is back")
            assert done["state"] == "done", done
            assert done["instances_done"] == len(files) and done["waiting"] is None
            for path in files:
                assert _held_by(b, path.read_bytes()) == path.read_bytes()
        assert _accounted(node, b, grant["token_id"]) == total
        assert _accounted(node, b, later["token_id"]) == len(after_restart.files)
        assert _pacs_status(node)["link"] == "up"
        assert _pacs_status(node)["retrieving"] == []


class TestCacheLimit:
    def test_a_run_of_fetches_larger_than_the_cache_evicts_the_least_recently_used(
        self, hospital: Hospital
    ) -> None:
        node, wallet = hospital.a, hospital.wallet_a
        listing = _studies(wallet, node)
        fetched: list[str] = []
        for study in hospital.in_pacs[1:]:
            grant = _grant(wallet, node, hospital.b, [_ref_of(listing, study)])
            hospital.b.cli("fetch", grant["token"])
            fetched.append(study.study_uid)
            held = _pacs_status(node)["cache"]
            assert held["bytes"] <= hospital.cache_limit
            assert _cached_studies(node)[-1] == study.study_uid  # the newest stays
        assert _cached_studies(node) == fetched[-2:]  # the oldest went first


class TestPrefetch:
    def test_a_grant_retrieves_its_pacs_study_before_any_fetch(self, hospital: Hospital) -> None:
        node, wallet, study = hospital.a, hospital.wallet_a, hospital.prefetched
        retrieves = _pacs_status(node)["retrieves"]
        grant = _grant(wallet, node, hospital.b, [_ref_of(_studies(wallet, node), study)])
        wait_until(
            lambda: study.study_uid in _cached_studies(node, complete_only=True),
            timeout=30,
            message="the granted study to be prefetched",
        )
        assert _pacs_status(node)["retrieves"] == retrieves + 1
        hospital.b.cli("fetch", grant["token"])
        assert _pacs_status(node)["retrieves"] == retrieves + 1  # served from the cache
        (access,) = _accesses(node, grant["token_id"])  # one stream: it was cached whole
        assert access["instances"] == len(study.files)


class TestDashboard:
    def test_the_dashboard_shows_the_pacs_link_and_the_cache(self, hospital: Hospital) -> None:
        with chromium_session("pacs") as browser:
            page = browser.new_page()
            page.goto(hospital.a.url + "/admin")
            page.locator("#token").fill(hospital.a.admin_token)
            page.locator("#login-form button[type=submit]").click()
            card = page.locator("#pacs")
            card.filter(has_text="C-FIND, C-GET").wait_for()
            text = card.inner_text()
            assert f"ORTHANC at 127.0.0.1:{hospital.orthanc.dicom_port}" in text
            assert "up" in text and "whole" in text
            page.shot("pacs-source")


def _revoke(wallet: Wallet, node: NodeProcess, token_ids: list[str]) -> None:
    async def revoke() -> None:
        async with aiohttp.ClientSession() as session:
            for token_id in token_ids:
                await wallet.revoke(session, node.url, bytes.fromhex(token_id))

    asyncio.run(revoke())


def _live_tokens(wallet: Wallet) -> list[str]:
    async def tokens() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            return await wallet.tokens(session)

    return [t["token_id"] for t in asyncio.run(tokens()) if t["status"] == "active"]


class TestRevocation:
    def test_a_revoked_grants_cached_study_is_dropped_once_no_live_grant_needs_it(
        self, hospital: Hospital
    ) -> None:
        node, wallet, b, study = hospital.w, hospital.wallet_w, hospital.b, hospital.after_restart
        ref = _ref_of(_studies(wallet, node), study)
        first, second = _grant(wallet, node, b, [ref]), _grant(wallet, node, b, [ref])
        b.cli("fetch", first["token"])  # cached whole at W (retrieved if it was not yet)
        assert study.study_uid in _cached_studies(node, complete_only=True)
        whole = _pacs_status(node)["cache"]["complete"]
        _revoke(wallet, node, [first["token_id"]])
        assert study.study_uid in _cached_studies(node)  # the second grant still needs it
        live = _live_tokens(wallet)
        assert second["token_id"] in live
        _revoke(wallet, node, live)  # the second, and any other grant covering it
        assert study.study_uid not in _cached_studies(node)
        # As the dashboard shows it: fewer whole studies (no grant left needs any here).
        assert (
            _pacs_status(node)["cache"]["complete"]
            == len(_cached_studies(node, complete_only=True))
            < whole
        )


# -- a PACS that answers what it should not ----------------------------------------------


@dataclass
class HostilePacs:
    server: HostileServer
    runtime: NodeRuntime
    source: PacsSource
    study: SyntheticStudy  # PATIENT's, served by the hostile PACS
    stranger: SyntheticStudy  # another study, slipped into its answers


def _dicom_json(uid: str, patient_id: str) -> dict[str, Any]:
    return {
        "0020000D": {"vr": "UI", "Value": [uid]},
        "00100020": {"vr": "LO", "Value": [patient_id]},
        "00201208": {"vr": "IS", "Value": [1]},
    }


def _multipart(*parts: bytes, boundary: str = "b0undary") -> web.Response:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    return web.Response(
        body=body + b"--" + boundary.encode() + b"--\r\n",
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostilePacs]:
    base = tmp_path_factory.mktemp("hostile-pacs")
    server = HostileServer()
    node = init_node(base, "h.example/imageshare", "h")
    # A cache of one byte: every retrieve evicts all that is not being retrieved or served.
    node.append_config(
        f'[pacs]\ndicomweb_url = "{server.url}/dicom-web"\ntimeout = 5.0\ncache_bytes = 1\n'
    )
    study = make_ct_study(base / "study", series=1, slices=1, patient_id=PATIENT, seed=3)
    stranger = make_ct_study(base / "stranger", series=1, slices=1, patient_id=PATIENT, seed=4)
    runtime = open_runtime(node.config)
    source = runtime.services.pacs
    assert source is not None
    try:
        yield HostilePacs(server, runtime, source, study, stranger)
    finally:
        runtime.close()
        server.stop()


class TestHostilePacs:
    def test_listing_keeps_only_the_patients_studies_with_valid_uids(
        self, hostile: HostilePacs
    ) -> None:
        good = hostile.study.study_uid
        answer = [
            _dicom_json(good, PATIENT),
            _dicom_json("1.2.3.4", "MRN-SOMEONE-ELSE"),
            _dicom_json("1.2/../../etc", PATIENT),
            _dicom_json("1.2.3", PATIENT.lower()),
        ]
        hostile.server.respond = lambda got: web.json_response(answer)
        listed = hostile.source.studies_of_patient("MRN-HOSTILE-1")
        assert listed == []  # every answer names another patient id
        hostile.server.respond = lambda got: web.json_response(
            [{**a, "00100020": {"vr": "LO", "Value": ["MRN-HOSTILE-2"]}} for a in answer[:3]]
            + [_dicom_json("9.9", "MRN-OTHER")]
        )
        assert [s.study_uid for s in hostile.source.studies_of_patient("MRN-HOSTILE-2")] == [
            good,
            "1.2.3.4",
        ]

    def test_a_patient_id_with_a_wildcard_is_never_sent_to_the_pacs(
        self, hostile: HostilePacs
    ) -> None:
        hostile.server.respond = lambda got: web.json_response([])
        before = len(hostile.server.received)
        for patient_id in ("MRN*", "MRN-?", "A\\B", "MRN%", "MRN_1"):
            assert hostile.source.studies_of_patient(patient_id) == []
        assert len(hostile.server.received) == before

    def test_an_answer_that_is_not_a_list_or_too_large_fails_closed(
        self, hostile: HostilePacs, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        hostile.server.respond = lambda got: web.json_response({"not": "a list"})
        assert hostile.source.studies_of_patient("MRN-HOSTILE-3") == []
        assert "other than a list" in hostile.source.status()["last_error"]
        monkeypatch.setattr(pacs, "MAX_JSON_BYTES", 1024)
        hostile.server.respond = lambda got: web.json_response([_dicom_json("1.2", "X" * 4096)])
        assert hostile.source.studies_of_patient("MRN-HOSTILE-4") == []
        assert hostile.source.status()["link"] == "down"

    def test_an_instance_of_another_study_is_refused_and_the_study_never_served(
        self, hostile: HostilePacs
    ) -> None:
        study, stranger = hostile.study, hostile.stranger
        listing = [_dicom_json(study.study_uid, PATIENT)]
        ds = pydicom.dcmread(study.files[0])
        instance = {
            "0020000E": {"vr": "UI", "Value": [ds.SeriesInstanceUID]},
            "00080018": {"vr": "UI", "Value": [ds.SOPInstanceUID]},
        }

        def answer(got: Received) -> web.Response:
            if got.path_qs.startswith("/dicom-web/studies?"):
                return web.json_response(listing)
            if got.path_qs.startswith(f"/dicom-web/studies/{study.study_uid}/instances"):
                return web.json_response([instance])
            return _multipart(stranger.files[0].read_bytes())

        hostile.server.respond = answer
        assert hostile.source.studies_of_patient(PATIENT)
        with pytest.raises(PacsUnavailable, match="another study"):
            hostile.source.instances_to_send(study.study_uid, b"t" * 16)
        assert hostile.source.cache.held(study.study_uid) == set()
        assert list(hostile.source.cache.directory.glob("*.dcm")) == []
        assert list((hostile.runtime.config.data_dir / "tmp").glob("*")) == []  # nothing staged


def _honest_pacs(patient_id: str, *studies: SyntheticStudy) -> Callable[[Received], web.Response]:
    """A DICOMweb PACS holding ``studies`` of ``patient_id``, answering as it should."""
    by_study = {
        study.study_uid: [pydicom.dcmread(path, stop_before_pixels=True) for path in study.files]
        for study in studies
    }
    files = {
        pydicom.dcmread(path).SOPInstanceUID: path.read_bytes()
        for study in studies
        for path in study.files
    }

    def answer(got: Received) -> web.Response:
        if got.path_qs.startswith("/dicom-web/studies?"):
            return web.json_response([_dicom_json(uid, patient_id) for uid in by_study])
        uid = got.path_qs.split("/")[3].split("?")[0]
        if "/instances?" in got.path_qs:
            return web.json_response(
                [
                    {
                        "0020000E": {"vr": "UI", "Value": [ds.SeriesInstanceUID]},
                        "00080018": {"vr": "UI", "Value": [ds.SOPInstanceUID]},
                    }
                    for ds in by_study[uid]
                ]
            )
        return _multipart(files[got.path_qs.rsplit("/", 1)[1]])

    return answer


class TestEviction:
    def test_a_study_being_served_or_opened_is_never_evicted(self, hostile: HostilePacs) -> None:
        source, served, other = hostile.source, hostile.study, hostile.stranger
        hostile.server.respond = _honest_pacs("MRN-EVICT", served, other)
        assert len(source.studies_of_patient("MRN-EVICT")) == 2
        first, second = b"1" * 16, b"2" * 16
        assert source.instances_to_send(served.study_uid, first).pending == 0
        with source.serving(first):
            # Retrieving another study evicts down to one byte, but not what streams.
            assert len(source.instances_to_send(other.study_uid, second).instances) == 1
            assert source.cache.complete_instances(served.study_uid) is not None
        # Its stream ended: evicted now; the other, opened and not yet streamed, stays.
        assert source.cache.complete_instances(served.study_uid) is None
        assert source.cache.complete_instances(other.study_uid) is not None
        with source.serving(second):
            pass
        assert source.cache.usage().studies == 0

    def test_a_study_larger_than_the_cache_stays_for_the_transfer_sent_part_of_it(
        self, hostile: HostilePacs, tmp_path: Path
    ) -> None:
        source, server = hostile.source, hostile.server
        study = make_ct_study(tmp_path / "two", series=1, slices=2, patient_id="MRN-P", seed=8)
        server.respond = _honest_pacs("MRN-P", study)
        assert len(source.studies_of_patient("MRN-P")) == 1
        second_sop = str(pydicom.dcmread(study.files[1]).SOPInstanceUID)
        server.released.clear()
        server.hold = lambda got: got.path_qs.endswith(second_sop)  # the PACS stalls there
        token = b"p" * 16
        try:
            part = source.instances_to_send(study.study_uid, token)
            assert (len(part.instances), part.pending) == (1, 1)  # the first, whole
            with source.serving(token):
                pass  # its stream: the study is being retrieved, so it stays
        finally:
            server.hold = None
            server.released.set()
        wait_until(lambda: not source.status()["retrieving"], message="the retrieve to end")
        asked = len(server.received)
        # The cache holds one byte, yet the study waits for the transfer's last part.
        rest = source.instances_to_send(study.study_uid, token)
        assert (len(rest.instances), rest.pending) == (2, 0)
        assert len(server.received) == asked  # from the cache, not retrieved again
        with source.serving(token):
            pass
        assert source.cache.usage().studies == 0


class TestSinglePart:
    TYPE = 'multipart/related; type="application/dicom"; boundary=xyz'

    def test_one_whole_part_is_returned_exactly(self) -> None:
        body = b"--xyz\r\nContent-Type: application/dicom\r\n\r\nDA\r\nTA\r\n--xyz--\r\n"
        assert single_part(body, self.TYPE) == b"DA\r\nTA"

    @pytest.mark.parametrize(
        ("body", "content_type"),
        [
            (b"--xyz\r\n\r\nDATA\r\n--xyz--\r\n", "application/dicom"),
            (b"--xyz\r\n\r\nDATA\r\n--xyz--\r\n", 'multipart/related; type="application/dicom"'),
            (b"--xyz\r\nContent-Type: application/dicom\r\n\r\nDATA", TYPE),  # cut off
            (b"--xyz\r\nContent-Type: application/dicom\r\n\r\nDATA\r\n--xyz\r\n", TYPE),
            (b"--xyz\r\n\r\nA\r\n--xyz\r\n\r\nB\r\n--xyz--\r\n", TYPE),
            (b"no delimiter at all", TYPE),
        ],
        ids=["not-multipart", "no-boundary", "truncated", "unclosed", "two-parts", "no-part"],
    )
    def test_anything_else_fails_closed(self, body: bytes, content_type: str) -> None:
        with pytest.raises(PacsUnavailable):
            single_part(body, content_type)
