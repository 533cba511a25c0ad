"""C2SP signed notes, tlog checkpoints and tlog cosignatures (witnessing).

- signed-note: ``body`` (UTF-8 lines, each ending in a newline), a blank line, then one
  line per signature: ``— <name> <base64(key_id(4) || signature)>``.
- tlog-checkpoint: the body is ``origin``, the tree size in decimal, the std-base64 root
  hash, then optional extension lines.
- tlog-cosignature/v1: a witness signs ``cosignature/v1\\ntime <t>\\n`` + checkpoint body;
  its signature value is key_id(4) || t (8 bytes, big-endian) || Ed25519 signature(64),
  with the key ID computed with algorithm byte 0x04 instead of 0x01. A node's one Ed25519
  key serves both roles; the cosigner key ID is derived from the same public key.
"""

from __future__ import annotations

import re
import struct
import unicodedata
from dataclasses import dataclass

from node.core.base64url import b64_decode, b64_encode
from node.core.keys import (
    COSIGNATURE_ALG,
    ED25519_ALG,
    NodeIdentity,
    VerifierKey,
    check_key_name,
    cosigner_key_id,
    key_id,
    parse_verifier_key,
    verify_ed25519,
)
from node.core.merkle import HASH_SIZE
from node.errors import BadInput, Unauthorized

SIGNATURE_PREFIX = "— "
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 1 << 20
COSIGNATURE_SIZE = 8 + 64
# Key ID and signature; room for algorithms with signatures larger than Ed25519's.
MAX_SIGNATURE_BYTES = 1024
_DECIMAL = re.compile(r"^(0|[1-9][0-9]{0,19})$")


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: signer name, 4-byte key ID, and the signature value after it."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        """The signature line, newline included."""
        encoded = b64_encode(self.key_id + self.signature)
        return f"{SIGNATURE_PREFIX}{self.name} {encoded}\n"


@dataclass(frozen=True)
class Checkpoint:
    """A tlog-checkpoint: a log's origin, tree size and root hash."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        """The checkpoint text that gets signed."""
        lines = [self.origin, str(self.size), b64_encode(self.root_hash)]
        return "\n".join([*lines, *self.extensions]) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint body; raises BadInput if it is malformed."""
        if not isinstance(text, str) or not text.endswith("\n"):
            raise BadInput("checkpoint must be text ending in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise BadInput("checkpoint needs origin, size and root hash lines")
        origin, size_text, root_text, *extensions = lines
        if not origin or _has_control(origin):
            raise BadInput("checkpoint origin is empty or has control characters")
        if not _DECIMAL.match(size_text) or int(size_text) >= 2**63:
            raise BadInput("checkpoint size is not a decimal integer")
        root = b64_decode(root_text, "checkpoint root hash", size=HASH_SIZE)
        if any(not ext or _has_control(ext) for ext in extensions):
            raise BadInput("checkpoint extension lines must be non-empty text")
        return cls(origin, int(size_text), root, tuple(extensions))


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _check_body(body: str) -> None:
    if not isinstance(body, str) or not body.endswith("\n"):
        raise BadInput("note text must end with a newline")
    if any(unicodedata.category(c) == "Cc" and c != "\n" for c in body):
        raise BadInput("note text has control characters")


def sign_note(body: str, identity: NodeIdentity) -> str:
    """A signed note: ``body`` signed by the node's key under its origin; BadInput if malformed."""
    _check_body(body)
    check_key_name(identity.origin)
    signature = NoteSignature(identity.origin, identity.key_id, identity.sign(body.encode()))
    return body + "\n" + signature.line()


def parse_note(text: str | bytes) -> tuple[str, list[NoteSignature]]:
    """Split a signed note into its body and signatures (unverified); BadInput if malformed."""
    if isinstance(text, bytes):
        if len(text) > MAX_NOTE_BYTES:
            raise BadInput("signed note is too large")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput("signed note is not UTF-8") from exc
    if not isinstance(text, str) or len(text) > MAX_NOTE_BYTES:
        raise BadInput("signed note must be text of reasonable size")
    split = text.rfind("\n\n")
    if split < 0:
        raise BadInput("signed note has no signature block")
    body, block = text[: split + 1], text[split + 2 :]
    _check_body(body)
    if not block or not block.endswith("\n"):
        raise BadInput("signed note has no signatures or lacks a final newline")
    signatures: list[NoteSignature] = []
    for line in block[:-1].split("\n"):
        if len(signatures) >= MAX_SIGNATURES:
            raise BadInput(f"signed note has more than {MAX_SIGNATURES} signatures")
        signatures.append(_parse_signature_line(line))
    return body, signatures


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(SIGNATURE_PREFIX):
        raise BadInput("signed note has a line that is not a signature")
    name, space, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
    if not space or " " in encoded:
        raise BadInput("signature line must be '— name base64'")
    check_key_name(name)
    # Canonical only: a flipped unused bit would otherwise give a second text of one note.
    raw = b64_decode(encoded, "signature", max_bytes=MAX_SIGNATURE_BYTES)
    if len(raw) < 5:
        raise BadInput("signature is too short")
    return NoteSignature(name, raw[:4], raw[4:])


