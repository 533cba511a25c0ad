"""Consented transfer between real node processes: the whole story and its refusals.

Three nodes on loopback: custodian A, grantee B, third node C. B reaches A only through
a recording TCP proxy (B's roster URL for A points at it), so the test sees every byte
between them and can slow the stream down to interrupt it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.core.consent import GrantFields, sign_grant, token_text
from node.core.entries import LedgerEntry
from node.core.keys import NodeIdentity
from node.core.manifest import OpenRequest, encode_handles
from node.core.signed_requests import make_headers, node_signer
from node.samples import SyntheticStudy, make_ct_study
from node.services.wallet import Wallet
from node.store.secrets import read_seed
from tests.support.nodes import (
    IMAGESHARE,
    NodeProcess,
    init_node,
    log_entries,
    run_cli,
    wait_until,
)
from tests.support.proxy import TcpProxy


@dataclass
class Federation:
    base: Path
    a: NodeProcess
    b: NodeProcess
    c: NodeProcess
    proxy: TcpProxy
    study: SyntheticStudy
    wallet_dir: Path
    wallet: Wallet


def _peer(node: NodeProcess, url: str) -> str:
    return f'[[peers]]\norigin = "{node.origin}"\nurl = "{url}"\nvkey = "{node.vkey}"\n'


def _enroll(a: NodeProcess, wallet_dir: Path, patient_id: str) -> Wallet:
    """A new wallet whose key for A is enrolled (by `imageshare enroll`) as ``patient_id``."""
    wallet = Wallet.create(wallet_dir, None)
    # --key=... because a base64url key may begin with "-".
    a.cli("enroll", "--patient-id", patient_id, f"--key={wallet.key_for(a.origin).public_key_text}")
    return wallet


def _grant_cli(fed: Federation, to: NodeProcess) -> dict[str, Any]:
    """`imageshare patient grant --all`, as the patient would."""
    result = run_cli(
        "patient", "grant", "--custodian", fed.a.url, "--to", to.origin, "--all",
        "--wallet", str(fed.wallet_dir), "--json",
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def _grant(fed: Federation, wallet: Wallet, to: NodeProcess) -> dict[str, Any]:
    """The same grant through the wallet library (no interpreter start)."""

    async def grant() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            return await wallet.grant(session, fed.a.url, to.origin, None, 3600)

    return asyncio.run(grant())


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("transfer")
    a = init_node(base, "a.example/imageshare", "a")
    b = init_node(base, "b.example/imageshare", "b")
    c = init_node(base, "c.example/imageshare", "c")
    proxy = TcpProxy(a.http_port, record=True)
    settings = "[federation]\ndiscovery = false\nreplicate_interval = 0.3\n"
    a.append_config(settings + "[consent]\nclock_skew_seconds = 1\n")
    a.append_config(_peer(b, b.url) + _peer(c, c.url))
    b.append_config(settings + _peer(a, proxy.url))
    c.append_config(settings + _peer(a, a.url))
    nodes = [a, b, c]
    try:
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(NodeProcess.start, nodes))
        study = make_ct_study(base / "study", series=2, slices=5, rows=64, columns=64)
        a.cli("import", str(base / "study"))
        wallet = _enroll(a, base / "wallet", study.patient_id)
        yield Federation(base, a, b, c, proxy, study, base / "wallet", wallet)
    finally:
        for node in nodes:
            node.stop()
        proxy.stop()


def _entries(node: NodeProcess, origin: str) -> list[LedgerEntry]:
    """Every entry of ``origin``'s log as ``node`` holds it (its own or its mirror)."""
    return log_entries(node, origin)


def _of_token(entries: list[LedgerEntry], kind: str, token_id: str) -> list[dict[str, Any]]:
    return [e.fields for e in entries if e.kind == kind and e.fields["token_id"].hex() == token_id]


