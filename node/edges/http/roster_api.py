"""The federation roster as this node holds it, read-only and public (wallets, auditors, nodes).

    GET /federation/roster                                the newest verified version (signed note)
    GET /federation/roster/log/checkpoint                 the roster log's signed checkpoint
    GET /federation/roster/log/entries?start=A&end=B      msgpack array of raw entries
    GET /federation/roster/log/proof/inclusion?index=I&size=N
    GET /federation/roster/log/proof/consistency?old=M&new=N

The roster log has the ledger API's shapes (node.edges.http.ledger_api); 404 on a node
without a federation or before its first `imageshare roster fetch`.
"""

from __future__ import annotations

from aiohttp import web

from node.edges.http.ledger_api import serve_consistency, serve_entries, serve_inclusion
from node.errors import NotFound
from node.services.federation_roster import HeldRosterLog, current_path
from node.services.runtime import NodeRuntime
from node.store.ledger import StoredLog

PREFIX = "/federation/roster"


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    held: HeldRosterLog = runtime.services.roster_log

    def roster_log() -> StoredLog:
        log = held.log()
        if log is None:
            raise NotFound("this node holds no federation roster")
        return log

    def text(note: str) -> web.Response:
        return web.Response(text=note, content_type="text/plain", charset="utf-8")

    async def newest(request: web.Request) -> web.Response:
        roster_log()
        return text(current_path(runtime.config).read_text())

    async def checkpoint(request: web.Request) -> web.Response:
        note = roster_log().checkpoint_note()
        if note is None:
            raise NotFound("the roster log has no checkpoint")
        return text(note)

    async def entries(request: web.Request) -> web.Response:
        return await serve_entries(roster_log, request)

    async def inclusion(request: web.Request) -> web.Response:
        return await serve_inclusion(roster_log, request)

    async def consistency(request: web.Request) -> web.Response:
        return await serve_consistency(roster_log, request)

    app.router.add_get(PREFIX, newest)
    app.router.add_get(PREFIX + "/log/checkpoint", checkpoint)
    app.router.add_get(PREFIX + "/log/entries", entries)
    app.router.add_get(PREFIX + "/log/proof/inclusion", inclusion)
    app.router.add_get(PREFIX + "/log/proof/consistency", consistency)
