"""Signed refusals: a node's 4xx answer to a signed request, bound to that request.

A refusal ("revoked", "wrong grantee", "bad signature"...) is acted on by the node that
asked: a fetch ends as refused and the clinician is told why. So it must come from the
node that was asked, and answer this very request, not another one replayed. The
refusing node signs, with its node key, these bytes (one field a line, no trailing
newline)::

    imageshare-refusal/v1
    <origin of the refusing node>
    <Signature-Signer of the request, as sent>
    <Signature-Nonce of the request, base64url as sent>
    <Signature of the request, base64url as sent>
    <HTTP status, decimal>
    <hex SHA-256 of the response body>

and sends the signature (base64url, no padding) in the ``Refusal-Signature`` header. The
request's signature covers its method, path, query, body digest, time, nonce and signer,
so naming it binds the refusal to everything the request said; the body digest binds
the reason (``{"error", "rule"}``). The asking node checks it with the roster key of the
node it asked; an answer that does not verify is no refusal at all, only an
unauthenticated answer (as if the node had not been reached).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from node.core.base64url import b64url_decode, b64url_encode
from node.core.keys import verify_ed25519
from node.core.signed_requests import SIGNATURE_SIZE, SignedHeaders
from node.errors import BadInput

DOMAIN = b"imageshare-refusal/v1"
REFUSAL_HEADER = "Refusal-Signature"


def is_refusal(status: int) -> bool:
    """Whether an HTTP status is a refusal that must be signed (every 4xx)."""
    return 400 <= status < 500


def refusal_bytes(refuser: str, request: SignedHeaders, status: int, body: bytes) -> bytes:
    """The exact bytes a refusal's signature covers."""
    fields = [
        refuser,
        request.signer,
        b64url_encode(request.nonce),
        b64url_encode(request.signature),
        str(status),
        hashlib.sha256(body).hexdigest(),
    ]
    return DOMAIN + b"\n" + "\n".join(fields).encode()


def sign_refusal(
    sign: Callable[[bytes], bytes], refuser: str, request: SignedHeaders, status: int, body: bytes
) -> str:
    """The ``Refusal-Signature`` header value for a refusal of ``request``."""
    return b64url_encode(sign(refusal_bytes(refuser, request, status, body)))


def verify_refusal(
    public_key: bytes,
    header: str | None,
    refuser: str,
    request: SignedHeaders,
    status: int,
    body: bytes,
) -> bool:
    """True only if ``header`` is ``refuser``'s signature of this refusal of ``request``."""
    if header is None:
        return False
    try:
        signature = b64url_decode(header.strip(), REFUSAL_HEADER, size=SIGNATURE_SIZE)
    except BadInput:
        return False
    return verify_ed25519(public_key, refusal_bytes(refuser, request, status, body), signature)
