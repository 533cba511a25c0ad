"""Refusals a grantee acts on are the custodian's own: forged ones are reported unverified.

Custodian A and grantee B are real node processes. B's roster URL for A points at a
hostile server that relays to A (a machine on the path, or whoever answers at A's
address). Relayed, A's genuine refusals reach B and are reported as refusals (exit 1).
A refusal the hostile server makes up (unsigned, signed by another key, or A's genuine
signed refusal of another request replayed) is not A's answer to this request: B reports
an unverified answer and treats A as unreachable (exit 2), never "refused (revoked)".
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from node.core.consent import GrantFields, sign_grant, token_text
from node.core.keys import NodeIdentity, parse_verifier_key
from node.core.refusals import REFUSAL_HEADER, sign_refusal, verify_refusal
from node.core.signed_requests import parse_headers
from node.samples import make_ct_study
from node.services.wallet import Wallet
from tests.support.hostile import HostileServer, Received, Relayed, Responder
from tests.support.nodes import NodeProcess, init_node

FORGED_BODY = {"error": "refused (revoked): the patient revoked this grant", "rule": "revoked"}


@dataclass
class Setup:
    a: NodeProcess
    b: NodeProcess
    relay: HostileServer
    wallet: Wallet


def _peer(node: NodeProcess, url: str) -> str:
    return f'[[peers]]\norigin = "{node.origin}"\nurl = "{url}"\nvkey = "{node.vkey}"\n'


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("forged-refusals")
    a = init_node(base, "a.forged.example/imageshare", "a")
    b = init_node(base, "b.forged.example/imageshare", "b")
    relay = HostileServer(forward_to=a.url)
    lean = "[federation]\ndiscovery = false\n"
    a.append_config(lean + _peer(b, b.url))
    b.append_config(lean + _peer(a, relay.url))
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(NodeProcess.start, (a, b)))
        make_ct_study(base / "study", series=1, slices=2, rows=32, columns=32)
        a.cli("import", str(base / "study"))
        wallet = Wallet.create(base / "wallet", None)
        key = wallet.key_for(a.origin).public_key_text
        patient_id = "MRN-0001"
        a.cli("enroll", "--patient-id", patient_id, f"--key={key}")
        yield Setup(a, b, relay, wallet)
    finally:
        relay.respond = None
        for node in (a, b):
            node.stop()
        relay.stop()


def _valid_grant(setup: Setup) -> str:
    async def grant() -> str:
        async with aiohttp.ClientSession() as session:
            made = await setup.wallet.grant(session, setup.a.url, setup.b.origin, None, 3600)
            return str(made["token"])

    return asyncio.run(grant())


def _expired_grant(setup: Setup) -> str:
    key = setup.wallet.key_for(setup.a.origin)
    now = int(time.time())
    fields = GrantFields(
        key.public_key, setup.a.origin, setup.b.origin, None, now - 7200, now - 3600, os.urandom(16)
    )
    return token_text(sign_grant(fields, key.sign))


def _refusals_of_a(setup: Setup) -> list[Relayed]:
    return [r for r in setup.relay.relayed if r.request.path_qs == "/p2p/transfer"]


def _forged(status: int = 403, signature: str | None = None) -> web.Response:
    headers = {REFUSAL_HEADER: signature} if signature is not None else {}
    return web.json_response(FORGED_BODY, status=status, headers=headers)


def _fetch_through_forgery(setup: Setup, token: str) -> tuple[int, str]:
    result = setup.b.cli("fetch", token, check=False)
    return result.returncode, result.stderr


def _assert_reported_unverified(code: int, stderr: str) -> None:
    assert code == 2, stderr
    assert "unverified" in stderr
    assert "revoked" not in stderr and "refused" not in stderr


def _only_transfer_opens(respond: Callable[[Received], web.Response]) -> Responder:
    """Answer B's transfer requests with ``respond``; relay everything else to A."""

    def wrapped(got: Received) -> web.Response | None:
        return respond(got) if got.path_qs == "/p2p/transfer" else None

    return wrapped


class TestRefusalsThroughARelay:
    def test_custodians_genuine_refusal_is_signed_and_reported_as_a_refusal(
        self, setup: Setup
    ) -> None:
        result = setup.b.cli("fetch", _expired_grant(setup), check=False)
        assert result.returncode == 1
        assert "refused the token (expired)" in result.stderr
        (relayed,) = _refusals_of_a(setup)
        assert relayed.status == 403 and json.loads(relayed.body)["rule"] == "expired"
        a_key = parse_verifier_key(setup.a.vkey).public_key
        assert verify_refusal(
            a_key,
            relayed.headers.get(REFUSAL_HEADER),
            setup.a.origin,
            parse_headers(relayed.request.headers, setup.a.origin),
            403,
            relayed.body,
        )

    def test_unsigned_refusal_is_unverified_and_the_custodian_unreachable(
        self, setup: Setup
    ) -> None:
        setup.relay.respond = _only_transfer_opens(lambda got: _forged())
        try:
            code, stderr = _fetch_through_forgery(setup, _valid_grant(setup))
        finally:
            setup.relay.respond = None
        _assert_reported_unverified(code, stderr)

    def test_refusal_signed_by_another_key_for_this_request_is_unverified(
        self, setup: Setup
    ) -> None:
        attacker = NodeIdentity(setup.a.origin, os.urandom(32))

        def forge(got: Received) -> web.Response:
            body = json.dumps(FORGED_BODY).encode()
            asked = parse_headers(got.headers, setup.a.origin)
            signature = sign_refusal(attacker.sign, setup.a.origin, asked, 403, body)
            return web.Response(
                status=403,
                body=body,
                content_type="application/json",
                headers={REFUSAL_HEADER: signature},
            )

        setup.relay.respond = _only_transfer_opens(forge)
        try:
            code, stderr = _fetch_through_forgery(setup, _valid_grant(setup))
        finally:
            setup.relay.respond = None
        _assert_reported_unverified(code, stderr)

    def test_custodians_signed_refusal_replayed_to_another_request_is_unverified(
        self, setup: Setup
    ) -> None:
        setup.b.cli("fetch", _expired_grant(setup), check=False)
        genuine = _refusals_of_a(setup)[-1]
        assert genuine.status == 403 and genuine.headers.get(REFUSAL_HEADER)

        def replay(_got: Received) -> web.Response:
            return web.Response(status=genuine.status, body=genuine.body, headers=genuine.headers)

        setup.relay.respond = _only_transfer_opens(replay)
        try:
            code, stderr = _fetch_through_forgery(setup, _valid_grant(setup))
        finally:
            setup.relay.respond = None
        _assert_reported_unverified(code, stderr)
        # The replayed refusal was a genuine "expired": it is not printed either.
        assert "expired" not in stderr

    def test_after_the_forgeries_the_same_relay_carries_a_fetch_that_works(
        self, setup: Setup
    ) -> None:
        fetched = json.loads(setup.b.cli("fetch", _valid_grant(setup), "--json").stdout)
        assert fetched["instances"] == 2
        assert fetched["custodian"] == setup.a.origin
