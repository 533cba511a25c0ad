"""The patient's view of the ledger: every access to, and refusal of, their tokens, proven.

The wallet knows the tokens it issued and, per custodian, the log key it pinned on first
contact. For each custodian it reads the log (from the custodian, else from a node that
mirrors it), keeps the access, denial and revocation entries that name one of its
tokens, and proves each one: the checkpoint is signed by the pinned key, carries at
least one valid cosignature by another federation node (whose key comes from that
node's own ``/ledger/logs``), and an inclusion proof served by the node places the entry
under that checkpoint's root. A custodian cannot then show the patient a history that
its peers have not witnessed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from node.core import origins
from node.core.base64url import b64_decode, b64url_encode
from node.core.chain import LogChain
from node.core.consent import decode_grant, decode_revocation, is_link_grantee, scope_text
from node.core.emergency import split_references
from node.core.entries import (
    Access,
    BreakGlass,
    Contribution,
    Denial,
    Grant,
    LedgerEntry,
    Revoke,
    decode_entry,
)
from node.core.key_rotation import chain_of_log
from node.core.keys import VerifierKey, parse_verifier_key
from node.core.merkle import verify_inclusion
from node.core.notes import Checkpoint, parse_note, verify_cosignature, verify_note
from node.core.shlink import link_access_kind
from node.errors import BadInput, PeerUnreachable, Unauthorized
from node.services.audit import LogListing, fetch_entries, get_body, parse_listing
from node.services.federation_roster import fetch_roster_log, verify_roster_log
from node.services.peer_client import describe
from node.services.wallet import Wallet

# The entries a patient sees about their tokens, and the break-glass entries naming their key.
EVENT_TYPES = (Access, Denial, Revoke, BreakGlass, Contribution)
ROSTER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Node:
    """A federation node as it describes itself: URL, origin, and its own log's key."""

    url: str
    origin: str
    vkey: str
    listings: list[LogListing]


@dataclass
class Proof:
    """How one event is proven: inclusion under a signed, witnessed checkpoint."""

    checkpoint_size: int
    log_signature: bool
    inclusion: bool
    cosigners: list[str] = field(default_factory=list)

    @property
    def proven(self) -> bool:
        return self.log_signature and self.inclusion and bool(self.cosigners)

    def as_json(self) -> dict[str, object]:
        return {
            "checkpoint_size": self.checkpoint_size,
            "log_signature": self.log_signature,
            "inclusion": self.inclusion,
            "cosigners": self.cosigners,
            "proven": self.proven,
        }


@dataclass
class PatientEvent:
    """One entry about one of the patient's tokens, with where it came from and its proof."""

    custodian: str
    index: int
    kind: str
    time: int
    token_id: bytes
    details: dict[str, object]
    proof: Proof
    source: str
    # Break-glass: the emergency access itself, or an access or refusal under it.
    flagged: bool = False

    def as_json(self) -> dict[str, object]:
        return {
            "custodian": self.custodian,
            "index": self.index,
            "kind": self.kind,
            "time": self.time,
            "token_id": self.token_id.hex(),
            **self.details,
            "flagged": self.flagged,
            "proof": self.proof.as_json(),
            "source": self.source,
        }


@dataclass
class PatientLog:
    events: list[PatientEvent]
    problems: list[str]  # custodians whose log could not be read or proven at all

    @property
    def exit_status(self) -> int:
        """1 if any event or custodian log is unproven, else 0."""
        return 1 if self.problems or not all(e.proof.proven for e in self.events) else 0

    def as_json(self) -> dict[str, object]:
        return {
            "events": [e.as_json() for e in self.events],
            "problems": self.problems,
            "proven": self.exit_status == 0,
        }


