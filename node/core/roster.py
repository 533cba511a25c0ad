"""The federation roster: which nodes are members, with which key, reachable where.

Only roster members are peers: their logs are mirrored, their signed /p2p requests are
accepted, and discovery only ever learns new addresses for them. A member is named by
its log origin and pinned by its verifier key; the URL is only a hint (static from the
configuration, or learned by discovery) because every byte fetched from it is verified
against the key. An address learned by discovery is used only once the member has
proven its key there: it signs ``address_proof_bytes`` over a fresh challenge.

Pure: building and querying the model; reading and writing roster files is in
node.store.federation_state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from node.core.keys import parse_verifier_key, verify_ed25519
from node.core.origins import check_node_origin, log_id
from node.core.signed_requests import NODE_PREFIX
from node.errors import BadInput

ADDRESS_PROOF_DOMAIN = b"imageshare-address-proof/v1"
CHALLENGE_SIZE = 32


def key_fingerprint(public_key: bytes) -> str:
    """Short public name of a node key, advertised by discovery: hex SHA-256, 16 bytes."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def normalize_url(url: str) -> str:
    """A member URL without trailing slash; raises BadInput unless it is http(s)://..."""
    url = url.strip().rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        raise BadInput(f"peer URL {url!r} must start with http:// or https://")
    return url


def address_proof_bytes(origin: str, url: str, challenge: bytes) -> bytes:
    """What a member signs to prove it holds its key at ``url`` (the URL it was asked at).

    One field a line, no trailing newline: the domain, the member's origin, the URL, and
    the asking node's fresh random challenge in hex.
    """
    return b"\n".join(
        [ADDRESS_PROOF_DOMAIN, origin.encode(), url.encode(), challenge.hex().encode()]
    )


def sign_address_proof(
    sign: Callable[[bytes], bytes], origin: str, url: str, challenge: bytes
) -> bytes:
    """A member's answer to a challenge received at ``url``: its signature of the proof."""
    return sign(address_proof_bytes(origin, url, challenge))


def verify_address_proof(member: Member, url: str, challenge: bytes, signature: bytes) -> bool:
    """True only if ``signature`` is ``member``'s roster key signing its proof for ``url``."""
    message = address_proof_bytes(member.origin, url, challenge)
    return verify_ed25519(member.public_key, message, signature)


@dataclass(frozen=True)
class Member:
    """One federation member: origin, verifier key, and its static URL (may be empty)."""

    origin: str
    vkey: str
    public_key: bytes
    url: str = ""

    @property
    def log_id(self) -> str:
        return log_id(self.origin)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)

    def as_json(self) -> dict[str, str]:
        return {"origin": self.origin, "vkey": self.vkey, "url": self.url, "log_id": self.log_id}


def make_member(origin: str, url: str, vkey: str) -> Member:
    """Validate one roster entry; raises BadInput for a bad origin or a bad or misnamed key."""
    check_node_origin(origin, f"peer origin {origin!r}")
    parsed = parse_verifier_key(vkey)
    if parsed.name != origin:
        raise BadInput(f"verifier key of {origin} is named {parsed.name}")
    return Member(origin, vkey, parsed.public_key, normalize_url(url))


class Roster:
    """The members, by origin, excluding this node itself."""

    def __init__(self, self_origin: str, members: Iterable[Member] = ()) -> None:
        self.self_origin = self_origin
        self._by_origin: dict[str, Member] = {}
        self._by_fingerprint: dict[str, Member] = {}
        for member in members:
            self.add(member)

    def add(self, member: Member) -> None:
        """Add or replace a member (later entries win); this node itself is never a peer."""
        if member.origin == self.self_origin:
            return
        old = self._by_origin.get(member.origin)
        if old is not None:
            self._by_fingerprint.pop(old.fingerprint, None)
        self._by_origin[member.origin] = member
        self._by_fingerprint[member.fingerprint] = member

    def __iter__(self) -> Iterator[Member]:
        return iter(sorted(self._by_origin.values(), key=lambda m: m.origin))

    def __len__(self) -> int:
        return len(self._by_origin)

    def get(self, origin: str) -> Member | None:
        return self._by_origin.get(origin)

    def by_log_id(self, wanted: str) -> Member | None:
        return next((m for m in self._by_origin.values() if m.log_id == wanted), None)

    def by_fingerprint(self, fingerprint: str) -> Member | None:
        return self._by_fingerprint.get(fingerprint)

    def public_key_of_signer(self, signer: str) -> bytes | None:
        """The key a ``node:<origin>`` request signer must use, or None if not a member."""
        if not signer.startswith(NODE_PREFIX):
            return None
        member = self._by_origin.get(signer[len(NODE_PREFIX) :])
        return member.public_key if member else None
