"""Consented study transfer between two nodes: the custodian's and the grantee's side.

Custodian A (``open_transfer`` then ``send_instances``): checks the token with the clock
through the one consent check (which records the grant on first sight and writes a
``denial`` on refusal), builds the manifest of the studies the token allows, and streams
the instances asked for through the encrypted channel, reading each file chunk by chunk.
Every instance whose last byte has been handed to the connection is journaled; when the
stream ends (complete or cut) one ``access`` entry per study is appended with what was
sent. A stream cut by a crash of A is closed the same way at A's next start.

Grantee B (``start_fetch``): a job that opens a transfer, decrypts the manifest, asks
only for the instances whose digest it does not hold, decrypts the stream on the fly
into the store's staging area, checks every size and SHA-256 against the manifest, and
commits durably in batches. When the stream ends (complete or cut) B appends one
``receipt`` entry per study with what arrived (verified and durably stored). A cut
stream is retried with backoff; each retry is a new transfer that asks only for what B
still lacks.

"What was sent" and "what arrived" are digested the same way (manifest.transfer_digest),
so an auditor matches an ``access`` with its ``receipt`` by token id, study and digest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yarl

from node.core import atna
from node.core.channel import (
    ChannelError,
    EphemeralKey,
    SessionKeys,
    StreamDecryptor,
    StreamEncryptor,
    open_sealed,
    receiver_session,
    seal,
    sender_session,
)
from node.core.consent import (
    RULE_MESSAGES,
    Rule,
    Verdict,
    decode_grant,
    parse_token_text,
    token_id_of,
)
from node.core.emergency import PatientIdentity, is_emergency_request, sign_request
from node.core.entries import Access, EntryBody, Receipt
from node.core.manifest import (
    CODEC_MESSAGES,
    DATA,
    Begin,
    Complete,
    Data,
    InstancesRequest,
    InstanceStreamParser,
    Manifest,
    ManifestEntry,
    OpenRequest,
    OpenResponse,
    begin_message,
    decode_instances_request,
    decode_manifest,
    decode_open_request,
    decode_open_response,
    encode_handles,
    end_message,
    transfer_digest,
)
from node.core.roster import Member
from node.core.signed_requests import parse_headers
from node.core.wire_compression import (
    CODECS,
    PIECE_BYTES,
    ZSTD,
    LinkCompression,
    PieceCompressor,
)
from node.errors import (
    BadInput,
    Conflict,
    Forbidden,
    ImageShareError,
    NotFound,
    PeerUnreachable,
    Unauthorized,
)
from node.services.consent import check_access, resolve_study_reference
from node.services.emergency import access_window, check_emergency
from node.services.ledger import LedgerService
from node.services.pacs import serving_from_cache
from node.services.peer_client import (
    CONNECTION_ERRORS,
    describe,
    node_signed_headers,
    open_session,
    raise_for_answer,
    read_bounded,
)
from node.services.runtime import NodeRuntime
from node.store.backends import open_transfer_store
from node.store.instances import InstanceRecord, StagedInstance, StagingFile
from node.store.pacs_cache import CachedInstance
from node.store.transfers import StreamedInstance

log = logging.getLogger(__name__)

# Plaintext bytes of instance data per encrypted message.
MESSAGE_BYTES = 64 * 1024
# Ciphertext handed to the connection at once (bounds memory on the sending side).
BLOCK_BYTES = 1024 * 1024
# Received bytes handed to the decrypting thread at once.
RECEIVE_BYTES = 1024 * 1024
# Instances (or bytes) committed in one durable batch at the grantee.
COMMIT_INSTANCES = 64
COMMIT_BYTES = 32 * 1024 * 1024
# ... or whatever arrived within this many seconds, so that a slow link still commits,
# and what is left to commit when the stream ends (waited for) stays small.
COMMIT_SECONDS = 0.25
SESSION_TTL = 3600.0
MAX_SESSIONS = 1000
# How often consent is checked again while a stream runs, in seconds.
RECHECK_SECONDS = 1.0
# How long a fetch keeps retrying a custodian that went away mid-transfer (counted from
# the last attempt that brought instances), and its backoff between attempts.
RETRY_WINDOW = 120.0
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 4.0


@dataclass
class RetryPatience:
    """How long a fetch keeps trying: RETRY_WINDOW from its last progress, with a backoff
    that doubles up to MAX_BACKOFF and starts again whenever the fetch makes progress
    (instances landed, or a partial manifest naming more of the study)."""

    deadline: float = field(default_factory=lambda: time.monotonic() + RETRY_WINDOW)
    backoff: float = FIRST_BACKOFF

    def progressed(self) -> None:
        self.deadline, self.backoff = time.monotonic() + RETRY_WINDOW, FIRST_BACKOFF

    def exhausted(self, wait: float = 0.0) -> bool:
        """Whether waiting ``wait`` more seconds would pass the deadline."""
        return time.monotonic() + wait > self.deadline

    def next_wait(self) -> float:
        """This retry's wait; the next one waits twice as long (up to MAX_BACKOFF)."""
        wait, self.backoff = self.backoff, min(self.backoff * 2, MAX_BACKOFF)
        return wait


