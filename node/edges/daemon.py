"""`imageshare run`: the HTTP server and every background service, until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from node.core import atna
from node.edges.dimse import dimse_service
from node.edges.http.app import build_app
from node.services.audit_export import audit_export_service, local_user
from node.services.discovery import discovery_service
from node.services.federation_roster import roster_refresher
from node.services.forward import forward_service
from node.services.ledger import WriterOnly
from node.services.periodic import BackgroundService
from node.services.runtime import NodeRuntime
from node.services.tls import server_tls_context

log = logging.getLogger(__name__)


# Factories of the background services, in start order; stopped in reverse.
ServiceFactory = Callable[[NodeRuntime], BackgroundService | None]


def writer_only(factory: ServiceFactory) -> ServiceFactory:
    """``factory``'s service, run only by the daemon that is the node's log writer."""

    def make(runtime: NodeRuntime) -> BackgroundService | None:
        service = factory(runtime)
        return None if service is None else WriterOnly(runtime.services.ledger.is_writer, service)

    return make


SERVICE_FACTORIES: list[ServiceFactory] = [
    audit_export_service,  # first to start, last to stop: it sends the others' events
    writer_only(lambda runtime: runtime.services.replication),
    lambda runtime: roster_refresher(runtime.config),
    discovery_service,
    dimse_service,
    writer_only(forward_service),
    lambda runtime: runtime.services.transfer,
    lambda runtime: runtime.services.alerts,
]


async def serve(
    runtime: NodeRuntime,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], Awaitable[None] | None] | None = None,
) -> None:
    """Serve until ``stop`` is set or SIGINT/SIGTERM arrives, then shut down cleanly."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    # The node's own pool for off-loop store calls, so that shutdown can wait for them.
    executor = ThreadPoolExecutor(thread_name_prefix="imageshare")
    loop.set_default_executor(executor)
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(signum, stop.set)
    http = runtime.config.http
    runner = web.AppRunner(
        build_app(runtime),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=http.client_timeout,
        # No body is decoded unless its route takes the encoding (see accepts_body_encodings).
        auto_decompress=False,
    )
    # Loaded before the port opens: a bad certificate stops the node with one sentence.
    tls = server_tls_context(http.cert_file, http.key_file) if http.tls else None
    await runner.setup()
    site = web.TCPSite(runner, http.host, http.port, reuse_address=True, ssl_context=tls)
    await site.start()
    started: list[BackgroundService] = []
    try:
        for factory in SERVICE_FACTORIES:
            service = factory(runtime)
            if service is not None:
                await service.start()
                started.append(service)
        runtime.ready = True
        runtime.security_audit.record(atna.application_activity, True, local_user())
        scheme = "https" if http.tls else "http"
        log.info("%s serving on %s://%s", runtime.config.origin, scheme, http.listen)
        if on_ready is not None:
            result = on_ready()
            if result is not None:
                await result
        await stop.wait()
    finally:
        log.info("shutting down")
        runtime.security_audit.record(atna.application_activity, False, local_user())
        for service in reversed(started):
            try:
                await service.stop()
            except Exception:
                log.exception("error while stopping %r", service)
        await runner.cleanup()
        await drain_off_loop_calls(loop, executor)
        runtime.close()


async def drain_off_loop_calls(
    loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor
) -> None:
    """Wait for every call running in ``executor`` before the stores close under them.

    Cancelling a task that awaits ``asyncio.to_thread`` leaves its thread running; closing a
    SQLite connection while that thread is inside a statement crashes the process. The
    loop gets a fresh default pool, so a caller's loop (a test's) stays usable.
    """
    loop.set_default_executor(ThreadPoolExecutor())
    await asyncio.to_thread(executor.shutdown, wait=True)
