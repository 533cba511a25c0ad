"""The signed federation roster: who the members are, with which keys, for which period.

A roster version is a C2SP signed note whose body is, one field a line (each ending in a
newline, in this order, nothing else):

    imageshare-roster/v1
    federation <name>                the federation's name (a node origin); names its key
    version <n>                      1, 2, 3, ... (decimal, no leading zero)
    not-before <unix seconds>
    not-after <unix seconds>         later than not-before
    key <vkey>                       the federation key: it signs this version and the next
    threshold <k>                    0, or k members of this version may sign the next
    member <origin> <vkey> <roles> <url>   one a member, sorted by origin, origins unique;
                                     roles: comma-separated names; url: http(s) or "-"

The chain rule: every version carries the signature of the key it names (so a version
is never published under a key nobody holds), and version v + 1 also carries either
the signature of the key version v names, or those of at least ``threshold`` (of v)
distinct members of v under the keys v names for them. A federation key change is thus
itself a new version, signed by the old key, or by a threshold of members when the old
key is lost. A verifier pinned to a federation key trusts the earliest version that
names and carries that key and follows the chain from there; versions before it are not
its concern.

Pure: no I/O, no clock (callers pass ``now``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from node.core.keys import NodeIdentity, parse_verifier_key
from node.core.notes import NoteSignature, add_signatures, parse_note, sign_note
from node.core.origins import check_node_origin
from node.core.roster import Member, make_member
from node.errors import BadInput, Unauthorized

HEADER = "imageshare-roster/v1"
# A roster travels inside one ledger entry (at most 64 KiB), so it stays small.
MAX_MEMBERS = 256
MAX_ROSTER_BYTES = 60 * 1024
MAX_ROLES = 8
_ROLE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_DECIMAL = re.compile(r"^(0|[1-9][0-9]{0,18})$")
NO_URL = "-"


@dataclass(frozen=True)
class RosterMember:
    """One member as a roster version names it."""

    origin: str
    vkey: str
    roles: tuple[str, ...] = ()
    url: str = ""

    def line(self) -> str:
        return f"member {self.origin} {self.vkey} {','.join(self.roles)} {self.url or NO_URL}\n"

    def as_member(self) -> Member:
        """The member as the node's live roster holds it."""
        return make_member(self.origin, self.url, self.vkey)

    def as_json(self) -> dict[str, object]:
        return {
            "origin": self.origin,
            "vkey": self.vkey,
            "roles": list(self.roles),
            "url": self.url,
        }


def make_roster_member(origin: str, vkey: str, roles: Iterable[str], url: str) -> RosterMember:
    """A checked member line; raises BadInput for a bad origin, key, role or URL."""
    member = make_member(origin, url, vkey)
    role_list = tuple(roles)
    if len(role_list) > MAX_ROLES or any(not _ROLE.match(r) for r in role_list):
        raise BadInput(f"roles of {origin} must be at most {MAX_ROLES} names of a-z, 0-9 and '-'")
    if len(set(role_list)) != len(role_list):
        raise BadInput(f"roles of {origin} name a role twice")
    return RosterMember(member.origin, member.vkey, role_list, member.url)


@dataclass(frozen=True)
class RosterDocument:
    """One version of the federation roster (the body of its signed note)."""

    federation: str
    version: int
    not_before: int
    not_after: int
    key: str
    threshold: int
    members: tuple[RosterMember, ...]

    def __post_init__(self) -> None:
        check_node_origin(self.federation, "the federation name")
        if parse_verifier_key(self.key).name != self.federation:
            raise BadInput("the federation key must be named by the federation's name")
        if not 1 <= self.version < 2**63:
            raise BadInput("a roster version is a positive integer")
        if not 0 <= self.not_before < self.not_after < 2**63:
            raise BadInput("a roster's not-after must come after its not-before")
        if len(self.members) > MAX_MEMBERS:
            raise BadInput(f"a roster names at most {MAX_MEMBERS} members")
        origins = [m.origin for m in self.members]
        if origins != sorted(set(origins)):
            raise BadInput("roster members must be sorted by origin, each origin once")
        if not 0 <= self.threshold <= len(self.members):
            raise BadInput("a roster's threshold is between 0 and its number of members")

    def body(self) -> str:
        """The note body that is signed."""
        head = (
            f"{HEADER}\nfederation {self.federation}\nversion {self.version}\n"
            f"not-before {self.not_before}\nnot-after {self.not_after}\n"
            f"key {self.key}\nthreshold {self.threshold}\n"
        )
        return head + "".join(m.line() for m in self.members)

    def member(self, origin: str) -> RosterMember | None:
        return next((m for m in self.members if m.origin == origin), None)

    def names_key(self, origin: str, public_key: bytes) -> bool:
        """True if this version names ``public_key`` as ``origin``'s key."""
        member = self.member(origin)
        return member is not None and parse_verifier_key(member.vkey).public_key == public_key

    def is_current(self, now: int) -> bool:
        return self.not_before <= now < self.not_after

    def as_json(self) -> dict[str, object]:
        return {
            "federation": self.federation,
            "version": self.version,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "key": self.key,
            "threshold": self.threshold,
            "members": [m.as_json() for m in self.members],
        }


def _field(line: str, name: str) -> str:
    prefix = name + " "
    if not line.startswith(prefix):
        raise BadInput(f"roster line {line[:40]!r} should be '{name} ...'")
    return line[len(prefix) :]


def _number(line: str, name: str) -> int:
    value = _field(line, name)
    if not _DECIMAL.match(value):
        raise BadInput(f"roster {name} is not a decimal integer")
    return int(value)