FIRST_CONTACT_ATTEMPTS = 3
RECENT = 100
# Transfer opens whose manifests are built at once (more wait their turn).
MANIFEST_THREADS = 16
# The open answer: a manifest of up to MAX_HANDLES instances of about 60 bytes each.
MAX_OPEN_RESPONSE_BYTES = 128 * 1024 * 1024


class TransferRefused(Forbidden):
    """The custodian refused the token; ``rule`` names the consent rule that failed."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"refused ({rule}): {message}")
        self.rule = rule
        self.explanation = message


class NotInRoster(PeerUnreachable):
    """The token names a custodian this node does not know: retrying cannot help."""


# The custodian's 503 answer to an open says this when its PACS cannot deliver the study.
PACS_UNAVAILABLE = "unavailable"


class CustodianPacsUnavailable(PeerUnreachable):
    """The custodian answered, but could not retrieve the study from its PACS now: the
    fetch waits and asks again (within RETRY_WINDOW of its last progress)."""


def source_label(custodian: str, token_id: bytes) -> str:
    """What a fetched study's ``source`` says: where it came from, under which token."""
    return f"fetched from {custodian} under token {token_id.hex()}"


# -- custodian side ----------------------------------------------------------------------


@dataclass
class SenderSession:
    transfer_id: str
    token: bytes
    token_id: bytes
    grantee: str
    grantee_key: bytes
    keys: SessionKeys
    manifest: Manifest
    paths: list[Path]
    created: float


@dataclass
class OutgoingProgress:
    """A stream this node is sending, for the admin API."""

    stream_id: str
    grantee: str
    token_id: bytes
    instances_total: int
    bytes_total: int
    started: float
    instances_sent: int = 0
    bytes_sent: int = 0
    finished: float | None = None
    complete: bool = False
    compression: str | None = None  # the codec the grantee accepted, if this node uses it

    def as_json(self) -> dict[str, Any]:
        end = self.finished or time.time()
        seconds = max(end - self.started, 1e-9)
        return {
            "stream_id": self.stream_id,
            "compression": self.compression,
            "grantee": self.grantee,
            "token_id": self.token_id.hex(),
            "instances_total": self.instances_total,
            "instances_sent": self.instances_sent,
            "bytes_total": self.bytes_total,
            "bytes_sent": self.bytes_sent,
            "started": self.started,
            "finished": self.finished,
            "seconds": round(seconds, 3),
            "mb_per_s": round(self.bytes_sent / seconds / 1e6, 2),
            "state": "running" if self.finished is None else "done" if self.complete else "cut",
        }


@dataclass
class _Block:
    data: bytes
    completed: list[StreamedInstance]
    raw: int  # instance bytes it carries


# -- grantee side ------------------------------------------------------------------------


@dataclass
class FetchJob:
    """One `imageshare fetch`: its progress and outcome (the admin API's view)."""

    id: str
    token: bytes
    token_id: bytes
    custodian: str
    public_url: str
    started: float = field(default_factory=time.time)
    state: str = "running"  # running | done | refused | failed | cancelled
    cancelled: bool = False  # cancel_fetch asked it to stop
    rule: str | None = None
    error: str | None = None
    unreachable: bool = False
    instances_total: int = 0
    bytes_total: int = 0
    instances_done: int = 0
    bytes_done: int = 0
    bytes_received: int = 0
    instances_received: int = 0
    attempts: int = 0
    opened: bool = False  # the custodian answered a transfer request at least once
    # Why a running fetch is waiting (the custodian's PACS), or None while it streams.
    waiting: str | None = None
    finished: float | None = None
    study_uids: list[str] = field(default_factory=list)
    # A break-glass fetch: its reason code (the token is the signed emergency request).
    emergency_reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        end = self.finished or time.time()
        seconds = max(end - self.started, 1e-9)
        return {
            "id": self.id,
            "kind": "fetch",
            "emergency": self.emergency_reason is not None,
            "reason": self.emergency_reason,
            "state": self.state,
            "token_id": self.token_id.hex(),
            "custodian": self.custodian,
            "rule": self.rule,
            "error": self.error,
            "unreachable": self.unreachable,
            "waiting": self.waiting,
            "instances_total": self.instances_total,
            "instances_done": self.instances_done,
            "instances_received": self.instances_received,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "bytes_received": self.bytes_received,
            "attempts": self.attempts,
            "started": self.started,
            "finished": self.finished,
            "seconds": round(seconds, 3),
            "mb_per_s": round(self.bytes_received / seconds / 1e6, 2),
            "studies": [
                {"study_uid": uid, "dicomweb_url": f"{self.public_url}/dicomweb/studies/{uid}"}
                for uid in self.study_uids
            ],
        }


