"""Node identities: Ed25519 keys and the C2SP verifier-key strings that name them.

A node is named by its log origin. Its verifier key (vkey) is the C2SP signed-note form
``name+hex(keyid)+base64(0x01 || pubkey)`` with keyid the first four bytes of
SHA-256(name || 0x0A || 0x01 || pubkey). The same key cosigns checkpoints as a
tlog-cosignature/v1 key, named with algorithm byte 0x04 instead. ``check_key_name`` and
``parse_verifier_key`` are the one key-name rule and the one vkey parser.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from node.core.base64url import b64_decode, b64_encode
from node.errors import BadInput

ED25519_ALG = 0x01
COSIGNATURE_ALG = 0x04
SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte C2SP key ID of an Ed25519 key under ``name``."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519_ALG]) + public_key).digest()[:4]


def cosigner_key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte key ID of a tlog-cosignature/v1 key (algorithm byte 0x04)."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([COSIGNATURE_ALG]) + public_key).digest()[
        :4
    ]


def check_key_name(name: object) -> None:
    """Raise BadInput unless ``name`` is a C2SP signed-note key name.

    The spec's rule: non-empty, no Unicode space, no ``+`` (which ends the name in a
    vkey). Control characters are refused too: a signed note may not carry them, so a
    key named with one could never sign a note that opens.
    """
    if (
        not isinstance(name, str)
        or not name
        or "+" in name
        or any(c.isspace() or unicodedata.category(c) == "Cc" for c in name)
    ):
        raise BadInput("key name must be non-empty, without spaces, '+' or control characters")


def verifier_key_string(name: str, public_key: bytes) -> str:
    """The C2SP vkey string for an Ed25519 public key."""
    encoded = b64_encode(bytes([ED25519_ALG]) + public_key)
    return f"{name}+{key_id(name, public_key).hex()}+{encoded}"


@dataclass(frozen=True)
class VerifierKey:
    """A parsed vkey: who signs (name), with which key."""

    name: str
    key_id: bytes
    public_key: bytes

    def verify(self, message: bytes, signature: bytes) -> bool:
        return verify_ed25519(self.public_key, message, signature)

    def __str__(self) -> str:
        return verifier_key_string(self.name, self.public_key)


def parse_verifier_key(vkey: str, algorithms: Collection[int] = (ED25519_ALG,)) -> VerifierKey:
    """Parse a C2SP Ed25519 vkey ``name+hex(keyid)+base64(alg || pubkey)``.

    ``algorithms`` are the algorithm bytes accepted: a node key (0x01) unless the caller
    also takes a cosigner key (0x04). The returned key's ``key_id`` is the one the string
    names. Raises BadInput if the string is malformed, the name breaks ``check_key_name``,
    or the key ID does not match the key.
    """
    parts = vkey.split("+", 2) if isinstance(vkey, str) else []  # base64 may contain "+"
    if len(parts) != 3:
        raise BadInput("verifier key must be name+keyid+base64key")
    name, hex_id, encoded = parts
    check_key_name(name)
    try:
        claimed_id = bytes.fromhex(hex_id)
    except ValueError as exc:
        raise BadInput("verifier key is not hex and base64 as required") from exc
    key_bytes = b64_decode(encoded, "verifier key", max_bytes=256)
    if len(key_bytes) != 1 + PUBLIC_KEY_SIZE or key_bytes[0] not in algorithms:
        raise BadInput("verifier key is not an Ed25519 key")
    public_key = key_bytes[1:]
    expected = (
        key_id(name, public_key)
        if key_bytes[0] == ED25519_ALG
        else cosigner_key_id(name, public_key)
    )
    if expected != claimed_id:
        raise BadInput("verifier key ID does not match its key")
    return VerifierKey(name, claimed_id, public_key)


def verify_ed25519(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message``; never raises."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != 64:
        return False
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class NodeIdentity:
    """A node's signing key and the origin that names it."""

    origin: str
    seed: bytes

    @classmethod
    def generate(cls, origin: str) -> NodeIdentity:
        return cls(origin, bytes(SigningKey.generate()))

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def vkey(self) -> str:
        return verifier_key_string(self.origin, self.public_key)

    @property
    def key_id(self) -> bytes:
        return key_id(self.origin, self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature
