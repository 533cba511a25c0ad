"""A hostile member's log server: the ledger HTTP API of one log, a different history per URL.

It signs with the member's real key (taken from an initialised node's data directory) and
serves, under ``/{view}``, the history named ``view``: each honest node's roster entry
for the member points at its own view, so each is shown a fork of its own. It answers
the /p2p calls the honest nodes make (notify, cosignature) with 200, and lists no proofs.
The histories can be switched while it runs.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time

from aiohttp import web

from node.core.encoding import canonical_encode
from node.core.entries import LedgerEntry, encode_entry
from node.core.keys import NodeIdentity
from node.core.merkle import ZERO_HASH, MemoryTree, consistency_proof, leaf_hash
from node.core.notes import Checkpoint, sign_note
from node.core.origins import log_id
from tests.support.nodes import free_port


def enrollments(count: int, after: list[bytes] | None = None) -> list[bytes]:
    """``after`` followed by ``count`` new well-formed, chained enroll entries."""
    entries = list(after or [])
    for _ in range(count):
        prev = leaf_hash(entries[-1]) if entries else ZERO_HASH
        fields = {"subject": os.urandom(32), "key": os.urandom(32), "replaces": None}
        entries.append(encode_entry(LedgerEntry("enroll", prev, int(time.time()), fields)))
    return entries


class HostileLogServer:
    """Serves ``histories[view]`` at ``url(view)``, each signed by ``identity``."""

    def __init__(self, identity: NodeIdentity, vkey: str, histories: dict[str, list[bytes]]):
        self.identity = identity
        self.vkey = vkey
        self.histories = dict(histories)
        self.port = free_port()
        self.calls: list[tuple[str, str]] = []  # (view, /p2p call) as they arrive
        # Serve consistency proofs with their hashes in the wrong order (a lying server).
        self.bad_proofs = False
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def url(self, view: str) -> str:
        return f"http://127.0.0.1:{self.port}/{view}"

    def show(self, view: str, entries: list[bytes]) -> None:
        """From now on, ``view`` is served ``entries`` (a single assignment: thread-safe)."""
        self.histories[view] = entries

    def note(self, view: str) -> str:
        """The signed checkpoint of the history served at ``view``."""
        entries = self.histories[view]
        root = MemoryTree([leaf_hash(e) for e in entries]).root()
        return sign_note(Checkpoint(self.identity.origin, len(entries), root).body(), self.identity)

    def __enter__(self) -> HostileLogServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application()
        lid = log_id(self.identity.origin)
        app.router.add_get("/{view}/ledger/logs", self._logs)
        app.router.add_get(f"/{{view}}/ledger/logs/{lid}/checkpoint", self._checkpoint)
        app.router.add_get(f"/{{view}}/ledger/logs/{lid}/entries", self._entries)
        app.router.add_get(f"/{{view}}/ledger/logs/{lid}/proof/consistency", self._consistency)
        app.router.add_get("/{view}/ledger/equivocations", self._no_proofs)
        app.router.add_post("/{view}/p2p/{call}", self._ok)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def _history(self, request: web.Request) -> list[bytes]:
        view = request.match_info["view"]
        if view not in self.histories:
            raise web.HTTPNotFound()
        return self.histories[view]

    async def _logs(self, request: web.Request) -> web.Response:
        entries = self._history(request)
        root = MemoryTree([leaf_hash(e) for e in entries]).root()
        row = {
            "origin": self.identity.origin,
            "log_id": log_id(self.identity.origin),
            "vkey": self.vkey,
            "size": len(entries),
            "root": base64.b64encode(root).decode(),
        }
        return web.json_response([row])

    async def _checkpoint(self, request: web.Request) -> web.Response:
        self._history(request)
        return web.Response(text=self.note(request.match_info["view"]), content_type="text/plain")

    async def _entries(self, request: web.Request) -> web.Response:
        entries = self._history(request)
        start, end = int(request.query["start"]), int(request.query["end"])
        body = canonical_encode(entries[start : min(end, len(entries))])
        return web.Response(body=body, content_type="application/msgpack")

    async def _consistency(self, request: web.Request) -> web.Response:
        tree = MemoryTree([leaf_hash(e) for e in self._history(request)])
        old, new = int(request.query["old"]), int(request.query["new"])
        hashes = consistency_proof(tree, old, new)
        if self.bad_proofs:
            hashes = hashes[::-1] if len(hashes) > 1 else [bytes(32)]
        proof = [base64.b64encode(h).decode() for h in hashes]
        return web.json_response({"old": old, "new": new, "proof": proof})

    async def _no_proofs(self, request: web.Request) -> web.Response:
        return web.json_response([])

    async def _ok(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls.append((request.match_info["view"], request.match_info["call"]))
        return web.json_response({"ok": True})
