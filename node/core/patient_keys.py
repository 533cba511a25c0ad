"""Patient keys: one wallet seed, one unlinkable Ed25519 key per custodian.

A wallet holds a single 32-byte secret seed. Its key for a custodian is the Ed25519 key
whose seed is ``HMAC-SHA512(wallet seed, "imageshare/patient-key/v1\\n" + origin)[:32]``.
Two custodians (and everyone who replicates their logs) therefore see unrelated public
keys, while the wallet can always re-derive the key for any custodian from its seed.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

from nacl.signing import SigningKey

from node.core.keys import PUBLIC_KEY_SIZE, SEED_SIZE
from node.errors import BadInput

KEY_DERIVATION_DOMAIN = b"imageshare/patient-key/v1\n"
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")


def b64url(data: bytes) -> str:
    """base64url without padding: the form of every patient key and token on the wire."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def from_b64url(text: str, what: str, max_bytes: int = 4096) -> bytes:
    """Decode unpadded base64url; raises BadInput naming ``what`` if it is not that."""
    text = text.strip()
    if not text or len(text) > (max_bytes * 4) // 3 + 4 or not _B64URL.match(text):
        raise BadInput(f"{what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"{what} is not base64url") from exc
    if b64url(data) != text:
        raise BadInput(f"{what} is not canonical base64url")
    return data


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
    return b64url(public_key)


def parse_public_key(text: str) -> bytes:
    """Parse a patient public key's text form; raises BadInput if it is not 32 bytes."""
    key = from_b64url(text, "patient key", PUBLIC_KEY_SIZE)
    if len(key) != PUBLIC_KEY_SIZE:
        raise BadInput("a patient key is 32 bytes in base64url")
    return key
