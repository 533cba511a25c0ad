"""End-to-end encryption between two nodes for one transfer.

Key agreement (both sides compute the same keys; no I/O, no clock)::

    static X25519 keys   sA, sB  derived from the nodes' Ed25519 keys
    ephemeral X25519     eA, eB  fresh for each transfer (forward secrecy)
    ee = DH(eB, eA)   es = DH(eB, sA)   se = DH(sB, eA)   ss = DH(sB, sA)
    transcript = SHA-256("imageshare/channel/v1" || pub(sA)... as below || token id)
    prk  = BLAKE2b-512(ee || es || se || ss || transcript, person="imageshare-chan1")
    key(label) = BLAKE2b-256(label, key=prk)

B is the grantee (it opens the transfer and receives), A the custodian (it sends). Only
the holder of A's static key can compute ``es`` and only the holder of B's can compute
``se``, so a key that decrypts proves both ends; ``ee`` alone already keeps past
transfers secret if a static key leaks later.

Data travels as one NaCl secretstream (XChaCha20-Poly1305) per stream: a 24-byte header,
then messages of at most MAX_MESSAGE bytes, each on the wire as a 4-byte big-endian
length followed by the ciphertext. The last message carries TAG_FINAL, so a stream
cut short is detected; reordering, dropping or altering any message fails authentication.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from nacl import bindings as sodium
from nacl.exceptions import CryptoError
from nacl.exceptions import RuntimeError as SodiumRuntimeError
from nacl.public import PrivateKey

from node.errors import BadInput

DOMAIN = b"imageshare/channel/v1"
KEY_SIZE = 32
HEADER_SIZE = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
OVERHEAD = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
# Largest plaintext message; bounds what a receiver must buffer for one message.
MAX_MESSAGE = 1024 * 1024
_LENGTH = struct.Struct(">I")

LABEL_MANIFEST = b"manifest"
LABEL_INSTANCES = b"instances"


class ChannelError(BadInput):
    """Encrypted data failed authentication, was cut short, or is malformed."""


@dataclass(frozen=True)
class EphemeralKey:
    """A one-transfer X25519 key pair."""

    secret: bytes
    public: bytes

    @classmethod
    def generate(cls) -> EphemeralKey:
        key = PrivateKey.generate()
        return cls(bytes(key), bytes(key.public_key))


def x25519_public_from_ed25519(ed25519_public: bytes) -> bytes:
    """The X25519 public key of a node's Ed25519 public key; BadInput if it is not valid."""
    try:
        return bytes(sodium.crypto_sign_ed25519_pk_to_curve25519(ed25519_public))
    except (SodiumRuntimeError, ValueError, TypeError) as exc:
        raise ChannelError("peer key is not a valid Ed25519 public key") from exc


def x25519_secret_from_ed25519_seed(seed: bytes) -> bytes:
    """The X25519 secret key of a node's Ed25519 seed."""
    _public, secret = sodium.crypto_sign_seed_keypair(seed)
    return bytes(sodium.crypto_sign_ed25519_sk_to_curve25519(secret))


