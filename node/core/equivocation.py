"""Equivocation proofs: two checkpoints of one log, signed by its key, that cannot both hold.

A proof is self-contained: anyone with the log's verifier key checks it, holding neither
history. Its JSON form (served at ``GET /ledger/equivocations``, pushed with ``POST
/p2p/equivocation``; docs/federation.md is the specification) is::

    {"log_id":      lowercase hex SHA-256 of the origin,
     "origin":      the log's origin,
     "notes":       [smaller, larger]   two C2SP signed notes (tlog-checkpoints),
     "prefix_root": base64 | null       root of the larger tree at the smaller size,
     "consistency": [base64, ...]       RFC 9162 consistency proof from
                                        (smaller size, prefix_root) to the larger checkpoint,
     "reason":      text, "detected_at": unix seconds   (informative, not verified)}

It holds if both notes carry a valid signature of the log's key over checkpoints of its
origin, and either both are of one size with different roots, or ``consistency``
proves that the larger checkpoint's tree had ``prefix_root`` at the smaller size and that
root is not the one the smaller checkpoint signed. Since the consistency proof ends at a
root the log signed, ``prefix_root`` is what the log committed to at that size: the log
signed two roots for one prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from node.core.base64url import b64_decode, b64_encode
from node.core.keys import VerifierKey
from node.core.merkle import EMPTY_ROOT, HASH_SIZE, verify_consistency
from node.core.notes import MAX_NOTE_BYTES, Checkpoint, parse_vkey, signed_only_by, verify_note
from node.core.origins import log_id
from node.errors import BadInput

# RFC 9162 consistency proofs of trees below 2**64 leaves have fewer hashes than this.
MAX_CONSISTENCY_HASHES = 130


@dataclass(frozen=True)
class EquivocationProof:
    """The evidence that a log signed two histories (see the module docstring)."""

    origin: str
    notes: tuple[str, str]
    prefix_root: bytes | None = None
    consistency: tuple[bytes, ...] = ()

    @property
    def log_id(self) -> str:
        return log_id(self.origin)

    def as_json(self) -> dict[str, Any]:
        """The proof's wire form, without the informative reason and time."""
        return {
            "log_id": self.log_id,
            "origin": self.origin,
            "notes": list(self.notes),
            "prefix_root": None if self.prefix_root is None else _b64(self.prefix_root),
            "consistency": [_b64(h) for h in self.consistency],
        }

    @classmethod
    def from_json(cls, document: Any) -> EquivocationProof:
        """Parse the wire form; raises BadInput if a field is missing, mistyped or too large.

        Nothing is verified here: see verify_equivocation.
        """
        if not isinstance(document, dict):
            raise BadInput("an equivocation proof must be a JSON object")
        origin, notes = document.get("origin"), document.get("notes")
        prefix_root, consistency = document.get("prefix_root"), document.get("consistency", [])
        if not isinstance(origin, str) or document.get("log_id") != log_id(origin):
            raise BadInput("an equivocation proof needs its log's origin and log_id")
        if (
            not isinstance(notes, list)
            or len(notes) != 2
            or not all(isinstance(n, str) and len(n) <= MAX_NOTE_BYTES for n in notes)
        ):
            raise BadInput("an equivocation proof needs two signed notes")
        if not isinstance(consistency, list) or len(consistency) > MAX_CONSISTENCY_HASHES:
            raise BadInput("an equivocation proof's consistency proof must be a short list")
        return cls(
            origin,
            (notes[0], notes[1]),
            None if prefix_root is None else _hash(prefix_root),
            tuple(_hash(h) for h in consistency),
        )


@dataclass(frozen=True)
class VerifiedEquivocation:
    """A proof that verified, in its one canonical form, and what it shows."""

    proof: EquivocationProof  # notes smaller first, each with only the log's signature
    reason: str


def verify_equivocation(proof: EquivocationProof, vkey: VerifierKey | str) -> VerifiedEquivocation:
    """Check a proof against the log's key alone; returns it canonical, with its reason.

    Raises Unauthorized if a note is not validly signed by ``vkey``, and BadInput if the
    proof is malformed, about another log, or does not show two inconsistent checkpoints.
    """
    key = vkey if isinstance(vkey, VerifierKey) else parse_vkey(vkey)
    if proof.origin != key.name:
        raise BadInput(f"the proof is about {proof.origin}, not the log of {key.name}")
    signed = sorted(
        ((verify_note(note, key), signed_only_by(note, key)) for note in proof.notes),
        key=lambda pair: (pair[0].size, pair[1]),
    )
    (smaller, smaller_note), (larger, larger_note) = signed
    canonical = EquivocationProof(
        proof.origin, (smaller_note, larger_note), proof.prefix_root, proof.consistency
    )
    if smaller.size == larger.size:
        if smaller.root_hash == larger.root_hash:
            raise BadInput("the two checkpoints are the same tree head")
        if proof.prefix_root is not None or proof.consistency:
            raise BadInput("a proof of one size carries no consistency proof")
        return VerifiedEquivocation(canonical, f"two different roots at size {smaller.size}")
    prefix_root = proof.prefix_root
    if prefix_root is None:
        raise BadInput(
            "checkpoints of different sizes need the larger tree's root at the smaller size"
        )
    if not _proves_prefix(proof.consistency, smaller, larger, prefix_root):
        raise BadInput("the consistency proof does not lead to the larger checkpoint's root")
    if prefix_root == smaller.root_hash:
        raise BadInput("the larger checkpoint extends the smaller one")
    return VerifiedEquivocation(
        canonical,
        f"the tree signed at size {larger.size} has another root at size {smaller.size} "
        "than the one signed for that size",
    )


def _proves_prefix(
    consistency: Sequence[bytes], smaller: Checkpoint, larger: Checkpoint, prefix_root: bytes
) -> bool:
    if smaller.size == 0:
        # Every tree has the empty root at size 0 (RFC 9162 proves nothing there).
        return prefix_root == EMPTY_ROOT and not consistency
    return verify_consistency(consistency, smaller.size, larger.size, prefix_root, larger.root_hash)


def _b64(digest: bytes) -> str:
    return b64_encode(digest)


def _hash(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) > 64:
        raise BadInput("a hash in an equivocation proof must be base64 text")
    return b64_decode(value, "a hash in an equivocation proof", size=HASH_SIZE)
