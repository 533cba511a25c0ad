"""The one way the node serves the files of its web pages (the patient wallet, the admin
dashboard): shipped inside the package, read once when the routes are mounted, served
from memory by name, so no path from a request ever reaches the file system.

Every answer carries the page's security headers and an ETag, and is revalidated on
every load (``no-cache``): a node upgrade reaches browsers at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from node.errors import NotFound

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


class StaticFiles:
    """The servable files of one directory: those whose suffix has a known content type."""

    def __init__(self, directory: Path, headers: Mapping[str, str]) -> None:
        self.headers = {**headers, "Cache-Control": "no-cache"}
        self.files: dict[str, StaticFile] = {}
        for path in sorted(directory.iterdir()):
            content_type = CONTENT_TYPES.get(path.suffix)
            if path.is_file() and content_type:
                body = path.read_bytes()
                etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                self.files[path.name] = StaticFile(body, content_type, etag)

    def response(self, request: web.Request, name: str) -> web.Response:
        """The file ``name`` (304 if the browser holds it); raises NotFound for any other."""
        found = self.files.get(name)
        if found is None:
            raise NotFound("no such file")
        headers = {**self.headers, "ETag": found.etag}
        if request.headers.get("If-None-Match") == found.etag:
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = found.content_type
        return web.Response(body=found.body, headers=headers)