def _dh(secret: bytes, public: bytes) -> bytes:
    if len(public) != KEY_SIZE:
        raise ChannelError("peer X25519 key must be 32 bytes")
    try:
        shared = bytes(sodium.crypto_scalarmult(secret, public))
    except (SodiumRuntimeError, ValueError, TypeError) as exc:
        # libsodium refuses low-order points (all-zero result): a forged key.
        raise ChannelError("peer key is a low-order point") from exc
    return shared


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one transfer: one per encrypted stream."""

    manifest: bytes
    instances: bytes


def _derive(
    ee: bytes,
    es: bytes,
    se: bytes,
    ss: bytes,
    sender_static: bytes,
    receiver_static: bytes,
    sender_ephemeral: bytes,
    receiver_ephemeral: bytes,
    token_id: bytes,
) -> SessionKeys:
    transcript = hashlib.sha256(
        DOMAIN
        + sender_static
        + receiver_static
        + sender_ephemeral
        + receiver_ephemeral
        + _LENGTH.pack(len(token_id))
        + token_id
    ).digest()
    prk = hashlib.blake2b(
        ee + es + se + ss + transcript, digest_size=64, person=b"imageshare-chan1"
    ).digest()

    def expand(label: bytes) -> bytes:
        return hashlib.blake2b(label, key=prk, digest_size=KEY_SIZE).digest()

    return SessionKeys(manifest=expand(LABEL_MANIFEST), instances=expand(LABEL_INSTANCES))


def receiver_session(
    own_seed: bytes,
    own_ephemeral: EphemeralKey,
    sender_ed25519_public: bytes,
    sender_ephemeral_public: bytes,
    token_id: bytes,
) -> SessionKeys:
    """Keys as computed by the grantee (B). Raises ChannelError on an invalid peer key."""
    own_static = x25519_secret_from_ed25519_seed(own_seed)
    sender_static = x25519_public_from_ed25519(sender_ed25519_public)
    return _derive(
        ee=_dh(own_ephemeral.secret, sender_ephemeral_public),
        es=_dh(own_ephemeral.secret, sender_static),
        se=_dh(own_static, sender_ephemeral_public),
        ss=_dh(own_static, sender_static),
        sender_static=sender_ed25519_public,
        receiver_static=sodium.crypto_sign_seed_keypair(own_seed)[0],
        sender_ephemeral=sender_ephemeral_public,
        receiver_ephemeral=own_ephemeral.public,
        token_id=token_id,
    )


def sender_session(
    own_seed: bytes,
    own_ephemeral: EphemeralKey,
    receiver_ed25519_public: bytes,
    receiver_ephemeral_public: bytes,
    token_id: bytes,
) -> SessionKeys:
    """Keys as computed by the custodian (A). Raises ChannelError on an invalid peer key."""
    own_static = x25519_secret_from_ed25519_seed(own_seed)
    receiver_static = x25519_public_from_ed25519(receiver_ed25519_public)
    return _derive(
        ee=_dh(own_ephemeral.secret, receiver_ephemeral_public),
        es=_dh(own_static, receiver_ephemeral_public),
        se=_dh(own_ephemeral.secret, receiver_static),
        ss=_dh(own_static, receiver_static),
        sender_static=sodium.crypto_sign_seed_keypair(own_seed)[0],
        receiver_static=receiver_ed25519_public,
        sender_ephemeral=own_ephemeral.public,
        receiver_ephemeral=receiver_ephemeral_public,
        token_id=token_id,
    )


class StreamEncryptor:
    """Encrypts one stream; ``header`` goes first on the wire, then each ``push`` result."""

    def __init__(self, key: bytes) -> None:
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self.header = bytes(
            sodium.crypto_secretstream_xchacha20poly1305_init_push(self._state, key)
        )
        self.finished = False

    def push(self, plaintext: bytes, final: bool = False) -> bytes:
        """One framed ciphertext message (length prefix included)."""
        if self.finished:
            raise ValueError("stream already finished")
        if len(plaintext) > MAX_MESSAGE:
            raise ValueError("message larger than MAX_MESSAGE")
        tag = TAG_FINAL if final else TAG_MESSAGE
        ciphertext = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, plaintext, tag=tag
        )
        self.finished = final
        return _LENGTH.pack(len(ciphertext)) + ciphertext


class StreamDecryptor:
    """Decrypts one stream fed in arbitrary pieces; yields (plaintext, is_final) messages.

    Raises ChannelError for a bad header, a message that fails authentication, an
    oversize frame, or data after the final message. Call ``close()`` at end of input:
    it raises ChannelError if the final message never came (truncation).
    """

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._state: sodium.crypto_secretstream_xchacha20poly1305_state | None = None
        self._buffer = bytearray()
        self.finished = False

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bool]]:
        """Add received bytes; yield every message now complete."""
        # Parse by offset and keep only the unfinished tail: trimming a buffer from the
        # front after every message would copy the rest of it each time.
        buffer = bytes(self._buffer) + data if self._buffer else bytes(data)
        self._buffer = bytearray()
        pos = 0
        if self._state is None:
            if len(buffer) < HEADER_SIZE:
                self._buffer = bytearray(buffer)
                return
            self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
            try:
                sodium.crypto_secretstream_xchacha20poly1305_init_pull(
                    self._state, buffer[:HEADER_SIZE], self._key
                )
            except (SodiumRuntimeError, ValueError) as exc:
                raise ChannelError("bad encrypted stream header") from exc
            pos = HEADER_SIZE
        try:
            while len(buffer) - pos >= _LENGTH.size:
                if self.finished:
                    raise ChannelError("data after the final message of the encrypted stream")
                (length,) = _LENGTH.unpack_from(buffer, pos)
                if length < OVERHEAD or length > MAX_MESSAGE + OVERHEAD:
                    raise ChannelError("encrypted message has an impossible length")
                start = pos + _LENGTH.size
                if len(buffer) - start < length:
                    break
                pos = start + length
                try:
                    plaintext, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                        self._state, buffer[start:pos]
                    )
                except (CryptoError, SodiumRuntimeError, ValueError) as exc:
                    raise ChannelError("encrypted message failed authentication") from exc
                if tag not in (TAG_MESSAGE, TAG_FINAL):
                    raise ChannelError("encrypted message has an unexpected tag")
                self.finished = tag == TAG_FINAL
                yield bytes(plaintext), self.finished
        finally:
            self._buffer = bytearray(buffer[pos:])

    def close(self) -> None:
        """End of input: raises ChannelError if the stream was cut short."""
        if not self.finished or self._buffer:
            raise ChannelError("encrypted stream was cut short")


def seal(key: bytes, plaintext: bytes) -> bytes:
    """Encrypt a whole message (header, then MAX_MESSAGE pieces, the last one final)."""
    encryptor = StreamEncryptor(key)
    pieces = [plaintext[i : i + MAX_MESSAGE] for i in range(0, len(plaintext), MAX_MESSAGE)]
    pieces = pieces or [b""]
    framed = [encryptor.push(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return encryptor.header + b"".join(framed)


def open_sealed(key: bytes, sealed: bytes) -> bytes:
    """Decrypt what ``seal`` made; raises ChannelError if it was altered or cut."""
    decryptor = StreamDecryptor(key)
    plaintext = b"".join(message for message, _final in decryptor.feed(sealed))
    decryptor.close()
    return plaintext
