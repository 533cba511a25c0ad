"""The small set of errors the node raises, each with the HTTP status it maps to.

Edges (HTTP, DIMSE, CLI) translate these in one place each; services and stores raise
them with a one-sentence message that is safe to show to the caller.
"""

from __future__ import annotations


class ImageShareError(Exception):
    """Base class: a refusal or failure with a message fit for the caller."""

    http_status = 500


class BadInput(ImageShareError):
    """Malformed input from outside: not DICOM, bad msgpack, bad token, bad header."""

    http_status = 400


class Unauthorized(ImageShareError):
    """The caller is not who it must be (missing or bad credentials, bad signature)."""

    http_status = 401


class Forbidden(ImageShareError):
    """The caller is known but the request is refused by a rule."""

    http_status = 403


class NotFound(ImageShareError):
    http_status = 404


class NotAcceptable(ImageShareError):
    """No representation the client accepts can be made (HTTP content negotiation)."""

    http_status = 406


class Conflict(ImageShareError):
    http_status = 409


class PayloadTooLarge(ImageShareError):
    http_status = 413


class TooManyRequests(ImageShareError):
    """The caller asks more often than its allowance; it may try again later."""

    http_status = 429


class StorageFull(ImageShareError):
    """The disk has no room: nothing was stored."""

    http_status = 507


class StorageFailed(ImageShareError):
    """A database of the node could not be read or written (an I/O error, a damaged file,
    a lock another process held too long): nothing was stored."""

    http_status = 503


class PeerUnreachable(ImageShareError):
    """Another node (a member, a custodian, a node being audited) could not be reached:
    down, refusing connections, timed out, failing (5xx), or answering unauthenticated."""

    http_status = 502


class ConfigError(ImageShareError):
    """node.toml or the data directory is missing or invalid."""
