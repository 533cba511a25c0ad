"""HTTP side of signed requests: authenticate an incoming one, send an outgoing one.

The format and its checks are in node.core.signed_requests; this module only binds them
to aiohttp (raw path and query as on the wire, the body read within the app's size
limit, the clock) and to the nonce store.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from node.core.signed_requests import (
    check_signature,
    parse_headers,
    signing_node_origin,
)
from node.errors import PayloadTooLarge, Unauthorized
from node.store.nonces import NonceStore


@dataclass(frozen=True)
class SignedCaller:
    """Who signed an authenticated request, and the request body it signed."""

    signer: str
    public_key: bytes
    body: bytes

    @property
    def node_origin(self) -> str | None:
        """The calling node's origin, or None if a patient signed."""
        return signing_node_origin(self.signer)


async def read_limited_body(request: web.Request, limit: int | None) -> bytes:
    """The request body, refusing it as soon as it exceeds ``limit``."""
    if limit is None:
        return await request.read()
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"this request carries at most {limit} bytes")
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"this request carries at most {limit} bytes")
    return bytes(body)


async def authenticate(
    request: web.Request,
    resolve_public_key: Callable[[str], bytes | None],
    max_age: int,
    nonces: NonceStore,
    own_origin: str,
    max_body: int | None = None,
) -> SignedCaller:
    """Verify a signed request addressed to ``own_origin`` and read its body.

    The body is read up to ``max_body`` bytes, if given. ``resolve_public_key(signer)``
    returns the key the signer must have signed with, or None if the signer is not
    admitted here. Raises Unauthorized("the request is addressed to ..." / "unknown
    signer" / "stale timestamp" / "bad signature" / "replayed nonce" / a malformed-header
    reason), and PayloadTooLarge for a body over ``max_body`` or the app's limit.
    """
    parsed = parse_headers(request.headers, own_origin)
    admitted_key = resolve_public_key(parsed.signer)
    # A patient signer names its own key, so its request is verified and its nonce spent
    # even while the key is not enrolled: refused now, it cannot be replayed once it is.
    public_key = admitted_key if admitted_key is not None else parsed.patient_key
    if public_key is None:
        raise Unauthorized(f"unknown signer {parsed.signer}")
    body = await read_limited_body(request, max_body)
    wire = request.rel_url
    check_signature(
        parsed,
        request.method,
        wire.raw_path,
        wire.raw_query_string,
        hashlib.sha256(body).digest(),
        public_key,
        int(time.time()),
        max_age,
    )
    # Nonces must be remembered as long as any route accepts their timestamps.
    nonces.max_age = max(nonces.max_age, max_age)
    # Only a verified request consumes a nonce, so forgers cannot fill the table.
    if not await asyncio.to_thread(nonces.remember, parsed.signer, parsed.nonce, parsed.timestamp):
        raise Unauthorized("replayed nonce")
    if admitted_key is None:
        raise Unauthorized(f"unknown signer {parsed.signer}")
    return SignedCaller(parsed.signer, public_key, body)