async def describe_node(session: aiohttp.ClientSession, url: str) -> Node:
    """A node's origin, own log key and listing; raises PeerUnreachable if unreadable."""
    base = url.rstrip("/")
    try:
        health = json.loads(await get_body(session, f"{base}/healthz"))
        listings = parse_listing(json.loads(await get_body(session, f"{base}/ledger/logs")))
    except (aiohttp.ClientError, TimeoutError, BadInput, ValueError, PeerUnreachable) as exc:
        raise PeerUnreachable(f"{base} is unreachable: {describe(exc)}") from exc
    origin = health.get("origin") if isinstance(health, dict) else None
    own = next((lst for lst in listings if lst.origin == origin), None)
    if not isinstance(origin, str) or own is None:
        raise PeerUnreachable(f"{base} does not name its origin or serve its own log")
    return Node(base, origin, own.vkey, listings)


def _event_details(entry: LedgerEntry, labels: dict[bytes, str]) -> dict[str, object]:
    body = entry.body
    if isinstance(body, Access):
        details: dict[str, object] = {
            "grantee": body.grantee,
            "study": b64url_encode(body.study),
            "instances": body.instances,
            "bytes": body.bytes,
        }
        if is_link_grantee(body.grantee):
            # The label is the wallet's own: the ledger names the link by a hash only.
            details["link"] = labels.get(bytes(body.token_id), "")
            details["link_access"] = link_access_kind(bytes(body.digest)) or "unknown"
        return details
    if isinstance(body, Denial):
        refused: dict[str, object] = {
            "requester": body.requester,
            "rule": body.rule,
            "study": None if body.study is None else b64url_encode(body.study),
        }
        if is_link_grantee(body.requester):
            refused["link"] = labels.get(bytes(body.token_id), "")
        return refused
    if isinstance(body, Contribution):
        # An opinion returned through one of the patient's links (docs/reports.md).
        return {"study": b64url_encode(body.study), "link": labels.get(bytes(body.token_id), "")}
    if isinstance(body, Grant):
        # Listed only when a delegate made it (the patient knows their own grants).
        grant = decode_grant(body.token)
        return {
            "grantee": grant.fields.grantee,
            "delegate": b64url_encode(grant.fields.patient_key),
            "scope": scope_text(grant.fields.scope),
            "expires": grant.fields.expires,
        }
    if isinstance(body, Revoke):
        # Who revoked: a delegate's revocation names the delegate.
        try:
            revocation = decode_revocation(body.revocation)
        except BadInput:
            return {}
        if revocation.delegation is None:
            return {}
        return {"delegate": b64url_encode(revocation.signer_key)}
    if isinstance(body, BreakGlass):
        try:
            studies = [b64url_encode(ref) for ref in split_references(body.studies)]
        except BadInput:
            studies = []
        return {
            "requester": body.requester,
            "reason": body.reason,
            "policy": body.policy,
            "default_policy": body.policy_index is None,
            "studies": studies,
        }
    return {}


def _event_token_id(entry: LedgerEntry) -> bytes | None:
    body = entry.body
    if isinstance(body, Access | Denial | Contribution):
        return body.token_id
    if isinstance(body, BreakGlass):
        return body.request
    if isinstance(body, Grant):
        return decode_grant(body.token).token_id
    if isinstance(body, Revoke):
        try:
            return decode_revocation(body.revocation).token_id
        except BadInput:
            return None
    return None


def _by_delegate(entry: LedgerEntry) -> bool:
    """Whether a (checked, own) grant entry was signed by a delegate."""
    body = entry.body
    return isinstance(body, Grant) and decode_grant(body.token).delegation is not None


def own_grant_id(entry: LedgerEntry, patient_key: bytes | None) -> bytes | None:
    """The token id of a grant entry signed by ``patient_key``, else None.

    The signature is checked: a custodian cannot make a patient see accesses under a grant
    it wrote in their name.
    """
    if patient_key is None or entry.kind != Grant.kind:
        return None
    try:
        body = entry.body
        grant = decode_grant(body.token) if isinstance(body, Grant) else None
    except BadInput:
        return None
    # A delegate's grant is the patient's too: its chain leads to their key.
    if grant is None or grant.patient_key != patient_key or not grant.signature_valid():
        return None
    return grant.token_id