def _as_verifier_key(vkey: VerifierKey | str) -> VerifierKey:
    key = vkey if isinstance(vkey, VerifierKey) else parse_vkey(vkey)
    if key.key_id != key_id(key.name, key.public_key):
        raise BadInput("a note signer's key must be an Ed25519 (0x01) key")
    return key


def _verified_signature(text: str | bytes, key: VerifierKey) -> tuple[str, NoteSignature]:
    body, signatures = parse_note(text)
    for sig in signatures:
        if sig.name == key.name and sig.key_id == key.key_id:
            if key.verify(body.encode(), sig.signature):
                return body, sig
            raise Unauthorized(f"the signature of {key.name} on the note does not verify")
    raise Unauthorized(f"the note carries no signature by {key.name}")


def verify_signed_body(text: str | bytes, vkey: VerifierKey | str) -> str:
    """The body of a note carrying a valid signature by ``vkey``.

    Raises BadInput if the note is malformed and Unauthorized if that signature is missing
    or does not verify.
    """
    return _verified_signature(text, _as_verifier_key(vkey))[0]


def signed_only_by(text: str | bytes, vkey: VerifierKey | str) -> str:
    """The note with only ``vkey``'s valid signature kept (cosignatures dropped).

    One checkpoint then has one text, whoever collected which cosignatures. Raises like
    verify_signed_body.
    """
    body, signature = _verified_signature(text, _as_verifier_key(vkey))
    return body + "\n" + signature.line()


def verify_note(text: str | bytes, vkey: VerifierKey | str) -> Checkpoint:
    """The checkpoint in a note signed by the log key ``vkey``.

    Raises Unauthorized if the log's signature is missing or bad, BadInput if the note or
    checkpoint is malformed or names another origin than the key.
    """
    key = _as_verifier_key(vkey)
    checkpoint = Checkpoint.parse(verify_signed_body(text, key))
    if checkpoint.origin != key.name:
        raise BadInput(f"checkpoint origin {checkpoint.origin!r} is not the key's {key.name!r}")
    return checkpoint


def cosigner_vkey_string(name: str, public_key: bytes) -> str:
    """The C2SP vkey of a cosigner key: ``name+hex(keyid)+base64(0x04 || pubkey)``."""
    encoded = b64_encode(bytes([COSIGNATURE_ALG]) + public_key)
    return f"{name}+{cosigner_key_id(name, public_key).hex()}+{encoded}"


def parse_vkey(vkey: str) -> VerifierKey:
    """Parse a C2SP Ed25519 vkey: a node key (alg 0x01) or a cosigner key (alg 0x04).

    Raises BadInput like ``node.core.keys.parse_verifier_key``.
    """
    return parse_verifier_key(vkey, (ED25519_ALG, COSIGNATURE_ALG))


# Kept for callers that name the cosigner case explicitly.
parse_cosigner_key = parse_vkey


def cosignature_message(checkpoint_body: str, timestamp: int) -> bytes:
    """What a witness signs: the tlog-cosignature/v1 header and the checkpoint body."""
    return f"cosignature/v1\ntime {timestamp}\n{checkpoint_body}".encode()


def cosign_checkpoint(
    checkpoint_body: str, identity: NodeIdentity, timestamp: int
) -> NoteSignature:
    """This node's tlog-cosignature/v1 of a checkpoint body, at unix time ``timestamp``."""
    _check_body(checkpoint_body)
    if not 0 <= timestamp < 2**63:
        raise BadInput("cosignature time must be a non-negative 64-bit integer")
    signature = identity.sign(cosignature_message(checkpoint_body, timestamp))
    return NoteSignature(
        identity.origin,
        cosigner_key_id(identity.origin, identity.public_key),
        struct.pack(">Q", timestamp) + signature,
    )


def verify_cosignature(
    checkpoint_body: str, signature: NoteSignature, vkey: VerifierKey | str
) -> int | None:
    """The cosignature's timestamp if ``signature`` is ``vkey``'s valid cosignature, else None.

    ``vkey`` may be the cosigner's node key (0x01) or cosigner key (0x04); both name the
    same Ed25519 public key. Never raises on a bad signature or key.
    """
    try:
        key = vkey if isinstance(vkey, VerifierKey) else parse_vkey(vkey)
    except BadInput:
        return None
    if (
        signature.name != key.name
        or signature.key_id != cosigner_key_id(key.name, key.public_key)
        or len(signature.signature) != COSIGNATURE_SIZE
        or not isinstance(checkpoint_body, str)
    ):
        return None
    (timestamp,) = struct.unpack(">Q", signature.signature[:8])
    message = cosignature_message(checkpoint_body, timestamp)
    if not verify_ed25519(key.public_key, message, signature.signature[8:]):
        return None
    return int(timestamp)


def add_signatures(note_text: str, signatures: list[NoteSignature]) -> str:
    """``note_text`` with ``signatures`` appended; one replaces an existing line of its key."""
    body, existing = parse_note(note_text)
    merged = {(s.name, s.key_id): s for s in existing}
    for sig in signatures:
        check_key_name(sig.name)
        merged[(sig.name, sig.key_id)] = sig
    if len(merged) > MAX_SIGNATURES:
        raise BadInput(f"a note holds at most {MAX_SIGNATURES} signatures")
    return body + "\n" + "".join(s.line() for s in merged.values())
