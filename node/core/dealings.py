"""Dealings: which other nodes an entry of this node's own log says it deals with.

Selective mirroring (docs/federation.md) copies the entries of a member's log only if
this node deals with it: it recorded a grant naming it (as custodian or grantee), sent it
studies, received studies from it, refused it, or served it in an emergency. Pure: the
replication service reads its own log and keeps the result.
"""

from __future__ import annotations

from collections.abc import Collection

from node.core.consent import decode_grant
from node.core.entries import Access, BreakGlass, Denial, Grant, Receipt, decode_entry
from node.core.origins import is_node_origin
from node.errors import BadInput


def counterparts(raw: bytes, own_origin: str) -> set[str]:
    """The node origins other than ``own_origin`` that the entry ``raw`` deals with.

    An entry this node cannot read (a kind of a later version) names nobody.
    """
    try:
        body = decode_entry(raw).body
    except BadInput:
        return set()
    named: set[str] = set()
    if isinstance(body, Grant):
        try:
            fields = decode_grant(body.token).fields
        except BadInput:
            return set()
        named = {fields.custodian, fields.grantee}
    elif isinstance(body, Access):
        named = {body.grantee}
    elif isinstance(body, Receipt):
        named = {body.custodian}
    elif isinstance(body, (Denial, BreakGlass)):
        named = {body.requester}
    return {o for o in named if o != own_origin and is_node_origin(o)}


def mirrors_log(mode: str, origin: str, dealings: Collection[str], also: Collection[str]) -> bool:
    """True if a node copies the entries of ``origin``'s log, not only its checkpoints:
    ``mode`` is ``[federation] mirror`` ("all": an archive), ``also`` its mirror_also."""
    return mode == "all" or origin in dealings or origin in also
