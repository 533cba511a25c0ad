"""A hostile HTTP server on loopback: it records every request and answers as a test says.

It stands where an attacker would: at an address it advertises for a member by zeroconf,
or at a member's roster URL (a machine in the path). By default it relays each request
to ``forward_to`` (the real node) and records the answer; ``respond`` may answer a
request itself instead (a forged refusal, a swallowed cosignature), and ``hold`` may
stall the requests it matches until ``released`` is set (an upstream that hangs).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from tests.support.nodes import free_port

# Hop-by-hop or recomputed headers that a relay does not copy.
_NOT_RELAYED = {"host", "content-length", "transfer-encoding", "connection"}


@dataclass(frozen=True)
class Received:
    """One request as the hostile server saw it."""

    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Relayed:
    """The real node's answer to a relayed request."""

    request: Received
    status: int
    headers: dict[str, str]
    body: bytes


Responder = Callable[[Received], web.Response | None]


class HostileServer:
    """An aiohttp server on 127.0.0.1 in a thread of its own; ``stop()`` when done."""

    def __init__(self, forward_to: str | None = None) -> None:
        self.forward_to = forward_to
        self.respond: Responder | None = None
        self.hold: Callable[[Received], bool] | None = None
        self.released = threading.Event()
        self.received: list[Received] = []
        self.relayed: list[Relayed] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise AssertionError("the hostile server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._session = aiohttp.ClientSession()

    async def _handle(self, request: web.Request) -> web.Response:
        got = Received(request.method, request.path_qs, dict(request.headers), await request.read())
        self.received.append(got)
        hold = self.hold
        if hold is not None and hold(got):
            await asyncio.to_thread(self.released.wait)
        respond = self.respond
        answer = respond(got) if respond is not None else None
        if answer is not None:
            return answer
        if self.forward_to is None:
            return web.json_response({"error": "nothing here"}, status=404)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_RELAYED}
        async with self._session.request(
            got.method, self.forward_to + got.path_qs, data=got.body, headers=headers
        ) as upstream:
            body = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in _NOT_RELAYED}
        self.relayed.append(Relayed(got, upstream.status, kept, body))
        return web.Response(status=upstream.status, body=body, headers=kept)

    def stop(self) -> None:
        self.released.set()

        async def shut() -> None:
            await self._session.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
