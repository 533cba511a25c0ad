"""The one client for talking to other nodes: members, custodians, and nodes an auditor reads.

Every outbound HTTP call of the node and of the command line goes through here, so that
these rules are written once:

- **Sessions**: ``open_session`` makes every aiohttp ClientSession, with one trust rule
  for ``https://`` URLs: the system's CAs, or only the pinned CA file when one is given
  (``[http] trusted_ca_file``, or the CLI's ``--ca-file``); BCP 195 (node.services.tls);
  the certificate must name the host.
- **Signing**: ``signed_headers`` builds the imageshare-request/v2 headers
  (node.core.signed_requests) for a node's or a patient's key, timestamped now with a
  fresh nonce and addressed to the receiving node's origin.
- **Bounded reads**: ``read_bounded`` reads an answer up to a byte bound and refuses a
  longer one with a clear error; no answer of another node is read unbounded.
- **No redirects**: every call passes ``allow_redirects=False``: a peer answers for
  itself, and a signed request is never carried to another address.
- **Timeouts**: the caller's ClientTimeout is on the session; a timeout or a refused,
  reset or failed TLS connection is ``PeerUnreachable``.
- **Status**: ``raise_for_answer`` turns a non-success answer into the node's error
  (``error_for_status``), and, for a signed request, takes a 4xx as the peer's refusal
  only if it carries the peer's signature bound to that request (node.core.refusals);
  any other 4xx is an unauthenticated answer, so the peer counts as not reached.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Callable
from typing import Any, NoReturn

import aiohttp
import yarl

from node.core.keys import NodeIdentity
from node.core.refusals import REFUSAL_HEADER, is_refusal, verify_refusal
from node.core.signed_requests import NONCE_SIZE, SignedHeaders, make_headers, node_signer
from node.errors import (
    BadInput,
    Conflict,
    Forbidden,
    ImageShareError,
    NotFound,
    PayloadTooLarge,
    PeerUnreachable,
    Unauthorized,
)
from node.services.tls import client_tls_context

# An error answer is a small JSON document; a longer one is not read further.
MAX_ERROR_BYTES = 64 * 1024
# A JSON answer to a wallet or the CLI (a study list, a proof).
MAX_JSON_BYTES = 16 * 1024 * 1024

# What a request may run into on the way; each means the peer was not reached.
CONNECTION_ERRORS = (aiohttp.ClientError, TimeoutError, ssl.SSLError)

_STATUS_ERRORS: dict[int, type[ImageShareError]] = {
    400: BadInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
}


def open_session(
    ca_file: str,
    timeout: aiohttp.ClientTimeout,
    *,
    limit_per_host: int = 0,
    trace_configs: list[aiohttp.TraceConfig] | None = None,
    read_bufsize: int = 2**16,
) -> aiohttp.ClientSession:
    """A ClientSession for talking to other nodes, trusting ``ca_file`` (or the system's
    CAs) for ``https://`` URLs; close it when done (``async with``)."""
    connector = aiohttp.TCPConnector(ssl=client_tls_context(ca_file), limit_per_host=limit_per_host)
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=connector,
        trace_configs=trace_configs,
        read_bufsize=read_bufsize,
    )


# -- signing ---------------------------------------------------------------------------------


def signed_headers(
    sign: Callable[[bytes], bytes],
    signer: str,
    method: str,
    target: yarl.URL,
    body: bytes,
    audience: str,
    now: int | None = None,
) -> dict[str, str]:
    """The signature headers of ``method target`` with ``body`` by ``signer`` (a node's or a
    patient's key), for the node whose origin is ``audience``, timestamped ``now`` (default:
    the clock) with a fresh nonce."""
    return make_headers(
        sign,
        signer,
        method,
        target.raw_path_qs,
        body,
        int(time.time()) if now is None else now,
        os.urandom(NONCE_SIZE),
        audience=audience,
    )


def signed_request(
    session: aiohttp.ClientSession,
    method: str,
    url: str | yarl.URL,
    sign: Callable[[bytes], bytes],
    signer: str,
    audience: str,
    body: bytes = b"",
    now: int | None = None,
    **kwargs: Any,
) -> Any:
    """Send a request signed for the node ``audience`` (its origin); use as
    ``async with signed_request(...) as response``. Extra keyword arguments (headers,
    timeout) go to ``session.request``."""
    target = yarl.URL(url)
    headers = dict(kwargs.pop("headers", None) or {})
    headers.update(signed_headers(sign, signer, method, target, body, audience, now))
    kwargs.setdefault("allow_redirects", False)
    return session.request(method, target, data=body, headers=headers, **kwargs)


