"""What every route module shares: the runtime its handlers serve, and the handler marks.

Handlers reach the node through ``runtime_of(request)`` and its typed services
(``runtime_of(request).services.transfer``); no route module keeps a service of its own on
the application. Route modules import this module, never node.edges.http.app, which
imports them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from node.services.runtime import NodeRuntime

RUNTIME_KEY = web.AppKey("runtime", NodeRuntime)
_BODY_ENCODINGS = "imageshare_body_encodings"  # handler attribute set by accepts_body_encodings
HandlerT = TypeVar("HandlerT", bound=Callable[..., Awaitable[web.StreamResponse]])
# Refusals keep the application's logger name: operators filter on it.
_refusals = logging.getLogger("node.edges.http.app")


def runtime_of(request: web.Request) -> NodeRuntime:
    """The node that ``request`` reached."""
    return request.app[RUNTIME_KEY]


def route_of(request: web.Request) -> str:
    """The route a request matched, as registered (never the UIDs or secrets of the path)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(no route)"


def log_refusal(request: web.Request, status: int, reason: str) -> None:
    """Write one refused request to the log: the one place refusals are logged."""
    _refusals.info("refused %s %s with %d: %s", request.method, route_of(request), status, reason)


def accepts_body_encodings(*encodings: str) -> Callable[[HandlerT], HandlerT]:
    """Mark a handler whose request body may carry these Content-Encodings; the handler
    decodes the body itself within its limits (the server decodes none). Every other
    route refuses an encoded body with 415 before reading it."""

    def mark(handler: HandlerT) -> HandlerT:
        setattr(handler, _BODY_ENCODINGS, frozenset(encodings))
        return handler

    return mark


def accepted_body_encodings(request: web.Request) -> frozenset[str]:
    """The Content-Encodings the matched handler takes (none unless it was marked)."""
    return getattr(request.match_info.handler, _BODY_ENCODINGS, frozenset())
