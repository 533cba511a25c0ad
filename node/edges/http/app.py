"""The node's aiohttp application: middlewares and the route modules, assembled once.

Each role lives in its own module exposing ``add_routes(app, runtime)``; this module
owns the cross-cutting rules: error mapping (every refusal logged at INFO with its route
and reason), request body encodings, CORS for viewers, and admin-token auth.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from node import __version__
from node.core import atna
from node.core.rate_limit import SlidingWindowLimit
from node.edges.http import route_modules
from node.edges.http.context import (
    RUNTIME_KEY,
    accepted_body_encodings,
    log_refusal,
    route_of,
    runtime_of,
)
from node.errors import ImageShareError
from node.services.runtime import NodeRuntime

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Path prefixes that need the admin bearer token. Others authenticate by signature
# (/p2p, /patient), are public by design (/ledger, /healthz), or are static pages.
ADMIN_PREFIXES = ("/dicomweb", "/admin/api")
# Warning carries QIDO-RS paging hints.
CORS_EXPOSED = "Content-Type, Content-Length, Warning"
CORS_SCOPE = "imageshare.cors_scope"  # request key: the CORS scope of this request's path
CORS_ORIGIN = "imageshare.cors_origin"  # request key: the allowed Origin of this request
# Admin-token authentications sent to the security audit per client address and outcome
# per minute: a viewer authenticates on every request, and a client sending wrong tokens
# must not flood the bounded audit queue and push real events out of it.
AUTH_AUDITS_PER_MINUTE = 6


@dataclass(frozen=True)
class CorsScope:
    """Paths that browser viewers on the configured origins may call, and how."""

    prefix: str
    methods: frozenset[str]
    headers: str


# The only paths with CORS: DICOMweb for viewers (with the admin token), and the public
# ledger reads for wallets and auditors in a browser. Admin, /p2p, /patient and the
# node's own pages never answer another origin.
CORS_SCOPES = (
    CorsScope(
        "/dicomweb",
        frozenset({"GET", "HEAD", "POST"}),
        "Authorization, Content-Type, Accept, Range",
    ),
    CorsScope("/ledger", frozenset({"GET", "HEAD"}), "Accept, Range"),
)


def cors_scope(path: str) -> CorsScope | None:
    """The CORS scope of a request path, or None where cross-origin reads are not allowed."""
    for scope in CORS_SCOPES:
        if path == scope.prefix or path.startswith(scope.prefix + "/"):
            return scope
    return None


class _UnparsableRequestsAsRefusals(logging.Filter):
    """aiohttp answers a request it cannot parse (a broken chunked framing, a malformed
    header) with 400 itself, and logs it at ERROR with a traceback. It is a refusal like
    any other: one line at INFO, with the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "refused a request that cannot be parsed with %d: %s"
            record.args = (exc.code, " ".join(exc.message.split()))
            record.exc_info, record.exc_text = None, None
        return True


_UNPARSABLE_FILTER = _UnparsableRequestsAsRefusals()


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def refusal_response(request: web.Request, status: int, message: str) -> web.Response:
    """The JSON error answer to ``request``, logged as a refusal when it is the client's
    fault (4xx). A request whose body was not read to its end keeps no connection alive.
    """
    if status < 500:
        log_refusal(request, status, message)
    response = error_response(status, message)
    if request.body_exists and not request.content.is_eof():
        response.force_close()
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map the node's errors to their HTTP status in one place; never leak a traceback."""
    try:
        return await handler(request)
    except ImageShareError as exc:
        return refusal_response(request, exc.http_status, str(exc))
    except (HttpProcessingError, RequestPayloadError) as exc:
        # aiohttp could not read the body (a broken chunked framing, a cut connection).
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return refusal_response(request, 400, f"the request body cannot be read: {reason}")
    except web.HTTPException as exc:
        if exc.status == 404 and request.path.startswith("/dicomweb/"):
            # No such DICOMweb resource: in JSON, as every DICOMweb error is.
            return refusal_response(request, 404, "no such DICOMweb resource")
        if 400 <= exc.status < 500:
            log_refusal(request, exc.status, exc.text or exc.reason)
        raise
    except ConnectionError:
        # The client left (or was cut off as too slow) mid-request: no fault of the node.
        log.info("client gone during %s %s", request.method, route_of(request))
        return error_response(400, "the connection closed before the request ended")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, route_of(request))
        return refusal_response(request, 500, "internal error; see the node's log")


@web.middleware
async def body_encoding_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a Content-Encoding the route does not take, before its body is read."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        allowed = accepted_body_encodings(request)
        if encoding not in allowed:
            return refusal_response(
                request, 415, f"this route does not take a body in Content-Encoding {encoding!r}"
            )
    return await handler(request)