class _StreamReceiver:
    """Decrypts, checks and stages one incoming instance stream; runs in a worker thread."""

    def __init__(
        self,
        runtime: NodeRuntime,
        manifest: Manifest,
        handles: list[int],
        key: bytes,
        codecs: Sequence[str],
    ) -> None:
        self._store = runtime.store
        self._decryptor = StreamDecryptor(key)
        self._parser = InstanceStreamParser(manifest, handles, codecs)
        self._staging: StagingFile | None = None
        self.ready: list[tuple[StagingFile, ManifestEntry]] = []
        self.ready_bytes = 0

    def feed(self, data: bytes) -> None:
        """Raises ChannelError (tampered/cut) or BadInput (breaks the manifest)."""
        for plaintext, final in self._decryptor.feed(data):
            for event in self._parser.feed(plaintext, final):
                if isinstance(event, Data):
                    assert self._staging is not None
                    self._staging.write(event.chunk)
                elif isinstance(event, Begin):
                    self._staging = self._store.open_staging()
                elif isinstance(event, Complete):
                    self._complete(event.entry)

    def _complete(self, entry: ManifestEntry) -> None:
        assert self._staging is not None
        staging, self._staging = self._staging, None
        staging.close()
        if staging.digest != entry.digest.hex():
            staging.abort()
            raise BadInput(f"instance {entry.handle} does not match its manifest digest")
        # Parsing its header waits for the commit thread, beside the decryption.
        self.ready.append((staging, entry))
        self.ready_bytes += staging.size

    def take_ready(self) -> list[tuple[StagingFile, ManifestEntry]]:
        taken, self.ready, self.ready_bytes = self.ready, [], 0
        return taken

    def close(self) -> None:
        """End of input: raises ChannelError if the stream was cut short."""
        self._decryptor.close()
        if not self._parser.ended:
            raise ChannelError("instance stream ended without its final message")

    def abort(self) -> None:
        if self._staging is not None:
            self._staging.abort()
            self._staging = None
        for staging, _ in self.take_ready():
            staging.abort()


