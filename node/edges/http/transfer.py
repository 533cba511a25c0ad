"""Transfer routes: node-to-node (signed, /p2p) and the admin API that drives fetches.

- ``POST /p2p/transfer``                    canonical msgpack {token, ephemeral}: consent
  check, then canonical msgpack {transfer, ephemeral, manifest (encrypted)}; a refusal is
  403 JSON {"error", "rule"}, signed like every /p2p refusal (``Refusal-Signature``, added
  on response prepare by node.edges.http.p2p); a study the custodian's PACS cannot
  deliver now is 503 JSON {"error", "pacs": "unavailable"} (the grantee waits and retries)
- ``POST /p2p/transfer/{id}/instances``     canonical msgpack {handles}: the encrypted
  instance stream (application/octet-stream)
- ``POST /admin/api/fetch``                 JSON {"token"}: start a fetch job; 202 + the job
- ``GET  /admin/api/transfers``             fetches (running, recent, refused) and streams sent
- ``GET  /admin/api/transfers/{id}``        one fetch job's progress and outcome
- ``POST /admin/api/transfers/{id}/retry``  fetch a finished job's token again (a new job)
- ``POST /admin/api/transfers/{id}/cancel`` stop a running fetch
"""

from __future__ import annotations

import fcntl
import json
import logging
import struct
import termios
from collections.abc import Callable

from aiohttp import web

from node.edges.http.context import runtime_of
from node.edges.http.signed import SignedCaller, authenticate
from node.errors import BadInput, Unauthorized
from node.services.pacs import PacsUnavailable
from node.services.runtime import NodeRuntime
from node.services.transfer import PACS_UNAVAILABLE, TransferRefused

log = logging.getLogger(__name__)

# A grant token and a list of handles: far below this.
MAX_REQUEST_BODY = 8 << 20
MSGPACK = "application/msgpack"


async def _node_caller(request: web.Request) -> SignedCaller:
    """Authenticate a roster member's signed request; raises Unauthorized with the reason."""
    runtime = runtime_of(request)
    # The body is read before its signature is checked: bound it, chunked bodies too.
    caller = await authenticate(
        request,
        runtime.services.roster.public_key_of_signer,
        runtime.config.federation.max_request_age,
        runtime.services.nonces,
        runtime.config.origin,
        max_body=MAX_REQUEST_BODY,
    )
    if caller.node_origin is None:
        raise Unauthorized("transfer requests must be signed by a node")
    return caller


def _refusal(exc: TransferRefused) -> web.Response:
    return web.json_response({"error": str(exc), "rule": exc.rule}, status=403)


async def open_transfer(request: web.Request) -> web.Response:
    caller = await _node_caller(request)
    try:
        body = await runtime_of(request).services.transfer.open_transfer(
            caller.node_origin or "", caller.public_key, caller.body
        )
    except TransferRefused as exc:
        return _refusal(exc)
    except PacsUnavailable as exc:
        return web.json_response({"error": str(exc), "pacs": PACS_UNAVAILABLE}, status=503)
    return web.Response(body=body, content_type=MSGPACK)


def _unacknowledged_bytes(request: web.Request) -> Callable[[], int | None]:
    """Bytes of this response not yet acknowledged by the peer: what the transport still
    buffers plus the kernel's send queue (Linux TIOCOUTQ); None where it cannot tell."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    outq = getattr(termios, "TIOCOUTQ", None)

    def unacknowledged() -> int | None:
        if transport is None or sock is None or outq is None or transport.is_closing():
            return None
        try:
            queued = fcntl.ioctl(sock.fileno(), outq, b"\0\0\0\0")
        except OSError:
            return None
        return int(struct.unpack("i", queued)[0]) + transport.get_write_buffer_size()

    return unacknowledged


async def send_instances(request: web.Request) -> web.StreamResponse:
    caller = await _node_caller(request)
    service = runtime_of(request).services.transfer
    try:
        session, asked = await service.prepare_send(
            request.match_info["transfer_id"], caller.node_origin or "", caller.body
        )
    except TransferRefused as exc:
        return _refusal(exc)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await response.prepare(request)
    try:
        await service.send_instances(session, asked, response.write, _unacknowledged_bytes(request))
    except TransferRefused as exc:
        # Too late for a 403: the stream ends without its final message, the grantee
        # sees the cut, asks again and is refused with the rule.
        log.info("stream to %s cut: %s", caller.node_origin, exc)
        return response
    except ConnectionError:
        # The grantee went away; what had left is in the access entry already.
        log.info("stream to %s cut: the connection was lost", caller.node_origin)
        return response
    await response.write_eof()
    return response


async def start_fetch(request: web.Request) -> web.Response:
    try:
        document = await request.json()
        token = document["token"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput('fetch body must be JSON {"token": "..."}') from exc
    if not isinstance(token, str):
        raise BadInput("token must be a string")
    job = runtime_of(request).services.transfer.start_fetch(token)
    return web.json_response(job.as_json(), status=202)


async def retry_fetch(request: web.Request) -> web.Response:
    job = runtime_of(request).services.transfer.retry_fetch(request.match_info["transfer_id"])
    return web.json_response(job.as_json(), status=202)


async def cancel_fetch(request: web.Request) -> web.Response:
    job = runtime_of(request).services.transfer.cancel_fetch(request.match_info["transfer_id"])
    return web.json_response(job.as_json())


async def list_transfers(request: web.Request) -> web.Response:
    return web.json_response(runtime_of(request).services.transfer.transfers_json())


async def get_transfer(request: web.Request) -> web.Response:
    job = runtime_of(request).services.transfer.job_json(request.match_info["transfer_id"])
    return web.json_response(job, dumps=json.dumps)


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app.router.add_post("/p2p/transfer", open_transfer)
    app.router.add_post("/p2p/transfer/{transfer_id}/instances", send_instances)
    app.router.add_post("/admin/api/fetch", start_fetch)
    app.router.add_get("/admin/api/transfers", list_transfers)
    app.router.add_get("/admin/api/transfers/{transfer_id}", get_transfer)
    app.router.add_post("/admin/api/transfers/{transfer_id}/retry", retry_fetch)
    app.router.add_post("/admin/api/transfers/{transfer_id}/cancel", cancel_fetch)
