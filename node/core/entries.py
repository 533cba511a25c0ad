"""Ledger entries: their kinds, fields, wire form and well-formedness.

Wire form: the canonical msgpack map ``{"v": 1, "kind": str, "prev": bin32, "time": int,
...kind fields}``. ``prev`` is the leaf hash of the entry before (32 zero bytes for entry
0), which chains the log. ``ENTRY_KINDS`` is the one registry of kinds and their fields;
a new kind is a new line there. No field may carry PHI or DICOM UIDs: subjects and
studies are keyed hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from node.core.encoding import canonical_decode, canonical_encode
from node.errors import BadInput

ENTRY_VERSION = 1
MAX_ENTRY_BYTES = 64 * 1024
MAX_TEXT = 1024
_UINT_MAX = 2**63 - 1

# Field types: "bin" (any bytes), "bin32"/"bin64" (exact length), "str" (UTF-8, at most
# MAX_TEXT characters), "int" (0 .. 2**63-1); a trailing "?" also allows nil.
ENTRY_KINDS: dict[str, dict[str, str]] = {
    "enroll": {"subject": "bin32", "key": "bin32", "replaces": "bin32?"},
    "grant": {"token": "bin"},
    "revoke": {"revocation": "bin"},
    "access": {
        "token_id": "bin32",
        "grantee": "str",
        "study": "bin32",
        "instances": "int",
        "bytes": "int",
        "digest": "bin32",
    },
    "denial": {"token_id": "bin32", "requester": "str", "rule": "str", "study": "bin32?"},
    "receipt": {
        "token_id": "bin32",
        "custodian": "str",
        "study": "bin32",
        "instances": "int",
        "bytes": "int",
        "digest": "bin32",
    },
    "witness": {"log_id": "bin32", "size": "int", "root": "bin32"},
    # node.core.key_rotation holds the signatures' message and the chain rule.
    "key_rotation": {
        "old_key": "bin32",
        "new_key": "bin32",
        "old_signature": "bin64?",
        "new_signature": "bin64",
        "reason": "str",
    },
}

_HEADER_FIELDS = ("v", "kind", "prev", "time")


@dataclass(frozen=True)
class LedgerEntry:
    """One decoded entry: its kind, the previous leaf hash, unix time, and the kind's fields."""

    kind: str
    prev: bytes
    time: int
    fields: dict[str, Any] = field(default_factory=dict)


def _check_value(kind: str, name: str, spec: str, value: Any) -> None:
    optional = spec.endswith("?")
    base = spec.rstrip("?")
    if value is None:
        if optional:
            return
        raise BadInput(f"{kind} entry field {name} must not be nil")
    ok = False
    if base == "bin":
        ok = isinstance(value, bytes)
    elif base == "bin32":
        ok = isinstance(value, bytes) and len(value) == 32
    elif base == "bin64":
        ok = isinstance(value, bytes) and len(value) == 64
    elif base == "str":
        ok = isinstance(value, str) and len(value) <= MAX_TEXT
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _UINT_MAX
    if not ok:
        raise BadInput(f"{kind} entry field {name} must be {spec}")


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
    missing = set(schema) - set(entry.fields)
    extra = set(entry.fields) - set(schema)
    if missing:
        raise BadInput(f"{entry.kind} entry lacks field {sorted(missing)[0]}")
    if extra:
        raise BadInput(f"{entry.kind} entry has unexpected field {sorted(map(str, extra))[0]}")
    for name, spec in schema.items():
        _check_value(entry.kind, name, spec, entry.fields[name])


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
    check_entry(entry)
    return entry
