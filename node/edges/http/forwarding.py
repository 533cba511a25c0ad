"""GET /admin/api/forwarding: the forwarder's outcome (behind the admin token)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from node.edges.http.context import runtime_of
from node.services.runtime import NodeRuntime


async def forwarding_status(request: web.Request) -> web.Response:
    forwarder = runtime_of(request).services.forwarder
    if forwarder is None:
        return web.json_response({"enabled": False})
    return web.json_response(await asyncio.to_thread(forwarder.status))


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app.router.add_get("/admin/api/forwarding", forwarding_status)