def witness_keys(nodes: list[Node], custodian: str) -> dict[str, VerifierKey]:
    """Keys of the nodes that may witness ``custodian``'s log: every other node asked."""
    keys = {}
    for node in nodes:
        if node.origin == custodian:
            continue
        try:
            keys[node.origin] = parse_verifier_key(node.vkey)
        except BadInput:
            continue
    return keys


async def roster_witnesses(pins: dict[str, Any], custodian: str) -> dict[str, VerifierKey] | None:
    """With a federation key pinned for ``custodian``: the members (but the custodian) of
    the newest roster version its log proves from that key, read from the custodian;
    None without a pin. Raises BadInput/Unauthorized if the roster does not verify."""
    federation = pins.get("federation")
    if not isinstance(federation, str):
        return None
    note, entries = await fetch_roster_log(str(pins["url"]), ROSTER_TIMEOUT, "")
    newest = verify_roster_log(federation, note, entries)[-1]
    return {m.origin: parse_verifier_key(m.vkey) for m in newest.members if m.origin != custodian}


def valid_cosigners(note: str, witnesses: dict[str, VerifierKey]) -> list[str]:
    """The names of the witnesses whose cosignature on ``note`` verifies."""
    body, signatures = parse_note(note)
    names = []
    for sig in signatures:
        key = witnesses.get(sig.name)
        if key is not None and verify_cosignature(body, sig, key) is not None:
            names.append(sig.name)
    return sorted(set(names))


async def _inclusion_proof(
    session: aiohttp.ClientSession, base: str, log_id: str, index: int, size: int
) -> list[bytes]:
    body = await get_body(
        session,
        f"{base}/ledger/logs/{log_id}/proof/inclusion",
        {"index": index, "size": size},
    )
    try:
        document = json.loads(body)
        return [b64_decode(h, "a proof hash", size=32) for h in document["proof"]]
    except (ValueError, KeyError, TypeError, BadInput) as exc:
        raise BadInput("the inclusion proof is malformed") from exc


def _verified_after_rotation(
    custodian: str, note: str, pinned_vkey: str, entries: list[bytes]
) -> Checkpoint | None:
    """The checkpoint, if the key the custodian's entries rotate to from the pinned one
    signed it (the wallet pinned the custodian before a key rotation); else None."""
    try:
        decoded = [decode_entry(raw) for raw in entries]
        pinned = parse_verifier_key(pinned_vkey).public_key
        chain = chain_of_log(custodian, decoded, pinned)
        return verify_note(note, chain.verifier_key_at(len(entries)))
    except (BadInput, Unauthorized):
        return None


