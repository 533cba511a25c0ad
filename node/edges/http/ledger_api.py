"""The read-only ledger API under /ledger: public, for peers, wallets and auditors.

    GET /ledger/logs                                         JSON list of logs served here
    GET /ledger/logs/{log_id}/checkpoint                     signed note (text/plain)
    GET /ledger/logs/{log_id}/published-checkpoint           the latest that met the policy
    GET /ledger/logs/{log_id}/entries?start=A&end=B          msgpack array of raw entries
    GET /ledger/logs/{log_id}/proof/inclusion?index=I&size=N JSON RFC 9162 audit path
    GET /ledger/logs/{log_id}/proof/consistency?old=M&new=N  JSON RFC 9162 proof
    GET /ledger/logs/{log_id}/tile/<L>/<N>[.p/<W>]           C2SP tlog-tiles hash tile
    GET /ledger/logs/{log_id}/tile/entries/<N>[.p/<W>]       C2SP tlog-tiles entry bundle

``/ledger/logs/{log_id}/`` is the log's tlog-tiles prefix: ``checkpoint`` and ``tile/...``
under it are what any tlog-tiles client reads, and could be copied to a static server.

Handlers are thin: parsing and validation here, the work in the ledger store.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

from aiohttp import web

from node.core.encoding import canonical_encode
from node.core.tiles import TileRef, parse_tile_path
from node.errors import BadInput, NotFound
from node.services.ledger import LedgerService
from node.services.runtime import NodeRuntime
from node.store.ledger import OwnLog, StoredLog
from node.store.off_loop import run_off_loop

MAX_ENTRIES_PER_RESPONSE = 1000
# A full tile never changes; a partial one is replaced by a wider one as the log grows.
FULL_TILE_CACHE = "public, max-age=31536000, immutable"
PARTIAL_TILE_CACHE = "public, max-age=5"
OCTET_STREAM = "application/octet-stream"
_UINT = re.compile(r"^(0|[1-9][0-9]{0,18})$")
MSGPACK = "application/msgpack"


def query_int(request: web.Request, name: str) -> int:
    """A required non-negative decimal query parameter; BadInput if missing or malformed."""
    value = request.query.get(name)
    if value is None:
        raise BadInput(f"query parameter {name} is required")
    if not _UINT.match(value):
        raise BadInput(f"query parameter {name} must be a non-negative decimal integer")
    return int(value)


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


def _entries_body(find_log: Callable[[], StoredLog], request: web.Request) -> bytes:
    log = find_log()  # an unknown log is a 404 before a malformed query is a 400
    start, end = query_int(request, "start"), query_int(request, "end")
    size = log.size()
    if start > end:
        raise BadInput("start must not exceed end")
    if start > size:
        raise BadInput(f"start {start} is beyond the log size {size}")
    end = min(end, size, start + MAX_ENTRIES_PER_RESPONSE)
    return canonical_encode(log.entries(start, end))


async def serve_entries(find_log: Callable[[], StoredLog], request: web.Request) -> web.Response:
    """``?start=A&end=B``: the raw entries A..B-1 (fewer past the size or the page limit).

    The log is found and read in a worker thread: a page is up to a thousand rows, and the
    event loop keeps serving other requests meanwhile (as it does for every store read).
    """
    body = await run_off_loop(_entries_body, find_log, request)
    return web.Response(body=body, content_type=MSGPACK)


def _inclusion_json(find_log: Callable[[], StoredLog], request: web.Request) -> dict[str, object]:
    log = find_log()
    index, size = query_int(request, "index"), query_int(request, "size")
    proof = log.inclusion_proof(index, size)
    return {"index": index, "size": size, "proof": _b64(proof)}


async def serve_inclusion(find_log: Callable[[], StoredLog], request: web.Request) -> web.Response:
    """``?index=I&size=N``: the RFC 9162 inclusion proof as JSON."""
    return web.json_response(await run_off_loop(_inclusion_json, find_log, request))


def _consistency_json(find_log: Callable[[], StoredLog], request: web.Request) -> dict[str, object]:
    log = find_log()
    old, new = query_int(request, "old"), query_int(request, "new")
    proof = log.consistency_proof(old, new)
    return {"old": old, "new": new, "proof": _b64(proof)}


async def serve_consistency(
    find_log: Callable[[], StoredLog], request: web.Request
) -> web.Response:
    """``?old=M&new=N``: the RFC 9162 consistency proof as JSON."""
    return web.json_response(await run_off_loop(_consistency_json, find_log, request))


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    service: LedgerService = runtime.services.ledger
    store = service.store

    def find_log(request: web.Request) -> Callable[[], StoredLog]:
        """The lookup of the request's log, to run in a worker thread with its reads."""

        def lookup() -> StoredLog:
            log = store.log_by_id(request.match_info["log_id"])
            if log is None:
                raise NotFound("no such log here")
            return log

        return lookup

    def list_json() -> list[dict[str, object]]:
        return [info.as_json() for info in store.logs()]

    async def list_logs(request: web.Request) -> web.Response:
        return web.json_response(await run_off_loop(list_json))

    def checkpoint_text(lookup: Callable[[], StoredLog]) -> str:
        log = lookup()
        if log.log_id == service.own.log_id:  # signs a fresh head if the log grew
            note: str | None = service.checkpoint_note()
        else:
            note = log.checkpoint_note()
        if note is None:
            raise NotFound(f"{log.origin} has no checkpoint yet")
        return note

    def published_text(lookup: Callable[[], StoredLog]) -> str:
        log = lookup()
        note = log.published_note() if isinstance(log, OwnLog) else None
        if note is None:
            raise NotFound(f"{log.origin} has no checkpoint here that met its witness policy")
        return note

    async def checkpoint(request: web.Request) -> web.Response:
        note = await run_off_loop(checkpoint_text, find_log(request))
        return web.Response(text=note, content_type="text/plain", charset="utf-8")

    async def published_checkpoint(request: web.Request) -> web.Response:
        note = await run_off_loop(published_text, find_log(request))
        return web.Response(text=note, content_type="text/plain", charset="utf-8")

    async def entries(request: web.Request) -> web.Response:
        return await serve_entries(find_log(request), request)

    async def inclusion(request: web.Request) -> web.Response:
        return await serve_inclusion(find_log(request), request)

    async def consistency(request: web.Request) -> web.Response:
        return await serve_consistency(find_log(request), request)

    async def tile(request: web.Request) -> web.Response:
        lookup = find_log(request)

        def read_tile() -> tuple[TileRef, bytes]:
            log = lookup()  # an unknown log is a 404 before a malformed path is a 400
            ref = parse_tile_path("tile/" + request.match_info["tile_path"])
            return ref, log.tile(ref)

        ref, data = await run_off_loop(read_tile)
        cache = PARTIAL_TILE_CACHE if ref.partial else FULL_TILE_CACHE
        return web.Response(body=data, content_type=OCTET_STREAM, headers={"Cache-Control": cache})

    app.router.add_get("/ledger/logs", list_logs)
    app.router.add_get("/ledger/logs/{log_id}/checkpoint", checkpoint)
    app.router.add_get("/ledger/logs/{log_id}/published-checkpoint", published_checkpoint)
    app.router.add_get("/ledger/logs/{log_id}/entries", entries)
    app.router.add_get("/ledger/logs/{log_id}/proof/inclusion", inclusion)
    app.router.add_get("/ledger/logs/{log_id}/proof/consistency", consistency)
    app.router.add_get("/ledger/logs/{log_id}/tile/{tile_path:.+}", tile)