class TransferService:
    """Both sides of transfers for one node: sessions it serves and fetches it runs."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.store = open_transfer_store(runtime.config)
        self.sessions: dict[str, SenderSession] = {}
        self.jobs: dict[str, FetchJob] = {}
        self.outgoing: collections.OrderedDict[str, OutgoingProgress] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        # Manifests are built here, not in the loop's default pool: an open may wait up
        # to pacs.PARTIAL_WAIT_SECONDS for a study to land from the PACS, and waiting opens
        # must not hold the threads every other request and stream needs.
        self._manifests = ThreadPoolExecutor(MANIFEST_THREADS, thread_name_prefix="manifest")
        self._job_tasks: dict[str, asyncio.Task[None]] = {}

    def close(self) -> None:
        # A manifest build already running reads the stores: it ends before they close.
        self._manifests.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    @property
    def ledger(self) -> LedgerService:
        return self.runtime.services.ledger

    # -- lifecycle (a background service of `imageshare run`) -------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.record_unrecorded_streams)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def record_unrecorded_streams(self) -> int:
        """Write the ledger entries of streams cut by a crash; returns how many were closed."""
        streams = self.store.unrecorded_streams()
        for stream in streams:
            self._append_accounting(stream.kind, stream.token_id, stream.peer, stream.instances)
            self.store.mark_recorded(stream.stream_id)
        return len(streams)

    def _append_accounting(
        self, kind: str, token_id: bytes, peer: str, items: list[StreamedInstance]
    ) -> None:
        """One ``access`` (peer = grantee) or ``receipt`` (peer = custodian) entry per study."""
        by_study: dict[bytes, list[StreamedInstance]] = {}
        for item in items:
            by_study.setdefault(item.study, []).append(item)
        deliveries: list[EntryBody] = []
        for study, group in sorted(by_study.items()):
            # The fields both sides record alike, in their declared order (entries._Delivery).
            shared = (
                token_id,
                study,
                len(group),
                sum(g.size for g in group),
                transfer_digest(g.digest for g in group),
            )
            deliveries.append(
                Access(*shared, grantee=peer)
                if kind == Access.kind
                else Receipt(*shared, custodian=peer)
            )
        self.ledger.append_many(deliveries)

    # -- custodian side ----------------------------------------------------------------

    async def open_transfer(self, grantee: str, grantee_key: bytes, body: bytes) -> bytes:
        """Answer a grantee's transfer request with the encrypted manifest.

        Raises BadInput (malformed request or key), TransferRefused (a consent rule failed;
        a ``denial`` entry has been written).
        """
        request = decode_open_request(body)
        verdict = await asyncio.to_thread(
            self.judge, request.token, grantee, grantee_key, int(time.time())
        )
        if not verdict.allowed:
            rule = verdict.rule or Rule.TAMPERED
            raise TransferRefused(rule.value, verdict.message)
        token_id = token_id_of(request.token)
        manifest, paths = await asyncio.get_running_loop().run_in_executor(
            self._manifests, self._build_manifest, token_id, verdict.studies
        )
        ephemeral = EphemeralKey.generate()
        keys = sender_session(
            self.runtime.identity.seed, ephemeral, grantee_key, request.ephemeral, token_id
        )
        self._expire_sessions()
        transfer_id = secrets.token_hex(16)
        self.sessions[transfer_id] = SenderSession(
            transfer_id,
            request.token,
            token_id,
            grantee,
            grantee_key,
            keys,
            manifest,
            paths,
            time.monotonic(),
        )
        sealed = seal(keys.manifest, manifest.encode())
        return OpenResponse(transfer_id, ephemeral.public, sealed).encode()

    def judge(self, token: bytes, grantee: str, grantee_key: bytes, now: int) -> Verdict:
        """The one consent decision of a transfer: a grant token, or a member's signed
        emergency request (break-glass, node.services.emergency)."""
        if is_emergency_request(token):
            return check_emergency(self.runtime, token, grantee, grantee_key, now)
        return check_access(self.runtime, token, grantee, None, now)

    def _build_manifest(
        self, token_id: bytes, study_refs: tuple[bytes, ...]
    ) -> tuple[Manifest, list[Path]]:
        studies: list[bytes] = []
        entries: list[ManifestEntry] = []
        paths: list[Path] = []
        pending = 0
        for ref in study_refs:
            try:
                uid = resolve_study_reference(self.runtime, ref)
            except NotFound:
                continue
            records: Sequence[InstanceRecord | CachedInstance]
            try:
                records = self.runtime.store.instances(uid)
            except NotFound:
                # Only in the hospital's PACS: what the cache holds of it so far is sent,
                # and the manifest says how much more is coming (a partial manifest).
                source = self.runtime.services.pacs
                if source is None:
                    continue
                part = source.instances_to_send(uid, token_id)
                records, pending = part.instances, pending + part.pending
            if not records:
                continue  # a study in scope that holds no instance here has nothing to send
            for record in records:
                entries.append(
                    ManifestEntry(
                        len(entries), len(studies), record.size, bytes.fromhex(record.digest)
                    )
                )
                paths.append(record.path)
            studies.append(ref)
        return Manifest(token_id, tuple(studies), tuple(entries), pending), paths

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for transfer_id, session in list(self.sessions.items()):
            if now - session.created > SESSION_TTL or len(self.sessions) > MAX_SESSIONS:
                del self.sessions[transfer_id]

    async def prepare_send(
        self, transfer_id: str, grantee: str, body: bytes
    ) -> tuple[SenderSession, InstancesRequest]:
        """Check a request for a transfer's instances, re-checking consent now.

        Raises NotFound (unknown or expired transfer, or another caller's), BadInput
        (bad handle list), TransferRefused (consent no longer holds: revoked, expired).
        """
        session = self.sessions.get(transfer_id)
        if session is None or session.grantee != grantee:
            raise NotFound("no such transfer (expired, or the custodian restarted)")
        asked = decode_instances_request(body, len(session.manifest.instances))
        await self._recheck(session)
        return session, asked

    async def send_instances(
        self,
        session: SenderSession,
        asked: InstancesRequest,
        write: Callable[[bytes], Awaitable[None]],
        unacknowledged: Callable[[], int | None] = lambda: None,
    ) -> None:
        """Stream the instances through ``write``; the access entries are written at the end.

        ``unacknowledged`` tells how many of the bytes written the grantee has not
        acknowledged yet (None where the connection cannot tell), for the link's rate.

        Pieces are compressed (zstd) when the grantee offered it, this node's
        ``transfer.compression`` allows it, and the link's rate makes it pay. Whatever
        happens to the connection, the instances fully handed to ``write`` are journaled
        and accounted in ``access`` entries before this returns or raises.
        """
        handles = asked.handles
        compression = (
            LinkCompression()
            if ZSTD in asked.compression and self.runtime.config.transfer.compression != "off"
            else None
        )
        stream_id = "out-" + secrets.token_hex(12)
        manifest = session.manifest
        progress = OutgoingProgress(
            stream_id,
            session.grantee,
            session.token_id,
            len(handles),
            sum(manifest.instances[h].size for h in handles),
            time.time(),
            compression=ZSTD if compression is not None else None,
        )
        self._remember_outgoing(progress)
        await self.store.off_loop(
            self.store.open_stream,
            stream_id,
            Access.kind,
            session.token_id,
            session.grantee,
            time.time(),
        )
        sent: list[StreamedInstance] = []
        blocks = self._blocks(session, handles, compression, asked.compression)
        # The next block is read and encrypted in a worker thread while this one is sent.
        upcoming = asyncio.ensure_future(asyncio.to_thread(next, blocks, None))
        checked_at = time.monotonic()
        # Studies from the PACS stay in the cache while they stream.
        serving = contextlib.ExitStack()
        serving.enter_context(serving_from_cache(self.runtime, session.token_id))
        try:
            while (block := await upcoming) is not None:
                if time.monotonic() - checked_at >= RECHECK_SECONDS:
                    # A revocation or expiry cuts a long stream within about a second.
                    await self._recheck(session)
                    checked_at = time.monotonic()
                upcoming = asyncio.ensure_future(asyncio.to_thread(next, blocks, None))
                write_started = time.monotonic()
                await write(block.data)
                if compression is not None:
                    done = time.monotonic()
                    compression.wrote(
                        len(block.data),
                        block.raw,
                        done - write_started,
                        done,
                        unacknowledged(),
                    )
                progress.bytes_sent += len(block.data)
                if block.completed:
                    sent += block.completed
                    progress.instances_sent += len(block.completed)
                    await self.store.off_loop(self.store.journal, stream_id, block.completed)
            progress.complete = True
        finally:
            progress.finished = time.time()
            with contextlib.suppress(BaseException):
                await upcoming
            blocks.close()
            try:
                await asyncio.shield(
                    asyncio.to_thread(self._close_stream, stream_id, session, sent)
                )
            finally:
                await asyncio.shield(asyncio.to_thread(serving.close))  # may evict: disk work

    async def _recheck(self, session: SenderSession) -> None:
        """Raises TransferRefused if the token no longer allows the transfer."""
        verdict = await asyncio.to_thread(
            self.judge, session.token, session.grantee, session.grantee_key, int(time.time())
        )
        if not verdict.allowed:
            self.sessions.pop(session.transfer_id, None)
            rule = verdict.rule or Rule.TAMPERED
            raise TransferRefused(rule.value, verdict.message)

    def _close_stream(
        self, stream_id: str, session: SenderSession, sent: list[StreamedInstance]
    ) -> None:
        self._append_accounting(Access.kind, session.token_id, session.grantee, sent)
        self.store.mark_recorded(stream_id)
        if sent:
            self.runtime.security_audit.record(
                atna.instances_transferred,
                True,
                session.grantee,
                "",
                self._study_uids({item.study for item in sent}),
                len(sent),
                "transfer",
            )

    def _study_uids(self, refs: set[bytes]) -> list[str]:
        """The UIDs of this node's own studies by their ledger references (for the audit)."""
        uids = []
        for ref in sorted(refs):
            with contextlib.suppress(NotFound):
                uids.append(resolve_study_reference(self.runtime, ref))
        return uids

    def _blocks(
        self,
        session: SenderSession,
        handles: list[int],
        compression: LinkCompression | None,
        codecs: Sequence[str],
    ) -> Generator[_Block]:
        """Encrypted blocks of about BLOCK_BYTES, each with the instances it completes.

        With ``compression``, each piece is compressed at the level the link asks for
        when that shrinks it. An instance's first compressed piece is its probe: it picks
        the offered codec that shrinks it most, or, if none does (noise, already
        compressed pixels), sends the instance raw from then on.
        """
        manifest = session.manifest
        encryptor = StreamEncryptor(session.keys.instances)
        compressor = PieceCompressor(codecs) if compression is not None else None
        parts = [encryptor.header]
        buffered, raw = len(encryptor.header), 0
        completed: list[StreamedInstance] = []
        for handle in handles:
            entry = manifest.instances[handle]
            parts.append(encryptor.push(begin_message(handle)))
            remaining = entry.size
            compress, codec = compressor is not None, None  # codec: the probe's choice
            with open(session.paths[handle], "rb") as f:
                while remaining > 0:
                    level = compression.level if compress and compression is not None else 0
                    chunk = f.read(min(PIECE_BYTES if level else MESSAGE_BYTES, remaining))
                    if not chunk:
                        raise BadInput("a stored instance is shorter than its index says")
                    remaining -= len(chunk)
                    raw += len(chunk)
                    message = DATA + chunk
                    if level and compressor is not None:
                        if codec is None:
                            probed = compressor.probe(chunk, level)
                            compress = probed is not None
                            codec, frame = probed if probed is not None else (None, None)
                        else:
                            frame = compressor.compress(chunk, level, codec)
                        if codec is not None and frame is not None:
                            message = CODEC_MESSAGES[codec] + frame
                    framed = encryptor.push(message)
                    parts.append(framed)
                    buffered += len(framed)
                    if remaining == 0:
                        study = manifest.studies[entry.study]
                        completed.append(StreamedInstance(study, entry.digest, entry.size))
                    if buffered >= BLOCK_BYTES:
                        yield _Block(b"".join(parts), completed, raw)
                        parts, buffered, completed, raw = [], 0, [], 0
            if entry.size == 0:
                completed.append(StreamedInstance(manifest.studies[entry.study], entry.digest, 0))
        parts.append(encryptor.push(end_message(len(handles)), final=True))
        yield _Block(b"".join(parts), completed, raw)

    def _remember_outgoing(self, progress: OutgoingProgress) -> None:
        self.outgoing[progress.stream_id] = progress
        while len(self.outgoing) > RECENT:
            self.outgoing.popitem(last=False)

    # -- grantee side ------------------------------------------------------------------

    def start_fetch(self, token_text: str) -> FetchJob:
        """Start fetching what a token grants; raises BadInput for a malformed token."""
        return self._start_fetch(parse_token_text(token_text))

    def retry_fetch(self, job_id: str) -> FetchJob:
        """Fetch again, as a new job, what a finished job of this run was fetching.

        Raises NotFound for a job this run does not hold (its token is kept in memory
        only), Conflict for one still running.
        """
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound("no such fetch in this run of the node (fetch its token again)")
        if job.finished is None:
            raise Conflict("that fetch is still running")
        return self._start_fetch(job.token)

    def cancel_fetch(self, job_id: str) -> FetchJob:
        """Stop a running fetch; what was stored stays (a later fetch skips it).

        Raises NotFound for an unknown job, Conflict for one already finished.
        """
        job = self.jobs.get(job_id)
        task = self._job_tasks.get(job_id)
        if job is None:
            raise NotFound("no such fetch")
        if job.finished is not None or task is None:
            raise Conflict("that fetch has already finished")
        job.cancelled = True
        task.cancel()
        return job

    def _start_fetch(self, token: bytes) -> FetchJob:
        grant = decode_grant(token)
        job = FetchJob(
            id=secrets.token_hex(8),
            token=token,
            token_id=token_id_of(token),
            custodian=grant.fields.custodian,
            public_url=self.runtime.config.public_url,
        )
        return self._start(job)

    def start_emergency_fetch(
        self, custodians: list[str], patient_id: str, reason: str, note: str
    ) -> list[FetchJob]:
        """Break-glass: ask each custodian (every other member if none is named) for the
        studies of the patient it knows by ``patient_id``, one signed request each.

        Raises BadInput for a bad reason, patient id or note, NotInRoster for a custodian
        this node does not know.
        """
        roster = self.runtime.services.roster.roster
        identity = self.runtime.identity
        if not custodians:
            custodians = [member.origin for member in roster]
        jobs = []
        for custodian in custodians:
            member = roster.get(custodian)
            if member is None or custodian == identity.origin:
                raise NotInRoster(f"custodian {custodian} is not a member of this node's roster")
            request = sign_request(
                identity.origin,
                custodian,
                member.public_key,
                reason,
                PatientIdentity(patient_id, note),
                int(time.time()),
                secrets.token_bytes(16),
                identity.sign,
            )
            job = FetchJob(
                id=secrets.token_hex(8),
                token=request,
                token_id=token_id_of(request),
                custodian=custodian,
                public_url=self.runtime.config.public_url,
                emergency_reason=reason,
            )
            jobs.append(job)
        return [self._start(job) for job in jobs]

    def _start(self, job: FetchJob) -> FetchJob:
        # The custodian's log tells what happened to this fetch: mirror it from now on.
        self.runtime.services.replication.start_dealing(job.custodian)
        finished = [j for j in self.jobs.values() if j.finished is not None]
        for old in sorted(finished, key=lambda j: j.started)[: max(0, len(finished) - RECENT)]:
            del self.jobs[old.id]  # kept in the transfer store
        self.jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        self._job_tasks[job.id] = task
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._job_tasks.pop(job.id, None))
        return job

    def job_json(self, job_id: str) -> dict[str, Any]:
        """A fetch job's state, live or from history; raises NotFound."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job.as_json()
        document = self.store.fetch(job_id)
        if document is None:
            raise NotFound("no such transfer")
        return dict(json.loads(document))

    def transfers_json(self) -> dict[str, Any]:
        """Fetches (running and recent, refusals with their rule) and streams sent."""
        fetches = {job.id: job.as_json() for job in self.jobs.values()}
        for job_id, document in self.store.recent_fetches(RECENT):
            fetches.setdefault(job_id, json.loads(document))
        ordered = sorted(fetches.values(), key=lambda j: j["started"], reverse=True)[:RECENT]
        sent = [p.as_json() for p in reversed(self.outgoing.values())]
        return {"fetches": ordered, "sent": sent}

    async def _run(self, job: FetchJob) -> None:
        patience = RetryPatience()
        named = 0  # instances named by the last manifest
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.runtime.config.federation.request_timeout, sock_read=60
        )
        try:
            trusted = self.runtime.config.http.trusted_ca_file
            async with open_session(trusted, timeout, read_bufsize=RECEIVE_BYTES) as http:
                while True:
                    job.attempts += 1
                    held_before = job.instances_done
                    try:
                        manifest = await self._attempt(job, http)
                    except TransferRefused as exc:
                        job.state, job.rule, job.error = "refused", exc.rule, exc.explanation
                        return
                    except (
                        TimeoutError,
                        PeerUnreachable,
                        ChannelError,
                        aiohttp.ClientError,
                        ConnectionError,
                    ) as exc:
                        job.error = describe(exc)
                        pacs_down = isinstance(exc, CustodianPacsUnavailable)
                        job.opened = job.opened or pacs_down  # the custodian did answer
                        job.unreachable = isinstance(exc, PeerUnreachable) and not pacs_down
                        job.waiting = job.error if pacs_down else None
                        if job.instances_done > held_before:
                            # A link that drops now and then but carries the study on
                            # is retried soon, for as long as each attempt gains.
                            patience.progressed()
                        # Until the custodian has answered once, give up soon: it may
                        # simply be down or misnamed; a cut transfer is retried longer.
                        gave_up = isinstance(exc, NotInRoster) or (
                            not job.opened and job.attempts >= FIRST_CONTACT_ATTEMPTS
                        )
                        if gave_up or patience.exhausted(patience.backoff):
                            job.state = "failed"
                            return
                        log.info("fetch %s interrupted (%s); retrying", job.id, job.error)
                        await asyncio.sleep(patience.next_wait())
                        continue
                    except ImageShareError as exc:
                        job.state, job.error = "failed", str(exc)
                        return
                    job.error = None
                    if job.emergency_reason is not None:
                        # The custodian served this node's break-glass: staff are told.
                        self.runtime.services.alerts.raise_break_glass(
                            job.token_id,
                            self.runtime.config.origin,
                            job.emergency_reason,
                            job.started + access_window(self.runtime),
                            job.custodian,
                        )
                    if not manifest.pending:
                        job.state = "done"
                        return
                    # A partial manifest: its instances are held now; the custodian's open
                    # waits for more of the study to land from its PACS, so ask again at
                    # once. Two minutes in which it names nothing new fail the fetch.
                    if len(manifest.instances) > named:
                        named = len(manifest.instances)
                        patience.progressed()
                    elif patience.exhausted():
                        job.state = "failed"
                        job.error = (
                            f"the custodian's PACS delivered nothing more in {RETRY_WINDOW:.0f} s"
                        )
                        return
        except asyncio.CancelledError:
            if job.cancelled:
                # Staff cancelled it from the dashboard: the fetch ends, the node goes on.
                job.state, job.error = "cancelled", "cancelled from the dashboard"
                return
            job.state, job.error = "failed", "the node stopped during the fetch"
            raise
        except Exception as exc:
            log.exception("fetch %s failed", job.id)
            job.state, job.error = "failed", f"internal error: {exc}"
        finally:
            job.finished = time.time()
            job.unreachable = job.state == "failed" and job.unreachable
            job.waiting = None
            with contextlib.suppress(Exception):
                await self.store.off_loop(
                    self.store.save_fetch, job.id, job.started, json.dumps(job.as_json())
                )

    def _custodian_urls(self, custodian: str) -> tuple[list[str], Member]:
        roster = self.runtime.services.roster
        member = roster.roster.get(custodian)
        if member is None:
            raise NotInRoster(f"custodian {custodian} is not in this node's roster")
        urls = roster.urls_of(member)
        if not urls:
            raise PeerUnreachable(f"no address known for custodian {custodian}")
        return urls, member

    async def _post(
        self, http: aiohttp.ClientSession, custodian: Member, url: str, body: bytes
    ) -> aiohttp.ClientResponse:
        """A POST signed with this node's key; raises for any answer but 200 (a refusal
        only if the custodian signed it for this request, else PeerUnreachable)."""
        identity = self.runtime.identity
        target = yarl.URL(url)
        headers = node_signed_headers(identity, "POST", target, body, custodian.origin)
        try:
            response = await http.post(target, data=body, headers=headers, allow_redirects=False)
        except (*CONNECTION_ERRORS, OSError) as exc:
            raise PeerUnreachable(f"custodian unreachable: {describe(exc)}") from exc
        if response.status != 200:
            try:
                await raise_for_answer(
                    response,
                    refuser=(custodian.origin, custodian.public_key),
                    asked=parse_headers(headers, custodian.origin),
                    refine=_transfer_refusal,
                )
            finally:
                response.release()
        return response

    async def _attempt(self, job: FetchJob, http: aiohttp.ClientSession) -> Manifest:
        """One transfer: open, then stream what this node lacks of the manifest; returns
        the manifest (partial when the custodian is still retrieving from its PACS)."""
        urls, custodian = self._custodian_urls(job.custodian)
        ephemeral = EphemeralKey.generate()
        body = OpenRequest(job.token, ephemeral.public).encode()
        # The proven learned address first, then the roster's; the one that answers (or
        # refuses, signed) serves all.
        for position, base in enumerate(urls):
            try:
                response = await self._post(http, custodian, f"{base}/p2p/transfer", body)
                break
            except PeerUnreachable:
                if position == len(urls) - 1:
                    raise
        try:
            opened = decode_open_response(await read_bounded(response, MAX_OPEN_RESPONSE_BYTES))
        finally:
            response.release()
        keys = receiver_session(
            self.runtime.identity.seed,
            ephemeral,
            custodian.public_key,
            opened.ephemeral,
            job.token_id,
        )
        job.opened = True
        manifest = decode_manifest(open_sealed(keys.manifest, opened.sealed_manifest))
        if manifest.token_id != job.token_id:
            raise BadInput("the custodian's manifest is for another token")
        job.instances_total = len(manifest.instances) + manifest.pending
        job.bytes_total = manifest.total_bytes
        job.waiting = (
            f"the custodian is retrieving {manifest.pending} more instances from its PACS"
            if manifest.pending
            else None
        )
        store = self.runtime.store
        present = await store.off_loop(
            store.digests_present, [e.digest.hex() for e in manifest.instances]
        )
        missing = [e.handle for e in manifest.instances if e.digest.hex() not in present]
        held = [e for e in manifest.instances if e.digest.hex() in present]
        job.instances_done = len(held)
        job.bytes_done = sum(e.size for e in held)
        held_studies = await store.off_loop(
            store.studies_with_digests, [e.digest.hex() for e in held]
        )
        self._note_studies(job, held_studies)
        if missing:
            url = f"{base}/p2p/transfer/{opened.transfer_id}/instances"
            await self._receive(job, http, custodian, url, keys, manifest, missing)
        return manifest

    def _note_studies(self, job: FetchJob, study_uids: list[str]) -> None:
        for uid in study_uids:
            if uid not in job.study_uids:
                job.study_uids.append(uid)

    async def _receive(
        self,
        job: FetchJob,
        http: aiohttp.ClientSession,
        custodian: Member,
        url: str,
        keys: SessionKeys,
        manifest: Manifest,
        handles: list[int],
    ) -> None:
        offered = CODECS if self.runtime.config.transfer.compression != "off" else ()
        receiver = _StreamReceiver(self.runtime, manifest, handles, keys.instances, offered)
        stream_id = "in-" + secrets.token_hex(12)
        await self.store.off_loop(
            self.store.open_stream,
            stream_id,
            Receipt.kind,
            job.token_id,
            job.custodian,
            time.time(),
        )
        arrived: list[StreamedInstance] = []
        pending: asyncio.Future[None] | None = None
        started = time.perf_counter()
        flushed_at = time.monotonic()
        commit_wait = 0.0

        async def flush() -> None:
            nonlocal pending, commit_wait
            batch = receiver.take_ready()
            if pending is not None:
                waited_from = time.perf_counter()
                await pending
                commit_wait += time.perf_counter() - waited_from
                pending = None
            if batch:
                pending = asyncio.ensure_future(
                    asyncio.to_thread(self._commit, job, stream_id, manifest, batch, arrived)
                )

        try:
            response = await self._post(http, custodian, url, encode_handles(handles, offered))
            try:
                async for chunk in response.content.iter_chunked(RECEIVE_BYTES):
                    job.bytes_received += len(chunk)
                    await asyncio.to_thread(receiver.feed, chunk)
                    if receiver.ready and (
                        len(receiver.ready) >= COMMIT_INSTANCES
                        or receiver.ready_bytes >= COMMIT_BYTES
                        or time.monotonic() - flushed_at >= COMMIT_SECONDS
                    ):
                        flushed_at = time.monotonic()
                        await flush()
            finally:
                response.release()
            receiver.close()
        finally:
            try:
                # What arrived and verified is kept even if the stream was cut.
                await flush()
                await flush()
            finally:
                receiver.abort()
                received_at = time.perf_counter()
                await asyncio.shield(
                    asyncio.to_thread(self._close_receipt, job, stream_id, arrived)
                )
                log.info(
                    "fetch %s: %d instances (%.1f MB) stored in %.2f s, %.2f s of it waiting"
                    " for durable commits; receipts in %.2f s",
                    job.id,
                    len(arrived),
                    sum(a.size for a in arrived) / 1e6,
                    received_at - started,
                    commit_wait,
                    time.perf_counter() - received_at,
                )

    def _commit(
        self,
        job: FetchJob,
        stream_id: str,
        manifest: Manifest,
        batch: list[tuple[StagingFile, ManifestEntry]],
        arrived: list[StreamedInstance],
    ) -> None:
        staged: list[StagedInstance] = []
        try:
            for staging, _ in batch:
                staged.append(staging.finish())
        except BaseException:
            for staging, _ in batch:
                staging.abort()
            raise
        results = self.runtime.store.commit(
            staged, source=source_label(job.custodian, job.token_id)
        )
        items = [
            StreamedInstance(manifest.studies[entry.study], entry.digest, entry.size)
            for _, entry in batch
        ]
        self.store.journal(stream_id, items)
        arrived += items
        job.instances_done += len(items)
        job.instances_received += len(items)
        job.bytes_done += sum(i.size for i in items)
        for result in results:
            if result.study_instance_uid not in job.study_uids:
                job.study_uids.append(result.study_instance_uid)

    def _close_receipt(
        self, job: FetchJob, stream_id: str, arrived: list[StreamedInstance]
    ) -> None:
        self._append_accounting(Receipt.kind, job.token_id, job.custodian, arrived)
        self.store.mark_recorded(stream_id)
        if arrived:
            self.runtime.security_audit.record(
                atna.instances_transferred,
                False,
                job.custodian,
                "",
                job.study_uids,
                len(arrived),
                "transfer",
            )


def _transfer_refusal(status: int, document: dict[str, Any]) -> ImageShareError | None:
    """What a custodian's verified refusal means for a fetch, beyond the status alone: the
    consent rule that failed (403), or a transfer it no longer knows (404)."""
    message = str(document.get("error") or "")
    rule = document.get("rule")
    if status == 403 and isinstance(rule, str):
        known = {r.value: m for r, m in RULE_MESSAGES.items()}
        return TransferRefused(rule, known.get(rule) or message or "refused by the custodian")
    if status == 401:
        return Unauthorized(f"the custodian did not accept this node's signature: {message}")
    if status == 404:
        return ChannelError(f"the custodian no longer knows the transfer: {message}")
    if status == 503 and document.get("pacs") == PACS_UNAVAILABLE:
        return CustodianPacsUnavailable(f"the custodian's PACS cannot deliver now: {message}")
    return None
