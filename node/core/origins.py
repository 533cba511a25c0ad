"""The one rule for a node origin: the name of a node and of its log in the federation.

An origin is 3 to 200 characters of ASCII letters, digits and ``. _ ~ / : -``. It is
written into checkpoints, C2SP verifier keys (whose name ends at a ``+``), signature
lines (which end at a space), the ``Signature-Signer`` and ``Signature-Audience``
headers, and consent tokens; the rule keeps it printable, unambiguous in each of those,
and the same everywhere. node.toml, `imageshare init`, the roster, consent tokens and
signed requests all call ``is_node_origin``.

A log is named on the ledger API and in ``witness`` entries by its log ID, SHA-256 of its
origin; ``log_id_bytes`` and ``log_id`` are the one place that hash is taken.

This is not a web origin (``scheme://host[:port]`` as a browser sends it in CORS): that
one is checked where CORS origins are configured, in node.config.
"""

from __future__ import annotations

import hashlib
import re
from typing import TypeGuard

from node.errors import BadInput

NODE_ORIGIN_RULE = "3 to 200 characters of letters, digits and ._~/:-, not starting with link:"
# A grant's grantee is a node origin or a share link ("link:" + a credential digest,
# node.core.consent); no node may take a name that reads as a link.
LINK_PREFIX = "link:"
# fullmatch, not "^...$": "$" would also accept a trailing newline.
_NODE_ORIGIN = re.compile(r"[A-Za-z0-9._~/:-]{3,200}")


def is_node_origin(value: object) -> TypeGuard[str]:
    """True if ``value`` is a string that follows the node origin rule."""
    return (
        isinstance(value, str)
        and _NODE_ORIGIN.fullmatch(value) is not None
        and not value.startswith(LINK_PREFIX)
    )


def check_node_origin(value: object, what: str) -> str:
    """``value`` if it is a node origin; raises BadInput naming ``what`` otherwise."""
    if not is_node_origin(value):
        raise BadInput(f"{what} is not a node origin ({NODE_ORIGIN_RULE})")
    return value


def log_id_bytes(origin: str) -> bytes:
    """A log's ID: SHA-256 of its origin (how stores and ``witness`` entries hold it)."""
    return hashlib.sha256(origin.encode()).digest()


def log_id(origin: str) -> str:
    """A log's ID as the ledger API names it: lowercase hex SHA-256 of its origin."""
    return log_id_bytes(origin).hex()


# A DNS name: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z)({_LABEL}\.)*{_LABEL}")


def origin_host(origin: str) -> str | None:
    """The host a node origin names, if it names one: ``ucsf.example`` for
    ``ucsf.example/imageshare``, ``https://ucsf.example:8443/x`` and ``ucsf.example:8443``;
    ``10.0.0.7`` for ``10.0.0.7:8600/x``; None if the part before the path names no host.
    Used to name the node's HTTPS certificate after it."""
    authority = origin.split("://", 1)[-1].split("/", 1)[0]
    host = authority.rsplit(":", 1)[0]
    return host.lower() if _DNS_NAME.fullmatch(host) else None