def node_signed_headers(
    identity: NodeIdentity, method: str, target: yarl.URL, body: bytes, audience: str
) -> dict[str, str]:
    """``signed_headers`` with this node's key: a request from this node to a member."""
    return signed_headers(
        identity.sign, node_signer(identity.origin), method, target, body, audience
    )


# -- reading answers -------------------------------------------------------------------------


def where(url: str | yarl.URL) -> str:
    """The part of a URL that names the peer (scheme, host, port), for messages."""
    return str(yarl.URL(url).origin())


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's whole body; raises BadInput, reading no further, if it is longer than
    ``limit`` bytes, and PeerUnreachable if the connection breaks off."""
    too_large = BadInput(f"the answer from {where(response.url)} is larger than {limit} bytes")
    if (response.content_length or 0) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise too_large
    except CONNECTION_ERRORS as exc:
        raise PeerUnreachable(
            f"the answer from {where(response.url)} broke off: {describe(exc)}"
        ) from exc
    return bytes(body)


def error_for_status(status: int, message: str) -> ImageShareError:
    """The node's error for a peer's HTTP error ``status``: the same type the peer raised
    (400 BadInput, 401 Unauthorized, 403 Forbidden, 404 NotFound, 409 Conflict, 413
    PayloadTooLarge, other 4xx BadInput); a 5xx means the peer could not serve, which is
    PeerUnreachable (worth retrying later)."""
    if status >= 500:
        return PeerUnreachable(message)
    return _STATUS_ERRORS.get(status, BadInput)(message)


def error_document(body: bytes) -> dict[str, Any]:
    """An error answer's JSON object (``{"error", ...}``), or {} if it is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


async def raise_for_answer(
    response: aiohttp.ClientResponse,
    *,
    refuser: tuple[str, bytes] | None = None,
    asked: SignedHeaders | None = None,
    refine: Callable[[int, dict[str, Any]], ImageShareError | None] | None = None,
) -> NoReturn:
    """Raise the node's error for a non-success answer.

    With ``refuser`` (the asked node's origin and public key) and ``asked`` (the signed
    request), a 4xx counts only if the refuser signed it for that request; otherwise it
    is PeerUnreachable and its text is not repeated. ``refine`` may return a more
    specific error from the status and the answer's JSON object.
    """
    url, status = response.url, response.status
    try:
        body: bytes | None = await read_bounded(response, MAX_ERROR_BYTES)
    except BadInput:
        body = None
    if refuser is not None and asked is not None and is_refusal(status):
        origin, public_key = refuser
        signature = response.headers.get(REFUSAL_HEADER)
        if body is None or not verify_refusal(public_key, signature, origin, asked, status, body):
            raise PeerUnreachable(
                f"unverified answer at {url}: its HTTP {status} is not signed by"
                f" {origin} for this request, so it was ignored"
            )
    document = error_document(body or b"")
    refined = refine(status, document) if refine is not None else None
    if refined is not None:
        raise refined
    message = str(document.get("error") or f"HTTP {status}")
    verb = "failed" if status >= 500 else "refused"
    raise error_for_status(status, f"{where(url)} {verb}: {message}")


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str | yarl.URL,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    limit: int = MAX_JSON_BYTES,
) -> Any:
    """One request whose answer is JSON: the decoded document of a 2xx answer.

    Raises PeerUnreachable if the peer is not reached (or fails, 5xx), the error of its
    status for a refusal (error_for_status), and BadInput for an answer that is not JSON
    or is longer than ``limit`` bytes.
    """
    target = yarl.URL(url)
    try:
        answer_of = session.request(
            method, target, headers=headers, data=body, allow_redirects=False
        )
        async with answer_of as response:
            if response.status >= 300:
                await raise_for_answer(response)
            answer = await read_bounded(response, limit)
    except CONNECTION_ERRORS as exc:
        raise PeerUnreachable(f"cannot reach {where(target)}: {describe(exc)}") from exc
    try:
        return json.loads(answer) if answer else {}
    except ValueError as exc:
        raise BadInput(f"{where(target)} answered with something other than JSON") from exc


def describe(exc: BaseException) -> str:
    """A network error in one line (aiohttp's may be empty or span several)."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
