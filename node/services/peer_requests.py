"""Requests from this node to a member, signed with the node's key for that member.

The signed bytes are defined once, in node.core.signed_requests; this module reads the
clock and draws the nonce, which the pure core does not.
"""

from __future__ import annotations

import os
import time

import yarl

from node.core.keys import NodeIdentity
from node.core.signed_requests import NONCE_SIZE, make_headers, node_signer


def node_signed_headers(
    identity: NodeIdentity, method: str, target: yarl.URL, body: bytes, audience: str
) -> dict[str, str]:
    """The signature headers of ``method target`` with ``body`` from this node to the
    member whose origin is ``audience``, timestamped now with a fresh nonce."""
    return make_headers(
        identity.sign,
        node_signer(identity.origin),
        method,
        target.raw_path_qs,
        body,
        int(time.time()),
        os.urandom(NONCE_SIZE),
        audience=audience,
    )
