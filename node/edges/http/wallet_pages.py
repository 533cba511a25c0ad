"""/wallet: the patient's phone wallet, a static web app shipped inside the package.

The files are read once at start-up from ``static/wallet`` and served from memory by
name (node.edges.http.static_files, as the dashboard's are). The content security
policy lets the page talk to its own origin only: no CDN, no inline script, and nothing
may frame it. The app itself signs every /patient request with the patient's key.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from node.edges.http.static_files import StaticFiles
from node.services.runtime import NodeRuntime

STATIC_DIR = Path(__file__).parent / "static" / "wallet"
PREFIX = "/wallet"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:;"
    " connect-src 'self'; worker-src 'self'; manifest-src 'self'; object-src 'none';"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Revalidated on every load (the service worker serves the files when offline).
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    add_static_pages(app, PREFIX, STATIC_DIR)


def add_static_pages(app: web.Application, prefix: str, directory: Path) -> None:
    """Serve the files of ``directory`` from memory under ``prefix`` with the CSP above."""
    files = StaticFiles(directory, PAGE_HEADERS)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect(prefix + "/")

    async def serve(request: web.Request) -> web.Response:
        return files.response(request, request.match_info.get("name") or "index.html")

    app.router.add_get(prefix, redirect)
    app.router.add_get(prefix + "/", serve)
    app.router.add_get(prefix + "/{name:[A-Za-z0-9._-]+}", serve)
