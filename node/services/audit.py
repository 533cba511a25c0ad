"""The auditor: mirror every reachable log over the public ledger API and verify it all.

Two halves. ``collect`` reads, from every node URL given, the node's own log and every
log it mirrors (``/ledger/logs``), each as that node serves it (signed checkpoint with
cosignatures, then every entry), plus the node's equivocation proofs. ``audit`` then
judges these views with the pure rules of node.core.audit_rules: signatures, chain,
roots, consistency with the saved state, one view per log across nodes, and the consent
rules over all logs together. Nothing here trusts a node's word: a log counts only as
far as its own signature and its entries prove it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack

from node.config import ConsentConfig
from node.core.audit_rules import (
    HISTORY_RULES,
    AccessCheck,
    BreakGlassReview,
    BreakGlassWalk,
    ConsentWalk,
    CosignatureStatus,
    EntryTimes,
    History,
    ReceiptLedger,
    ServedRoster,
    SignatureChecks,
    Violation,
    Walked,
    access_violation,
    check_against_saved,
    check_cosignatures,
    check_history,
    check_keys_in_roster,
    check_roster_equivocation,
    check_same_copy,
    check_split_view,
    check_witness_entries,
    count_kinds,
    first_difference,
    signed_items,
    violation_state,
    witness_claim,
)
from node.core.chain import LogChain
from node.core.consent import (
    GrantToken,
    KeyStatus,
    Revocation,
    Rule,
    decode_grant,
    validate_token,
)
from node.core.entries import KeyRotation, LedgerEntry, Witness, decode_entry, encode_entry
from node.core.equivocation import EquivocationProof, verify_equivocation
from node.core.key_rotation import KeyChain
from node.core.keys import VerifierKey, parse_verifier_key
from node.core.merkle import leaf_hash
from node.core.notes import Checkpoint, parse_note
from node.core.origins import is_node_origin, log_id, log_id_bytes
from node.core.roster_document import open_roster
from node.core.tiles import TILE_WIDTH, entry_bundles, parse_entry_bundle
from node.errors import BadInput, PeerUnreachable, Unauthorized
from node.services.audit_state import AuditState, SavedCheckpoint, VerifiedPrefix
from node.services.audit_workers import (
    PARALLEL_THRESHOLD,
    Workers,
    verify_grants,
    verify_revocations,
)
from node.services.federation_roster import (
    check_roster_log_bytes,
    roster_notes,
    verify_roster_log,
)
from node.services.peer_client import describe, open_session, read_bounded
from node.store.audit_scratch import Scratch, SpilledMap
from node.store.audit_state import JudgedRows
from node.store.entry_spool import EntrySource, EntrySpool, entries_from

# A server may return fewer entries than asked; we ask for pages of this size.
ENTRIES_PAGE = 1000
# Pages of one log fetched at the same time from one node.
PAGES_IN_FLIGHT = 4
# Largest log the auditor will hold in memory (a node may claim any size).
MAX_LOG_ENTRIES = 50_000_000
# Largest roster log (versions and key rotations) the auditor reads.
MAX_ROSTER_ENTRIES = 8192
# Largest JSON or msgpack answer the auditor reads from a node.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LogListing:
    """One row of a node's ``GET /ledger/logs``: what the node claims about a log."""

    origin: str
    log_id: str
    vkey: str
    size: int


@dataclass
class ServedLog:
    """One log as one node serves it: its checkpoint note and the entries it returned.

    ``error`` is set when the node listed the log but would not or could not serve it
    whole (an HTTP error, a malformed answer, fewer entries than its checkpoint).
    """

    source: str
    listing: LogListing
    note: str | None = None
    entries: EntrySource = field(default_factory=list, repr=False)  # on disk: up to millions
    error: str | None = None
    # How many of ``entries`` the node sent (the others are the state's verified prefix).
    entries_read: int = 0
    # The verified prefix ``entries`` start with (entries the state kept), if any.
    resumed: VerifiedPrefix | None = field(default=None, repr=False)


@dataclass
class PeerView:
    """Everything one node served: its name, its logs, its equivocation proofs."""

    url: str
    origin: str
    logs: list[ServedLog]
    equivocations: list[Any]
    # The federation roster log it serves (checkpoint note, entries), if any; or why not.
    roster: tuple[str, list[bytes]] | None = None
    roster_error: str | None = None


async def get_body(
    session: aiohttp.ClientSession, url: str, params: dict[str, Any] | None = None
) -> bytes:
    """GET and return the body; raises BadInput on a non-200 answer (with the node's reason)."""
    async with session.get(url, params=params, allow_redirects=False) as response:
        body = await read_bounded(response, MAX_RESPONSE_BYTES)
        if response.status != 200:
            reason = body[:200].decode(errors="replace").strip()
            raise BadInput(f"{url} answered {response.status}: {reason}")
        return body


def _json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadInput(f"{what} is not JSON") from exc


def parse_listing(document: Any) -> list[LogListing]:
    """Parse ``GET /ledger/logs``; raises BadInput if it is not a list of well-typed rows."""
    if not isinstance(document, list):
        raise BadInput("/ledger/logs is not a JSON list")
    listings = []
    for row in document:
        if not isinstance(row, dict):
            raise BadInput("/ledger/logs row is not an object")
        origin, log_id, vkey, size = (row.get(k) for k in ("origin", "log_id", "vkey", "size"))
        if not (
            is_node_origin(origin)
            and isinstance(log_id, str)
            and isinstance(vkey, str)
            and isinstance(size, int)
            and not isinstance(size, bool)
            and size >= 0
        ):
            raise BadInput("/ledger/logs row has missing or mistyped fields")
        listings.append(LogListing(origin, log_id, vkey, size))
    return listings


