"""Ledger entries: their kinds, fields, wire form and well-formedness.

Wire form: the canonical msgpack map ``{"v": 1, "kind": str, "prev": bin32, "time": int,
...kind fields}``. ``prev`` is the leaf hash of the entry before (32 zero bytes for entry
0), which chains the log. Each kind is a typed class (its fields and their wire types);
``ENTRY_TYPES`` is the one registry of kinds, one line a kind. Encoding and decoding are
here only. No field may carry PHI or DICOM UIDs: subjects and
studies are keyed hashes.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from functools import cached_property
from typing import Any, ClassVar

from node.core.encoding import canonical_decode, canonical_encode
from node.errors import BadInput

ENTRY_VERSION = 1
# The largest entry a C2SP entry bundle can carry (a uint16 length prefix).
MAX_ENTRY_BYTES = 0xFFFF
MAX_TEXT = 1024
_UINT_MAX = 2**63 - 1


# Field types: "bin" (any bytes), "bin32"/"bin64" (exact length), "str" (UTF-8, at most
# MAX_TEXT characters), "int" (0 .. 2**63-1); a trailing "?" also allows nil.
def _wire(spec: str) -> dict[str, str]:
    """A kind's field's metadata: its wire type (see above)."""
    return {"spec": spec}


class EntryBody:
    """The fields of one kind of entry; each kind is a frozen dataclass below."""

    kind: ClassVar[str]

    def wire_fields(self) -> dict[str, Any]:
        """The kind's fields as the wire map holds them."""
        return {f.name: getattr(self, f.name) for f in dataclass_fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class Enroll(EntryBody):
    """Staff enrolled a patient key for a keyed subject reference (replacing ``replaces``)."""

    kind: ClassVar[str] = "enroll"
    subject: bytes = field(metadata=_wire("bin32"))
    key: bytes = field(metadata=_wire("bin32"))
    replaces: bytes | None = field(metadata=_wire("bin32?"))


@dataclass(frozen=True)
class Grant(EntryBody):
    """A patient-signed grant token, verbatim."""

    kind: ClassVar[str] = "grant"
    token: bytes = field(metadata=_wire("bin"))


@dataclass(frozen=True)
class Revoke(EntryBody):
    """A patient-signed revocation, verbatim."""

    kind: ClassVar[str] = "revoke"
    revocation: bytes = field(metadata=_wire("bin"))


@dataclass(frozen=True)
class _Delivery(EntryBody):
    """What both sides of a transfer record alike, so that an auditor can match them."""

    token_id: bytes = field(metadata=_wire("bin32"))
    study: bytes = field(metadata=_wire("bin32"))
    instances: int = field(metadata=_wire("int"))
    bytes: int = field(metadata=_wire("int"))  # the wire's name; the type below is the builtin's
    digest: builtins.bytes = field(metadata=_wire("bin32"))


@dataclass(frozen=True)
class Access(_Delivery):
    """The custodian sent a grantee a study under a token (with the transfer's digest)."""

    kind: ClassVar[str] = "access"
    grantee: str = field(metadata=_wire("str"))


@dataclass(frozen=True)
class Denial(EntryBody):
    """The custodian refused a request under a token, naming the rule."""

    kind: ClassVar[str] = "denial"
    token_id: bytes = field(metadata=_wire("bin32"))
    requester: str = field(metadata=_wire("str"))
    rule: str = field(metadata=_wire("str"))
    study: bytes | None = field(metadata=_wire("bin32?"))


@dataclass(frozen=True)
class Receipt(_Delivery):
    """The grantee received a study from a custodian (the same digest as its access)."""

    kind: ClassVar[str] = "receipt"
    custodian: str = field(metadata=_wire("str"))


@dataclass(frozen=True)
class Witness(EntryBody):
    """This node saw a signed checkpoint (size, root) of the log ``log_id``."""

    kind: ClassVar[str] = "witness"
    log_id: bytes = field(metadata=_wire("bin32"))
    size: int = field(metadata=_wire("int"))
    root: bytes = field(metadata=_wire("bin32"))


@dataclass(frozen=True)
class KeyRotation(EntryBody):
    """The log's key moves from ``old_key`` to ``new_key``; both sign (the old key's
    signature is nil for a compromised key). node.core.key_rotation holds the signed
    message and the chain rule."""

    kind: ClassVar[str] = "key_rotation"
    old_key: bytes = field(metadata=_wire("bin32"))
    new_key: bytes = field(metadata=_wire("bin32"))
    old_signature: bytes | None = field(metadata=_wire("bin64?"))
    new_signature: bytes = field(metadata=_wire("bin64"))
    reason: str = field(metadata=_wire("str"))


@dataclass(frozen=True)
class EmergencyPolicyEntry(EntryBody):
    """A patient-signed emergency policy, verbatim (node.core.emergency)."""

    kind: ClassVar[str] = "emergency_policy"
    policy: bytes = field(metadata=_wire("bin"))


@dataclass(frozen=True)
class BreakGlass(EntryBody):
    """The custodian served a member's emergency request, written before the first byte.

    ``request`` is the id of the requester's signed request (SHA-256; the request itself
    names the patient, sealed to the custodian, so only its id is here); ``subject`` the
    patient matched; ``patient_key`` its enrolled key then (nil: none); ``policy`` the
    choice applied and ``policy_index`` the entry of the patient's policy (nil: the
    federation default); ``studies`` the study references served, concatenated.
    """

    kind: ClassVar[str] = "break_glass"
    request: bytes = field(metadata=_wire("bin32"))
    requester: str = field(metadata=_wire("str"))
    reason: str = field(metadata=_wire("str"))
    subject: bytes = field(metadata=_wire("bin32"))
    patient_key: bytes | None = field(metadata=_wire("bin32?"))
    policy: str = field(metadata=_wire("str"))
    policy_index: int | None = field(metadata=_wire("int?"))
    studies: bytes = field(metadata=_wire("bin"))


@dataclass(frozen=True)
class DelegationEntry(EntryBody):
    """A patient-signed delegation to another key, verbatim (node.core.consent.Delegation)."""

    kind: ClassVar[str] = "delegation"
    delegation: bytes = field(metadata=_wire("bin"))


@dataclass(frozen=True)
class DeskDelegation(EntryBody):
    """Staff at the desk delegated, after an identity check, every power of a minor's
    custodian-held key to a guardian's key: the delegation verbatim, signed by that key."""

    kind: ClassVar[str] = "desk_delegation"
    delegation: bytes = field(metadata=_wire("bin"))


@dataclass(frozen=True)
class RosterVersion(EntryBody):
    """A version of the federation roster, its signed note verbatim (in the roster's own
    log, never a node's; node.core.roster_document holds the format and chain rule)."""

    kind: ClassVar[str] = "roster"
    note: bytes = field(metadata=_wire("bin"))


@dataclass(frozen=True)
class Contribution(EntryBody):
    """A link's holder returned an opinion on a study: the link's grant, the study's keyed
    reference and the SHA-256 of the stored instance (no content, no name)."""

    kind: ClassVar[str] = "contribution"
    token_id: bytes = field(metadata=_wire("bin32"))
    study: bytes = field(metadata=_wire("bin32"))
    digest: bytes = field(metadata=_wire("bin32"))


def _registry(*kinds: type[EntryBody]) -> dict[str, type[EntryBody]]:
    return {k.kind: k for k in kinds}


# The one registry of kinds: a new kind is a class above and one line here.
ENTRY_TYPES: dict[str, type[EntryBody]] = _registry(
    Enroll,
    Grant,
    Revoke,
    Access,
    Denial,
    Receipt,
    Witness,
    KeyRotation,
    EmergencyPolicyEntry,
    BreakGlass,
    DelegationEntry,
    DeskDelegation,
    RosterVersion,
    Contribution,
)
# Each kind's wire fields and their types, in declaration order.
ENTRY_KINDS: dict[str, dict[str, str]] = {
    kind: {f.name: f.metadata["spec"] for f in dataclass_fields(cls)}  # type: ignore[arg-type]
    for kind, cls in ENTRY_TYPES.items()
}

_HEADER_FIELDS = ("v", "kind", "prev", "time")


@dataclass(frozen=True)
class LedgerEntry:
    """One entry as on the wire: its kind, the previous leaf hash, unix time, and the kind's
    fields. Readers take ``body``, the typed fields; writers build one with ``of``."""

    kind: str
    prev: bytes
    time: int
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, prev: bytes, time: int, body: EntryBody) -> LedgerEntry:
        """The entry holding ``body`` after the entry whose leaf hash is ``prev``."""
        return cls(body.kind, prev, time, body.wire_fields())

    @cached_property
    def body(self) -> EntryBody:
        """The kind's typed fields; raises BadInput unless the entry is well-formed."""
        check_entry(self)
        return ENTRY_TYPES[self.kind](**self.fields)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _UINT_MAX