async def _cut_off_slow_body(request: web.Request, window: float, min_rate: int) -> None:
    """Close the connection of a request whose body arrives slower than ``min_rate``
    bytes/s over a ``window`` (a stalled or trickling client), so that it cannot hold a
    handler and its resources forever. The handler then sees the connection lost."""
    content = request.content
    received = content.total_bytes
    while not content.is_eof():
        await asyncio.sleep(window)
        if content.is_eof():
            return
        if content.total_bytes - received < min_rate * window:
            log.warning(
                "cut off %s %s: its body arrives slower than %d bytes/s",
                request.method,
                request.path,
                min_rate,
            )
            if request.transport is not None:
                request.transport.close()
            return
        received = content.total_bytes


def make_slow_body_middleware(
    window: float, min_rate: int
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Bound how slowly a request body may arrive (headers are bounded by the server's
    keep-alive timeout, which runs from the moment a connection opens)."""

    @web.middleware
    async def slow_body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if window <= 0 or not request.body_exists:
            return await handler(request)
        watchdog = asyncio.create_task(_cut_off_slow_body(request, window, min_rate))
        try:
            return await handler(request)
        finally:
            watchdog.cancel()

    return slow_body_middleware


def _has_admin_prefix(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES)


def bearer_token_matches(request: web.Request, expected: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


def make_auth_middleware(runtime: NodeRuntime) -> Callable[..., Awaitable[web.StreamResponse]]:
    audited = SlidingWindowLimit(AUTH_AUDITS_PER_MINUTE, 60.0)

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Only a CORS preflight goes without the token (the browser sends none with it);
        # another OPTIONS (DICOMweb Retrieve Capabilities) needs it like any request.
        preflight = (
            request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        )
        if preflight or not _has_admin_prefix(request.path):
            return await handler(request)
        authenticated = bearer_token_matches(request, runtime.admin_token)
        address = request.remote or ""
        if audited.admit(f"{address} {authenticated}", time.monotonic()):
            runtime.security_audit.record(atna.admin_authentication, authenticated, address)
        if not authenticated:
            response = refusal_response(
                request, 401, "missing or wrong admin token (Authorization: Bearer ...)"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="imageshare"'
            return response
        return await handler(request)

    return auth_middleware


def make_cors_middleware(allowed: list[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """CORS for the configured origins (browser viewers such as OHIF) on CORS_SCOPES only.

    ``allowed`` holds exact origins (validated in node.config; never "*" or "null").
    """
    origins = frozenset(allowed)

    @web.middleware
    async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        scope = cors_scope(request.path)
        if scope is None:
            return await handler(request)
        request[CORS_SCOPE] = scope  # Vary: Origin on every answer of the scope
        origin = request.headers.get("Origin", "")
        if origin not in origins:
            return await handler(request)
        preflight = (
            request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        )
        method = request.headers["Access-Control-Request-Method"] if preflight else request.method
        if method.upper() not in scope.methods:
            return await handler(request)
        request[CORS_ORIGIN] = origin  # headers are added by add_cors_headers
        if preflight:
            return web.Response(status=204)
        return await handler(request)

    return cors_middleware


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On response prepare: streamed answers (WADO-RS) send their headers before the
    middleware sees them, so the CORS headers are added here."""
    scope: CorsScope | None = request.get(CORS_SCOPE)
    if scope is None:
        return
    # The answer depends on Origin, whether allowed or not: caches must know.
    vary = response.headers.get("Vary")
    response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
    origin = request.get(CORS_ORIGIN)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Headers"] = scope.headers
        response.headers["Access-Control-Allow-Methods"] = ", ".join(sorted(scope.methods))
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
        response.headers["Access-Control-Max-Age"] = "600"


def make_hsts_header(max_age: int) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """On response prepare, over HTTPS: Strict-Transport-Security, so that a browser that
    has seen the node once never tries plain HTTP to it (a LAN attacker's downgrade)."""
    value = f"max-age={max_age}"

    async def add_hsts_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Strict-Transport-Security"] = value

    return add_hsts_header


async def healthz(request: web.Request) -> web.Response:
    """200 once the node serves everything (HTTP and its background services), else 503."""
    runtime = runtime_of(request)
    return web.json_response(
        {
            "status": "ok" if runtime.ready else "starting",
            "origin": runtime.config.origin,
            "version": __version__,
        },
        status=200 if runtime.ready else 503,
    )


def build_app(runtime: NodeRuntime) -> web.Application:
    """The whole HTTP surface of one node."""
    app = web.Application(
        client_max_size=runtime.config.http.max_body_bytes,
        middlewares=[
            make_slow_body_middleware(
                runtime.config.http.client_timeout, runtime.config.http.min_body_rate
            ),
            make_cors_middleware(runtime.config.http.cors_origins),
            errors_middleware,
            make_auth_middleware(runtime),
            body_encoding_middleware,
        ],
    )
    app[RUNTIME_KEY] = runtime
    logging.getLogger("aiohttp.server").addFilter(_UNPARSABLE_FILTER)  # once: a set
    app.on_response_prepare.append(add_cors_headers)
    if runtime.config.http.tls and runtime.config.http.hsts_max_age:
        app.on_response_prepare.append(make_hsts_header(runtime.config.http.hsts_max_age))
    app.router.add_get("/healthz", healthz)
    for module in route_modules.MODULES:
        module.add_routes(app, runtime)
    return app
