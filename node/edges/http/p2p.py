"""Node-to-node routes (/p2p, signed by a roster member's key) and federation status.

- ``GET  /p2p/whoami``          who the caller is to this node (a connectivity check)
- ``POST /p2p/notify``          JSON {"log_id", "size"}: the caller's log grew; fetch it now
- ``POST /p2p/cosignature``     text/plain note: a checkpoint body of this node's log and
                                the caller's tlog-cosignature of it
- ``POST /p2p/equivocation``    JSON equivocation proof (node.core.equivocation) the caller
                                holds; kept only if it verifies here with the log's key
- ``POST /p2p/address-proof``   JSON {"challenge": hex, "url"}: this node's signature that
                                it holds its key at that URL (discovery's challenge)
- ``GET  /ledger/equivocations`` public: every equivocation proof this node holds
- ``GET  /admin/api/federation`` admin: peers, reachability, sizes, cosignatures, proofs

Every 4xx answer to a ``/p2p`` request that carries well-formed signature headers (these
routes and the transfer routes alike) is signed with this node's key and bound to that
request (``Refusal-Signature``, node.core.refusals), so that the asking node can tell this
node's refusal from a forgery by whoever answered at its address.
"""

from __future__ import annotations

import json

from aiohttp import web

from node.core.base64url import b64url_encode
from node.core.refusals import REFUSAL_HEADER, is_refusal, sign_refusal
from node.core.roster import CHALLENGE_SIZE, sign_address_proof
from node.core.signed_requests import parse_headers
from node.edges.http.context import runtime_of
from node.edges.http.signed import SignedCaller, authenticate
from node.errors import BadInput, Unauthorized
from node.services.runtime import NodeRuntime

MAX_P2P_BODY = 1 << 20
MAX_URL_CHARS = 2048


async def _caller(request: web.Request) -> SignedCaller:
    """Authenticate a /p2p request as a roster member; raises Unauthorized with the reason."""
    replication = runtime_of(request).services.replication
    caller = await authenticate(
        request,
        replication.roster.public_key_of_signer,
        replication.runtime.config.federation.max_request_age,
        replication.runtime.services.nonces,
        replication.runtime.config.origin,
        max_body=MAX_P2P_BODY,
    )
    if caller.node_origin is None:
        raise Unauthorized("node-to-node requests must be signed by a node")
    replication.heard_from(caller.node_origin)
    return caller


async def whoami(request: web.Request) -> web.Response:
    caller = await _caller(request)
    runtime = runtime_of(request)
    return web.json_response({"caller": caller.node_origin, "origin": runtime.config.origin})


async def notify(request: web.Request) -> web.Response:
    caller = await _caller(request)
    try:
        hint = json.loads(caller.body)
        log_id, size = str(hint["log_id"]), int(hint["size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput("notify body must be JSON {log_id, size}") from exc
    runtime_of(request).services.replication.notify_received(caller.node_origin or "", log_id, size)
    return web.json_response({"ok": True})


async def cosignature(request: web.Request) -> web.Response:
    caller = await _caller(request)
    try:
        text = caller.body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput("cosignature must be a UTF-8 note") from exc
    replication = runtime_of(request).services.replication
    size = replication.accept_cosignature(caller.node_origin or "", text)
    return web.json_response({"ok": True, "size": size})


async def equivocation(request: web.Request) -> web.Response:
    caller = await _caller(request)
    try:
        document = json.loads(caller.body)
    except ValueError as exc:
        raise BadInput("an equivocation proof must be JSON") from exc
    new = runtime_of(request).services.replication.accept_proof(caller.node_origin or "", document)
    return web.json_response({"ok": True, "new": new})


async def address_proof(request: web.Request) -> web.Response:
    caller = await _caller(request)
    try:
        document = json.loads(caller.body)
        challenge = bytes.fromhex(document["challenge"])
        url = document["url"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput('an address challenge is JSON {"challenge": hex, "url"}') from exc
    if len(challenge) != CHALLENGE_SIZE or not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise BadInput(f"the challenge must be {CHALLENGE_SIZE} bytes and the URL a short string")
    identity = runtime_of(request).identity
    signature = sign_address_proof(identity.sign, identity.origin, url, challenge)
    return web.json_response({"origin": identity.origin, "signature": b64url_encode(signature)})


async def sign_p2p_refusal(request: web.Request, response: web.StreamResponse) -> None:
    """On response prepare: sign a 4xx answer to a signed /p2p request, bound to it."""
    if not request.path.startswith("/p2p/") or not is_refusal(response.status):
        return
    if not isinstance(response, web.Response):
        return  # refusals are small JSON answers, never streams
    body = b"" if response.body is None else response.body
    if not isinstance(body, bytes):
        return
    identity = runtime_of(request).identity
    try:
        asked = parse_headers(request.headers, identity.origin)
    except Unauthorized:
        # No nonce to bind the answer to, or a request meant for another node: the caller
        # cannot take the answer as its custodian's refusal.
        return
    response.headers[REFUSAL_HEADER] = sign_refusal(
        identity.sign, identity.origin, asked, response.status, body
    )


async def equivocations(request: web.Request) -> web.Response:
    state = runtime_of(request).services.replication.state
    return web.json_response([proof.as_json() for proof in state.equivocations()])


async def federation_status(request: web.Request) -> web.Response:
    return web.json_response(runtime_of(request).services.replication.status())


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app.router.add_get("/p2p/whoami", whoami)
    app.router.add_post("/p2p/notify", notify)
    app.router.add_post("/p2p/cosignature", cosignature)
    app.router.add_post("/p2p/equivocation", equivocation)
    app.router.add_post("/p2p/address-proof", address_proof)
    app.on_response_prepare.append(sign_p2p_refusal)
    app.router.add_get("/ledger/equivocations", equivocations)
    app.router.add_get("/admin/api/federation", federation_status)