# What a field's base type (its spec without the optional mark "?") accepts.
_BASE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "bin": lambda value: isinstance(value, bytes),
    "bin32": lambda value: isinstance(value, bytes) and len(value) == 32,
    "bin64": lambda value: isinstance(value, bytes) and len(value) == 64,
    "str": lambda value: isinstance(value, str) and len(value) <= MAX_TEXT,
    "int": _is_uint,
}
# Each kind's fields as (name, spec, optional, check), its specs parsed once, not per entry.
_FIELD_CHECKS = {
    kind: tuple(
        (name, spec, spec.endswith("?"), _BASE_CHECKS.get(spec.rstrip("?"), lambda _: False))
        for name, spec in schema.items()
    )
    for kind, schema in ENTRY_KINDS.items()
}
_FIELD_NAMES = {kind: frozenset(schema) for kind, schema in ENTRY_KINDS.items()}


def check_entry(entry: LedgerEntry) -> None:
    """Raise BadInput unless ``entry`` is well-formed for its kind."""
    schema = ENTRY_KINDS.get(entry.kind) if isinstance(entry.kind, str) else None
    if schema is None:
        raise BadInput(f"unknown ledger entry kind {entry.kind!r}")
    if not isinstance(entry.prev, bytes) or len(entry.prev) != 32:
        raise BadInput("entry prev must be 32 bytes")
    if (
        not isinstance(entry.time, int)
        or isinstance(entry.time, bool)
        or not 0 <= entry.time <= _UINT_MAX
    ):
        raise BadInput("entry time must be a non-negative integer")
    if not isinstance(entry.fields, dict):
        raise BadInput("entry fields must be a map")
    fields = entry.fields
    if fields.keys() != _FIELD_NAMES[entry.kind]:
        missing = set(schema) - set(fields)
        extra = set(fields) - set(schema)
        if missing:
            raise BadInput(f"{entry.kind} entry lacks field {sorted(missing)[0]}")
        raise BadInput(f"{entry.kind} entry has unexpected field {sorted(map(str, extra))[0]}")
    for name, spec, optional, check in _FIELD_CHECKS[entry.kind]:
        value = fields[name]
        if value is None:
            if optional:
                continue
            raise BadInput(f"{entry.kind} entry field {name} must not be nil")
        if not check(value):
            raise BadInput(f"{entry.kind} entry field {name} must be {spec}")


