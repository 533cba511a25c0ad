"""The one rule for a node origin: the name of a node and of its log in the federation.

An origin is 3 to 200 characters of ASCII letters, digits and ``. _ ~ / : -``. It is
written into checkpoints, C2SP verifier keys (whose name ends at a ``+``), signature
lines (which end at a space), the ``Signature-Signer`` and ``Signature-Audience``
headers, and consent tokens; the rule keeps it printable, unambiguous in each of those,
and the same everywhere. node.toml, `imageshare init`, the roster, consent tokens and
signed requests all call ``is_node_origin``.

This is not a web origin (``scheme://host[:port]`` as a browser sends it in CORS): that
one is checked where CORS origins are configured, in node.config.
"""

from __future__ import annotations

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