def _post_json(node: NodeProcess, path: str, body: Any) -> Any:
    request = urllib.request.Request(
        node.url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={**node.auth, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _assert_held_identically(node: NodeProcess, files: list[Path]) -> None:
    for path in files:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        assert node.stored_object(digest) == data


class TestConsentedFetch:
    def test_fetch_copies_study_exactly_accounts_both_sides_and_stops_after_revoke(
        self, fed: Federation
    ) -> None:
        grant = _grant_cli(fed, fed.b)
        fetched = json.loads(fed.b.cli("fetch", grant["url"], "--json").stdout)
        assert fetched["study_uid"] == fed.study.study_uid
        assert fetched["instances"] == len(fed.study.files)
        assert fetched["custodian"] == fed.a.origin
        assert fetched["dicomweb_url"].endswith(f"/dicomweb/studies/{fed.study.study_uid}")
        _assert_held_identically(fed.b, fed.study.files)
        found = fed.b.get_json(f"/dicomweb/studies?StudyInstanceUID={fed.study.study_uid}")
        assert len(found) == 1

        (access,) = _of_token(_entries(fed.a, fed.a.origin), "access", grant["token_id"])
        (receipt,) = _of_token(_entries(fed.b, fed.b.origin), "receipt", grant["token_id"])
        assert access["grantee"] == fed.b.origin and receipt["custodian"] == fed.a.origin
        assert access["instances"] == receipt["instances"] == len(fed.study.files)
        assert access["bytes"] == receipt["bytes"] == sum(p.stat().st_size for p in fed.study.files)
        assert (access["study"], access["digest"]) == (receipt["study"], receipt["digest"])
        wait_until(
            lambda: _of_token(_entries(fed.b, fed.a.origin), "access", grant["token_id"]),
            message="B's mirror of A's log to hold the access entry",
        )

        run_cli(
            "patient", "revoke", grant["token_id"], "--custodian", fed.a.url,
            "--wallet", str(fed.wallet_dir),
        )  # fmt: skip
        refused = fed.b.cli("fetch", grant["token"], check=False)
        assert refused.returncode == 1
        assert "revoked" in refused.stderr
        denials = _of_token(_entries(fed.a, fed.a.origin), "denial", grant["token_id"])
        assert [d["rule"] for d in denials] == ["revoked"]
        assert denials[0]["requester"] == fed.b.origin

        mine = [
            f for f in fed.b.get_json("/admin/api/transfers")["fetches"]
            if f["token_id"] == grant["token_id"]
        ]  # fmt: skip
        assert [(f["state"], f["rule"]) for f in mine] == [("refused", "revoked"), ("done", None)]
        assert mine[1]["instances_received"] == len(fed.study.files)
        sent = [
            s for s in fed.a.get_json("/admin/api/transfers")["sent"]
            if s["token_id"] == grant["token_id"]
        ]  # fmt: skip
        assert [(s["grantee"], s["state"]) for s in sent] == [(fed.b.origin, "done")]

    def test_bytes_between_nodes_hold_no_plaintext(self, fed: Federation) -> None:
        grant = _grant(fed, fed.wallet, fed.b)
        said = fed.b.cli("fetch", grant["token"]).stdout
        assert f"/dicomweb/studies/{fed.study.study_uid}" in said
        # Everything between B and A since they started: the study crossed it in this
        # fetch or in an earlier one (B asks only for what it lacks).
        wire = fed.proxy.captured()
        assert len(wire) > sum(p.stat().st_size for p in fed.study.files)
        for secret in (
            b"DICM",
            fed.study.patient_name.encode(),
            fed.study.patient_id.encode(),
            fed.study.study_uid.encode(),
            *(uid.encode() for uid in fed.study.sop_uids),
        ):
            assert secret not in wire

    def test_third_node_with_the_grantees_token_is_refused_wrong_grantee(
        self, fed: Federation
    ) -> None:
        grant = _grant(fed, fed.wallet, fed.b)
        refused = fed.c.cli("fetch", grant["token"], check=False)
        assert refused.returncode == 1
        assert "wrong_grantee" in refused.stderr
        denials = _of_token(_entries(fed.a, fed.a.origin), "denial", grant["token_id"])
        assert [(d["rule"], d["requester"]) for d in denials] == [("wrong_grantee", fed.c.origin)]

    def test_expired_token_is_refused(self, fed: Federation) -> None:
        key = fed.wallet.key_for(fed.a.origin)
        now = int(time.time())
        fields = GrantFields(
            key.public_key, fed.a.origin, fed.b.origin, None, now - 7200, now - 3600, os.urandom(16)
        )
        refused = fed.b.cli("fetch", token_text(sign_grant(fields, key.sign)), check=False)
        assert refused.returncode == 1
        assert "expired" in refused.stderr

    def test_unknown_custodian_is_unreachable(self, fed: Federation) -> None:
        key = fed.wallet.key_for("x.example/gone")
        now = int(time.time())
        fields = GrantFields(
            key.public_key, "x.example/gone", fed.b.origin, None, now, now + 60, os.urandom(16)
        )
        result = fed.b.cli("fetch", token_text(sign_grant(fields, key.sign)), check=False)
        assert result.returncode == 2
        assert "roster" in result.stderr

    def test_malformed_token_is_a_clear_error(self, fed: Federation) -> None:
        result = fed.b.cli("fetch", "not-a-token!", check=False)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr and result.stderr.startswith("imageshare:")


def _signed_post(fed: Federation, signer: NodeProcess, path: str, body: bytes) -> tuple[int, Any]:
    """A /p2p request to A signed with ``signer``'s node key; (status, JSON or raw body)."""
    identity = NodeIdentity(signer.origin, read_seed(signer.data_dir / "node.key"))
    headers = make_headers(
        identity.sign, node_signer(signer.origin), "POST", path, body, int(time.time()),
        os.urandom(16), audience=fed.a.origin,
    )  # fmt: skip
    request = urllib.request.Request(fed.a.url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class TestHostileRequests:
    def test_custodian_refuses_bad_transfer_requests_and_keeps_serving(
        self, fed: Federation
    ) -> None:
        request = urllib.request.Request(fed.a.url + "/p2p/transfer", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as unsigned:
            urllib.request.urlopen(request, timeout=30)
        assert unsigned.value.code == 401

        status, answer = _signed_post(fed, fed.c, "/p2p/transfer", b"\xc1garbage")
        assert status == 400 and answer["error"]
        tampered = OpenRequest(b"not a token", os.urandom(32)).encode()
        status, answer = _signed_post(fed, fed.c, "/p2p/transfer", tampered)
        assert (status, answer["rule"]) == (403, "tampered")
        status, answer = _signed_post(
            fed, fed.c, "/p2p/transfer/0123abcd/instances", encode_handles([0])
        )
        assert status == 404
        assert fed.a.get_json("/healthz", auth=False)["status"] == "ok"


class TestResume:
    def test_custodian_killed_mid_transfer_resumes_sending_only_what_is_lacking(
        self, fed: Federation
    ) -> None:
        study = make_ct_study(
            fed.base / "big", series=2, slices=30, rows=256, columns=256, patient_id="MRN-0002"
        )
        fed.a.cli("import", str(fed.base / "big"))
        wallet = _enroll(fed.a, fed.base / "wallet2", study.patient_id)
        grant = _grant(fed, wallet, fed.b)
        total = sum(p.stat().st_size for p in study.files)

        fed.proxy.rate = 3e6
        start = len(fed.proxy.downstream)
        fetch = subprocess.Popen(
            [*IMAGESHARE, "fetch", grant["token"], "--json", "-c", str(fed.b.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(
                lambda: len(fed.proxy.downstream) - start > total // 3,
                timeout=30,
                message="a third of the study on the wire",
            )
            fed.a.kill9()
            fed.proxy.rate = None
            fed.a.start()
            out, err = fetch.communicate(timeout=90)
        finally:
            fetch.kill()
        assert fetch.returncode == 0, err
        assert json.loads(out)["instances"] == len(study.files)
        _assert_held_identically(fed.b, study.files)

        receipts = _of_token(_entries(fed.b, fed.b.origin), "receipt", grant["token_id"])
        assert len(receipts) == 2
        cut, resumed = receipts
        assert 0 < cut["instances"] < len(study.files)
        assert cut["instances"] + resumed["instances"] == len(study.files)
        accesses = _of_token(_entries(fed.a, fed.a.origin), "access", grant["token_id"])
        # The cut stream's access is written at A's restart from its journal; the resumed
        # stream sent exactly what B lacked (the two may be written in either order).
        assert len(accesses) == 2
        assert (resumed["instances"], resumed["digest"]) in {
            (a["instances"], a["digest"]) for a in accesses
        }

    def test_grantee_killed_mid_transfer_accounts_what_arrived_and_fetch_again_completes(
        self, fed: Federation
    ) -> None:
        study = make_ct_study(
            fed.base / "big-b", series=1, slices=60, rows=256, columns=256, patient_id="MRN-0004"
        )
        fed.a.cli("import", str(fed.base / "big-b"))
        wallet = _enroll(fed.a, fed.base / "wallet4", study.patient_id)
        grant = _grant(fed, wallet, fed.b)
        total = sum(p.stat().st_size for p in study.files)

        fed.proxy.rate = 3e6
        start = len(fed.proxy.downstream)
        try:
            job = _post_json(fed.b, "/admin/api/fetch", {"token": grant["token"]})
            wait_until(
                lambda: fed.b.get_json(f"/admin/api/transfers/{job['id']}")["instances_done"],
                timeout=30,
                message="a first durable batch at B",
            )
            assert len(fed.proxy.downstream) - start < total
            fed.b.kill9()
        finally:
            fed.proxy.rate = None
        fed.b.start()
        # The cut stream's receipt is written at B's restart from its journal.
        (cut,) = wait_until(
            lambda: _of_token(_entries(fed.b, fed.b.origin), "receipt", grant["token_id"]),
            message="the receipt of the cut stream",
        )
        assert 0 < cut["instances"] < len(study.files)
        fetched = json.loads(fed.b.cli("fetch", grant["token"], "--json").stdout)
        assert fetched["instances"] == len(study.files)
        _assert_held_identically(fed.b, study.files)
        cut_again, resumed = _of_token(_entries(fed.b, fed.b.origin), "receipt", grant["token_id"])
        assert cut_again == cut
        assert cut["instances"] + resumed["instances"] == len(study.files)


class TestRevocationDuringStream:
    def test_revocation_cuts_a_running_stream_and_the_fetch_ends_refused(
        self, fed: Federation
    ) -> None:
        study = make_ct_study(
            fed.base / "long", series=1, slices=80, rows=256, columns=256, patient_id="MRN-0003"
        )
        fed.a.cli("import", str(fed.base / "long"))
        wallet = _enroll(fed.a, fed.base / "wallet3", study.patient_id)
        grant = _grant(fed, wallet, fed.b)
        total = sum(p.stat().st_size for p in study.files)

        async def revoke() -> None:
            async with aiohttp.ClientSession() as session:
                await wallet.revoke(session, fed.a.url, bytes.fromhex(grant["token_id"]))

        fed.proxy.rate = 2e6
        start = len(fed.proxy.downstream)
        fetch = subprocess.Popen(
            [*IMAGESHARE, "fetch", grant["token"], "-c", str(fed.b.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(
                lambda: len(fed.proxy.downstream) - start > 500_000,
                timeout=30,
                message="the stream to be under way",
            )
            asyncio.run(revoke())
            _out, err = fetch.communicate(timeout=60)
        finally:
            fed.proxy.rate = None
            fetch.kill()
        assert fetch.returncode == 1
        assert "revoked" in err
        assert len(fed.proxy.downstream) - start < total
        stored = fed.b.stored_digests()
        held = sum(hashlib.sha256(p.read_bytes()).hexdigest() in stored for p in study.files)
        assert held < len(study.files)
