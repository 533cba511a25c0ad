"""Signed HTTP requests: node-to-node (/p2p) and patient wallet (/patient) calls.

A caller proves who it is by signing, with its Ed25519 key, the origin of the node it
addresses (the audience), the request's method, path, canonical query, body digest, a
timestamp and a fresh nonce. Five headers carry it::

    Signature-Signer:    node:<origin> | patient:<base64url public key, no padding>
    Signature-Audience:  <origin of the receiving node>
    Signature-Timestamp: <unix seconds>
    Signature-Nonce:     <base64url of 16 random bytes>
    Signature:           <base64url Ed25519 signature>

The signed bytes are (one field a line, no trailing newline)::

    imageshare-request/v2
    audience (the receiving node's origin)
    METHOD
    /path
    canonical query (the raw query's key=value pairs, sorted, joined by "&")
    hex SHA-256 of the body
    timestamp
    nonce (base64url, as in the header)
    signer

The audience makes a request good at one node only: a member that receives a signed
request cannot replay it at another member, which refuses it on parsing, before any
other effect. (Version 1 named no audience; it is no longer accepted.)

Pure: no I/O and no clock reads; the caller passes ``now``. Replay protection (each
nonce accepted once) lives in node.store.nonces, because it needs memory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from node.core.base64url import b64url_decode, b64url_encode
from node.core.keys import PUBLIC_KEY_SIZE, verify_ed25519
from node.core.origins import is_node_origin
from node.errors import BadInput, Unauthorized

DOMAIN = b"imageshare-request/v2"
SIGNER_HEADER = "Signature-Signer"
AUDIENCE_HEADER = "Signature-Audience"
TIMESTAMP_HEADER = "Signature-Timestamp"
NONCE_HEADER = "Signature-Nonce"
SIGNATURE_HEADER = "Signature"
NODE_PREFIX = "node:"
PATIENT_PREFIX = "patient:"
NONCE_SIZE = 16
SIGNATURE_SIZE = 64
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")


def _header_bytes(text: str, size: int, what: str) -> bytes:
    """A signature field's bytes; a malformed one makes the request unauthenticated (401)."""
    try:
        return b64url_decode(text, what, size=size)
    except BadInput as exc:
        raise Unauthorized(str(exc)) from exc


def canonical_query(raw_query: str) -> str:
    """The raw (still percent-encoded) query string's key=value pairs, sorted."""
    return "&".join(sorted(part for part in raw_query.split("&") if part))


def node_signer(origin: str) -> str:
    return NODE_PREFIX + origin


def signing_node_origin(signer: str) -> str | None:
    """The origin of the node that a ``Signature-Signer`` value names, or None for a patient."""
    return signer[len(NODE_PREFIX) :] if signer.startswith(NODE_PREFIX) else None


def patient_signer(public_key: bytes) -> str:
    return PATIENT_PREFIX + b64url_encode(public_key)


def signing_bytes(
    audience: str,
    method: str,
    path: str,
    query: str,
    body_digest: bytes,
    timestamp: int,
    nonce: bytes,
    signer: str,
) -> bytes:
    """The exact bytes a request's signature covers; ``query`` is the raw query string."""
    fields = [
        audience,
        method.upper(),
        path,
        canonical_query(query),
        body_digest.hex(),
        str(timestamp),
        b64url_encode(nonce),
        signer,
    ]
    return DOMAIN + b"\n" + "\n".join(fields).encode()


def make_headers(
    sign: Callable[[bytes], bytes],
    signer: str,
    method: str,
    path_and_query: str,
    body: bytes,
    now: int,
    nonce: bytes,
    *,
    audience: str,
) -> dict[str, str]:
    """The signature headers for a request to the node named ``audience`` (its origin).

    ``path_and_query`` is as sent on the wire.
    """
    path, _, query = path_and_query.partition("?")
    digest = hashlib.sha256(body).digest()
    message = signing_bytes(audience, method, path, query, digest, now, nonce, signer)
    return {
        SIGNER_HEADER: signer,
        AUDIENCE_HEADER: audience,
        TIMESTAMP_HEADER: str(now),
        NONCE_HEADER: b64url_encode(nonce),
        SIGNATURE_HEADER: b64url_encode(sign(message)),
    }


@dataclass(frozen=True)
class SignedHeaders:
    """The parsed, well-formed (not yet verified) signature headers of a request."""

    signer: str
    audience: str
    timestamp: int
    nonce: bytes
    signature: bytes

    @property
    def node_origin(self) -> str | None:
        """The calling node's origin, or None if a patient signed."""
        return signing_node_origin(self.signer)

    @property
    def patient_key(self) -> bytes | None:
        """The patient's public key named by the signer, or None if a node signed."""
        if not self.signer.startswith(PATIENT_PREFIX):
            return None
        return _header_bytes(self.signer[len(PATIENT_PREFIX) :], PUBLIC_KEY_SIZE, "patient key")


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        # Plain dicts are case-sensitive; HTTP header names are not.
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    if value is None:
        raise Unauthorized(f"missing {name} header")
    if not isinstance(value, str):
        raise Unauthorized(f"{name} header is not text")
    return value.strip()


def parse_headers(headers: Mapping[str, str], own_origin: str) -> SignedHeaders:
    """Parse the signature headers of a request received by the node ``own_origin``.

    Raises Unauthorized naming what is missing or malformed, or naming the other node a
    request was addressed to: a request signed for one node is good at no other.
    """
    signer = _header(headers, SIGNER_HEADER)
    if signer.startswith(NODE_PREFIX):
        if not is_node_origin(signer[len(NODE_PREFIX) :]):
            raise Unauthorized("Signature-Signer names a malformed node origin")
    elif signer.startswith(PATIENT_PREFIX):
        _header_bytes(signer[len(PATIENT_PREFIX) :], PUBLIC_KEY_SIZE, "patient key")
    else:
        raise Unauthorized("Signature-Signer must be node:<origin> or patient:<key>")
    audience = _header(headers, AUDIENCE_HEADER)
    if audience != own_origin:
        shown = audience if is_node_origin(audience) else "a malformed origin"
        raise Unauthorized(f"the request is addressed to {shown}, not to {own_origin}")
    timestamp_text = _header(headers, TIMESTAMP_HEADER)
    if not _TIMESTAMP.match(timestamp_text):
        raise Unauthorized("Signature-Timestamp must be unix seconds")
    nonce = _header_bytes(_header(headers, NONCE_HEADER), NONCE_SIZE, "Signature-Nonce")
    signature = _header_bytes(_header(headers, SIGNATURE_HEADER), SIGNATURE_SIZE, "Signature")
    return SignedHeaders(signer, audience, int(timestamp_text), nonce, signature)


def check_signature(
    parsed: SignedHeaders,
    method: str,
    path: str,
    query: str,
    body_digest: bytes,
    public_key: bytes,
    now: int,
    max_age: int,
) -> None:
    """Check freshness and signature; raises Unauthorized("stale timestamp"/"bad signature")."""
    if abs(now - parsed.timestamp) > max_age:
        raise Unauthorized("stale timestamp")
    message = signing_bytes(
        parsed.audience,
        method,
        path,
        query,
        body_digest,
        parsed.timestamp,
        parsed.nonce,
        parsed.signer,
    )
    if not verify_ed25519(public_key, message, parsed.signature):
        raise Unauthorized("bad signature")
