"""A wide-area link emulated in user space: a TCP proxy on loopback, for tests and benchmarks.

``tc netem`` is not available everywhere this runs, so the link is a proxy: each
connection to ``LinkEmulator.port`` is relayed to the target, and each direction of it
goes through its own emulated wire with a one-way delay and a bandwidth cap. A piece of
data read from one side leaves the wire when the link has serialised it (its size over
the bandwidth, after what was queued before it) plus the delay, like a packet on a real
link. The wire holds at most one bandwidth-delay product of data in flight plus a router
buffer: beyond that the proxy stops reading, so the sender's TCP feels backpressure as
on a real link (the proxy does not emulate slow start or loss).

With ``drop_every_bytes`` the link cuts each connection (both sides at once, abruptly)
once that many bytes have crossed it, in either direction: a flaky link that keeps
failing a long transfer.

Runs its own event loop in a thread, so that synchronous tests and benchmarks can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Bytes read from a socket at once; small enough that serialisation is smooth.
READ_BYTES = 16 * 1024
# A router's buffer beyond the bandwidth-delay product.
ROUTER_BUFFER_BYTES = 256 * 1024
# The proxy's receive buffer on both of its sockets, so that neither side's kernel
# takes megabytes at loopback speed that the link has not carried: the side that sends
# (a custodian behind the target, an Orthanc peer as the client) feels the same
# backpressure whichever way the data flows.
PROXY_RCVBUF = 65536


@dataclass(frozen=True)
class LinkSettings:
    """One link: ``rtt`` seconds round trip (half each way), ``mbit_per_s`` each way."""

    rtt: float = 0.0
    mbit_per_s: float | None = None  # None: no bandwidth cap
    drop_every_bytes: int | None = None

    @property
    def bytes_per_second(self) -> float | None:
        return None if self.mbit_per_s is None else self.mbit_per_s * 1e6 / 8

    def describe(self) -> str:
        rate = "no cap" if self.mbit_per_s is None else f"{self.mbit_per_s:g} Mbit/s"
        return f"{self.rtt * 1000:g} ms RTT, {rate}"


@dataclass
class LinkCounters:
    """What crossed the link, for every connection it carried."""

    connections: int = 0
    drops: int = 0
    # Bytes delivered at the far end (a cut loses what was still on the wire).
    bytes_up: int = 0  # client to target
    bytes_down: int = 0  # target to client
    by_connection: list[int] = field(default_factory=list)  # bytes each took, both ways


class _Wire:
    """One direction of one connection: serialisation at the cap, then the delay."""

    def __init__(
        self, settings: LinkSettings, link_free_at: list[float], delivered: Callable[[int], None]
    ) -> None:
        self._settings = settings
        self._delivered = delivered
        self._queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()
        rate = settings.bytes_per_second
        delay = settings.rtt / 2
        self._limit = ROUTER_BUFFER_BYTES + (int(rate * delay) if rate else 0)
        # Shared by every connection in this direction: they share the link's bandwidth.
        self._link_free_at = link_free_at

    async def send(self, data: bytes) -> None:
        """Queue ``data`` for the far side; waits while the wire is full."""
        await self._room.wait()
        rate = self._settings.bytes_per_second
        now = time.monotonic()
        start = max(now, self._link_free_at[0])
        done = start + (len(data) / rate if rate else 0.0)
        self._link_free_at[0] = done
        self._in_flight += len(data)
        if self._in_flight >= self._limit:
            self._room.clear()
        await self._queue.put((done + self._settings.rtt / 2, data))

    async def close(self) -> None:
        await self._queue.put(None)

    async def deliver(self, writer: asyncio.StreamWriter) -> None:
        """Write what arrives at the far side, when it arrives."""
        while (item := await self._queue.get()) is not None:
            arrives, data = item
            wait = arrives - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            self._delivered(len(data))
            self._in_flight -= len(data)
            if self._in_flight < self._limit:
                self._room.set()
        with contextlib.suppress(OSError):
            writer.write_eof()


class LinkEmulator:
    """A proxy on 127.0.0.1:``port`` to ``target_host``:``target_port`` through a link."""

    def __init__(self, target_host: str, target_port: int, settings: LinkSettings) -> None:
        self.target = (target_host, target_port)
        self.settings = settings
        self.counters = LinkCounters()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._up_free_at = [0.0]
        self._down_free_at = [0.0]
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LinkEmulator:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connected, "127.0.0.1", 0), self._loop
        ).result(10)
        listening = self._server.sockets[0]
        # Accepted connections inherit the listening socket's buffer size.
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PROXY_RCVBUF)
        self.port = int(listening.getsockname()[1])
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._server is not None:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _connected(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(client_reader, client_writer)
        except asyncio.CancelledError:
            pass  # the emulator is stopping: the connection just ends
        finally:
            self._tasks.discard(task)

    async def _relay(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        target = socket.socket()
        target.setblocking(False)
        try:
            target.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PROXY_RCVBUF)
            await asyncio.get_running_loop().sock_connect(target, self.target)
            target_reader, target_writer = await asyncio.open_connection(sock=target)
        except OSError:
            target.close()
            client_writer.transport.abort()
            return
        counters = self.counters
        counters.connections += 1
        index = len(counters.by_connection)
        counters.by_connection.append(0)
        # The connection's handshake crosses the link once before any data.
        await asyncio.sleep(self.settings.rtt)
        cut = asyncio.Event()

        async def pump(reader: asyncio.StreamReader, wire: _Wire) -> None:
            try:
                while data := await reader.read(READ_BYTES):
                    limit = self.settings.drop_every_bytes
                    if limit is not None and counters.by_connection[index] + len(data) > limit:
                        counters.drops += 1
                        cut.set()
                        return
                    counters.by_connection[index] += len(data)
                    await wire.send(data)
            except OSError:
                pass
            await wire.close()

        def delivered_up(size: int) -> None:
            counters.bytes_up += size

        def delivered_down(size: int) -> None:
            counters.bytes_down += size

        up = _Wire(self.settings, self._up_free_at, delivered_up)
        down = _Wire(self.settings, self._down_free_at, delivered_down)
        tasks = [
            asyncio.ensure_future(pump(client_reader, up)),
            asyncio.ensure_future(pump(target_reader, down)),
            asyncio.ensure_future(up.deliver(target_writer)),
            asyncio.ensure_future(down.deliver(client_writer)),
        ]

        async def relays_done() -> None:
            await asyncio.gather(*tasks, return_exceptions=True)

        async def cut_off() -> None:
            await cut.wait()

        ending = [asyncio.ensure_future(relays_done()), asyncio.ensure_future(cut_off())]
        try:
            await asyncio.wait(ending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*ending, *tasks]:
                task.cancel()
            if cut.is_set():
                client_writer.transport.abort()
                target_writer.transport.abort()
            else:
                client_writer.close()
                target_writer.close()
            await asyncio.gather(*tasks, return_exceptions=True)
