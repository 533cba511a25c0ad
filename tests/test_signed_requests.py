"""Signed requests: the pure format, the nonce store, and authentication over real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.base64url import b64url_encode
from node.core.keys import NodeIdentity
from node.core.signed_requests import (
    AUDIENCE_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    SIGNER_HEADER,
    TIMESTAMP_HEADER,
    canonical_query,
    check_signature,
    make_headers,
    node_signer,
    parse_headers,
    patient_signer,
    signing_bytes,
)
from node.edges.http.app import errors_middleware
from node.edges.http.signed import authenticate
from node.errors import BadInput, Unauthorized
from node.services.peer_client import signed_request
from node.store.nonces import NonceStore, PostgresNonceStore
from tests.support.nodes import free_port
from tests.support.state_engines import StateEngine

ORIGIN = "a.example/imageshare"
# The node that receives the requests of these tests.
RECEIVER = "b.example/imageshare"
NOW = 1_800_000_000


def signed(
    identity: NodeIdentity,
    path_and_query: str = "/p2p/x?b=2&a=1",
    body: bytes = b"hi",
    audience: str = RECEIVER,
):
    return make_headers(
        identity.sign,
        node_signer(identity.origin),
        "POST",
        path_and_query,
        body,
        NOW,
        b"n" * 16,
        audience=audience,
    )


def check(
    headers: dict[str, str],
    identity: NodeIdentity,
    now: int = NOW,
    body: bytes = b"hi",
    receiver: str = RECEIVER,
):
    parsed = parse_headers(headers, receiver)
    check_signature(
        parsed,
        "POST",
        "/p2p/x",
        "a=1&b=2",
        hashlib.sha256(body).digest(),
        identity.public_key,
        now,
        300,
    )
    return parsed


class TestSigningBytes:
    def test_layout_is_one_field_a_line(self) -> None:
        digest = hashlib.sha256(b"").digest()
        message = signing_bytes(
            "b.example", "get", "/p", "b=1&a=2", digest, 5, b"\0" * 16, "node:o"
        )
        assert message == (
            b"imageshare-request/v2\nb.example\nGET\n/p\na=2&b=1\n"
            + digest.hex().encode()
            + b"\n5\nAAAAAAAAAAAAAAAAAAAAAA\nnode:o"
        )

    def test_query_pairs_are_sorted_and_empty_parts_dropped(self) -> None:
        assert canonical_query("z=1&&a=%20&m") == "a=%20&m&z=1"


class TestCheckSignature:
    def test_good_signature_is_accepted(self) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        parsed = check(signed(identity), identity)
        assert parsed.node_origin == ORIGIN
        assert parsed.patient_key is None

    def test_query_order_does_not_matter(self) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        check(signed(identity, "/p2p/x?a=1&b=2"), identity)

    def test_other_key_is_a_bad_signature(self) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        with pytest.raises(Unauthorized, match="bad signature"):
            check(signed(identity), NodeIdentity.generate(ORIGIN))

    def test_changed_body_is_a_bad_signature(self) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        with pytest.raises(Unauthorized, match="bad signature"):
            check(signed(identity), identity, body=b"ho")

    def test_changed_path_is_a_bad_signature(self) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        with pytest.raises(Unauthorized, match="bad signature"):
            check(signed(identity, "/p2p/y?a=1&b=2"), identity)

    def test_request_addressed_to_another_node_is_refused_naming_it(self) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        headers = signed(identity, audience="c.example/imageshare")
        with pytest.raises(Unauthorized, match=r"addressed to c\.example/imageshare, not to b"):
            check(headers, identity)

    def test_audience_header_rewritten_to_the_receiver_is_a_bad_signature(self) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        headers = signed(identity, audience="c.example/imageshare")
        headers[AUDIENCE_HEADER] = RECEIVER
        with pytest.raises(Unauthorized, match="bad signature"):
            check(headers, identity)

    @pytest.mark.parametrize("skew", [301, -301, 10**6])
    def test_old_or_future_timestamp_is_stale(self, skew: int) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        with pytest.raises(Unauthorized, match="stale timestamp"):
            check(signed(identity), identity, now=NOW + skew)

    def test_patient_signer_names_its_key(self) -> None:
        patient = NodeIdentity.generate("patient")
        signer = patient_signer(patient.public_key)
        headers = make_headers(
            patient.sign,
            signer,
            "GET",
            "/patient/studies",
            b"",
            NOW,
            os.urandom(16),
            audience=RECEIVER,
        )
        parsed = parse_headers(headers, RECEIVER)
        assert parsed.patient_key == patient.public_key
        check_signature(
            parsed,
            "GET",
            "/patient/studies",
            "",
            hashlib.sha256(b"").digest(),
            patient.public_key,
            NOW,
            300,
        )


class TestParseHeaders:
    @pytest.mark.parametrize(
        "header",
        [SIGNER_HEADER, AUDIENCE_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER],
    )
    def test_missing_header_is_named(self, header: str) -> None:
        headers = signed(NodeIdentity.generate(ORIGIN))
        del headers[header]
        with pytest.raises(Unauthorized, match=f"missing {header}"):
            parse_headers(headers, RECEIVER)

    def test_header_names_are_case_insensitive(self) -> None:
        headers = {k.lower(): v for k, v in signed(NodeIdentity.generate(ORIGIN)).items()}
        assert parse_headers(headers, RECEIVER).timestamp == NOW

    @pytest.mark.parametrize(
        ("header", "value"),
        [
            (SIGNER_HEADER, "robot:x"),
            (SIGNER_HEADER, "node:has space"),
            (SIGNER_HEADER, "patient:AAAA"),
            (TIMESTAMP_HEADER, "-5"),
            (TIMESTAMP_HEADER, "1e9"),
            (NONCE_HEADER, "AAAA"),
            (NONCE_HEADER, "!!!!!!!!!!!!!!!!!!!!!!"),
            (NONCE_HEADER, ""),
            (NONCE_HEADER, b64url_encode(b"n" * 16) + "="),  # padding
            (NONCE_HEADER, b64url_encode(b"n" * 15) + "A+"),  # standard base64
            (NONCE_HEADER, b64url_encode(b"n" * 15) + "AB"),  # unused bits set: not canonical
            (SIGNATURE_HEADER, b64url_encode(b"x" * 63)),
        ],
    )
    def test_malformed_header_is_refused(self, header: str, value: str) -> None:
        headers = signed(NodeIdentity.generate(ORIGIN))
        headers[header] = value
        with pytest.raises(Unauthorized):
            parse_headers(headers, RECEIVER)

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(
                [
                    SIGNER_HEADER,
                    AUDIENCE_HEADER,
                    TIMESTAMP_HEADER,
                    NONCE_HEADER,
                    SIGNATURE_HEADER,
                    "Other",
                ]
            ),
            st.one_of(
                st.text(max_size=120),
                st.sampled_from(["node:a.example", "patient:" + "A" * 43, "1800000000", RECEIVER]),
                st.binary(min_size=16, max_size=16).map(b64url_encode),
                st.binary(min_size=64, max_size=64).map(b64url_encode),
            ),
        )
    )
    def test_fuzzed_headers_only_raise_unauthorized_or_bad_input(
        self, headers: dict[str, str]
    ) -> None:
        try:
            parsed = parse_headers(headers, RECEIVER)
        except (Unauthorized, BadInput):
            return
        with pytest.raises(Unauthorized):
            check_signature(parsed, "GET", "/", "", b"\0" * 32, b"\1" * 32, parsed.timestamp, 300)


@pytest.fixture
def open_nonces(state_engine: StateEngine) -> Callable[..., NonceStore]:
    """Open the nonce store (again: a restart on SQLite, another daemon on PostgreSQL)."""

    def open_store(max_age: int = 300) -> NonceStore:
        return state_engine.open(
            lambda directory: NonceStore(directory / "n.sqlite", max_age),
            lambda pool: PostgresNonceStore(pool, max_age),
        )

    return open_store


class TestNonceStore:
    def test_second_use_of_a_nonce_is_a_replay(
        self, open_nonces: Callable[..., NonceStore]
    ) -> None:
        store = open_nonces()
        assert store.remember("node:a", b"1" * 16, NOW, now=NOW)
        assert not store.remember("node:a", b"1" * 16, NOW, now=NOW)
        assert store.remember("node:b", b"1" * 16, NOW, now=NOW)

    def test_replay_is_remembered_across_restarts_and_daemons(
        self, open_nonces: Callable[..., NonceStore]
    ) -> None:
        open_nonces().remember("node:a", b"1" * 16, NOW, now=NOW)
        other = open_nonces()
        assert not other.remember("node:a", b"1" * 16, NOW, now=NOW)

    def test_nonces_older_than_max_age_are_pruned(
        self, open_nonces: Callable[..., NonceStore]
    ) -> None:
        store = open_nonces(max_age=300)
        store.remember("node:a", b"1" * 16, NOW, now=NOW)
        store.remember("node:a", b"2" * 16, NOW + 1000, now=NOW + 1000)
        assert store.count() == 1

    def test_the_same_nonce_sent_to_two_daemons_at_once_is_accepted_once(
        self, open_nonces: Callable[..., NonceStore]
    ) -> None:
        # On SQLite the two stores are two connections to one file, as two processes.
        daemons = [open_nonces(), open_nonces()]
        for attempt in range(20):
            nonce = attempt.to_bytes(16, "big")
            start = threading.Barrier(8)

            def race(store: NonceStore, nonce: bytes = nonce, start: Any = start) -> bool:
                start.wait()
                return store.remember("node:a", nonce, NOW, now=NOW)

            with ThreadPoolExecutor(8) as pool:
                accepted = list(pool.map(race, [daemons[i % 2] for i in range(8)]))
            assert accepted.count(True) == 1, attempt


def run_with_server(
    tmp_path: Path,
    known: dict[str, bytes],
    scenario: Callable[[str, aiohttp.ClientSession], Awaitable[None]],
    max_body: int | None = None,
) -> None:
    """Serve POST /p2p/echo (signed) on a free loopback port and run ``scenario`` against it."""
    nonces = NonceStore(tmp_path / "nonces.sqlite")

    async def echo(request: web.Request) -> web.Response:
        caller = await authenticate(request, known.get, 300, nonces, RECEIVER, max_body=max_body)
        return web.json_response({"signer": caller.signer, "body": caller.body.decode()})

    async def main() -> None:
        app = web.Application(middlewares=[errors_middleware], client_max_size=1024)
        app.router.add_post("/p2p/echo", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as session:
                await scenario(f"http://127.0.0.1:{port}", session)
        finally:
            await runner.cleanup()

    asyncio.run(main())


async def status_and_error(response: Any) -> tuple[int, str]:
    async with response as r:
        document = await r.json()
        return r.status, document.get("error", "")


class TestAuthenticateOverHttp:
    def test_good_request_is_accepted_with_its_body(self, tmp_path: Path) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        signer = node_signer(ORIGIN)

        async def scenario(base: str, session: aiohttp.ClientSession) -> None:
            url = base + "/p2p/echo?z=%2F1&a=x y"
            ping = signed_request(session, "POST", url, identity.sign, signer, RECEIVER, b"ping")
            async with ping as r:
                assert r.status == 200
                assert await r.json() == {"signer": signer, "body": "ping"}

        run_with_server(tmp_path, {signer: identity.public_key}, scenario)

    def test_refusals_name_their_reason(self, tmp_path: Path) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        stranger = NodeIdentity.generate("stranger.example")
        signer = node_signer(ORIGIN)

        async def scenario(base: str, session: aiohttp.ClientSession) -> None:
            url = base + "/p2p/echo"
            unknown = signed_request(
                session, "POST", url, stranger.sign, node_signer(stranger.origin), RECEIVER, b"x"
            )
            assert await status_and_error(unknown) == (401, "unknown signer node:stranger.example")
            forged = signed_request(session, "POST", url, stranger.sign, signer, RECEIVER, b"x")
            assert await status_and_error(forged) == (401, "bad signature")
            stale = signed_request(
                session,
                "POST",
                url,
                identity.sign,
                signer,
                RECEIVER,
                b"x",
                now=int(time.time()) - 3600,
            )
            assert await status_and_error(stale) == (401, "stale timestamp")
            unsigned = session.post(url, data=b"x")
            assert await status_and_error(unsigned) == (401, "missing Signature-Signer header")

            headers = make_headers(
                identity.sign,
                signer,
                "POST",
                "/p2p/echo",
                b"x",
                int(time.time()),
                os.urandom(16),
                audience=RECEIVER,
            )
            first = session.post(url, data=b"x", headers=headers)
            assert (await status_and_error(first))[0] == 200
            replay = session.post(url, data=b"x", headers=headers)
            assert await status_and_error(replay) == (401, "replayed nonce")

        run_with_server(tmp_path, {signer: identity.public_key}, scenario)

    def test_request_for_another_node_is_refused_before_its_nonce_is_spent(
        self, tmp_path: Path
    ) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        signer = node_signer(ORIGIN)

        async def scenario(base: str, session: aiohttp.ClientSession) -> None:
            url = base + "/p2p/echo"
            elsewhere = signed_request(
                session, "POST", url, identity.sign, signer, "c.example/imageshare", b"x"
            )
            assert await status_and_error(elsewhere) == (
                401,
                f"the request is addressed to c.example/imageshare, not to {RECEIVER}",
            )

        run_with_server(tmp_path, {signer: identity.public_key}, scenario)
        assert NonceStore(tmp_path / "nonces.sqlite").count() == 0

    def test_unknown_patient_spends_its_nonce_so_it_cannot_replay_once_admitted(
        self, tmp_path: Path
    ) -> None:
        patient = NodeIdentity.generate("patient")
        signer = patient_signer(patient.public_key)
        admitted: dict[str, bytes] = {}

        async def scenario(base: str, session: aiohttp.ClientSession) -> None:
            url = base + "/p2p/echo"
            headers = make_headers(
                patient.sign,
                signer,
                "POST",
                "/p2p/echo",
                b"x",
                int(time.time()),
                os.urandom(16),
                audience=RECEIVER,
            )
            refused = session.post(url, data=b"x", headers=headers)
            assert await status_and_error(refused) == (401, f"unknown signer {signer}")
            admitted[signer] = patient.public_key
            replay = session.post(url, data=b"x", headers=headers)
            assert await status_and_error(replay) == (401, "replayed nonce")

        run_with_server(tmp_path, admitted, scenario)

    def test_oversize_body_is_refused(self, tmp_path: Path) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        signer = node_signer(ORIGIN)

        async def scenario(base: str, session: aiohttp.ClientSession) -> None:
            big = signed_request(
                session, "POST", base + "/p2p/echo", identity.sign, signer, RECEIVER, b"x" * 4096
            )
            async with big as r:
                assert r.status == 413

        run_with_server(tmp_path, {signer: identity.public_key}, scenario)

    def test_body_over_the_route_limit_is_refused_even_when_streamed(self, tmp_path: Path) -> None:
        identity = NodeIdentity.generate(ORIGIN)
        signer = node_signer(ORIGIN)

        async def chunks() -> Any:
            for _ in range(4):
                yield b"x" * 100

        async def scenario(base: str, session: aiohttp.ClientSession) -> None:
            url = base + "/p2p/echo"
            fits = signed_request(session, "POST", url, identity.sign, signer, RECEIVER, b"x" * 100)
            async with fits as r:
                assert r.status == 200
            # Signed over an empty body, but streamed without a length: cut off at the limit.
            headers = make_headers(
                identity.sign,
                signer,
                "POST",
                "/p2p/echo",
                b"",
                int(time.time()),
                os.urandom(16),
                audience=RECEIVER,
            )
            async with session.post(url, data=chunks(), headers=headers) as r:
                assert r.status == 413

        run_with_server(tmp_path, {signer: identity.public_key}, scenario, max_body=100)
