"""Node key rotation: the ``key_rotation`` entry, its signatures, and a log's chain of keys.

A log keeps its origin and its log ID (SHA-256 of the origin) for ever; only the key that
signs its checkpoints changes. A ``key_rotation`` entry at index ``r`` of a log moves the
log from its old key to its new key: a checkpoint of size ``n`` is valid only under the key
in force at ``n``, which is the new key of the last rotation at an index below ``n`` (the
log's first key if there is none). So checkpoints of size <= r stay under the old key and
every checkpoint that includes the rotation is signed by the new key.

Both keys sign one message (``rotation_message``): the domain, the log's origin, the old
and the new public key (standard base64) and the reason, one a line, no final newline.
An ordinary rotation carries both signatures. When the old key is compromised its holder
cannot be told apart from the node, so a rotation signed by the new key alone (reason
``compromised``) counts only once the roster confirms it: the member's pinned key is
already the new key (each member's operator confirms it by hand).

A rotation never needs the entry's position in its message: it applies only while its old
key is the key in force, so a replayed copy anywhere later in the log is refused.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from node.core.entries import KeyRotation, LedgerEntry
from node.core.keys import NodeIdentity, VerifierKey, key_id, verify_ed25519
from node.errors import BadInput, Unauthorized

ROTATION_DOMAIN = b"imageshare-key-rotation/v1"
ROUTINE = "routine"
COMPROMISED = "compromised"
REASONS = (ROUTINE, COMPROMISED)


def rotation_message(origin: str, old_key: bytes, new_key: bytes, reason: str) -> bytes:
    """What the old and the new key both sign to rotate ``origin``'s log."""
    return b"\n".join(
        [
            ROTATION_DOMAIN,
            origin.encode(),
            base64.b64encode(old_key),
            base64.b64encode(new_key),
            reason.encode(),
        ]
    )


def rotation_from_entry(entry: LedgerEntry) -> KeyRotation:
    """The rotation a decoded, well-formed key_rotation entry records."""
    body = entry.body
    if not isinstance(body, KeyRotation):
        raise BadInput(f"a {entry.kind} entry is not a key rotation")
    return body


def sign_rotation(old: NodeIdentity | None, new: NodeIdentity, old_key: bytes) -> KeyRotation:
    """A rotation of ``new.origin``'s log from ``old_key`` to ``new``'s key.

    ``old`` signs too when given (a routine rotation); without it the rotation is the
    compromised-key kind, which peers take only once their roster confirms the new key.
    """
    if old is not None and old.public_key != old_key:
        raise BadInput("the old identity does not hold the old key")
    reason = ROUTINE if old is not None else COMPROMISED
    message = rotation_message(new.origin, old_key, new.public_key, reason)
    return KeyRotation(
        old_key,
        new.public_key,
        old.sign(message) if old is not None else None,
        new.sign(message),
        reason,
    )


def check_rotation(
    origin: str, key_in_force: bytes, rotation: KeyRotation, confirmed_key: bytes | None = None
) -> None:
    """Raise unless ``rotation`` validly moves ``origin``'s log on from ``key_in_force``.

    Raises BadInput if it names another old key, rotates to the same key or has an unknown
    reason; Unauthorized if a signature does not verify, or if it is signed by the new key
    alone and ``confirmed_key`` (the roster's key for the member) is not its new key.
    """
    if rotation.reason not in REASONS:
        raise BadInput(f"key rotation reason must be one of {', '.join(REASONS)}")
    if rotation.old_key != key_in_force:
        raise BadInput(f"the key rotation of {origin} does not start from the key in force")
    if rotation.new_key == rotation.old_key:
        raise BadInput(f"the key rotation of {origin} names the same key twice")
    if (rotation.old_signature is None) != (rotation.reason == COMPROMISED):
        raise BadInput("only a compromised-key rotation lacks the old key's signature")
    message = rotation_message(origin, rotation.old_key, rotation.new_key, rotation.reason)
    if not verify_ed25519(rotation.new_key, message, rotation.new_signature):
        raise Unauthorized(f"the new key's signature on the key rotation of {origin} is bad")
    if rotation.old_signature is None:
        if confirmed_key != rotation.new_key:
            raise Unauthorized(
                f"the compromised-key rotation of {origin} is not confirmed by the roster"
            )
    elif not verify_ed25519(rotation.old_key, message, rotation.old_signature):
        raise Unauthorized(f"the old key's signature on the key rotation of {origin} is bad")


