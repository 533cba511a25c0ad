"""`imageshare patient log`: the patient's accesses, denials and revocations, proven.

A real story on real nodes: custodian A and grantee B replicate (and so cosign) each
other's logs; the patient keeps a wallet, is enrolled at A, grants B, B fetches through
the transfer service, the patient revokes, and B's next fetch is refused (a denial).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgpack
import pytest
from aiohttp import web

from node.core.consent import token_id_of
from node.core.entries import Grant, LedgerEntry, decode_entry
from node.core.patient_keys import PatientKey
from node.core.tiles import encode_entry_bundle, iter_entry_bundle
from node.samples import make_ct_study
from node.services.patient_log import own_grant_id
from node.services.wallet import Wallet
from tests.support.nodes import (
    NodeProcess,
    free_port,
    init_node,
    peer_each_other,
    run_cli,
    wait_until,
)
from tests.support.patients import make_grant, patient, with_session

T = TypeVar("T")


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("patient-log")
    a = init_node(base, "a.example/imageshare")
    b = init_node(base, "b.example/imageshare")
    peer_each_other(a, b)
    make_ct_study(base / "study", series=1, slices=2, patient_id="MRN-LOG-1")
    a.cli("import", str(base / "study"))
    a.start()
    b.start()
    wallet = base / "wallet"
    patient(wallet, "keygen")
    opened = Wallet.open(wallet, None)
    # The wallet's library calls, in process: the CLI around them is the consent tests' part.
    custodian = asyncio.run(with_session(lambda s: opened.custodian(s, a.url)))
    key = opened.key_for(custodian.origin).public_key_text
    a.cli("enroll", "--patient-id", "MRN-LOG-1", "--key", key)
    grant = asyncio.run(with_session(lambda s: opened.grant(s, a.url, b.origin, None, 3600)))
    b.cli("fetch", grant["token"])
    token_id = bytes.fromhex(grant["token_id"])
    asyncio.run(with_session(lambda s: opened.revoke(s, a.url, token_id)))
    refused = b.cli("fetch", grant["token"], check=False)
    try:
        yield {"a": a, "b": b, "wallet": wallet, "grant": grant, "refused": refused}
    finally:
        a.stop()
        b.stop()


def proven_log(a: NodeProcess, b: NodeProcess, wallet: Path) -> dict[str, Any] | None:
    """The patient log once every event is proven (cosigned checkpoints take a moment)."""
    result = run_cli("patient", "log", a.url, b.url, "--wallet", str(wallet), "--json", check=False)
    if result.returncode != 0:
        return None
    document: dict[str, Any] = json.loads(result.stdout)
    return document


class TestPatientLog:
    def test_lists_exactly_the_fetch_the_revocation_and_the_denial(
        self, story: dict[str, Any]
    ) -> None:
        a, b, wallet = story["a"], story["b"], story["wallet"]
        assert story["refused"].returncode == 1
        log = wait_until(
            lambda: proven_log(a, b, wallet), timeout=30, interval=0.5, message="a proven log"
        )
        events = [(e["kind"], e["token_id"]) for e in log["events"]]
        token_id = story["grant"]["token_id"]
        assert events == [("access", token_id), ("revoke", token_id), ("denial", token_id)]
        access, _, denial = log["events"]
        assert access["grantee"] == b.origin and access["instances"] == 2
        assert denial["requester"] == b.origin and denial["rule"] == "revoked"
        assert all(e["custodian"] == a.origin for e in log["events"])

    def test_every_event_is_proven_by_inclusion_under_a_checkpoint_cosigned_by_a_peer(
        self, story: dict[str, Any]
    ) -> None:
        a, b, wallet = story["a"], story["b"], story["wallet"]
        log = wait_until(
            lambda: proven_log(a, b, wallet), timeout=30, interval=0.5, message="a proven log"
        )
        assert log["proven"] is True
        for event in log["events"]:
            proof = event["proof"]
            assert proof["log_signature"] and proof["inclusion"]
            assert proof["cosigners"] == [b.origin]
            assert proof["checkpoint_size"] > event["index"]

    def test_human_log_says_who_received_what_and_how_it_is_proven(
        self, story: dict[str, Any]
    ) -> None:
        a, b, wallet = story["a"], story["b"], story["wallet"]
        wait_until(lambda: proven_log(a, b, wallet), timeout=30, interval=0.5)
        result = run_cli("patient", "log", a.url, b.url, "--wallet", str(wallet))
        assert f"{b.origin} received 2 images" in result.stdout
        assert "was refused (revoked)" in result.stdout
        assert f"cosigned by {b.origin}" in result.stdout

    def test_without_a_witness_nothing_is_proven(self, story: dict[str, Any]) -> None:
        # Asking the custodian alone: its signature and inclusion hold, but no other node
        # is there to vouch for the checkpoint's cosigner key.
        a, wallet = story["a"], story["wallet"]
        result = run_cli("patient", "log", a.url, "--wallet", str(wallet), "--json", check=False)
        assert result.returncode == 1
        log = json.loads(result.stdout)
        assert log["events"] and not any(e["proof"]["proven"] for e in log["events"])

    def test_audit_of_the_story_is_clean(self, story: dict[str, Any]) -> None:
        a, b = story["a"], story["b"]

        def audited() -> dict[str, Any] | None:
            result = run_cli("audit", a.url, b.url, "--json", check=False)
            report: dict[str, Any] = json.loads(result.stdout)
            # Replication may lag a moment: a mirror a size behind is no violation.
            return report if result.returncode == 0 else None

        report = wait_until(audited, timeout=30, interval=0.5, message="a clean audit")
        logs = {log["origin"]: log for log in report["logs"]}
        assert logs[a.origin]["counts"]["access"] == 1
        assert logs[a.origin]["counts"]["denial"] == 1
        assert logs[b.origin]["counts"]["receipt"] == 1
        assert any(c["status"] == "valid" for c in logs[a.origin]["cosignatures"])

    def test_unreachable_node_exits_2(self, story: dict[str, Any]) -> None:
        result = run_cli(
            "patient",
            "log",
            story["a"].url,
            f"http://127.0.0.1:{free_port()}",
            "--wallet",
            str(story["wallet"]),
            check=False,
        )
        assert result.returncode == 2
        assert "unreachable" in result.stderr

    def test_a_node_hiding_an_access_is_caught(self, story: dict[str, Any]) -> None:
        # A loopback proxy in front of the custodian serves its log with the access entry
        # replaced by a copy of the entry before it: every listed event would still have
        # a valid inclusion proof, but the list is no longer the signed log.
        a, b, wallet = story["a"], story["b"], story["wallet"]
        with HidingProxy(a.url, hide_kind="access") as proxy:
            result = run_cli(
                "patient",
                "log",
                proxy.url,
                b.url,
                "--wallet",
                str(wallet),
                "--json",
                check=False,
            )
        assert result.returncode == 1
        log = json.loads(result.stdout)
        assert not any(e["kind"] == "access" for e in log["events"])
        assert any("do not hash to the signed checkpoint" in p for p in log["problems"])


class TestGrantsMadeInAnotherWallet:
    def test_a_grant_in_the_log_is_the_patients_only_if_their_key_signed_it(self) -> None:
        custodian = "a.example/imageshare"
        key = PatientKey.derive(os.urandom(32), custodian)
        other = PatientKey.derive(os.urandom(32), custodian)

        def entry(token: bytes) -> LedgerEntry:
            return LedgerEntry.of(bytes(32), 1, Grant(token=token))

        mine = make_grant(key, custodian, "b.example/imageshare")
        assert own_grant_id(entry(mine), key.public_key) == token_id_of(mine)
        assert own_grant_id(entry(mine), None) is None
        theirs = make_grant(other, custodian, "b.example/imageshare")
        assert own_grant_id(entry(theirs), key.public_key) is None
        # A custodian writing a grant in the patient's name cannot sign it.
        forged = make_grant(other, custodian, "b.example/imageshare", patient_key=key.public_key)
        assert own_grant_id(entry(forged), key.public_key) is None


class HidingProxy:
    """A real aiohttp server on loopback that forwards to a node, hiding entries of a kind."""

    def __init__(self, target: str, hide_kind: str) -> None:
        self.target, self.hide_kind = target, hide_kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def forward(self, request: web.Request) -> web.Response:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.target + request.path_qs) as answer,
        ):
            body, status = await answer.read(), answer.status
            content_type = answer.content_type
        if request.path.endswith("/entries") and status == 200:
            body = msgpack.packb(self._hidden(msgpack.unpackb(body)))
        elif "/tile/entries/" in request.path and status == 200:
            body = encode_entry_bundle(self._hidden(list(iter_entry_bundle(body))))
        return web.Response(body=body, status=status, content_type=content_type)

    def _hidden(self, entries: list[bytes]) -> list[bytes]:
        """``entries`` with each of the hidden kind replaced by the one before it."""
        for i, raw in enumerate(entries):
            if i and decode_entry(raw).kind == self.hide_kind:
                entries[i] = entries[i - 1]
        return entries

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> HidingProxy:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
