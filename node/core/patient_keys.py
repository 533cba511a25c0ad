"""Patient keys: one wallet seed, one unlinkable Ed25519 key per custodian.

A wallet holds a single 32-byte secret seed. Its key for a custodian is the Ed25519 key
whose seed is ``HMAC-SHA512(wallet seed, "imageshare/patient-key/v1\\n" + origin)[:32]``.
Two custodians (and everyone who replicates their logs) therefore see unrelated public
keys, while the wallet can always re-derive the key for any custodian from its seed.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from nacl.signing import SigningKey

from node.core.base64url import b64url_decode, b64url_encode
from node.core.keys import PUBLIC_KEY_SIZE, SEED_SIZE
from node.errors import BadInput

KEY_DERIVATION_DOMAIN = b"imageshare/patient-key/v1\n"


def derive_patient_seed(wallet_seed: bytes, custodian_origin: str) -> bytes:
    """The Ed25519 seed of the wallet's key for one custodian."""
    if len(wallet_seed) != SEED_SIZE:
        raise BadInput("a wallet seed is 32 bytes")
    message = KEY_DERIVATION_DOMAIN + custodian_origin.encode()
    return hmac.new(wallet_seed, message, hashlib.sha512).digest()[:SEED_SIZE]


@dataclass(frozen=True)
class PatientKey:
    """A patient's signing key at one custodian."""

    custodian_origin: str
    seed: bytes

    @classmethod
    def derive(cls, wallet_seed: bytes, custodian_origin: str) -> PatientKey:
        return cls(custodian_origin, derive_patient_seed(wallet_seed, custodian_origin))

    @property
    def public_key(self) -> bytes:
        return bytes(SigningKey(self.seed).verify_key)

    @property
    def public_key_text(self) -> str:
        return encode_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return SigningKey(self.seed).sign(message).signature


def encode_public_key(public_key: bytes) -> str:
    """The text form of a patient public key (what `imageshare enroll --key` takes)."""
    return b64url_encode(public_key)


def parse_public_key(text: str) -> bytes:
    """Parse a patient public key's text form; raises BadInput if it is not 32 bytes."""
    # Pasted from a terminal or a file: surrounding whitespace is not part of the key.
    return b64url_decode(text.strip(), "patient key", size=PUBLIC_KEY_SIZE)
