"""The admin dashboard: its page (public: it holds no data) and its JSON API (admin token).

- ``GET  /admin``                    the page (HTML); ``/admin/`` redirects here
- ``GET  /admin/static/{name}``      its script and style sheet, shipped in the package
- ``GET  /admin/api/status``         node, peers, own log, transfers, forwarding, last audit
- ``GET  /admin/api/studies?q=&limit=&offset=&from=&to=&modality=&order=``  the local
  study list, one page (PHI: the hospital's own staff)
- ``POST /admin/api/audit``          audit this node and its roster peers; the report
- ``GET  /admin/api/log?before=&limit=``  a page of the own log in plain words
- ``GET  /admin/api/log.csv``        the whole own log in plain words, as CSV
- ``POST /admin/api/peers/remove``   JSON {"origin"}: remove a member added in peers.toml
- ``POST /admin/api/alerts/test``    send a test alert to every configured channel
- ``POST /admin/api/forwards/{id}/retry``   forward a retrying or failed instance now
- ``POST /admin/api/forwards/{id}/cancel``  never forward a queued instance ({id}: its
  SOP Instance UID, as the forwarding status lists it)

The page asks for the admin token and sends it as ``Authorization: Bearer`` on every
call; no cookie is ever set, so there is nothing for a cross-site request to ride on.
The API paths sit under /admin/api, which app.py guards with the admin token.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from aiohttp import web

from node.core import atna
from node.core.uids import UID_PATTERN
from node.edges.http.context import runtime_of
from node.edges.http.static_files import StaticFiles
from node.errors import BadInput, NotFound
from node.services.audit_export import local_user
from node.services.roster import remove_peer
from node.services.runtime import NodeRuntime
from node.services.status import MAX_LOG_PAGE, StudyQuery

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
    asked = request.query
    query = StudyQuery.parse(
        asked.get("q", ""),
        asked.get("limit", "50"),
        asked.get("offset", "0"),
        asked.get("from", ""),
        asked.get("to", ""),
        asked.get("modality", ""),
        asked.get("order", "arrival"),
    )
    service = runtime_of(request).services.status
    found = await asyncio.to_thread(service.studies, query)
    return web.json_response(found, headers=NO_STORE)


def _whole_number(request: web.Request, name: str, low: int, high: int) -> int | None:
    """An optional query parameter in ``low..high``; BadInput otherwise."""
    text = request.query.get(name)
    if text is None:
        return None
    if not text.isdigit() or not low <= int(text) <= high:
        raise BadInput(f"{name} must be a whole number from {low} to {high}")
    return int(text)


async def log_page(request: web.Request) -> web.Response:
    before = _whole_number(request, "before", 0, 2**62)
    limit = _whole_number(request, "limit", 1, MAX_LOG_PAGE) or 50
    service = runtime_of(request).services.status
    found = await asyncio.to_thread(service.log_page, before, limit)
    return web.json_response(found, headers=NO_STORE)


async def log_csv(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            **NO_STORE,
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": 'attachment; filename="imageshare-log.csv"',
        }
    )
    await response.prepare(request)
    lines = runtime_of(request).services.status.log_csv()
    while True:
        chunk = await asyncio.to_thread(lambda: "".join(itertools.islice(lines, 500)))
        if not chunk:
            break
        await response.write(chunk.encode("utf-8"))
    await response.write_eof()
    return response


async def remove_peer_route(request: web.Request) -> web.Response:
    try:
        origin = (await request.json())["origin"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput('the body must be JSON {"origin": "..."}') from exc
    if not isinstance(origin, str) or not origin:
        raise BadInput("origin must be the member's origin")
    runtime = runtime_of(request)
    await asyncio.to_thread(remove_peer, runtime.config, origin)
    runtime.security_audit.record(
        atna.configuration_changed, local_user(), "federation member removed", origin
    )
    return web.json_response({"removed": origin}, headers=NO_STORE)


async def test_alert(request: web.Request) -> web.Response:
    outcome = await runtime_of(request).services.alerts.send_test()
    return web.json_response({"channels": outcome}, headers=NO_STORE)


async def forward_action(request: web.Request) -> web.Response:
    forwarder = runtime_of(request).services.forwarder
    if forwarder is None:
        raise NotFound("forwarding is off (no [forward] PACS in node.toml)")
    uid, action = request.match_info["id"], request.match_info["action"]
    await asyncio.to_thread(forwarder.retry if action == "retry" else forwarder.cancel, uid)
    state = await asyncio.to_thread(forwarder.state.state_of, uid)
    return web.json_response({"id": uid, "state": state}, headers=NO_STORE)


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
    app.router.add_get("/admin/api/log", log_page)
    app.router.add_get("/admin/api/log.csv", log_csv)
    app.router.add_post("/admin/api/peers/remove", remove_peer_route)
    app.router.add_post("/admin/api/alerts/test", test_alert)
    app.router.add_post(
        "/admin/api/forwards/{id:" + UID_PATTERN + "}/{action:retry|cancel}", forward_action
    )