def parse_entries_page(body: bytes) -> list[bytes]:
    """Parse an ``/entries`` answer (msgpack array of bin); raises BadInput otherwise."""
    try:
        page = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError) as exc:
        raise BadInput("entries answer is not msgpack") from exc
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadInput("entries answer is not msgpack") from exc
    if not isinstance(page, list) or not all(isinstance(e, bytes) for e in page):
        raise BadInput("entries answer is not an array of byte strings")
    return page


# Where fetched entries go, in index order, a page at a time.
EntrySink = Callable[[list[bytes]], None]


async def fetch_entries(
    session: aiohttp.ClientSession, base: str, log_id: str, size: int, start: int = 0
) -> list[bytes]:
    """Entries start..size-1 of a log from one node, as stream_entries reads them."""
    entries: list[bytes] = []
    await stream_entries(session, base, log_id, size, entries.extend, start)
    return entries


async def stream_entries(
    session: aiohttp.ClientSession,
    base: str,
    log_id: str,
    size: int,
    sink: EntrySink,
    start: int = 0,
) -> None:
    """Entries start..size-1 of a log from one node into ``sink``, several pages in flight.

    Whole entry bundles where the range covers them; an unaligned head (the rest of the
    partial bundle a previous read ended in) comes from ``/entries``, so that a rerun
    reads no entry twice. Raises BadInput if the log is larger than the auditor reads,
    or the node errs, answers garbage, or stops short of ``size``.
    """
    if size > MAX_LOG_ENTRIES:
        raise BadInput(f"a log of {size} entries is more than this auditor reads")
    url = f"{base}/ledger/logs/{log_id}/entries"
    aligned = min(size, -(-start // TILE_WIDTH) * TILE_WIDTH)
    if start < aligned:
        await fetch_entry_pages(session, url, start, aligned, sink)
    if not await fetch_entry_bundles(session, f"{base}/ledger/logs/{log_id}", size, sink, aligned):
        await fetch_entry_pages(session, url, aligned, size, sink)


class _InOrder:
    """Chunks fetched out of order, passed on to a sink in order as soon as they can be."""

    def __init__(self, sink: EntrySink, starts: Sequence[int]) -> None:
        self.sink, self.starts = sink, starts
        self.chunks: dict[int, list[bytes]] = {}
        self.next = 0

    def put(self, start: int, chunk: list[bytes]) -> None:
        self.chunks[start] = chunk
        while self.next < len(self.starts) and self.starts[self.next] in self.chunks:
            self.sink(self.chunks.pop(self.starts[self.next]))
            self.next += 1


async def fetch_entry_pages(
    session: aiohttp.ClientSession, url: str, first: int, size: int, sink: EntrySink
) -> None:
    """Entries first..size-1 from an ``/entries`` endpoint, several pages in flight."""
    order = _InOrder(sink, range(first, size, ENTRIES_PAGE))
    starts = iter(range(first, size, ENTRIES_PAGE))

    async def fetch_pages() -> None:
        for start in starts:  # shared: each page is fetched by one of the fetchers
            end = min(start + ENTRIES_PAGE, size)
            got: list[bytes] = []
            while start + len(got) < end:
                query = {"start": start + len(got), "end": end}
                page = parse_entries_page(await get_body(session, url, query))
                if not page:
                    raise BadInput(f"node stopped serving entries at {start + len(got)} of {size}")
                got.extend(page[: end - start - len(got)])
            order.put(start, got)

    await asyncio.gather(*(fetch_pages() for _ in range(PAGES_IN_FLIGHT)))


async def fetch_entry_bundles(
    session: aiohttp.ClientSession, prefix: str, size: int, sink: EntrySink, start: int = 0
) -> bool:
    """Entries start..size-1 (``start`` a multiple of 256) from a log's tlog-tiles entry
    bundles into ``sink``, several in flight; False if the node serves no tiles (its
    first bundle is 404). Raises BadInput like fetch_entries."""
    if start >= size:
        return True
    refs = entry_bundles(start, size)
    first = f"{prefix}/{refs[0].path()}"
    async with session.get(first, allow_redirects=False) as response:
        if response.status == 404:
            return False
        body = await read_bounded(response, MAX_RESPONSE_BYTES)
        if response.status != 200:
            raise BadInput(f"{first} answered {response.status}")
    order = _InOrder(sink, [ref.n for ref in refs])
    order.put(refs[0].n, parse_entry_bundle(body, refs[0].width))
    pending = iter(refs[1:])

    async def fetch() -> None:
        for ref in pending:  # shared: each bundle is fetched by one of the fetchers
            body = await get_body(session, f"{prefix}/{ref.path()}")
            order.put(ref.n, parse_entry_bundle(body, ref.width))

    await asyncio.gather(*(fetch() for _ in range(PAGES_IN_FLIGHT)))
    return True


async def fetch_served_log(
    session: aiohttp.ClientSession,
    base: str,
    listing: LogListing,
    scratch: Scratch,
    known: VerifiedPrefix | None = None,
) -> ServedLog:
    """One log as ``base`` serves it, its entries spooled to ``scratch``; a failure is
    recorded on the result, never raised.

    With ``known`` (the entries verified last time) only the entries after them are
    read, if they extend them to the checkpoint's root; otherwise (a rollback, a
    rewritten history) the whole log is read again and judged like any copy.
    """
    served = ServedLog(base, listing)
    url = f"{base}/ledger/logs/{listing.log_id}/checkpoint"
    spool: EntrySpool | None = None
    try:
        note = (await get_body(session, url)).decode()
        served.note = note
        body, _signatures = parse_note(note)
        claimed = Checkpoint.parse(body)
        if known is not None and known.size <= claimed.size:
            spool = scratch.spool(known.entries_from, known.size)
            await stream_entries(
                session, base, listing.log_id, claimed.size, spool.extend, known.size
            )
            served.entries_read = len(spool) - known.size
            if _extends(known.chain, spool.iter_from(known.size), claimed.root_hash):
                served.entries, served.resumed = spool, known
                return served
            spool.close()
        spool = scratch.spool()
        await stream_entries(session, base, listing.log_id, claimed.size, spool.extend)
        served.entries_read += len(spool)
        served.entries = spool
    except (BadInput, UnicodeDecodeError) as exc:
        served.error = str(exc)
    except (aiohttp.ClientError, TimeoutError, PeerUnreachable) as exc:
        served.error = f"connection failed while reading the log: {describe(exc)}"
    if served.error is not None and spool is not None:
        spool.close()
    return served


def _extends(chain: LogChain, new: Iterable[bytes], root: bytes) -> bool:
    """True if ``new`` entries after the ones ``chain`` walked give the tree ``root``."""
    grown = chain.copy()
    for raw in new:
        grown.push_leaf(leaf_hash(raw))
    return grown.root() == root


def checkpoint_size(note: str) -> int:
    """The tree size a signed note claims; raises BadInput if it is no checkpoint."""
    body, _signatures = parse_note(note)
    return Checkpoint.parse(body).size


async def fetch_view(
    session: aiohttp.ClientSession,
    url: str,
    scratch: Scratch,
    known: Mapping[str, VerifiedPrefix] | None = None,
) -> PeerView:
    """Everything one node serves, its logs' entries spooled to ``scratch``; raises
    PeerUnreachable if its API cannot be read. ``known``: entries verified last time, by
    origin (only what follows them is read)."""
    known = known or {}
    base = url.rstrip("/")
    try:
        health = _json(await get_body(session, f"{base}/healthz"), "/healthz")
        listings = parse_listing(
            _json(await get_body(session, f"{base}/ledger/logs"), "/ledger/logs")
        )
        equivocations = await _fetch_equivocations(session, base)
    except (aiohttp.ClientError, TimeoutError, BadInput, PeerUnreachable) as exc:
        raise PeerUnreachable(f"{base} is unreachable: {describe(exc)}") from exc
    origin = health.get("origin") if isinstance(health, dict) else None
    if not is_node_origin(origin):
        raise PeerUnreachable(f"{base}/healthz does not name the node's origin")
    logs = await asyncio.gather(
        *(fetch_served_log(session, base, lst, scratch, known.get(lst.origin)) for lst in listings)
    )
    view = PeerView(base, origin, list(logs), equivocations)
    try:
        view.roster = await _fetch_roster_log(session, base)
    except (BadInput, UnicodeDecodeError) as exc:
        view.roster_error = str(exc)
    except (aiohttp.ClientError, TimeoutError) as exc:
        view.roster_error = f"connection failed while reading the roster log: {describe(exc)}"
    return view


async def _fetch_roster_log(
    session: aiohttp.ClientSession, base: str
) -> tuple[str, list[bytes]] | None:
    """The roster log a node serves (node.edges.http.roster_api), or None if it has none."""
    url = f"{base}/federation/roster/log"
    async with session.get(url + "/checkpoint", allow_redirects=False) as response:
        if response.status == 404:
            return None
    note = (await get_body(session, url + "/checkpoint")).decode()
    size = checkpoint_size(note)
    if size > MAX_ROSTER_ENTRIES:
        raise BadInput(f"a roster log of {size} entries is more than a roster holds")
    entries: list[bytes] = []
    while len(entries) < size:
        query = {"start": len(entries), "end": size}
        page = parse_entries_page(await get_body(session, url + "/entries", query))
        if not page:
            raise BadInput(f"node stopped serving roster entries at {len(entries)} of {size}")
        entries.extend(page[: size - len(entries)])
        check_roster_log_bytes(entries)
    return note, entries


async def _fetch_equivocations(session: aiohttp.ClientSession, base: str) -> list[Any]:
    equivocations = f"{base}/ledger/equivocations"
    async with session.get(equivocations, allow_redirects=False) as response:
        if response.status == 404:  # a node without federation serves none
            return []
        body = await read_bounded(response, MAX_RESPONSE_BYTES)
        if response.status != 200:
            raise BadInput(f"{base}/ledger/equivocations answered {response.status}")
    document = _json(body, "/ledger/equivocations")
    if not isinstance(document, list):
        raise BadInput("/ledger/equivocations is not a JSON list")
    return document


async def collect(
    urls: list[str],
    scratch: Scratch,
    timeout: float = 30.0,
    ca_file: str = "",
    known: Mapping[str, VerifiedPrefix] | None = None,
) -> tuple[list[PeerView], list[str]]:
    """Views of every reachable node and the reasons the others were unreachable, the
    entries spooled to ``scratch``; ``https://`` nodes are trusted by ``ca_file``
    (peer_client.open_session). ``known``: each log's entries verified last time
    (node.services.audit_state)."""
    client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    async with open_session(ca_file, client_timeout) as session:
        results = await asyncio.gather(
            *(fetch_view(session, url, scratch, known) for url in urls), return_exceptions=True
        )
    views: list[PeerView] = []
    unreachable: list[str] = []
    for result in results:
        if isinstance(result, PeerUnreachable):
            unreachable.append(str(result))
        elif isinstance(result, BaseException):
            raise result
        else:
            views.append(result)
    return views, unreachable


# -- judging ------------------------------------------------------------------------------

# Seconds an access or receipt may wait for its other half before it is a violation.
DEFAULT_RECEIPT_GRACE = 300


def judge_accesses(checks: Iterable[AccessCheck]) -> list[Rule | None]:
    """consent.validate_token's refusal rule (None: allowed) for each planned access.

    In-process: the grants' signatures were checked once each (check_signatures), so
    what is left is cheaper than sending the checks to another process."""
    return [validate_token(c.token, c.request, c.view, c.policy).rule for c in checks]


@dataclass
class LogReport:
    """What the audit found for one log."""

    origin: str
    log_id: str
    vkey: str
    size: int
    sources: list[str]
    counts: dict[str, int]
    cosignatures: list[CosignatureStatus]
    verified: bool  # some node served an intact, validly signed copy
    entries_read: int = 0  # entries the nodes sent of it, all copies (the rest: the state)
    entries_judged: int = 0  # entries the consent rules walked (a rerun: the new ones)

    def as_json(self) -> dict[str, object]:
        return {
            "origin": self.origin,
            "log_id": self.log_id,
            "vkey": self.vkey,
            "size": self.size,
            "sources": self.sources,
            "counts": self.counts,
            "cosignatures": [
                {"name": c.name, "status": c.status, "timestamp": c.timestamp}
                for c in self.cosignatures
            ],
            "verified": self.verified,
            "entries_read": self.entries_read,
            "entries_judged": self.entries_judged,
        }


@dataclass
class AuditReport:
    logs: list[LogReport]
    violations: list[Violation]
    unreachable: list[str]
    checked_at: int
    # Every break-glass access, for review; those that broke the policy are flagged.
    break_glass: list[BreakGlassReview] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        """2 if a node was unreachable, else 1 if any rule was broken, else 0."""
        if self.unreachable:
            return 2
        return 1 if self.violations else 0

    def as_json(self) -> dict[str, object]:
        return {
            "clean": not self.violations and not self.unreachable,
            "checked_at": self.checked_at,
            "logs": [log.as_json() for log in self.logs],
            "violations": [v.as_json() for v in self.violations],
            "unreachable": self.unreachable,
            "break_glass": [b.as_json() for b in self.break_glass],
            "entries_read": sum(log.entries_read for log in self.logs),
            "entries_judged": sum(log.entries_judged for log in self.logs),
        }


def resolve_keys(
    views: Sequence[PeerView], saved: dict[str, SavedCheckpoint]
) -> tuple[dict[str, VerifierKey], list[Violation]]:
    """The key each log is verified from (its trust anchor), and unusable keys.

    The key pinned in the saved state wins; else the one the log's own node serves; else
    the one most nodes serve. A log's other keys are learned from its key_rotation
    entries (check_history); a node serving a key that is none of them is a violation
    (_check_copies).
    """
    claims: dict[str, dict[str, list[str]]] = {}
    own: dict[str, str] = {}
    for view in views:
        for served in view.logs:
            origin, vkey = served.listing.origin, served.listing.vkey
            claims.setdefault(origin, {}).setdefault(vkey, []).append(view.url)
            if view.origin == origin:
                own[origin] = vkey
    keys: dict[str, VerifierKey] = {}
    violations: list[Violation] = []
    for origin, by_vkey in sorted(claims.items()):
        pinned = saved[origin].vkey if origin in saved else None
        chosen = pinned or own.get(origin) or max(by_vkey, key=lambda k: len(by_vkey[k]))
        try:
            key = parse_verifier_key(chosen)
        except BadInput as exc:
            violations.append(Violation(origin, None, "key_mismatch", f"unusable key: {exc}"))
            continue
        if key.name != origin:
            violations.append(
                Violation(origin, None, "key_mismatch", f"the key names {key.name}, not the log")
            )
            continue
        keys[origin] = key
    return keys, violations


def audit_views(
    views: Sequence[PeerView],
    saved: dict[str, SavedCheckpoint],
    now: int,
    receipt_grace: int = DEFAULT_RECEIPT_GRACE,
    clock_skew: int = ConsentConfig().clock_skew_seconds,
    workers: Workers | None = None,
    unreachable: Sequence[str] = (),
    federation_key: str | None = None,
    scratch: Scratch | None = None,
) -> tuple[AuditReport, list[SavedCheckpoint]]:
    """Judge everything the nodes served; returns the report and the checkpoints to save.

    Logs showing a finding about their history (HISTORY_RULES) are not saved, so they
    keep being compared with the last good checkpoint until resolved; the other findings
    are judged again from the saved entries on every run. ``federation_key`` anchors
    the roster logs served (else each is read from its own first version). ``scratch``
    holds what the consent rules remember (a temporary one if None).
    """
    own_scratch = scratch is None
    scratch = scratch or Scratch()
    workers = workers or Workers()
    try:
        return _audit_views(
            views,
            saved,
            _Judging(now, receipt_grace, clock_skew, workers, scratch, views),
            unreachable,
            federation_key,
        )
    finally:
        if own_scratch:
            scratch.close()


def _audit_views(
    views: Sequence[PeerView],
    saved: dict[str, SavedCheckpoint],
    judging: _Judging,
    unreachable: Sequence[str],
    federation_key: str | None,
) -> tuple[AuditReport, list[SavedCheckpoint]]:
    keys, violations = resolve_keys(views, saved)
    judging.audited = {log_id_bytes(origin) for origin in keys}
    histories, best, judges, found = _check_copies(views, keys, judging)
    violations += found
    for origin, held in histories.items():
        violations += check_split_view(held)
        violations += locate_damage(held)
        if origin in saved:
            for copy in held:
                violations += check_against_saved(copy, saved[origin].size, saved[origin].root_hash)
    violations += _equivocations(views, keys)
    violations += check_witness_entries(best, {o: j.witnesses for o, j in judges.items()})
    reviews: list[BreakGlassReview] = []
    for origin in sorted(best):
        judged, reviewed = judges[origin].verdict()
        violations += judged
        reviews += reviewed
    violations += judging.receipts.violations(set(best), judging.now, judging.receipt_grace)
    violations += _roster(views, best, judges, federation_key)
    violations = _dedupe(violations)
    reports = _log_reports(views, keys, histories, best, judges)
    broken = {v.log for v in violations if v.rule in HISTORY_RULES}
    # The key pinned for next time is the log's current one (its chain leads back).
    to_save = [
        SavedCheckpoint(
            origin,
            str(h.signing_key),
            h.size,
            h.checkpoint.root_hash,
            h.note,
            h.source,
            judges[origin].saved(),
            h.edge,
        )
        for origin, h in sorted(best.items())
        if origin not in broken and h.checkpoint is not None and h.signing_key is not None
    ]
    report = AuditReport(reports, violations, list(unreachable), judging.now, reviews)
    return report, to_save


# The format of the judged state saved per log; a state of another is judged anew.
JUDGED_VERSION = 1
# Entries judged together: their grants' signatures are checked in one go (by the
# workers), then the entries walked; the batch is all the auditor holds decoded.
JUDGE_BATCH = 4096


class _Judging:
    """What judging one audit's logs shares: the clock, the workers, the scratch space
    and the receipt halves of every log."""

    def __init__(
        self,
        now: int,
        receipt_grace: int,
        clock_skew: int,
        workers: Workers,
        scratch: Scratch,
        views: Sequence[PeerView],
    ) -> None:
        self.now, self.receipt_grace, self.clock_skew = now, receipt_grace, clock_skew
        self.workers, self.scratch = workers, scratch
        self.receipts = ReceiptLedger(scratch.db)
        self.audited: set[bytes] = set()
        # Each entry's time is kept (8 bytes) only where a roster will judge the keys.
        self.rosters = any(view.roster is not None for view in views)


class _LogJudge:
    """The rules over one copy's entries, fed each entry as check_history walks it:
    what they remember is the consent state (on disk where it grows), not the entries."""

    def __init__(self, origin: str, source: str, size: int, judging: _Judging) -> None:
        self.origin, self.judging = origin, judging
        scratch = judging.scratch
        self.times_rule = EntryTimes(origin, source, judging.now, judging.clock_skew)
        grants = scratch.mapping(_grant_bytes, decode_grant)
        keys = scratch.mapping(_key_status_bytes, _key_status)
        active = scratch.mapping(bytes, bytes)
        holders = scratch.mapping(_int_bytes, _bytes_int)
        self.maps: dict[str, SpilledMap[Any]] = {
            "grants": grants,
            "keys": keys,
            "active": active,
            "holders": holders,
        }
        self.consent = ConsentWalk(origin, judging.clock_skew, grants=grants, keys=keys)
        self.break_glass = BreakGlassWalk(origin, active=active, holders=holders)
        self.kinds: Counter[str] = Counter()
        # The log's key rotations (index, bytes): a rerun's structural check starts from them.
        self.rotations: list[tuple[int, bytes]] = []
        self.witnesses: list[tuple[int, Witness]] = []
        self.times = array("q") if judging.rosters else None
        self.walk = judging.receipts.new_walk()
        self.large = size >= PARALLEL_THRESHOLD
        self.batch: list[tuple[int, LedgerEntry]] = []
        # The batch before, its signatures being checked meanwhile.
        self.pending: tuple[list[tuple[int, LedgerEntry]], Callable[[], SignatureChecks]] | None
        self.pending = None
        self.violations: list[Violation] = []
        self.walked = 0  # entries walked in this run

    def observe(self, index: int, entry: LedgerEntry | None) -> None:
        self.walked += 1
        if entry is not None:  # a copy with an undecodable entry is not judged
            self.batch.append((index, entry))
            if len(self.batch) >= JUDGE_BATCH:
                self._next_batch()

    def _next_batch(self) -> None:
        """Start the signature checks of the batch read, then judge the one before it:
        the workers verify a batch while this process decodes the next."""
        started = check_signatures([e for _, e in self.batch], self.judging.workers, self.large)
        previous, self.pending = self.pending, (self.batch, started)
        self.batch = []
        if previous is not None:
            self._judge_batch(*previous)

    def _judge_batch(
        self, batch: list[tuple[int, LedgerEntry]], checked: Callable[[], SignatureChecks]
    ) -> None:
        judging = self.judging
        signatures = checked()
        checks: list[AccessCheck] = []
        for index, entry in batch:
            self.times_rule.feed(index, entry)
            self.break_glass.feed(index, entry)
            self.kinds[entry.kind] += 1
            if (witness := witness_claim(entry, judging.audited)) is not None:
                self.witnesses.append((index, witness))
            if self.times is not None:
                self.times.append(entry.time)
            if entry.kind == KeyRotation.kind:
                self.rotations.append((index, encode_entry(entry)))
            judging.receipts.feed(self.origin, index, entry, self.walk)
            check = self.consent.feed(index, entry, signatures)
            if check is not None:
                checks.append(check)
        for check, rule in zip(checks, judge_accesses(checks), strict=True):
            violation = access_violation(check, rule)
            if violation is not None:
                self.violations.append(violation)

    def finish(self) -> None:
        self._next_batch()
        self._next_batch()  # the last batch was only started

    def discard(self) -> None:
        """The copy turned out not to be the one judged: forget its receipt halves."""
        self.judging.receipts.forget(self.walk)

    def verdict(self) -> tuple[list[Violation], list[BreakGlassReview]]:
        reviews, found = self.break_glass.done()
        violations = self.violations + self.times_rule.done() + self.consent.findings.done()
        return violations + found, reviews

    def saved(self) -> JudgedRows:
        """What the walk left, for the state: a rerun resumes from it (``resume``)."""
        state = {
            "version": JUDGED_VERSION,
            "times_rule": self.times_rule.state(),
            "consent": self.consent.state(),
            "break_glass": self.break_glass.state(),
            "kinds": dict(self.kinds),
            "witnesses": [[i, w.wire_fields()] for i, w in self.witnesses],
            "violations": [violation_state(v) for v in self.violations],
            "rotations": self.rotations,
            "times": None if self.times is None else self.times.tobytes(),
        }
        halves = self.judging.receipts.halves(self.origin, self.walk)
        maps = {name: mapping.rows() for name, mapping in self.maps.items()}
        return JudgedRows(msgpack.packb(state), maps, halves)

    def resume(self, prefix: VerifiedPrefix) -> Walked | None:
        """Start from what judging the log's saved prefix left; returns where its
        structural check stands, or None (nothing taken) if that state is not usable
        for this audit (none, saved by another version, or without the entry times a
        roster now needs). Raises BadInput if the saved state is garbage."""
        saved = prefix.judged
        if saved is None:
            return None
        try:
            state = msgpack.unpackb(saved.state)
            if not isinstance(state, dict) or state.get("version") != JUDGED_VERSION:
                return None
            if self.times is not None and state["times"] is None:
                return None
            self.times_rule.restore(state["times_rule"])
            self.consent.restore(state["consent"])
            self.break_glass.restore(state["break_glass"])
            self.kinds = Counter(state["kinds"])
            self.witnesses = [(i, Witness(**fields)) for i, fields in state["witnesses"]]
            self.violations = [Violation(*v) for v in state["violations"]]
            self.rotations = [(i, raw) for i, raw in state["rotations"]]
            rotations = tuple((i, decode_entry(raw)) for i, raw in self.rotations)
            if self.times is not None:
                self.times.frombytes(state["times"])
        except (BadInput, ValueError, TypeError, KeyError, msgpack.exceptions.ExtraData) as exc:
            raise BadInput(f"audit state of {self.origin} is corrupt: {exc}") from exc
        for name, mapping in self.maps.items():
            mapping.load(saved.map_rows(name))
        self.judging.receipts.restore(self.origin, saved.halves(), self.walk)
        return Walked(prefix.chain, rotations)


def _grant_bytes(token: GrantToken) -> bytes:
    return token.raw


def _key_status_bytes(status: KeyStatus) -> bytes:
    return bytes([status.retired]) + status.subject


def _key_status(raw: bytes) -> KeyStatus:
    return KeyStatus(raw[1:], bool(raw[0]))


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


def _bytes_int(raw: bytes) -> int:
    return int.from_bytes(raw, "big", signed=True)


def _roster(
    views: Sequence[PeerView],
    best: Mapping[str, History],
    judges: Mapping[str, _LogJudge],
    federation_key: str | None,
) -> list[Violation]:
    """The roster findings: logs that do not verify, versions that fork, and members'
    logs under keys the roster of the time does not name (judged by the longest roster)."""
    served: list[ServedRoster] = []
    violations: list[Violation] = []
    for view in views:
        if view.roster_error is not None:
            violations.append(Violation(view.url, None, "roster_invalid", view.roster_error))
        if view.roster is None:
            continue
        note, entries = view.roster
        try:
            notes = roster_notes(entries)
            anchor = (federation_key or open_roster(notes[0])[0].key) if notes else ""
            versions = verify_roster_log(anchor, note, entries)
        except (BadInput, Unauthorized) as exc:
            detail = f"the roster log served does not verify: {exc}"
            violations.append(Violation(view.url, None, "roster_invalid", detail, view.url))
            continue
        served.append(ServedRoster(view.url, versions[0].federation, tuple(versions)))
    violations += check_roster_equivocation(served)
    if served:
        longest = max(served, key=lambda r: r.versions[-1].version)
        for origin, history in best.items():
            times = judges[origin].times
            if origin != longest.federation and times is not None:
                violations += check_keys_in_roster(history, longest.versions, times)
    return violations


def confirmed_keys(views: Sequence[PeerView]) -> dict[str, bytes]:
    """For each log, the key every other member serving it pins, when they all agree.

    That is the roster's confirmation a compromised-key rotation needs: members list a
    mirror under a new key only once they followed it (or their operator confirmed it).
    """
    served: dict[str, set[str]] = {}
    for view in views:
        for log in view.logs:
            if view.origin != log.listing.origin:
                served.setdefault(log.listing.origin, set()).add(log.listing.vkey)
    confirmed = {}
    for origin, vkeys in served.items():
        if len(vkeys) == 1:
            with contextlib.suppress(BadInput):
                confirmed[origin] = parse_verifier_key(next(iter(vkeys))).public_key
    return confirmed


def _key_for_copy(note: str, anchor: VerifierKey, chain: KeyChain | None) -> VerifierKey:
    """The trusted key to check one copy from: the key in force at its checkpoint's size."""
    if chain is None:
        return anchor
    try:
        size = checkpoint_size(note)
    except BadInput:
        return anchor
    return chain.verifier_key_at(size)


def _listed_key_problem(served: ServedLog, history: History, url: str) -> Violation | None:
    """A key_mismatch if the node lists the log under a key that is none of the log's."""
    if history.chain is None:
        return None
    try:
        listed = parse_verifier_key(served.listing.vkey)
    except BadInput as exc:
        return Violation(history.origin, None, "key_mismatch", f"unusable key: {exc}", url)
    if listed.name == history.origin and history.chain.holds(listed.public_key):
        return None
    detail = f"{url} serves a key that is none of the keys of the log"
    return Violation(history.origin, None, "key_mismatch", detail, url)


def _rereader(entries: EntrySource) -> Callable[[], Iterable[bytes]] | None:
    """How to read a spooled copy again (a list is held already: its leaves are kept)."""
    if isinstance(entries, EntrySpool):
        return lambda: entries_from(entries)
    return None


def _claimed_size(served: ServedLog) -> int:
    try:
        return checkpoint_size(served.note) if served.note is not None else 0
    except BadInput:
        return 0


def _check_copies(
    views: Sequence[PeerView], keys: dict[str, VerifierKey], judging: _Judging
) -> tuple[dict[str, list[History]], dict[str, History], dict[str, _LogJudge], list[Violation]]:
    """The structural checks of every copy of every log, each node's copy on its own,
    and the consent rules over the copy judged of each log: the largest intact one, the
    log's own node's first among equals.

    Copies are walked largest first, so the first intact one is the copy judged, and the
    consent rules walk it in the same pass as its structure (each entry decoded once).
    The largest copy's key chain gives the key each smaller copy's checkpoint is checked
    under (a node that has not followed a rotation serves an older, shorter copy).
    """
    confirmed = confirmed_keys(views)
    node_of = {view.url: view.origin for view in views}
    histories: dict[str, list[History]] = {origin: [] for origin in keys}
    best: dict[str, History] = {}
    judges: dict[str, _LogJudge] = {}
    violations: list[Violation] = []
    copies: dict[str, list[tuple[int, PeerView, ServedLog]]] = {origin: [] for origin in keys}
    for view in views:
        for served in view.logs:
            held = copies.get(served.listing.origin)
            if held is not None:
                held.append((len(held), view, served))
    for origin, held in copies.items():
        key = keys[origin]
        ranked = sorted(
            held,
            key=lambda c: (_claimed_size(c[2]), node_of[c[1].url] == origin),
            reverse=True,
        )
        chain: KeyChain | None = None
        # Where the state's verified prefix of the log leaves the checks, once resumed.
        walked: Walked | None = None
        # The copies judged whole and intact, that other copies may equal.
        verified: list[History] = []
        checked: dict[int, History] = {}
        for position, view, served in ranked:
            if served.error is not None:
                violations.append(
                    Violation(origin, None, "entries_unavailable", served.error, view.url)
                )
                continue
            if served.note is None:  # listed empty and never signed
                continue
            note, prefix = served.note, served.resumed
            # A copy extending the state's verified prefix is hashed from its end on.
            hashed_from = 0 if prefix is None else prefix.size
            resumed_chain = None if prefix is None else prefix.chain
            same = next(
                (
                    copy
                    for v in verified
                    if (
                        copy := check_same_copy(
                            v,
                            view.url,
                            note,
                            entries_from(served.entries, hashed_from),
                            resumed_chain,
                        )
                    )
                ),
                None,
            )
            if same is not None:
                history = same
            else:
                judge = None
                resumable = walked is not None
                if origin not in best:
                    size = _claimed_size(served)
                    judge = _LogJudge(origin, view.url, size, judging)
                    judged = judge.resume(prefix) if prefix is not None else None
                    walked, resumable = walked or judged, judged is not None
                # Walked from the saved prefix's end when the rules resume there too.
                start = prefix.size if prefix is not None and resumable else 0
                history, found = check_history(
                    origin,
                    _key_for_copy(note, key, chain),
                    view.url,
                    note,
                    entries_from(served.entries, start),
                    confirmed_key=confirmed.get(origin),
                    observe=judge.observe if judge is not None else None,
                    resume=walked if start else None,
                    reread=_rereader(served.entries),
                )
                violations += found
                chain = chain or history.chain
                if history.intact:
                    verified.append(history)
                if judge is not None:
                    if history.intact:
                        judge.finish()
                        best[origin], judges[origin] = history, judge
                    else:
                        judge.discard()
            problem = _listed_key_problem(served, history, view.url)
            if problem is not None:
                violations.append(problem)
            checked[position] = history
        histories[origin] = [checked[p] for p in sorted(checked)]
    # Every key of every node, for its cosignatures made before or after it rotated.
    all_keys: dict[str, list[VerifierKey]] = {name: [key] for name, key in keys.items()}
    for origin, held_histories in histories.items():
        for history in held_histories:
            all_keys[origin] += history.chain.verifier_keys() if history.chain else []
    for held_histories in histories.values():
        for history in held_histories:
            violations += check_cosignatures(history, all_keys)
    return histories, best, judges, violations


def _log_reports(
    views: Sequence[PeerView],
    keys: dict[str, VerifierKey],
    histories: dict[str, list[History]],
    best: dict[str, History],
    judges: Mapping[str, _LogJudge],
) -> list[LogReport]:
    sources: dict[str, list[str]] = {}
    read: dict[str, int] = {}
    for view in views:
        for served in view.logs:
            sources.setdefault(served.listing.origin, []).append(view.url)
            read[served.listing.origin] = read.get(served.listing.origin, 0) + served.entries_read
    reports = []
    for origin in sorted(sources):
        chosen = best.get(origin)
        key = keys.get(origin)
        largest = max((h.size for h in histories.get(origin, [])), default=0)
        reports.append(
            LogReport(
                origin=origin,
                log_id=log_id(origin),
                vkey=str(key) if key else "",
                size=chosen.size if chosen else largest,
                sources=sources[origin],
                counts=count_kinds(judges[origin].kinds) if chosen else {},
                cosignatures=chosen.cosignatures if chosen else [],
                verified=chosen is not None,
                entries_read=read[origin],
                entries_judged=judges[origin].walked if chosen else 0,
            )
        )
    return reports


def locate_damage(held: Sequence[History]) -> list[Violation]:
    """Name the first damaged entry of a broken copy, by an intact copy of the same checkpoint."""
    violations = []
    intact = {(h.size, h.checkpoint.root_hash): h for h in held if h.intact and h.checkpoint}
    for history in held:
        if history.intact or history.checkpoint is None or not history.leaf_hashes:
            continue
        good = intact.get((history.size, history.checkpoint.root_hash))
        if good is None:
            continue
        index = first_difference(history.leaf_hashes, good.leaf_hashes)
        if index is not None:
            detail = f"entry {index} differs from the copy {good.source} serves, which verifies"
            violations.append(
                Violation(history.origin, index, "root_mismatch", detail, history.source)
            )
    return violations


def _equivocations(views: Sequence[PeerView], keys: dict[str, VerifierKey]) -> list[Violation]:
    """Equivocation proofs served by nodes, each verified on its own before it counts."""
    violations = []
    for view in views:
        for document in view.equivocations:
            try:
                proof = EquivocationProof.from_json(document)
                key = keys.get(proof.origin)
                if key is None:
                    continue  # about a log no node serves: no key to check it with
                verified = verify_equivocation(proof, key)
            except (BadInput, Unauthorized):
                continue  # a proof that does not hold proves nothing
            violations.append(
                Violation(proof.origin, None, "equivocation", verified.reason, view.url)
            )
    return violations


def check_signatures(
    entries: Sequence[LedgerEntry], workers: Workers, large: bool = False
) -> Callable[[], SignatureChecks]:
    """Decode and verify every grant and revocation among ``entries`` (each distinct one
    once), started in the workers; the function returned waits for the results.
    ``large``: part of a log large enough for the worker processes."""
    grants, revocations = signed_items(entries)
    grant_list, revocation_list = sorted(set(grants)), sorted(set(revocations))
    grants_checked = workers.submit(verify_grants, grant_list, large)
    revocations_checked = workers.submit(verify_revocations, revocation_list, large)
    return lambda: _signature_checks(
        grant_list, grants_checked(), revocation_list, revocations_checked()
    )


def _signature_checks(
    grant_list: list[bytes],
    grant_results: list[tuple[GrantToken | None, bool]],
    revocation_list: list[bytes],
    revocation_results: list[tuple[Revocation | None, bool]],
) -> SignatureChecks:
    return SignatureChecks(
        grants={raw: token for raw, (token, _) in zip(grant_list, grant_results, strict=True)},
        grants_valid=frozenset(
            raw for raw, (_, ok) in zip(grant_list, grant_results, strict=True) if ok
        ),
        revocations={
            raw: rev for raw, (rev, _) in zip(revocation_list, revocation_results, strict=True)
        },
        revocations_valid=frozenset(
            raw for raw, (_, ok) in zip(revocation_list, revocation_results, strict=True) if ok
        ),
    )


def _dedupe(violations: list[Violation]) -> list[Violation]:
    """Each finding once, in a stable order: by log, then index, then rule."""
    unique = {(v.log, v.index, v.rule, v.detail): v for v in violations}
    return sorted(
        unique.values(),
        key=lambda v: (v.log, -1 if v.index is None else v.index, v.rule, v.source or ""),
    )


def run_audit(
    urls: list[str],
    state: AuditState | None,
    now: int,
    receipt_grace: int = DEFAULT_RECEIPT_GRACE,
    timeout: float = 30.0,
    ca_file: str = "",
    federation_key: str | None = None,
) -> AuditReport:
    """Mirror, verify and judge every log the nodes at ``urls`` serve.

    With ``state``, only the entries after each log's saved checkpoint are read, and the
    logs whose history verified are saved with their entries. Raises BadInput if the state
    directory is corrupt, tampered, or holds another federation's logs.
    """
    with _few_collections():
        return _run_audit(urls, state, now, receipt_grace, timeout, ca_file, federation_key)


# Allocations between young-generation collections while auditing (Python's default: 700).
AUDIT_GC_THRESHOLD = 100_000


@contextlib.contextmanager
def _few_collections() -> Iterator[None]:
    """The cyclic collector run less often: an audit allocates millions of short-lived
    objects (decoded entries, a batch at a time), which the default thresholds would
    scan again and again, and it makes few reference cycles for the collector to free."""
    before = gc.get_threshold()
    gc.set_threshold(AUDIT_GC_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _run_audit(
    urls: list[str],
    state: AuditState | None,
    now: int,
    receipt_grace: int,
    timeout: float,
    ca_file: str,
    federation_key: str | None,
) -> AuditReport:
    saved = state.load() if state is not None else {}
    known: dict[str, VerifiedPrefix] = {}
    if state is not None:
        for origin in saved:
            prefix = state.verified_prefix(origin)
            if prefix is not None:
                known[origin] = prefix
    scratch = Scratch()
    workers = Workers()
    try:
        views, unreachable = asyncio.run(collect(urls, scratch, timeout, ca_file, known))
        refuse_foreign_state(saved, views)
        report, to_save = audit_views(
            views,
            saved,
            now,
            receipt_grace,
            workers=workers,
            unreachable=unreachable,
            federation_key=federation_key,
            scratch=scratch,
        )
        if state is not None:
            save_verified(state, to_save, views)
    finally:
        workers.close()
        scratch.close()
    return report


def refuse_foreign_state(saved: Mapping[str, SavedCheckpoint], views: Sequence[PeerView]) -> None:
    """BadInput if the state holds logs but the nodes serve none of them: it was saved
    auditing another federation, and judging against it would report nothing useful."""
    served = {log.listing.origin for view in views for log in view.logs}
    if saved and served and not served & set(saved):
        raise BadInput(
            f"the audit state holds the logs of {', '.join(sorted(saved))}, none of which the"
            " nodes serve: it belongs to another federation; use another --state directory"
        )


def save_verified(
    state: AuditState, to_save: Sequence[SavedCheckpoint], views: Sequence[PeerView]
) -> None:
    """Save each clean log's checkpoint with the entries of the copy that was judged and
    what judging them left (a rerun judges only what follows)."""
    copies = {(view.url, log.listing.origin): log for view in views for log in view.logs}
    for checkpoint in to_save:
        copy = copies.get((checkpoint.source or "", checkpoint.origin))
        entries = copy.entries if copy is not None else None
        kept = entries if entries is not None and len(entries) == checkpoint.size else None
        if kept is None or not checkpoint.size:
            state.save(checkpoint)
        else:
            state.save(checkpoint, kept, checkpoint.judged, checkpoint.edge)
