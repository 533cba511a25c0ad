"""The admin dashboard: its page (public: it holds no data) and its JSON API (admin token).

- ``GET  /admin``                    the page (HTML); ``/admin/`` redirects here
- ``GET  /admin/static/{name}``      its script and style sheet, shipped in the package
- ``GET  /admin/api/status``         node, peers, own log, transfers, forwarding, last audit
- ``GET  /admin/api/studies?q=&limit=``  the local study list (PHI: the hospital's own staff)
- ``POST /admin/api/audit``          audit this node and its roster peers; the report

The page asks for the admin token and sends it as ``Authorization: Bearer`` on every
call; no cookie is ever set, so there is nothing for a cross-site request to ride on.
The API paths sit under /admin/api, which app.py guards with the admin token.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from node.edges.http.context import runtime_of
from node.edges.http.static_files import StaticFiles
from node.services.runtime import NodeRuntime
from node.services.status import StudyQuery

STATIC_DIR = Path(__file__).parent / "static" / "admin"
# The page may talk to its own node only, and may not be framed.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# The page and its script and style sheet, read once and served from memory by name.
PAGE_FILES_KEY = web.AppKey("admin_files", StaticFiles)
# Answers carry PHI (the study list) or node state: never cached.
NO_STORE = {"Cache-Control": "no-store"}


async def page(request: web.Request) -> web.Response:
    return request.app[PAGE_FILES_KEY].response(request, "index.html")


async def page_slash(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect("/admin")


async def static_file(request: web.Request) -> web.Response:
    return request.app[PAGE_FILES_KEY].response(request, request.match_info["name"])


async def status(request: web.Request) -> web.Response:
    return web.json_response(await runtime_of(request).services.status.summary(), headers=NO_STORE)


async def studies(request: web.Request) -> web.Response:
    query = StudyQuery.parse(request.query.get("q", ""), request.query.get("limit", "50"))
    service = runtime_of(request).services.status
    found = await asyncio.to_thread(service.studies, query)
    return web.json_response(found, headers=NO_STORE)


async def audit(request: web.Request) -> web.Response:
    return web.json_response(await runtime_of(request).services.status.audit(), headers=NO_STORE)


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app[PAGE_FILES_KEY] = StaticFiles(STATIC_DIR, PAGE_HEADERS)
    app.router.add_get("/admin", page)
    app.router.add_get("/admin/", page_slash)
    app.router.add_get("/admin/static/{name}", static_file)
    app.router.add_get("/admin/api/status", status)
    app.router.add_get("/admin/api/studies", studies)
    app.router.add_post("/admin/api/audit", audit)
