"""One static-file helper serves the wallet and the dashboard: from memory, by name only."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from node.edges.http.app import errors_middleware
from node.edges.http.static_files import StaticFiles

HEADERS = {"Content-Security-Policy": "default-src 'none'", "X-Content-Type-Options": "nosniff"}


def test_known_files_are_served_from_memory_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<p>page</p>")
    (tmp_path / "app.js").write_text("console.log(1)")
    (tmp_path / "node.key").write_bytes(b"secret")  # no known content type: never served
    (tmp_path / "sub").mkdir()
    files = StaticFiles(tmp_path, HEADERS)
    (tmp_path / "app.js").write_text("changed on disk after start")

    async def serve(request: web.Request) -> web.Response:
        return files.response(request, request.match_info["name"])

    async def run() -> None:
        app = web.Application(middlewares=[errors_middleware])
        app.router.add_get("/{name:.*}", serve)
        async with TestClient(TestServer(app)) as client:
            page = await client.get("/index.html")
            assert page.status == 200 and await page.text() == "<p>page</p>"
            assert page.headers["Content-Type"] == "text/html; charset=utf-8"
            assert page.headers["Cache-Control"] == "no-cache"
            assert page.headers["X-Content-Type-Options"] == "nosniff"
            script = await client.get("/app.js")
            assert await script.text() == "console.log(1)"  # read once, at start
            again = await client.get("/app.js", headers={"If-None-Match": script.headers["ETag"]})
            assert again.status == 304 and again.headers["Content-Security-Policy"]
            for name in ("node.key", "sub", "../node.key", "%2e%2e/node.key", "missing.js"):
                refused = await client.get("/" + name)
                assert refused.status == 404, name
                assert b"secret" not in await refused.read()

    asyncio.run(run())