async def custodian_events(
    session: aiohttp.ClientSession,
    nodes: list[Node],
    custodian: str,
    pinned_vkey: str,
    token_ids: set[bytes],
    labels: dict[bytes, str] | None = None,
    patient_key: bytes | None = None,
    witnesses: dict[str, VerifierKey] | None = None,
) -> list[PatientEvent]:
    """The patient's events in one custodian's log, each with its proof.

    The patient's tokens are ``token_ids`` and, given ``patient_key``, every grant in the
    log that key signed (a link made in the web wallet from the same seed, say).
    Reads from the custodian if it was asked, else from the first node mirroring it.
    ``witnesses``: whose cosignatures count (the pinned roster's members), else every
    other node asked. Raises BadInput if no node serves the log, or the entries served
    are not the whole log under its signed checkpoint (something could be hidden).
    """
    log_id = origins.log_id(custodian)
    servers = sorted(
        (n for n in nodes if any(lst.origin == custodian for lst in n.listings)),
        key=lambda n: n.origin != custodian,
    )
    if not servers:
        raise BadInput(f"no node given serves the log of {custodian}")
    source = servers[0].url
    note = (await get_body(session, f"{source}/ledger/logs/{log_id}/checkpoint")).decode()
    try:
        checkpoint: Checkpoint | None = verify_note(note, pinned_vkey)
    except (BadInput, Unauthorized):
        checkpoint = None
    size = checkpoint.size if checkpoint else Checkpoint.parse(parse_note(note)[0]).size
    entries = await fetch_entries(session, source, log_id, size)
    if checkpoint is None:
        checkpoint = _verified_after_rotation(custodian, note, pinned_vkey, entries)
    if witnesses is None:
        witnesses = witness_keys(nodes, custodian)
    cosigners = valid_cosigners(note, witnesses) if checkpoint else []
    # Inclusion proofs show that what is listed is in the log; recomputing the root from
    # every entry shows that nothing was left out.
    chain = LogChain()
    links = [chain.append(raw) for raw in entries]
    if checkpoint is not None and not chain.gives_root_of(checkpoint):
        raise BadInput(f"the entries {source} serves do not hash to the signed checkpoint")
    events = []
    token_ids = set(token_ids)
    emergencies: set[bytes] = set()
    for index, link in enumerate(links):
        entry = link.entry
        own_grant = None if entry is None else own_grant_id(entry, patient_key)
        if own_grant is not None:
            token_ids.add(own_grant)  # a grant precedes every event under it in its log
        by_delegate = own_grant is not None and entry is not None and _by_delegate(entry)
        if entry is None or not (isinstance(entry.body, EVENT_TYPES) or by_delegate):
            continue
        body = entry.body
        if isinstance(body, BreakGlass) and patient_key and body.patient_key == patient_key:
            # It precedes the accesses under it, as a grant does.
            emergencies.add(body.request)
            token_ids.add(body.request)
        token_id = _event_token_id(entry)
        if token_id is None or token_id not in token_ids:
            continue
        included = False
        if checkpoint is not None:
            proof = await _inclusion_proof(session, source, log_id, index, size)
            included = verify_inclusion(proof, link.leaf, index, size, checkpoint.root_hash)
        events.append(
            PatientEvent(
                custodian,
                index,
                entry.kind,
                entry.time,
                token_id,
                _event_details(entry, labels or {}),
                Proof(size, checkpoint is not None, included, cosigners),
                source,
                flagged=token_id in emergencies,
            )
        )
    return events


async def read_patient_log(
    session: aiohttp.ClientSession, wallet: Wallet, urls: list[str]
) -> PatientLog:
    """Every access, denial and revocation of the wallet's tokens across the nodes at ``urls``.

    Raises PeerUnreachable if a node cannot be read at all.
    """
    nodes = list(await asyncio.gather(*(describe_node(session, url) for url in urls)))
    state = wallet.files.load_state()
    tokens_by_custodian: dict[str, set[bytes]] = {}
    labels: dict[bytes, str] = {}
    for record in state["tokens"]:
        token_id = bytes.fromhex(record["token_id"])
        tokens_by_custodian.setdefault(record["custodian"], set()).add(token_id)
        if isinstance(record.get("link"), dict):
            labels[token_id] = str(record["link"].get("label", ""))
    # Custodians asked here whose log the wallet pinned may hold grants its key signed
    # elsewhere (the web wallet), which this wallet's state does not list.
    served = {listing.origin for node in nodes for listing in node.listings}
    for custodian in set(state["custodians"]) & served:
        tokens_by_custodian.setdefault(custodian, set())
    events: list[PatientEvent] = []
    problems: list[str] = []
    for custodian, token_ids in sorted(tokens_by_custodian.items()):
        pinned = state["custodians"].get(custodian, {}).get("vkey")
        if not isinstance(pinned, str):
            problems.append(f"{custodian}: the wallet has no key pinned for its log")
            continue
        own_key = wallet.key_for(custodian).public_key
        try:
            witnesses = await roster_witnesses(state["custodians"][custodian], custodian)
        except (BadInput, Unauthorized, PeerUnreachable) as exc:
            problems.append(f"{custodian}: the federation roster does not verify: {exc}")
            witnesses = {}
        try:
            events.extend(
                await custodian_events(
                    session, nodes, custodian, pinned, token_ids, labels, own_key, witnesses
                )
            )
        except (BadInput, Unauthorized, UnicodeDecodeError) as exc:
            problems.append(f"{custodian}: {exc}")
    # Break-glass first: what the patient did not consent to is what they must see.
    events.sort(key=lambda e: (not e.flagged, e.time, e.custodian, e.index))
    return PatientLog(events, problems)