@dataclass(frozen=True)
class KeyEpoch:
    """A key and the first checkpoint size it signs (the rotation's index + 1; 0 at first)."""

    first_size: int
    public_key: bytes


@dataclass(frozen=True)
class KeyChain:
    """The keys of one log in order; each signs checkpoints from its ``first_size`` on."""

    origin: str
    epochs: tuple[KeyEpoch, ...]

    @classmethod
    def starting_with(cls, origin: str, first_key: bytes) -> KeyChain:
        return cls(origin, (KeyEpoch(0, first_key),))

    @property
    def current_key(self) -> bytes:
        return self.epochs[-1].public_key

    def key_at(self, size: int) -> bytes:
        """The key a checkpoint of ``size`` must be signed by."""
        return next(e.public_key for e in reversed(self.epochs) if e.first_size <= size)

    def verifier_key_at(self, size: int) -> VerifierKey:
        """``key_at(size)`` as the verifier key that checks the log's checkpoints of ``size``."""
        public_key = self.key_at(size)
        return VerifierKey(self.origin, key_id(self.origin, public_key), public_key)

    def verifier_keys(self) -> list[VerifierKey]:
        """Every key of the chain as a verifier key, oldest first."""
        return [self.verifier_key_at(e.first_size) for e in self.epochs]

    def holds(self, public_key: bytes) -> bool:
        return any(e.public_key == public_key for e in self.epochs)

    def following(
        self,
        rotations: Iterable[tuple[int, KeyRotation]],
        confirmed_key: bytes | None = None,
    ) -> KeyChain:
        """This chain extended by the (index, rotation) pairs, in log order.

        Raises like check_rotation for the first rotation that does not hold, and BadInput
        if an index is not after the last rotation's.
        """
        epochs = list(self.epochs)
        for index, rotation in rotations:
            if index + 1 <= epochs[-1].first_size:
                raise BadInput(f"key rotation at {index} of {self.origin} is out of order")
            check_rotation(self.origin, epochs[-1].public_key, rotation, confirmed_key)
            epochs.append(KeyEpoch(index + 1, rotation.new_key))
        return KeyChain(self.origin, tuple(epochs))


def rotations_in(
    entries: Iterable[LedgerEntry | None], first_index: int = 0
) -> list[tuple[int, KeyRotation]]:
    """The (index, rotation) of every key_rotation entry among ``entries`` (None: skipped)."""
    return [
        (first_index + i, rotation_from_entry(e))
        for i, e in enumerate(entries)
        if e is not None and e.kind == KeyRotation.kind
    ]


def chain_of_log(
    origin: str,
    entries: Iterable[LedgerEntry | None],
    anchor_key: bytes,
    confirmed_key: bytes | None = None,
) -> KeyChain:
    """The key chain a whole log's entries prove, which must hold ``anchor_key``.

    A verifier that trusts one key of the log (pinned earlier, or the one the roster
    lists now) learns the others from the log itself: the chain starts at the first
    rotation's old key (or at ``anchor_key`` if the log never rotated) and every link is
    checked. Raises like KeyChain.following, and Unauthorized if ``anchor_key`` is not in
    the chain.
    """
    return chain_of_rotations(origin, rotations_in(entries), anchor_key, confirmed_key)


def chain_of_rotations(
    origin: str,
    rotations: Sequence[tuple[int, KeyRotation]],
    anchor_key: bytes,
    confirmed_key: bytes | None = None,
) -> KeyChain:
    """chain_of_log from a log's rotations alone (``rotations_in``, gathered while the
    entries stream past)."""
    first = rotations[0][1].old_key if rotations else anchor_key
    chain = KeyChain.starting_with(origin, first).following(rotations, confirmed_key)
    if not chain.holds(anchor_key):
        raise Unauthorized(f"the key chain of {origin} does not hold the key trusted for it")
    return chain