def parse_roster_body(body: str) -> RosterDocument:
    """The roster in a note body; raises BadInput unless it is exactly the format above."""
    if not isinstance(body, str) or len(body.encode()) > MAX_ROSTER_BYTES:
        raise BadInput(f"a roster is text of at most {MAX_ROSTER_BYTES} bytes")
    if not body.endswith("\n"):
        raise BadInput("a roster ends with a newline")
    lines = body[:-1].split("\n")
    if len(lines) < 7 or lines[0] != HEADER:
        raise BadInput(f"a roster starts with {HEADER!r} and six header lines")
    if len(lines) - 7 > MAX_MEMBERS:
        raise BadInput(f"a roster names at most {MAX_MEMBERS} members")
    members = []
    for line in lines[7:]:
        parts = _field(line, "member").split(" ")
        if len(parts) != 4:
            raise BadInput("a roster member line is 'member ORIGIN VKEY ROLES URL'")
        origin, vkey, roles, url = parts
        role_list = roles.split(",") if roles else []
        members.append(make_roster_member(origin, vkey, role_list, "" if url == NO_URL else url))
    document = RosterDocument(
        federation=_field(lines[1], "federation"),
        version=_number(lines[2], "version"),
        not_before=_number(lines[3], "not-before"),
        not_after=_number(lines[4], "not-after"),
        key=_field(lines[5], "key"),
        threshold=_number(lines[6], "threshold"),
        members=tuple(members),
    )
    if document.body() != body:
        raise BadInput("the roster is not in its one canonical form")
    return document


def _signature_of(body: str, identity: NodeIdentity) -> NoteSignature:
    return NoteSignature(identity.origin, identity.key_id, identity.sign(body.encode()))


def sign_roster(document: RosterDocument, signers: Sequence[NodeIdentity]) -> str:
    """The signed note of ``document``, signed by every identity in ``signers``.

    The first signer is normally the federation key the document names (required: a
    version carries its own key's signature); the others sign for the chain (the previous
    federation key, or members making up a threshold).
    """
    if not signers:
        raise BadInput("a roster needs at least one signature")
    body = document.body()
    note = sign_note(body, signers[0])
    return add_signatures(note, [_signature_of(body, s) for s in signers[1:]])


def add_roster_signatures(note: str, signers: Sequence[NodeIdentity]) -> str:
    """``note`` with more signatures over its body (a member adding its share of a threshold)."""
    body, _ = parse_note(note)
    return add_signatures(note, [_signature_of(body, s) for s in signers])


def _signed_by(body: str, signatures: list[NoteSignature], vkey: str) -> bool:
    key = parse_verifier_key(vkey)
    return any(
        s.name == key.name and s.key_id == key.key_id and key.verify(body.encode(), s.signature)
        for s in signatures
    )


def open_roster(note: str | bytes) -> tuple[RosterDocument, str, list[NoteSignature]]:
    """A roster note's document, body and signatures; BadInput if malformed, Unauthorized
    unless it carries a valid signature by the federation key it names."""
    body, signatures = parse_note(note)
    document = parse_roster_body(body)
    if not _signed_by(body, signatures, document.key):
        raise Unauthorized(
            f"roster version {document.version} is not signed by the federation key it names"
        )
    return document, body, signatures


def check_successor(previous: RosterDocument, note: str | bytes) -> RosterDocument:
    """The next version after ``previous``, if ``note`` chains to it (see the chain rule).

    Raises BadInput for a malformed note, a version that is not previous + 1 or another
    federation; Unauthorized if neither the previous key nor a threshold of its members
    signed it.
    """
    document, body, signatures = open_roster(note)
    if document.federation != previous.federation:
        raise BadInput(f"roster version {document.version} is of another federation")
    if document.version != previous.version + 1:
        raise BadInput(
            f"roster version {document.version} does not follow version {previous.version}"
        )
    if _signed_by(body, signatures, previous.key):
        return document
    members = {m.vkey for m in previous.members if _signed_by(body, signatures, m.vkey)}
    if previous.threshold and len(members) >= previous.threshold:
        return document
    raise Unauthorized(
        f"roster version {document.version} is signed neither by the federation key of "
        f"version {previous.version} nor by {previous.threshold or 'a threshold of'} of its members"
    )


def verify_roster_chain(notes: Sequence[str | bytes], pinned_key: str) -> list[RosterDocument]:
    """The verified versions among ``notes`` (versions 1, 2, ... in order), from the
    earliest one that names and is signed by ``pinned_key`` to the last.

    Raises BadInput if a note is malformed or out of order, Unauthorized if no version
    names the pinned key or a later one does not chain.
    """
    pinned = parse_verifier_key(pinned_key)
    verified: list[RosterDocument] = []
    for position, note in enumerate(notes):
        if verified:
            verified.append(check_successor(verified[-1], note))
            continue
        body, _ = parse_note(note)
        document = parse_roster_body(body)
        if document.version != position + 1:
            raise BadInput(f"roster log entry {position} holds version {document.version}")
        if parse_verifier_key(document.key).public_key == pinned.public_key:
            verified.append(open_roster(note)[0])
    if not verified:
        raise Unauthorized(f"no roster version names the pinned federation key {pinned.name}")
    return verified


def members_of(document: RosterDocument, self_origin: str) -> list[Member]:
    """The members a node takes from a roster version (all but itself)."""
    return [m.as_member() for m in document.members if m.origin != self_origin]
