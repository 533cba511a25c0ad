"""C2SP tlog-witness: ``POST /witness/add-checkpoint`` (public, like the ledger API).

The body and answers are those of the spec (node.core.witness): 200 with this node's
``cosignature/v1`` line, 409 with the size it last cosigned as ``text/x.tlog.size``, and
400/403/404/422 with a one-line reason. Anyone may submit: only a checkpoint signed by a
member's key and consistent with what was cosigned before is cosigned.
"""

from __future__ import annotations

from aiohttp import web

from node.core.witness import MAX_REQUEST_BYTES, SIZE_CONTENT_TYPE, WitnessRefusal
from node.edges.http.signed import read_limited_body
from node.services.runtime import NodeRuntime


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    async def add_checkpoint(request: web.Request) -> web.Response:
        body = await read_limited_body(request, MAX_REQUEST_BYTES)
        try:
            line = await runtime.services.witness.submit(body)
        except WitnessRefusal as refusal:
            if refusal.known_size is not None:
                # Exactly this Content-Type, no charset: clients compare it whole.
                return web.Response(
                    status=409,
                    body=f"{refusal.known_size}\n".encode(),
                    headers={"Content-Type": SIZE_CONTENT_TYPE},
                )
            return web.Response(status=refusal.http_status, text=f"{refusal}\n")
        return web.Response(text=line, content_type="text/plain", charset="utf-8")

    app.router.add_post("/witness/add-checkpoint", add_checkpoint)
