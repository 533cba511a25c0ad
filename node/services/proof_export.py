"""Proof files a patient keeps: a C2SP tlog-proof of one grant, revocation or access.

``export_proof`` reads the custodian's public ledger API: its log key, its latest
*published* checkpoint (one that met its witness policy, with the cosignatures),
the entries up to that size, and the inclusion proof of the one entry asked for. The file
is checked (node.core.proof_file) before it is handed out, so a custodian that serves a
bad proof is found out at export, not later.
"""

from __future__ import annotations

import json

import aiohttp
import msgpack

from node.core.base64url import b64_decode
from node.core.consent import decode_grant, decode_revocation
from node.core.entries import Access, Grant, LedgerEntry, Revoke, decode_entry
from node.core.merkle import HASH_SIZE
from node.core.notes import Checkpoint, parse_note, parse_vkey
from node.core.origins import log_id
from node.core.proof_file import TlogProof, verify_tlog_proof
from node.errors import BadInput, NotFound
from node.services.audit import fetch_entries, get_body
from node.services.patient_log import describe_node

# What a proof can be asked for by token id: the entry kinds that name a token.
PROVABLE_KINDS = {"grant": Grant, "revoke": Revoke, "access": Access}


def names_token(entry: LedgerEntry, token_id: bytes, kind: str) -> bool:
    """True if ``entry`` is of ``kind`` and about the token ``token_id``."""
    body = entry.body
    try:
        if kind == "grant" and isinstance(body, Grant):
            return decode_grant(body.token).token_id == token_id
        if kind == "revoke" and isinstance(body, Revoke):
            return decode_revocation(body.revocation).token_id == token_id
    except BadInput:
        return False
    return kind == "access" and isinstance(body, Access) and body.token_id == token_id


async def export_proof(
    session: aiohttp.ClientSession,
    custodian_url: str,
    token_id: bytes | None = None,
    kind: str = "grant",
    index: int | None = None,
) -> TlogProof:
    """A verified tlog-proof of an entry of the custodian's own log: the latest entry of
    ``kind`` naming ``token_id``, or the entry at ``index``.

    Raises NotFound if the published checkpoint holds no such entry (or there is none
    yet), PeerUnreachable, or BadInput/Unauthorized if what the custodian serves is wrong.
    """
    node = await describe_node(session, custodian_url)
    base = f"{node.url}/ledger/logs/{log_id(node.origin)}"
    try:
        note = (await get_body(session, f"{base}/published-checkpoint")).decode("utf-8")
    except BadInput as exc:
        raise NotFound(f"{node.origin} has published no checkpoint yet: {exc}") from exc
    size = Checkpoint.parse(parse_note(note)[0]).size
    if index is None:
        if token_id is None or kind not in PROVABLE_KINDS:
            raise BadInput("name a token id and a kind, or an index")
        entries = await fetch_entries(session, node.url, log_id(node.origin), size)
        found = [
            i for i, raw in enumerate(entries) if names_token(decode_entry(raw), token_id, kind)
        ]
        if not found:
            raise NotFound(f"no {kind} of that token in {node.origin}'s published checkpoint")
        index, entry = found[-1], entries[found[-1]]
    else:
        if not 0 <= index < size:
            raise NotFound(f"entry {index} is not in the published checkpoint of size {size}")
        page = await get_body(
            session, f"{base}/entries", {"start": str(index), "end": str(index + 1)}
        )
        entry = _single_entry(page)
    answer = json.loads(
        await get_body(session, f"{base}/proof/inclusion", {"index": str(index), "size": str(size)})
    )
    hashes = tuple(b64_decode(h, "a proof hash", size=HASH_SIZE) for h in answer["proof"])
    proof = TlogProof(entry, index, hashes, note)
    # Witnesses are the patient's to judge at verification; here the log and the tree.
    verify_tlog_proof(proof, parse_vkey(node.vkey), unknown_signatures_allowed=True)
    return proof


def _single_entry(page: bytes) -> bytes:
    entries = msgpack.unpackb(page, raw=True)
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], bytes):
        raise BadInput("the custodian did not serve that one entry")
    return bytes(entries[0])
