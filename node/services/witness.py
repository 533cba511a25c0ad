"""C2SP tlog-witness, both sides: this node witnesses every member's log, and asks every
member (and the outside witnesses configured) to witness its own.

- **As a witness** (``POST /witness/add-checkpoint``, node.edges.http.witness_api): it
  trusts, for each member's origin, the member's roster key and the key its mirror's
  chain of rotations has in force at the checkpoint's size. The check and the new state
  are one store transaction (``LedgerStore.witness``), so of two racing requests only
  one moves it on, and it never cosigns two inconsistent checkpoints of one log, across
  restarts too.
- **As a log**: whenever its log grows, and every few seconds while some witness has not
  cosigned the latest checkpoint, it sends each witness ``old`` (the size that witness
  last cosigned, learnt from its answers: a 409 says it), the consistency proof from
  there and the checkpoint, and keeps each cosignature that verifies with that witness's
  key. The checkpoint counts as **published** once the witness policy (``[witness]``) is
  met; the published checkpoint is what proof files carry (``OwnLog.published_note``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from node.core import notes
from node.core.equivocation import EquivocationProof
from node.core.keys import VerifierKey
from node.core.witness import (
    SIZE_CONTENT_TYPE,
    AddCheckpoint,
    WitnessPolicy,
    WitnessRefusal,
    encode_add_checkpoint,
    parse_add_checkpoint,
    parse_cosignature_lines,
)
from node.errors import BadInput, Conflict, ImageShareError
from node.services.peer_client import read_bounded
from node.store.ledger import MirrorLog

if TYPE_CHECKING:
    from node.services.runtime import NodeRuntime

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024
# While a witness has not cosigned the latest checkpoint, it is asked again this often.
RETRY_INTERVAL = 5.0
FIRST_RETRY = 0.25
ADD_CHECKPOINT_PATH = "/witness/add-checkpoint"


@dataclass(frozen=True)
class WitnessEndpoint:
    """A witness this node asks: its key and where it answers add-checkpoint."""

    key: VerifierKey
    url: str


class WitnessService:
    """This node as a tlog-witness of the members' logs, and as a log asking witnesses."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.config = runtime.config.witness
        self.store = runtime.services.ledger.store
        # Witness name -> the size it last cosigned of this node's log, as it told us.
        self.known_sizes: dict[str, int] = {}
        self._grew = asyncio.Event()

    # ---- as a witness ---------------------------------------------------------------------

    def trusted_keys(self, origin: str, size: int) -> list[VerifierKey] | None:
        """The keys trusted to sign ``origin``'s checkpoint of ``size`` (None: not a
        member's log): the roster's key, and the key the mirror's chain of rotations has in
        force at that size, so a key rotated away from signs no new checkpoint."""
        member = self.runtime.services.roster.roster.get(origin)
        if member is None or origin == self.runtime.config.origin:
            return None
        keys = [notes.parse_vkey(member.vkey)]
        mirror = self.store.log_by_id(member.log_id)
        chain = mirror.key_chain() if isinstance(mirror, MirrorLog) else None
        return keys + ([chain.verifier_key_at(size)] if chain is not None else [])

    def add_checkpoint(self, body: bytes) -> str:
        """Judge a tlog-witness add-checkpoint request; the cosignature line if it holds.

        Blocking (a store transaction). Raises WitnessRefusal with the spec's status.
        """
        request: AddCheckpoint = parse_add_checkpoint(body)
        checkpoint = request.checkpoint
        try:
            self.store.witness(request, self.trusted_keys(checkpoint.origin, checkpoint.size))
        except WitnessRefusal as refusal:
            if refusal.http_status == 422:
                refusal.evidence = self._same_size_fork(request)
            raise
        signature = notes.cosign_checkpoint(
            request.checkpoint.body(), self.runtime.identity, int(time.time())
        )
        return signature.line()

    def _same_size_fork(self, request: AddCheckpoint) -> EquivocationProof | None:
        """Two signed checkpoints of one size and two roots: what the witness cosigned and
        the one refused. Proof of equivocation from checkpoints alone, with no entries."""
        held = self.store.witnessed_note(request.checkpoint.origin)
        if held is None:
            return None
        kept = notes.Checkpoint.parse(notes.parse_note(held)[0])
        if kept.size != request.checkpoint.size or kept.root_hash == request.checkpoint.root_hash:
            return None
        return EquivocationProof(request.checkpoint.origin, (held, request.note))

    async def submit(self, body: bytes) -> str:
        """``add_checkpoint`` from a coroutine; a refusal that proves the log equivocated
        is kept, served and pushed like any equivocation proof (node.services.replication)."""
        try:
            return await asyncio.to_thread(self.add_checkpoint, body)
        except WitnessRefusal as refusal:
            if refusal.evidence is not None:
                replication = self.runtime.services.replication
                with contextlib.suppress(ImageShareError):
                    replication.accept_proof("this node as its witness", refusal.evidence.as_json())
            raise

    # ---- as a log -------------------------------------------------------------------------

    def endpoints(self) -> list[WitnessEndpoint]:
        """Every member (at the URL it proved) and every outside witness configured."""
        roster = self.runtime.services.roster
        found = []
        for member in roster.roster:
            urls = roster.urls_of(member)
            if urls and member.origin != self.runtime.config.origin:
                found.append(WitnessEndpoint(notes.parse_vkey(member.vkey), urls[0] + "/witness"))
        for outside in self.config.outside:
            found.append(WitnessEndpoint(notes.parse_vkey(outside.vkey), outside.url.rstrip("/")))
        return found

    def policy(self, endpoints: Iterable[WitnessEndpoint]) -> WitnessPolicy:
        """The witness policy: ``threshold`` of the named witnesses (default: of all)."""
        keys = [e.key for e in endpoints]
        if self.config.policy:
            keys = [k for k in keys if k.name in self.config.policy]
        return WitnessPolicy(tuple(keys), self.config.threshold)

    def log_grew(self) -> None:
        """The own log grew: ask the witnesses now rather than at the next retry."""
        self._grew.set()

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Ask the witnesses to cosign each new checkpoint, for ever (a background task)."""
        delay = FIRST_RETRY
        while True:
            self._grew.clear()
            complete = False
            try:
                complete = await self.collect(session)
            except (ImageShareError, OSError) as exc:
                log.warning("collecting cosignatures failed: %s", exc)
            # A witness that did not answer (not up yet, say) is asked again soon, then
            # less and less often.
            delay = FIRST_RETRY if complete else min(delay * 2, RETRY_INTERVAL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._grew.wait(), delay)
            if self._grew.is_set():
                delay = FIRST_RETRY

    async def collect(self, session: aiohttp.ClientSession) -> bool:
        """Ask every witness that has not cosigned the latest checkpoint; publish if met.

        True if every witness has cosigned it.
        """
        ledger = self.runtime.services.ledger
        note = await asyncio.to_thread(ledger.checkpoint_note)
        checkpoint = notes.Checkpoint.parse(notes.parse_note(note)[0])
        endpoints = self.endpoints()
        pending = [e for e in endpoints if self.known_sizes.get(e.key.name) != checkpoint.size]
        await asyncio.gather(*(self._ask(session, e, note, checkpoint) for e in pending))
        latest = ledger.own.checkpoint_note()
        if latest is not None:
            policy = self.policy(endpoints)
            await asyncio.to_thread(ledger.own.publish_if, latest, policy.met_by(latest))
        return all(self.known_sizes.get(e.key.name) == checkpoint.size for e in endpoints)

    async def _ask(
        self,
        session: aiohttp.ClientSession,
        witness: WitnessEndpoint,
        note: str,
        checkpoint: notes.Checkpoint,
    ) -> None:
        own = self.runtime.services.ledger.own
        # Only the log's own signature goes to a witness, not others' cosignatures.
        signed = notes.signed_only_by(note, own.vkey_at(checkpoint.size))
        old = min(self.known_sizes.get(witness.key.name, 0), checkpoint.size)
        for _ in range(2):  # a 409 tells the size to prove from: one retry from there
            proof = own.consistency_proof(old, checkpoint.size)
            body = encode_add_checkpoint(old, proof, signed)
            try:
                async with session.post(
                    witness.url + "/add-checkpoint", data=body, allow_redirects=False
                ) as response:
                    answer = await read_bounded(response, MAX_ANSWER_BYTES)
                    status, content_type = response.status, response.content_type
            except (TimeoutError, aiohttp.ClientError, ImageShareError) as exc:
                log.info("witness %s unreachable: %s", witness.key.name, exc)
                return
            if status == 409 and content_type == SIZE_CONTENT_TYPE:
                known = _parse_size(answer)
                if known is None or known > checkpoint.size:
                    break
                old = known
                continue
            if status == 200:
                self._keep(witness, answer, checkpoint)
                return
            break
        log.info("witness %s declined size %d: %s", witness.key.name, checkpoint.size, status)

    def _keep(self, witness: WitnessEndpoint, answer: bytes, checkpoint: notes.Checkpoint) -> None:
        own = self.runtime.services.ledger.own
        try:
            lines = parse_cosignature_lines(answer.decode("utf-8"))
        except (BadInput, UnicodeDecodeError):
            log.info("witness %s answered no signature lines", witness.key.name)
            return
        body = checkpoint.body()
        for signature in lines:
            if notes.verify_cosignature(body, signature, witness.key) is None:
                continue
            # Conflict: a newer checkpoint was signed meanwhile; the next round asks again.
            with contextlib.suppress(Conflict):
                own.add_cosignature(signature, checkpoint_body=body, preferred=self.config.policy)
            self.known_sizes[witness.key.name] = checkpoint.size
            return
        log.info("witness %s answered no valid cosignature", witness.key.name)


def _parse_size(answer: bytes) -> int | None:
    text = answer.decode("ascii", errors="replace")
    if not text.endswith("\n") or not text[:-1].isdigit() or len(text) > 21:
        return None
    return int(text[:-1])
