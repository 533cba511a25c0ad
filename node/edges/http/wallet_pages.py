"""/wallet: the patient's phone wallet, a static web app shipped inside the package.

The files are read once at start-up from ``static/wallet`` and served from memory by
name (no path from the request ever reaches the file system). The content security
policy lets the page talk to its own origin only: no CDN, no inline script, and nothing
may frame it. The app itself signs every /patient request with the patient's key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import web

from node.errors import NotFound
from node.services.runtime import NodeRuntime

STATIC_DIR = Path(__file__).parent / "static" / "wallet"
PREFIX = "/wallet"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:;"
    " connect-src 'self'; worker-src 'self'; manifest-src 'self'; object-src 'none';"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def load_files(directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """Every servable file of the wallet: name -> (bytes, content type)."""
    files = {}
    for path in sorted(directory.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if path.is_file() and content_type:
            files[path.name] = (path.read_bytes(), content_type)
    return files


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    add_static_pages(app, PREFIX, STATIC_DIR)


def add_static_pages(app: web.Application, prefix: str, directory: Path) -> None:
    """Serve the files of ``directory`` from memory under ``prefix`` with the CSP above."""
    files = load_files(directory)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect(prefix + "/")

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        found = files.get(name)
        if found is None:
            raise NotFound("no such file")
        body, content_type = found
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {
            # Revalidated on every load (the service worker serves it when offline).
            "Cache-Control": "no-cache",
            "ETag": etag,
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers={**headers, "Content-Type": content_type})

    app.router.add_get(prefix, redirect)
    app.router.add_get(prefix + "/", serve)
    app.router.add_get(prefix + "/{name:[A-Za-z0-9._-]+}", serve)
