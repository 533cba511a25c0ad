"""C2SP tlog-proof: a file a patient keeps that proves one ledger entry offline.

    c2sp.org/tlog-proof@v1
    extra <the entry's bytes, standard base64>
    index <the entry's index, decimal>
    <inclusion proof, one standard-base64 hash per line, leaf's sibling first>
    <blank line>
    <the log's signed checkpoint, with its witnesses' cosignatures, verbatim>

The ``extra`` line carries the entry itself (the spec's out-of-band data that the leaf
hash is computed from), so the file alone says what was recorded: a grant, revocation or
access. It verifies with the log's key and the witnesses' keys only, no network.

Verification is strict so that no byte of a file can change unnoticed: one canonical
spelling of every line, the entry must decode, every signature line must be the log's
or a known witness's and verify, and at least ``threshold`` known witnesses must have
cosigned.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from node.core.base64url import b64_decode, b64_encode
from node.core.entries import LedgerEntry, decode_entry
from node.core.keys import VerifierKey, cosigner_key_id
from node.core.merkle import HASH_SIZE, leaf_hash, verify_inclusion
from node.core.notes import Checkpoint, parse_note, verify_cosignature, verify_note
from node.errors import BadInput, Unauthorized

HEADER = "c2sp.org/tlog-proof@v1"
MAX_PROOF_FILE_BYTES = 256 * 1024
MAX_PROOF_HASHES = 63
_INDEX = re.compile(r"^index (0|[1-9][0-9]{0,18})$")


@dataclass(frozen=True)
class TlogProof:
    """A parsed tlog-proof: the entry (extra), its index, audit path and signed note."""

    entry: bytes
    index: int
    proof: tuple[bytes, ...]
    note: str

    def encode(self) -> bytes:
        """The file's bytes."""
        lines = [
            HEADER,
            f"extra {b64_encode(self.entry)}",
            f"index {self.index}",
            *(b64_encode(h) for h in self.proof),
        ]
        return ("\n".join(lines) + "\n\n" + self.note).encode()


@dataclass(frozen=True)
class VerifiedProof:
    """What a verified proof file shows: the entry, where, and who witnessed it."""

    entry: LedgerEntry
    index: int
    checkpoint: Checkpoint
    cosigners: list[str]


def parse_tlog_proof(data: bytes) -> TlogProof:
    """Parse a tlog-proof file; BadInput if it is malformed in any way."""
    if len(data) > MAX_PROOF_FILE_BYTES:
        raise BadInput(f"a proof file is at most {MAX_PROOF_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput("a proof file is UTF-8 text") from exc
    head, blank, note = text.partition("\n\n")
    if not blank:
        raise BadInput("a proof file needs a blank line before the checkpoint")
    lines = head.split("\n")
    if len(lines) < 3 or lines[0] != HEADER:
        raise BadInput(f"a proof file starts with {HEADER}, an extra and an index line")
    if not lines[1].startswith("extra "):
        raise BadInput("this proof file has no extra line holding the entry")
    entry = b64_decode(lines[1][len("extra ") :], "the extra line", max_bytes=MAX_PROOF_FILE_BYTES)
    match = _INDEX.match(lines[2])
    if match is None:
        raise BadInput("the index line is 'index <decimal>'")
    hashes = lines[3:]
    if len(hashes) > MAX_PROOF_HASHES:
        raise BadInput(f"an inclusion proof has at most {MAX_PROOF_HASHES} hashes")
    proof = []
    for line in hashes:
        proof.append(b64_decode(line, "a proof line", size=HASH_SIZE))
    return TlogProof(entry, int(match.group(1)), tuple(proof), note)


def verify_tlog_proof(
    proof: TlogProof,
    log_key: VerifierKey,
    witnesses: Sequence[VerifierKey] = (),
    threshold: int = 0,
    unknown_signatures_allowed: bool = False,
) -> VerifiedProof:
    """Check a proof file offline: the entry is at its index under a checkpoint signed by
    ``log_key`` and cosigned by at least ``threshold`` of ``witnesses``.

    Raises BadInput for a malformed file or entry, Unauthorized for a signature that is
    missing, bad or by an unknown key (unless ``unknown_signatures_allowed``), too few
    cosigners, or an inclusion that fails.
    """
    entry = decode_entry(proof.entry)
    checkpoint = verify_note(proof.note, log_key)
    body, signatures = parse_note(proof.note)
    cosigners: list[str] = []
    for signature in signatures:
        if signature.name == log_key.name and signature.key_id == log_key.key_id:
            continue  # verified above
        witness = next(
            (
                w
                for w in witnesses
                if w.name == signature.name
                and signature.key_id == cosigner_key_id(w.name, w.public_key)
            ),
            None,
        )
        if witness is None and unknown_signatures_allowed:
            continue
        if witness is None:
            raise Unauthorized(
                f"the proof carries a signature by an unknown key ({signature.name})"
            )
        if verify_cosignature(body, signature, witness) is None:
            raise Unauthorized(f"the cosignature by {signature.name} does not verify")
        if signature.name not in cosigners:
            cosigners.append(signature.name)
    if len(cosigners) < threshold:
        raise Unauthorized(f"{len(cosigners)} known witnesses cosigned, {threshold} are needed")
    if not verify_inclusion(
        list(proof.proof),
        leaf_hash(proof.entry),
        proof.index,
        checkpoint.size,
        checkpoint.root_hash,
    ):
        raise Unauthorized(f"the entry is not at index {proof.index} of the signed tree")
    return VerifiedProof(entry, proof.index, checkpoint, cosigners)
