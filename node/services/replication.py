"""Replication, witnessing and equivocation detection of every member's log.

Every member's checkpoints are verified and witnessed; the entries of a log are mirrored
only if ``[federation] mirror`` says so: ``"all"`` (an archive) mirrors every log,
``"dealings"`` those of members this node deals with (node.core.dealings: read from its
own log, and from each fetch it starts) plus ``mirror_also``. Of a log not mirrored only
the latest verified checkpoint is kept; a checkpoint of another size is judged against
it by a consistency proof fetched from whoever serves the larger tree, and a split view
is proven from that tree's hashes, streamed once and not stored.

One task follows each member. A round asks the member for ``GET /ledger/logs`` (small),
and for each log listed whose size or root differs from ours fetches the signed checkpoint,
verifies it with the log's roster key, fetches the missing entries in batches and hands
them to ``MirrorLog.extend``, which checks signature, well-formedness, hash chain and
Merkle root before storing anything. Logs a member mirrors of other members are fetched
from it too (its copy is verified against the same keys), so a node cut off from a log's
own node still converges, and two views of one log are compared (split-view detection).

Witnessing is C2SP tlog-witness (node.services.witness): when this node's log grows it
asks every member to cosign the new checkpoint with ``POST /witness/add-checkpoint``
(the witnessing task runs on this service's session). ``POST /p2p/cosignature`` still
takes a cosignature pushed by a node of the earlier protocol.

Two validly signed checkpoints of one log that cannot both hold (same size and another
root; a smaller one whose root is not our prefix's root; or a larger one whose tree, read
whole from whoever serves it, has another prefix than ours) are an equivocation. It is
kept as a self-contained proof (node.core.equivocation: the notes, plus the larger tree's
root at the smaller size and its consistency proof), durably, served, pushed to every
member, logged, and that log's new entries are no longer accepted. A proof a member
reports is kept only if it verifies here with the log's roster key alone.

A down or slow member stalls only its own task (timeouts, exponential backoff). When
this node's own log grows, it tells every member at once (``POST /p2p/notify``) so that
they fetch without waiting for their next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
import yarl

from node.core import atna, notes
from node.core.base64url import b64_decode
from node.core.dealings import counterparts, mirrors_log
from node.core.equivocation import EquivocationProof, VerifiedEquivocation, verify_equivocation
from node.core.keys import verifier_key_string
from node.core.merkle import EMPTY_ROOT, StreamingConsistency, leaf_hash, verify_consistency
from node.core.origins import log_id
from node.core.roster import Member
from node.core.tiles import entry_bundles, parse_entry_bundle
from node.errors import BadInput, Conflict, ImageShareError, Unauthorized
from node.services.federation_roster import federated
from node.services.peer_client import (
    MAX_ERROR_BYTES,
    node_signed_headers,
    open_session,
    read_bounded,
)
from node.services.roster import RosterService, move_member_key
from node.services.runtime import NodeRuntime
from node.store.backends import open_federation_state
from node.store.federation_state import Equivocation
from node.store.ledger import LedgerStoreBase, MirrorLog, OwnLog

log = logging.getLogger(__name__)

ENTRY_BATCH = 1000
MAX_CHECKPOINT_BYTES = 64 * 1024
MAX_LISTING_BYTES = 4 * 1024 * 1024
MAX_BATCH_BYTES = 64 * 1024 * 1024
# A catch-up is verified and stored in one step against one signed checkpoint.
MAX_CATCHUP_BYTES = 512 * 1024 * 1024
OWN_LOG_CHECK_INTERVAL = 0.1
# One request per this many seconds to a member that is down costs nothing.
MAX_BACKOFF = 10.0
# Proofs are pushed when found; pulling them this often catches those a node missed.
PROOF_PULL_INTERVAL = 60.0
# What one replication round may run into; none of it stops the follower.
PeerError = (
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ImageShareError,
    ValueError,
)


class PeerFailure(Exception):
    """A member answered wrongly or not at all; its task backs off and retries."""


@dataclass
class PeerStatus:
    """What the follower of one member knows, for GET /admin/api/federation."""

    url: str = ""
    reachable: bool | None = None
    last_success: float | None = None
    last_error: str = ""
    failures: int = 0
    size_there: int | None = None
    proofs_pulled_at: float = float("-inf")
    # The largest size of its own log the member announced in a signed notify.
    hinted_size: int = 0
    # Log IDs whose copy at this member was last judged at (its listed size and root, our
    # size), so that a listing whose root we cannot confirm is not fetched every round.
    compared: dict[str, tuple[int, bytes | None, int]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "reachable": self.reachable,
            "last_success": self.last_success,
            "last_error": self.last_error,
            "failures": self.failures,
            "size_there": self.size_there,
        }


@dataclass
class Traffic:
    """HTTP bytes this node's replication client sent and received (headers included)."""

    requests: int = 0
    bytes_out: int = 0
    bytes_in: int = 0

    def trace(self) -> aiohttp.TraceConfig:
        """An aiohttp trace that counts requests, headers and request bodies."""

        def header_bytes(first_line: str, headers: Any) -> int:
            # "Name: value\r\n" per header, the first line and the blank line.
            return len(first_line) + 4 + sum(len(k) + len(v) + 4 for k, v in headers)

        async def headers_sent(_s: Any, _c: Any, params: Any) -> None:
            self.requests += 1
            line = f"{params.method} {params.url.raw_path_qs} HTTP/1.1"
            self.bytes_out += header_bytes(line, params.headers.items())

        async def chunk_sent(_s: Any, _c: Any, params: Any) -> None:
            self.bytes_out += len(params.chunk)

        async def request_end(_s: Any, _c: Any, params: Any) -> None:
            raw = params.response.raw_headers
            self.bytes_in += header_bytes(
                "HTTP/1.1 200 OK", ((k.decode(), v.decode()) for k, v in raw)
            )

        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(headers_sent)
        trace.on_request_chunk_sent.append(chunk_sent)
        trace.on_request_end.append(request_end)
        return trace

    def as_json(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes_out": self.bytes_out, "bytes_in": self.bytes_in}


@dataclass(frozen=True)
class ListedLog:
    """One row of a member's ``GET /ledger/logs``: whose log, served where, claiming what."""

    member: Member
    url: str
    claim: tuple[int, bytes | None]  # the listed size and root
    direct: bool  # served by the log's own node


class ReplicationService:
    """The background service behind replication, witnessing and the /p2p routes."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.settings = runtime.config.federation
        self.roster: RosterService = runtime.services.roster
        self.state = open_federation_state(runtime.config)
        self.peers: dict[str, PeerStatus] = {}
        self.ignored_by_discovery: dict[str, str] = {}
        self._distrusted = self.state.equivocating_logs()
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._witnessing: asyncio.Task[None] | None = None
        self.traffic = Traffic()
        self._own: OwnLog | None = None
        self._mirrors: dict[tuple[str, str], MirrorLog] = {}
        self._extend_locks: dict[str, asyncio.Lock] = {}
        self._dealings = self.state.dealings()
        self._dealings_scanned = self.state.dealings_scanned()

    # ---- the ledger store ----------------------------------------------------------------

    def _store(self) -> LedgerStoreBase:
        """The ledger service's store: one store for the own log and the mirrors."""
        return self.runtime.services.ledger.store

    def _own_log(self) -> OwnLog:
        if self._own is None:
            identity = self.runtime.identity
            self._own = self._store().own_log(identity.origin, identity.vkey)
        return self._own

    def _mirror(self, member: Member) -> MirrorLog:
        # Opening a log is a write transaction: do it once per member and key.
        key = (member.origin, member.vkey)
        mirror = self._mirrors.get(key)
        if mirror is None:
            try:
                mirror = self._store().mirror(member.origin, member.vkey)
            except Conflict:
                # The roster pins a key the mirror has not rotated to yet: an operator
                # confirmed a compromised-key rotation; the mirror's chain still decides.
                held = self._store().log_by_id(member.log_id)
                if not isinstance(held, MirrorLog):
                    raise
                mirror = held
            self._mirrors[key] = mirror
        return mirror

    def _verified_or_claimed(self, mirror: MirrorLog, note: str, direct: bool) -> notes.Checkpoint:
        """The checkpoint of ``note``, verified by the key in force at its size.

        A checkpoint beyond what is held, served by the log's own node, may be signed by a
        key that the entries in between rotate to: it is returned unverified, and
        MirrorLog.extend verifies the rotation and the signature before anything is
        stored. A copy served by another member must verify at once: otherwise anyone
        could make this node download a large catch-up for a checkpoint nobody signed
        (once the rotation is followed from the log's node, copies verify again). Raises
        BadInput or Unauthorized like notes.verify_note.
        """
        held = mirror.size()
        claimed = notes.Checkpoint.parse(notes.parse_note(note)[0])
        try:
            return notes.verify_note(note, mirror.vkey_at(min(claimed.size, held)))
        except Unauthorized:
            if claimed.size <= held or not direct:
                raise
            return claimed

    def _follow_rotation(self, log_member: Member, mirror: MirrorLog) -> None:
        """Pin the roster to the key the member's log now has in force, once proven there.

        Only forward: a roster key the mirror's chain does not hold yet is an operator's
        confirmation of a compromised-key rotation still to come, and stays.
        """
        vkey = mirror.vkey
        chain = mirror.key_chain()
        if vkey == log_member.vkey or chain is None or not chain.holds(log_member.public_key):
            return
        if federated(self.runtime.config):
            return  # in a federation the member's key moves with a new roster version
        move_member_key(self.runtime.config, log_member.origin, vkey)
        log.warning("%s rotated its key; the roster follows: %s", log_member.origin, vkey)
        self.runtime.security_audit.record(
            atna.configuration_changed,
            "imageshare",
            "federation member key rotated",
            log_member.origin,
        )

    # ---- which logs are mirrored ---------------------------------------------------------

    def mirrors(self, origin: str) -> bool:
        """True if this node copies the entries of ``origin``'s log, not only its checkpoints."""
        return mirrors_log(self.settings.mirror, origin, self._dealings, self.settings.mirror_also)

    def start_dealing(self, origin: str) -> None:
        """This node deals with ``origin`` from now on: mirror its log, from its start."""
        try:
            self._keep_dealings({origin}, None)
        except ImageShareError as exc:
            # The own log's entries name it again once the dealing is recorded there.
            log.warning("cannot keep the dealing with %s: %s", origin, exc)

    def _keep_dealings(self, origins: set[str], scanned_size: int | None) -> None:
        origins = {o for o in origins if o != self.runtime.config.origin}
        if not origins - self._dealings and scanned_size is None:
            return
        new = self.state.add_dealings(origins, scanned_size, int(time.time()))
        self._dealings |= new
        if scanned_size is not None:
            self._dealings_scanned = scanned_size
        for origin in sorted(new):
            log.info("dealing with %s: its log is mirrored from now on", origin)
            self.wake(origin)

    def _read_dealings(self, size: int) -> set[str]:
        """The members this node's own log entries from the last read up to ``size`` name."""
        own, found = self._own_log(), set()
        for start in range(self._dealings_scanned, size, ENTRY_BATCH):
            for raw in own.entries(start, min(size, start + ENTRY_BATCH)):
                found |= counterparts(raw, self.runtime.config.origin)
        return found

    async def _follow_own_log(self, size: int) -> None:
        if size > self._dealings_scanned:
            found = await asyncio.to_thread(self._read_dealings, size)
            self._keep_dealings(found, size)

    # ---- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=self.settings.request_timeout, connect=self.settings.request_timeout
        )
        self._session = open_session(
            self.runtime.config.http.trusted_ca_file,
            timeout,
            limit_per_host=4,
            trace_configs=[self.traffic.trace()],
        )
        self._supervisor = asyncio.create_task(self._supervise())
        self._witnessing = asyncio.create_task(self.runtime.services.witness.run(self._session))

    async def stop(self) -> None:
        tasks = [
            t
            for t in (self._supervisor, self._witnessing, *self._tasks.values(), *self._background)
            if t
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def close(self) -> None:
        self.state.close()

    async def _supervise(self) -> None:
        """Keep one follower per member; tell members when this node's log grows."""
        announced = -1  # forces one notify at start, so peers reset their backoff
        last_roster_check = 0.0
        while True:
            now = time.monotonic()
            if now - last_roster_check >= 1.0:
                last_roster_check = now
                self._reconcile_followers()
            try:
                size = self._own_log().size()
                if size != announced:
                    announced = size
                    self._notify_all(size)
                    self.runtime.services.witness.log_grew()
                    await self._follow_own_log(size)
            except PeerError as exc:
                log.warning("cannot read this node's own log: %s", exc)
            await asyncio.sleep(OWN_LOG_CHECK_INTERVAL)

    def _reconcile_followers(self) -> None:
        members = {m.origin: m for m in self.roster.roster}
        for origin in list(self._tasks):
            if origin not in members:
                self._tasks.pop(origin).cancel()
        for origin in members:
            task = self._tasks.get(origin)
            if task is None or task.done():
                self._wake[origin] = asyncio.Event()
                self.peers.setdefault(origin, PeerStatus())
                self._tasks[origin] = asyncio.create_task(self._follow(origin))

    # ---- following one member ------------------------------------------------------------

    async def _follow(self, origin: str) -> None:
        status, wake = self.peers[origin], self._wake[origin]
        while True:
            wake.clear()
            member = self.roster.roster.get(origin)
            if member is None:
                return
            delay = self.settings.replicate_interval
            try:
                await self._sync_member(member, status)
                if status.failures:
                    # Back after a failure (or a partition): say so, so that the member
                    # retries us now rather than when its own backoff ends.
                    self._hello(member)
                status.reachable, status.last_success, status.failures = True, time.time(), 0
                status.last_error = ""
            except (PeerFailure, *PeerError) as exc:
                status.reachable = False
                status.failures += 1
                status.last_error = str(exc) or type(exc).__name__
                delay = min(delay * 2**status.failures, max(delay, MAX_BACKOFF))
                log.info("replication from %s failed: %s", origin, status.last_error)
            except Exception:
                # A bug must not end replication from this member: log it and retry later.
                log.exception("replication from %s failed unexpectedly", origin)
                status.reachable, status.last_error = False, "internal error"
                status.failures += 1
                delay = MAX_BACKOFF
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)

    def wake(self, origin: str) -> None:
        event = self._wake.get(origin)
        if event is not None:
            event.set()

    def heard_from(self, origin: str) -> None:
        """A member just reached us: it is up, so retry it now rather than after backoff."""
        status = self.peers.get(origin)
        if status is not None and status.failures:
            status.failures = 0
            self.wake(origin)

    def notify_received(self, origin: str, hinted_log_id: str, size: int) -> None:
        """A member says a log grew: fetch now, unless we already hold that size."""
        member = self.roster.roster.by_log_id(hinted_log_id)
        status = self.peers.get(origin)
        if status is not None and member is not None and member.origin == origin:
            status.hinted_size = max(status.hinted_size, size)
        if member is not None and member.log_id not in self._distrusted:
            with contextlib.suppress(*PeerError):
                if self._size_here(member) >= size:
                    return
        self.wake(origin)

    async def _get(self, url: str, limit: int) -> tuple[bytes, str]:
        assert self._session is not None
        async with self._session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise PeerFailure(f"GET {url} answered {response.status}")
            body = await read_bounded(response, limit)
            self.traffic.bytes_in += len(body)
            return body, response.content_type

    async def _listing(self, member: Member, status: PeerStatus) -> tuple[str, list[Any]]:
        """The member's GET /ledger/logs from the first of its URLs that answers and is not
        behind what the member itself (in a signed notify) said its log holds."""
        urls = self.roster.urls_of(member)
        if not urls:
            raise PeerFailure(f"no address known for {member.origin}")
        failure: Exception | None = None
        stale: tuple[str, list[Any]] | None = None
        for url in urls:
            try:
                body, _ = await self._get(url + "/ledger/logs", MAX_LISTING_BYTES)
                listing = json.loads(body)
                if not isinstance(listing, list):
                    raise PeerFailure("GET /ledger/logs is not a JSON list")
            except (PeerFailure, *PeerError) as exc:
                failure = exc
                continue
            own = [i for i in listing if isinstance(i, dict) and i.get("origin") == member.origin]
            size = own[0].get("size") if own else None
            if isinstance(size, int) and size < status.hinted_size:
                # An old copy (a learned address gone stale, a relay): try the member's other URLs.
                stale = stale or (url, listing)
                continue
            status.url = url
            return url, listing
        if stale is not None:
            status.url = stale[0]
            return stale
        raise PeerFailure(str(failure))

    async def _sync_member(self, member: Member, status: PeerStatus) -> None:
        url, listing = await self._listing(member, status)
        if time.monotonic() - status.proofs_pulled_at >= PROOF_PULL_INTERVAL:
            await self._pull_proofs(member, url, status)
        roster = self.roster.roster
        for item in listing:
            if not isinstance(item, dict):
                raise PeerFailure("GET /ledger/logs lists something that is not an object")
            listed_origin, size = item.get("origin"), item.get("size")
            if not isinstance(listed_origin, str) or not isinstance(size, int) or size < 0:
                raise PeerFailure("GET /ledger/logs has an entry without origin and size")
            root = _listed_root(item.get("root"))
            log_member = roster.get(listed_origin)
            if log_member is None or log_member.log_id in self._distrusted:
                continue  # our own log, a non-member's, or one we no longer trust
            direct = log_member.origin == member.origin
            if direct:
                status.size_there = size
            sync = self._sync_log if self.mirrors(log_member.origin) else self._sync_checkpoint
            try:
                await sync(ListedLog(log_member, url, (size, root), direct), status)
            except (PeerFailure, *PeerError) as exc:
                if direct:
                    raise
                log.info("copy of %s at %s not usable: %s", listed_origin, member.origin, exc)

    async def _sync_log(self, listed: ListedLog, status: PeerStatus) -> None:
        """Bring one log up to what ``url`` serves of it, and judge that view against ours.

        The listed (size, root) is compared with the verified mirror every round; only a
        listing that says something new, or another root, costs a checkpoint fetch.
        """
        log_member, url, listed_size, listed_root = listed.member, listed.url, *listed.claim
        direct = listed.direct
        mirror = self._mirror(log_member)
        ours = mirror.size()
        lid = log_member.log_id
        claim = (listed_size, listed_root, ours)
        if listed_size <= ours and listed_root == mirror.root(listed_size):
            if not direct or listed_size < ours or mirror.checkpoint_note() is not None:
                return  # the same history as ours, and a checkpoint of it held
        elif listed_root is not None and status.compared.get(lid) == claim:
            return  # judged at this listing already; its signed checkpoint agreed
        base = f"{url}/ledger/logs/{lid}"
        note_bytes, _ = await self._get(base + "/checkpoint", MAX_CHECKPOINT_BYTES)
        note = note_bytes.decode("utf-8", errors="strict")
        checkpoint = self._verified_or_claimed(mirror, note, direct)
        ours = mirror.size()
        if checkpoint.size <= ours:
            if mirror.root(checkpoint.size) != checkpoint.root_hash:
                self._equivocation_against_held(log_member, mirror, note)
                return
            if checkpoint.size == ours and (direct or mirror.checkpoint_note() is None):
                # The latest note, with the cosignatures it has collected, is served on.
                await asyncio.to_thread(mirror.extend, [], note, log_member.vkey)
        else:
            entries = await self._fetch_entries(base, ours, checkpoint.size)
            # Several followers may fetch one log at once (from its node and from copies);
            # only one extends it, the others find it grown and move on.
            async with self._extend_locks.setdefault(lid, asyncio.Lock()):
                if mirror.size() != ours:
                    return
                try:
                    # Verifying and storing a large catch-up takes a while: keep serving.
                    await asyncio.to_thread(mirror.extend, entries, note, log_member.vkey)
                except (Conflict, BadInput) as exc:
                    # The signature was checked first: the entries are bad, or the log forked.
                    try:
                        await self._judge_conflict(log_member, mirror, note, checkpoint, base, exc)
                    except PeerFailure:
                        status.compared[lid] = claim  # a bad copy: judged once, not each round
                        raise
                    return
            log.info("mirrored %s up to %d from %s", log_member.origin, checkpoint.size, url)
            self._follow_rotation(log_member, mirror)
            self._judge_kept_checkpoint(log_member, mirror)
        status.compared[lid] = (listed_size, listed_root, mirror.size())

    async def _entry_batches(self, base: str, start: int, end: int) -> AsyncIterator[list[bytes]]:
        """Entries start..end-1 from ``base``: its tlog-tiles entry bundles (immutable, so
        any cache or mirror may answer them), else, from a node that serves no tiles,
        the ``/entries`` pages."""
        at = start
        for ref in entry_bundles(start, end):
            try:
                body, _ = await self._get(f"{base}/{ref.path()}", MAX_BATCH_BYTES)
            except PeerFailure:
                if at == start:
                    break  # no tiles there: read the JSON API's pages instead
                raise
            try:
                batch = parse_entry_bundle(body, ref.width)
            except BadInput as exc:
                raise PeerFailure(f"{ref.path()}: {exc}") from exc
            first, _ = ref.entry_range()
            batch = batch[at - first :]
            at += len(batch)
            yield batch
        while at < end:
            last = min(at + ENTRY_BATCH, end)
            body, _ = await self._get(f"{base}/entries?start={at}&end={last}", MAX_BATCH_BYTES)
            try:
                batch = msgpack.unpackb(body, raw=True)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise PeerFailure("entries are not a msgpack array") from exc
            if (
                not isinstance(batch, list)
                or not batch
                or len(batch) > last - at
                or not all(isinstance(e, bytes) for e in batch)
            ):
                raise PeerFailure("entries answer is not a non-empty array of byte strings")
            at += len(batch)
            yield batch

    async def _fetch_entries(self, base: str, start: int, end: int) -> list[bytes]:
        entries: list[bytes] = []
        held = 0
        async for batch in self._entry_batches(base, start, end):
            entries.extend(batch)
            held += sum(len(e) for e in batch)
            if held > MAX_CATCHUP_BYTES:
                raise PeerFailure("catch-up larger than this node holds in memory in one step")
        return entries

    async def _judge_conflict(
        self,
        log_member: Member,
        mirror: MirrorLog,
        note: str,
        checkpoint: notes.Checkpoint,
        base: str,
        exc: Exception,
    ) -> None:
        """Entries did not extend our prefix to the signed root: bad copy, or equivocation?

        If the source proves the signed tree consistent with ours, only its entries were
        bad. Otherwise its whole history is streamed once (O(log n) hashes held): if it
        gives the signed root, the log signed a tree with another prefix than ours, and
        that history yields the proof; if not, the source serves a broken copy. Whoever
        serves it, a tree whose root the log signed is the log's word.
        """
        ours = notes.Checkpoint(log_member.origin, mirror.size(), mirror.root())
        if await self._consistent(base, ours, checkpoint):
            raise PeerFailure(f"entries do not match the signed checkpoint: {exc}")
        held_note = mirror.checkpoint_note()
        if held_note is None:
            raise PeerFailure(f"no checkpoint of {log_member.origin} is held here")
        await self._prove_split(log_member, base, held_note, note, f"malformed entries ({exc})")

    async def _prove_split(
        self, log_member: Member, base: str, smaller_note: str, larger_note: str, otherwise: str
    ) -> None:
        """The larger checkpoint's tree, streamed whole from ``base`` (O(log n) hashes held),
        has another root at the smaller size than the smaller checkpoint: keep the proof.

        Raises PeerFailure if ``base`` does not serve the larger signed tree, or if its tree
        agrees with the smaller checkpoint after all (then ``otherwise`` was the fault).
        """
        smaller = notes.Checkpoint.parse(notes.parse_note(smaller_note)[0])
        larger = notes.Checkpoint.parse(notes.parse_note(larger_note)[0])
        tree = StreamingConsistency(smaller.size, larger.size)
        async for batch in self._entry_batches(base, 0, larger.size):
            tree.push([leaf_hash(raw) for raw in batch])
        if tree.new_root() != larger.root_hash:
            raise PeerFailure(f"copy of {log_member.origin} does not give its signed root")
        if tree.old_root() == smaller.root_hash:
            raise PeerFailure(f"{log_member.origin} at {base}: {otherwise}")
        self._keep_verified(
            log_member,
            EquivocationProof(
                log_member.origin,
                (smaller_note, larger_note),
                tree.old_root(),
                tuple(tree.proof()),
            ),
            "found here",
        )

    # ---- logs not mirrored: their checkpoints alone --------------------------------------

    def _size_here(self, member: Member) -> int:
        """The size of ``member``'s log verified here: mirrored, or its kept checkpoint."""
        if self.mirrors(member.origin):
            return self._mirror(member).size()
        kept = self._kept_checkpoint(member)
        return -1 if kept is None else kept[1].size

    def _kept_checkpoint(self, member: Member) -> tuple[str, notes.Checkpoint, str] | None:
        """The checkpoint kept of a log not mirrored here: note, checkpoint, where served."""
        kept = self.state.checkpoint(member.log_id)
        if kept is None:
            return None
        note, source = kept
        return note, notes.Checkpoint.parse(notes.parse_note(note)[0]), source

    async def _sync_checkpoint(self, listed: ListedLog, status: PeerStatus) -> None:
        """Verify the checkpoint ``url`` serves of a log not mirrored here, and judge it
        against the one kept: one size and two roots, or two sizes that no consistency
        proof joins, is a split view. No entries are read unless the log looks split."""
        log_member, url, listed_size, listed_root = listed.member, listed.url, *listed.claim
        lid = log_member.log_id
        kept = self._kept_checkpoint(log_member)
        if kept is not None and (listed_size, listed_root) == (kept[1].size, kept[1].root_hash):
            return
        claim = (listed_size, listed_root, -1 if kept is None else kept[1].size)
        if listed_root is not None and status.compared.get(lid) == claim:
            return  # judged at this listing already
        base = f"{url}/ledger/logs/{lid}"
        note_bytes, _ = await self._get(base + "/checkpoint", MAX_CHECKPOINT_BYTES)
        note = note_bytes.decode("utf-8", errors="strict")
        checkpoint = notes.verify_note(note, log_member.vkey)
        if checkpoint.origin != log_member.origin:
            raise PeerFailure(f"{base} serves a checkpoint of {checkpoint.origin}")
        if kept is None:
            self.state.keep_checkpoint(lid, log_member.origin, checkpoint.size, note, base)
            return
        kept_note, held, kept_base = kept
        if checkpoint.size == held.size:
            if checkpoint.root_hash != held.root_hash:
                proof = EquivocationProof(log_member.origin, (kept_note, note))
                self._keep_verified(log_member, proof, "found here")
            status.compared[lid] = claim
            return
        # Whoever served the larger checkpoint proves its tree (the kept one's source may
        # have grown since: it still proves sizes it served).
        if checkpoint.size > held.size:
            smaller, larger, larger_base = (kept_note, held), (note, checkpoint), base
        else:
            smaller, larger, larger_base = (note, checkpoint), (kept_note, held), kept_base
        if not await self._consistent(larger_base, smaller[1], larger[1]):
            try:
                await self._prove_split(
                    log_member, larger_base, smaller[0], larger[0], "a bad consistency proof"
                )
            except PeerFailure:
                status.compared[lid] = claim  # a bad copy: judged once, not each round
                raise
        elif larger[0] is note:
            self.state.keep_checkpoint(lid, log_member.origin, checkpoint.size, note, base)
        # Judged (a transient failure above is not: it is judged again next round).
        status.compared[lid] = claim

    async def _consistent(
        self, base: str, smaller: notes.Checkpoint, larger: notes.Checkpoint
    ) -> bool:
        """True if ``base`` proves ``larger``'s tree extends ``smaller``'s (RFC 9162)."""
        if smaller.size == 0:
            return smaller.root_hash == EMPTY_ROOT
        body, _ = await self._get(
            f"{base}/proof/consistency?old={smaller.size}&new={larger.size}", MAX_LISTING_BYTES
        )
        try:
            proof = [b64_decode(h, "a proof hash", size=32) for h in json.loads(body)["proof"]]
        except (ValueError, KeyError, TypeError, BadInput) as err:
            raise PeerFailure("consistency proof is malformed") from err
        return verify_consistency(
            proof, smaller.size, larger.size, smaller.root_hash, larger.root_hash
        )

    def _judge_kept_checkpoint(self, log_member: Member, mirror: MirrorLog) -> None:
        """A log mirrored since it began to be dealt with must agree with the checkpoint
        kept of it before; the mirror's tree proves a split if not."""
        kept = self._kept_checkpoint(log_member)
        if kept is None or kept[1].size > mirror.size():
            return
        if mirror.root(kept[1].size) != kept[1].root_hash:
            self._equivocation_against_held(log_member, mirror, kept[0])

    def _equivocation_against_held(self, log_member: Member, mirror: MirrorLog, note: str) -> None:
        """A signed checkpoint no larger than our mirror disagrees with it: prove it from ours."""
        held_note = mirror.checkpoint_note()
        if held_note is None:
            raise PeerFailure(f"no checkpoint of {log_member.origin} is held here")
        held = notes.verify_note(held_note, log_member.vkey).size
        smaller = notes.verify_note(note, log_member.vkey).size
        prefix = None if smaller == held else mirror.root(smaller)
        path = () if smaller == held else tuple(mirror.consistency_proof(smaller, held))
        self._keep_verified(
            log_member,
            EquivocationProof(log_member.origin, (note, held_note), prefix, path),
            "found here",
        )

    def _keep_verified(self, log_member: Member, proof: EquivocationProof, how: str) -> bool:
        """Verify a proof with the log's roster key, then keep it; True if it is new here.

        Raises BadInput or Unauthorized (node.core.equivocation) if it does not verify.
        """
        verified: VerifiedEquivocation = verify_equivocation(proof, log_member.vkey)
        found = Equivocation(
            verified.proof,
            f"two signed checkpoints of {log_member.origin} are inconsistent ({how}): "
            f"{verified.reason}",
            int(time.time()),
        )
        new = self.state.record_equivocation(found)
        if new:
            log.error(
                "EQUIVOCATION by %s: %s; its new entries are refused", found.origin, found.reason
            )
            self._post_to_all("/p2p/equivocation", json.dumps(found.as_json()).encode())
        self._distrusted.add(found.log_id)
        return new

    def accept_proof(self, reporter: str, document: Any) -> bool:
        """Verify an equivocation proof a member reports and keep it; True if it is new here.

        Raises BadInput if it is malformed, names no member's log or does not show two
        inconsistent checkpoints, and Unauthorized if a note is not signed by the log's key.
        """
        proof = EquivocationProof.from_json(document)
        member = self.roster.roster.get(proof.origin)
        if member is None:
            raise BadInput("that proof is about no member's log")
        return self._keep_verified(member, proof, f"reported by {reporter}, verified here")

    async def _pull_proofs(self, member: Member, url: str, status: PeerStatus) -> None:
        """Take the equivocation proofs a member holds (pushed proofs may have been missed)."""
        status.proofs_pulled_at = time.monotonic()
        try:
            body, _ = await self._get(url + "/ledger/equivocations", MAX_LISTING_BYTES)
            proofs = json.loads(body)
        except (PeerFailure, *PeerError) as exc:
            log.info("no equivocation list from %s: %s", member.origin, exc)
            return
        for proof in proofs if isinstance(proofs, list) else []:
            try:
                self.accept_proof(member.origin, proof)
            except PeerError as exc:
                log.info("an equivocation proof from %s does not hold: %s", member.origin, exc)

    # ---- signed calls to members ---------------------------------------------------------

    def _signed(self, audience: str, method: str, url: str, body: bytes) -> Any:
        """A request signed with this node's key for the member ``audience`` (the format is
        node.core.signed_requests)."""
        assert self._session is not None
        identity = self.runtime.identity
        target = yarl.URL(url)
        headers = node_signed_headers(identity, method, target, body, audience)
        return self._session.request(
            method, target, data=body, headers=headers, allow_redirects=False
        )

    def _size_hint(self, size: int) -> bytes:
        return json.dumps({"log_id": log_id(self.runtime.config.origin), "size": size}).encode()

    def _notify_all(self, size: int) -> None:
        self._post_to_all("/p2p/notify", self._size_hint(size))

    def _hello(self, member: Member) -> None:
        urls = self.roster.urls_of(member)
        if urls:
            hint = self._size_hint(self._own_log().size())
            self._post_in_background(member.origin, urls[0] + "/p2p/notify", hint)

    def _post_to_all(self, path: str, body: bytes) -> None:
        """A signed POST to every member, in the background; failures are only logged."""
        for member in self.roster.roster:
            urls = self.roster.urls_of(member)
            if urls:
                self._post_in_background(member.origin, urls[0] + path, body)

    def _post_in_background(self, audience: str, url: str, body: bytes) -> None:
        task = asyncio.create_task(self._post(audience, url, body))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post(self, audience: str, url: str, body: bytes) -> None:
        try:
            async with self._signed(audience, "POST", url, body) as response:
                self.traffic.bytes_in += len(await read_bounded(response, MAX_ERROR_BYTES))
        except PeerError as exc:
            log.debug("POST %s failed: %s", url, exc)

    # ---- the log's own node: collecting cosignatures -------------------------------------

    def accept_cosignature(self, cosigner: str, text: str) -> int:
        """Keep a member's cosignature of one of this node's checkpoints; returns its size.

        Raises BadInput if malformed, Unauthorized if the cosignature does not verify with
        the member's key, Conflict if the checkpoint is not one this log signed.
        """
        member = self.roster.roster.get(cosigner)
        if member is None:
            raise Unauthorized(f"{cosigner} is not a roster member")
        body, signatures = notes.parse_note(text)
        if len(signatures) != 1 or signatures[0].name != cosigner:
            raise BadInput("send exactly one cosignature, by the calling node")
        if notes.verify_cosignature(body, signatures[0], member.vkey) is None:
            raise Unauthorized("bad cosignature")
        checkpoint = notes.Checkpoint.parse(body)
        own = self._own_log()
        if (
            checkpoint.origin != self.runtime.config.origin
            or checkpoint.size > own.size()
            or own.root(checkpoint.size) != checkpoint.root_hash
        ):
            raise Conflict("that checkpoint is not one of this node's log")
        own.add_cosignature(
            signatures[0], checkpoint_body=body, preferred=self.runtime.config.witness.policy
        )
        return checkpoint.size

    # ---- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Peers, reachability, sizes here and there, cosignatures, equivocations."""
        peers = []
        for member in self.roster.roster:
            entry: dict[str, Any] = {
                "origin": member.origin,
                "log_id": member.log_id,
                "urls": self.roster.urls_of(member),
                # Found by discovery but not proven by the member there: never used.
                "candidate_urls": self.roster.candidates_of(member),
                "rejected_urls": self.roster.rejected_of(member),
            }
            entry.update(self.peers.get(member.origin, PeerStatus()).as_json())
            entry["mirrored"] = self.mirrors(member.origin)
            try:
                size_here = self._size_here(member)
                entry["size_here"] = size_here if size_here >= 0 else None
            except (ImageShareError, ValueError):
                entry["size_here"] = None
            entry["trusted"] = member.log_id not in self._distrusted
            peers.append(entry)
        own: dict[str, Any] = {"origin": self.runtime.config.origin, "cosigners": []}
        with contextlib.suppress(*PeerError):
            own["size"] = self._own_log().size()
            chain = self._own_log().key_chain()
            # The node's key history: which key signs its checkpoints from which size on.
            own["keys"] = [
                {
                    "first_size": e.first_size,
                    "vkey": verifier_key_string(self.runtime.config.origin, e.public_key),
                }
                for e in (chain.epochs if chain is not None else ())
            ]
            note = self._own_log().checkpoint_note()
            if note is not None:
                body, signatures = notes.parse_note(note)
                own["checkpoint_size"] = notes.Checkpoint.parse(body).size
                own["cosigners"] = sorted(
                    {s.name for s in signatures if s.name != self.runtime.config.origin}
                )
        return {
            "origin": self.runtime.config.origin,
            "own_log": own,
            "peers": peers,
            "equivocations": [p.as_json() for p in self.state.equivocations()],
            "ignored_by_discovery": dict(self.ignored_by_discovery),
            "traffic": self.traffic.as_json(),
        }


def _listed_root(value: Any) -> bytes | None:
    """The root a listing row claims (base64), or None if it names none or garbage."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return b64_decode(value, "a listed root", size=32)
    except BadInput:
        return None
