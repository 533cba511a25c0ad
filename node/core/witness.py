"""C2SP tlog-witness: the add-checkpoint request, the witness's rule, and witness policies.

A log's node asks a witness to cosign its new checkpoint with ``POST <witness
URL>/add-checkpoint``; the body is

    old <size the witness last cosigned, decimal>\\n
    <consistency proof from that size, one standard-base64 hash per line (at most 63)>
    \\n
    <the signed checkpoint note>

The witness cosigns (200, ``cosignature/v1`` signature lines) only a checkpoint that is
signed by a key it trusts for the origin and is consistent with the last one it
cosigned, and remembers it in the same transaction as the check. Its answers:

    400  malformed body, checkpoint or proof line, or old size larger than the checkpoint
    404  the checkpoint's origin is not a log this witness knows
    403  no signature by a key it trusts for that origin verifies
    409  old size is not the size it last cosigned: ``text/x.tlog.size``, that size + "\\n"
    422  the consistency proof does not verify (for equal sizes: the roots differ)

Pure: the store runs ``judge`` inside its write transaction.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from node.core.base64url import b64_decode, b64_encode
from node.core.equivocation import EquivocationProof
from node.core.keys import VerifierKey
from node.core.merkle import EMPTY_ROOT, HASH_SIZE, verify_consistency
from node.core.notes import (
    MAX_SIGNATURES,
    Checkpoint,
    NoteSignature,
    add_signatures,
    parse_note,
    verify_cosignature,
    verify_note,
)
from node.errors import BadInput, ImageShareError, Unauthorized

MAX_PROOF_LINES = 63
# A note with the most signatures a note may hold, and its proof, fit.
MAX_REQUEST_BYTES = 64 * 1024
SIZE_CONTENT_TYPE = "text/x.tlog.size"
_OLD_LINE = re.compile(r"^old (0|[1-9][0-9]{0,18})$")


class WitnessRefusal(ImageShareError):
    """A witness declines to cosign; ``http_status`` is the tlog-witness answer."""

    def __init__(self, http_status: int, message: str, known_size: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        # For 409: the size of the checkpoint the witness last cosigned.
        self.known_size = known_size
        # Set by the witness when the refused checkpoint proves the log equivocated.
        self.evidence: EquivocationProof | None = None


@dataclass(frozen=True)
class AddCheckpoint:
    """A parsed add-checkpoint request: old size, consistency proof, signed note."""

    old_size: int
    proof: tuple[bytes, ...]
    note: str
    checkpoint: Checkpoint

    def encode(self) -> bytes:
        """The request body."""
        return encode_add_checkpoint(self.old_size, self.proof, self.note)


@dataclass(frozen=True)
class Witnessed:
    """What a witness last cosigned for one log: its size and root."""

    size: int
    root: bytes


def encode_add_checkpoint(old_size: int, proof: Sequence[bytes], note: str) -> bytes:
    """An add-checkpoint request body; BadInput if the proof is too long or malformed."""
    if len(proof) > MAX_PROOF_LINES or any(len(h) != HASH_SIZE for h in proof):
        raise BadInput(f"a witness takes at most {MAX_PROOF_LINES} 32-byte proof hashes")
    lines = [f"old {old_size}", *(b64_encode(h) for h in proof)]
    return ("\n".join(lines) + "\n\n" + note).encode()


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    """Parse a request body; WitnessRefusal(400) if anything in it is malformed."""
    if len(body) > MAX_REQUEST_BYTES:
        raise WitnessRefusal(400, f"an add-checkpoint body is at most {MAX_REQUEST_BYTES} bytes")
    head, blank, note_bytes = body.partition(b"\n\n")
    if not blank:
        raise WitnessRefusal(400, "the body needs a blank line before the checkpoint")
    try:
        lines = head.decode("ascii").split("\n")
        note = note_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WitnessRefusal(400, "the body is not text") from exc
    match = _OLD_LINE.match(lines[0])
    if match is None:
        raise WitnessRefusal(400, "the first line must be 'old <decimal size>'")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise WitnessRefusal(400, f"a consistency proof has at most {MAX_PROOF_LINES} lines")
    proof = []
    for line in lines[1:]:
        try:
            digest = b64_decode(line, "a proof line", size=HASH_SIZE)
        except BadInput as exc:
            raise WitnessRefusal(
                400, "a proof line is not one 32-byte hash in standard base64"
            ) from exc
        proof.append(digest)
    try:
        checkpoint = Checkpoint.parse(parse_note(note)[0])
    except BadInput as exc:
        raise WitnessRefusal(400, f"the checkpoint is malformed: {exc}") from exc
    old_size = int(match.group(1))
    if old_size > checkpoint.size:
        raise WitnessRefusal(400, "old size is larger than the checkpoint's size")
    return AddCheckpoint(old_size, tuple(proof), note, checkpoint)


def judge(
    request: AddCheckpoint, trusted: Sequence[VerifierKey] | None, held: Witnessed | None
) -> Witnessed:
    """What the witness will remember if it cosigns ``request``; WitnessRefusal if not.

    ``trusted`` are the keys the witness trusts for the checkpoint's origin (None: an
    origin it does not know); ``held`` is what it last cosigned for that log (None: never).
    """
    checkpoint = request.checkpoint
    if trusted is None:
        raise WitnessRefusal(404, f"this witness does not know the log {checkpoint.origin}")
    if not any(_signed_by(request.note, key) for key in trusted):
        raise WitnessRefusal(403, f"no key trusted for {checkpoint.origin} signed the checkpoint")
    known = held or Witnessed(0, EMPTY_ROOT)
    if request.old_size != known.size:
        raise WitnessRefusal(409, f"this witness last cosigned size {known.size}", known.size)
    if checkpoint.size == 0 and checkpoint.root_hash != EMPTY_ROOT:
        raise WitnessRefusal(422, "an empty tree has the empty root")
    if not verify_consistency(
        list(request.proof), known.size, checkpoint.size, known.root, checkpoint.root_hash
    ):
        raise WitnessRefusal(
            422, f"the checkpoint is not consistent with size {known.size} as cosigned"
        )
    return Witnessed(checkpoint.size, checkpoint.root_hash)


def _signed_by(note: str, key: VerifierKey) -> bool:
    try:
        verify_note(note, key)
    except (BadInput, Unauthorized):
        return False
    return True


def parse_cosignature_lines(text: str) -> list[NoteSignature]:
    """The signature lines a witness answered (each ``— name base64\\n``); BadInput if not."""
    if not text or not text.endswith("\n"):
        raise BadInput("a witness answers signature lines ending in a newline")
    # The lines are parsed as the signature block of a note with a placeholder body.
    return parse_note("x\n\n" + text)[1]


@dataclass(frozen=True)
class WitnessPolicy:
    """A checkpoint counts as published once ``threshold`` of ``witnesses`` cosigned it."""

    witnesses: tuple[VerifierKey, ...]
    threshold: int

    def cosigners(self, note: str) -> list[str]:
        """The names of the policy's witnesses whose valid cosignature ``note`` carries."""
        body, signatures = parse_note(note)
        names = []
        for witness in self.witnesses:
            if any(verify_cosignature(body, sig, witness) is not None for sig in signatures):
                names.append(witness.name)
        return names

    def met_by(self, note: str) -> bool:
        """True if ``note`` carries valid cosignatures of at least ``threshold`` witnesses."""
        return len(self.cosigners(note)) >= self.threshold


def with_cosignature(note: str, signature: NoteSignature, preferred: Collection[str]) -> str | None:
    """``note`` carrying ``signature`` too, within a note's signature limit; None: not kept.

    Go's sumdb/note, like the signed-note spec's advice, refuses a note of more than
    MAX_SIGNATURES signatures, and a federation has more members than that: so a checkpoint
    carries its log's signature and the first cosignatures to arrive. When it is full, a
    cosignature by a ``preferred`` witness (one the log's witness policy counts) takes the
    place of the latest one by a witness the policy does not count, so the policy can
    still be met; any other is not kept. A witness's new cosignature replaces its old one.
    """
    body, held = parse_note(note)
    key = (signature.name, signature.key_id)
    if len(held) < MAX_SIGNATURES or any((s.name, s.key_id) == key for s in held):
        return add_signatures(note, [signature])
    if signature.name not in preferred:
        return None
    log_origin = Checkpoint.parse(body).origin
    for victim in reversed(held):
        if victim.name != log_origin and victim.name not in preferred:
            without = body + "\n" + "".join(s.line() for s in held if s is not victim)
            return add_signatures(without, [signature])
    return None
