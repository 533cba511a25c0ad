"""The one peer client: bounded reads, one status-to-error map, unreachable peers.

A real aiohttp server on loopback (tests.support.hostile) answers as each test says; the
client calls are the ones the wallet, transfer, replication and the auditor make.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.payload import AsyncIterablePayload

from node import errors
from node.errors import BadInput, ImageShareError, PeerUnreachable
from node.services.audit import get_body
from node.services.peer_client import open_session, read_bounded, request_json
from node.services.wallet import Wallet
from tests.support.hostile import HostileServer, Received
from tests.support.nodes import free_port

TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    hostile = HostileServer()
    try:
        yield hostile
    finally:
        hostile.stop()


def _call(work: Any) -> Any:
    async def main() -> Any:
        async with open_session("", TIMEOUT) as session:
            return await work(session)

    return asyncio.run(main())


def _answer(server: HostileServer, response: web.Response) -> None:
    server.respond = lambda _r: response


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


class TestBoundedReads:
    def test_a_long_answer_without_a_length_is_refused_once_past_the_bound(
        self, server: HostileServer
    ) -> None:
        # Chunked: no Content-Length to refuse it by, so the bound must hold while reading.
        server.respond = lambda _r: web.Response(body=AsyncIterablePayload(_chunks(64, 16384)))

        async def read(session: aiohttp.ClientSession) -> bytes:
            async with session.get(server.url + "/big") as response:
                assert "Content-Length" not in response.headers
                return await read_bounded(response, 65536)

        with pytest.raises(BadInput, match="larger than 65536 bytes"):
            _call(read)

    def test_an_answer_declaring_a_length_past_the_bound_is_refused_unread(
        self, server: HostileServer
    ) -> None:
        _answer(server, web.Response(body=b"y" * 200_000))

        async def read(session: aiohttp.ClientSession) -> bytes:
            async with session.get(server.url + "/big") as response:
                return await read_bounded(response, 1000)

        with pytest.raises(BadInput, match="larger than 1000 bytes"):
            _call(read)

    def test_an_answer_within_the_bound_is_read_whole(self, server: HostileServer) -> None:
        server.respond = lambda _r: web.Response(body=AsyncIterablePayload(_chunks(4, 1000)))
        assert _call(lambda s: get_body(s, server.url + "/fits")) == b"x" * 4000

    def test_a_json_answer_past_its_bound_is_a_clear_error(self, server: HostileServer) -> None:
        _answer(server, web.json_response({"pad": "z" * 5000}))
        with pytest.raises(BadInput, match="larger than 100 bytes"):
            _call(lambda s: request_json(s, "GET", server.url + "/json", limit=100))


class TestStatusMapping:
    @pytest.mark.parametrize(
        ("status", "error"),
        [
            (400, BadInput),
            (401, errors.Unauthorized),
            (403, errors.Forbidden),
            (404, errors.NotFound),
            (409, errors.Conflict),
            (413, errors.PayloadTooLarge),
            (418, BadInput),
            (500, PeerUnreachable),
            (503, PeerUnreachable),
        ],
    )
    def test_a_refusal_raises_the_error_of_its_status_with_the_peers_reason(
        self, server: HostileServer, status: int, error: type[ImageShareError]
    ) -> None:
        _answer(server, web.json_response({"error": "because of a rule"}, status=status))
        with pytest.raises(error, match="because of a rule") as raised:
            _call(lambda s: request_json(s, "POST", server.url + "/x", body=b"{}"))
        assert type(raised.value) is error

    def test_a_failing_custodian_is_unreachable_to_the_wallet_not_a_refusal(
        self, server: HostileServer, tmp_path: Path
    ) -> None:
        # The wallet mapped a 5xx to a bare error (exit 1, "refused"); transfer took it as
        # the custodian not reached. One map now: a failing peer is PeerUnreachable.
        _answer(server, web.Response(status=502, text="bad gateway"))
        wallet = Wallet.create(tmp_path / "wallet", None)
        with pytest.raises(PeerUnreachable, match="failed: HTTP 502"):
            _call(lambda s: wallet.custodian(s, server.url))

    def test_a_redirect_is_not_followed_so_a_signed_request_stays_at_its_peer(
        self, server: HostileServer
    ) -> None:
        def respond(request: Received) -> web.Response | None:
            if request.path_qs == "/elsewhere":
                return web.json_response({"studies": []})
            return web.Response(status=307, headers={"Location": server.url + "/elsewhere"})

        server.respond = respond
        server.received.clear()
        with pytest.raises(BadInput, match="refused: HTTP 307"):
            _call(lambda s: request_json(s, "POST", server.url + "/patient/x", body=b"signed"))
        assert [r.path_qs for r in server.received] == ["/patient/x"]

    def test_an_answer_that_is_not_json_is_bad_input(self, server: HostileServer) -> None:
        _answer(server, web.Response(text="<html>hello</html>"))
        with pytest.raises(BadInput, match="something other than JSON"):
            _call(lambda s: request_json(s, "GET", server.url + "/page"))


class TestUnreachable:
    def test_nothing_listening_is_peer_unreachable(self) -> None:
        url = f"http://127.0.0.1:{free_port()}/healthz"
        with pytest.raises(PeerUnreachable, match=r"cannot reach http://127\.0\.0\.1"):
            _call(lambda s: request_json(s, "GET", url))

    def test_a_peer_that_says_nothing_times_out_as_unreachable(
        self, server: HostileServer
    ) -> None:
        slow_started: list[Received] = []

        def respond(request: Received) -> web.Response:
            slow_started.append(request)
            return web.Response(body=AsyncIterablePayload(_stall()))

        server.respond = respond

        async def main() -> Any:
            async with open_session("", aiohttp.ClientTimeout(total=1)) as session:
                return await request_json(session, "GET", server.url + "/stall")

        with pytest.raises(PeerUnreachable):
            asyncio.run(main())
        assert slow_started


async def _stall() -> AsyncIterator[bytes]:
    yield b"{"
    await asyncio.sleep(3)