def encode_entry(entry: LedgerEntry) -> bytes:
    """The canonical wire bytes of ``entry``; raises BadInput if it is not well-formed."""
    check_entry(entry)
    data = canonical_encode(
        {"v": ENTRY_VERSION, "kind": entry.kind, "prev": entry.prev, "time": entry.time}
        | entry.fields
    )
    if len(data) > MAX_ENTRY_BYTES:
        raise BadInput(f"entry is larger than {MAX_ENTRY_BYTES} bytes")
    return data


def decode_entry(raw: bytes) -> LedgerEntry:
    """Parse wire bytes into an entry; raises BadInput if non-canonical or not well-formed."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise BadInput("entry must be bytes")
    if len(raw) > MAX_ENTRY_BYTES:
        raise BadInput(f"entry is larger than {MAX_ENTRY_BYTES} bytes")
    value = canonical_decode(bytes(raw))
    if not isinstance(value, dict):
        raise BadInput("entry is not a map")
    if value.get("v") != ENTRY_VERSION or isinstance(value.get("v"), bool):
        raise BadInput(f"unknown entry version {value.get('v')!r}")
    for name in _HEADER_FIELDS:
        if name not in value:
            raise BadInput(f"entry lacks {name}")
    fields = {k: v for k, v in value.items() if k not in _HEADER_FIELDS}
    entry = LedgerEntry(kind=value["kind"], prev=value["prev"], time=value["time"], fields=fields)
    _ = entry.body  # checks the entry (BadInput) and keeps its typed fields
    return entry
