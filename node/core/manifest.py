"""Wire formats of a study transfer: requests, the manifest, and the instance stream.

All request and response bodies are canonical msgpack maps (node.core.encoding):

    open request      {"v": 1, "token": bin, "ephemeral": bin32}
    open response     {"v": 1, "transfer": str, "ephemeral": bin32, "manifest": bin (sealed)}
    instances request {"v": 1, "handles": [int, ...]}
                   or {"v": 2, "handles": [int, ...], "compression": ["zstd", ...]}

Version 2 of the instances request lists the codecs the grantee decodes; only then may
the stream carry compressed pieces. Version 1 (no compression) is still accepted.

The manifest (sealed with the transfer's manifest key) lists the studies by their keyed
references and every instance by an opaque per-transfer handle (its position)::

    {"v": 1, "token_id": bin32, "studies": [bin32, ...],
     "instances": [[study index, size, sha256 bin32], ...]}

A **partial manifest** adds ``"pending": n`` (n >= 1): the custodian is still retrieving
n more instances of the granted studies from its PACS. It names, with digests, only the
instances already held; the grantee streams those, then opens again for the rest, and is
never done while a manifest it was given is partial. A whole manifest has no such key
(one encoding per value), so it is byte for byte what it always was.

The instance stream (inside the encrypted channel) is a sequence of plaintext messages:
``b"I" + handle (u32 BE)`` opens an instance, ``b"D" + bytes`` carries its data (the
instance ends when its manifest size is reached), ``b"Z" + zstd frame`` carries a piece
of its data compressed (only if the request offered zstd; node.core.wire_compression
bounds it), ``b"S" + zstd frame`` one compressed with its bytes in two lanes (only if
the request offered zstd-shuffle2), and the final message is ``b"E" + count (u32 BE)``,
the number of instances sent. Sizes and digests are always those of the stored
(uncompressed) bytes.

"What was sent" / "what arrived" in one stream are digested the same way on both sides:
``transfer_digest`` = SHA-256 over the sorted raw SHA-256 digests of the instances.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from node.core.encoding import canonical_decode, canonical_encode
from node.core.wire_compression import CODECS, ZSTD, ZSTD_SHUFFLE, decompress_piece
from node.errors import BadInput

VERSION = 1
# The instances request that offers compression.
COMPRESSION_VERSION = 2
MAX_CODECS = 8
DIGEST_SIZE = 32
MAX_HANDLES = 1_000_000
_U32 = struct.Struct(">I")

BEGIN = b"I"
DATA = b"D"
COMPRESSED = b"Z"
SHUFFLED = b"S"
END = b"E"
# The message kind of a piece in each codec.
CODEC_MESSAGES = {ZSTD: COMPRESSED, ZSTD_SHUFFLE: SHUFFLED}


def transfer_digest(digests: Iterable[bytes]) -> bytes:
    """SHA-256 over the sorted per-instance SHA-256 digests (the access/receipt digest)."""
    hasher = hashlib.sha256()
    for digest in sorted(digests):
        hasher.update(digest)
    return hasher.digest()


def _map(
    data: bytes, what: str, keys: set[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    value = canonical_decode(data)
    if not isinstance(value, dict) or not keys <= set(value) <= keys | optional:
        raise BadInput(f"{what} must be a map with exactly {sorted(keys)}")
    if value["v"] != VERSION:
        raise BadInput(f"{what} has an unknown version")
    return value


def _bin(value: Any, size: int | None, what: str) -> bytes:
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        raise BadInput(f"{what} must be {size or 'some'} bytes")
    return value


def _count(value: Any, what: str, limit: int = 2**62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise BadInput(f"{what} must be a non-negative integer")
    return value


# -- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenRequest:
    token: bytes
    ephemeral: bytes

    def encode(self) -> bytes:
        return canonical_encode({"v": VERSION, "token": self.token, "ephemeral": self.ephemeral})


def decode_open_request(data: bytes) -> OpenRequest:
    """Raises BadInput for anything but a well-formed open request."""
    value = _map(data, "transfer request", {"v", "token", "ephemeral"})
    return OpenRequest(
        _bin(value["token"], None, "token"), _bin(value["ephemeral"], 32, "ephemeral key")
    )


@dataclass(frozen=True)
class OpenResponse:
    transfer_id: str
    ephemeral: bytes
    sealed_manifest: bytes

    def encode(self) -> bytes:
        return canonical_encode(
            {
                "v": VERSION,
                "transfer": self.transfer_id,
                "ephemeral": self.ephemeral,
                "manifest": self.sealed_manifest,
            }
        )


def decode_open_response(data: bytes) -> OpenResponse:
    """Raises BadInput for anything but a well-formed open response."""
    value = _map(data, "transfer response", {"v", "transfer", "ephemeral", "manifest"})
    transfer_id = value["transfer"]
    if not isinstance(transfer_id, str) or not transfer_id.isalnum() or len(transfer_id) > 64:
        raise BadInput("transfer id must be short and alphanumeric")
    return OpenResponse(
        transfer_id,
        _bin(value["ephemeral"], 32, "ephemeral key"),
        _bin(value["manifest"], None, "manifest"),
    )


@dataclass(frozen=True)
class InstancesRequest:
    handles: list[int]
    compression: tuple[str, ...]  # codecs the grantee decodes, ours only


def encode_handles(handles: Sequence[int], compression: Sequence[str] = ()) -> bytes:
    """The instances request; version 2 when it offers ``compression`` codecs."""
    if not compression:
        return canonical_encode({"v": VERSION, "handles": list(handles)})
    return canonical_encode(
        {"v": COMPRESSION_VERSION, "handles": list(handles), "compression": list(compression)}
    )


def decode_instances_request(data: bytes, manifest_size: int) -> InstancesRequest:
    """The requested handles (distinct, each in the manifest) and the codecs offered that
    this node knows; raises BadInput otherwise."""
    value = canonical_decode(data)
    if isinstance(value, dict) and value.get("v") == COMPRESSION_VERSION:
        if set(value) != {"v", "handles", "compression"}:
            raise BadInput("instances request must be a map with exactly v, handles, compression")
        offered = value["compression"]
        if not isinstance(offered, list) or len(offered) > MAX_CODECS:
            raise BadInput("compression must be a short list of codec names")
        if not all(isinstance(codec, str) for codec in offered):
            raise BadInput("compression must be a short list of codec names")
        compression = tuple(codec for codec in CODECS if codec in offered)
    else:
        value = _map(data, "instances request", {"v", "handles"})
        compression = ()
    handles = value["handles"]
    if not isinstance(handles, list) or len(handles) > MAX_HANDLES:
        raise BadInput("handles must be a list")
    checked = [_count(h, "handle", manifest_size - 1) for h in handles]
    if len(set(checked)) != len(checked):
        raise BadInput("handles must be distinct")
    return InstancesRequest(checked, compression)


# -- manifest -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestEntry:
    handle: int
    study: int  # index into Manifest.studies
    size: int
    digest: bytes  # raw SHA-256 of the instance's bytes


@dataclass(frozen=True)
class Manifest:
    token_id: bytes
    studies: tuple[bytes, ...]
    instances: tuple[ManifestEntry, ...]
    # Instances still on their way from the custodian's PACS; 0 for a whole manifest.
    pending: int = 0

    def encode(self) -> bytes:
        value: dict[str, Any] = {
            "v": VERSION,
            "token_id": self.token_id,
            "studies": list(self.studies),
            "instances": [[e.study, e.size, e.digest] for e in self.instances],
        }
        if self.pending:
            value["pending"] = self.pending
        return canonical_encode(value)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.instances)


def decode_manifest(data: bytes) -> Manifest:
    """Raises BadInput for anything but a well-formed (whole or partial) manifest."""
    value = _map(
        data, "manifest", {"v", "token_id", "studies", "instances"}, frozenset({"pending"})
    )
    pending = _count(value.get("pending", 0), "pending count", MAX_HANDLES)
    if "pending" in value and pending == 0:
        raise BadInput("a whole manifest has no pending count")
    studies = value["studies"]
    rows = value["instances"]
    if not isinstance(studies, list) or not isinstance(rows, list) or len(rows) > MAX_HANDLES:
        raise BadInput("manifest studies and instances must be lists")
    refs = tuple(_bin(s, DIGEST_SIZE, "study reference") for s in studies)
    entries = []
    for handle, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 3:
            raise BadInput("manifest instance must be [study, size, digest]")
        study = _count(row[0], "study index", len(refs) - 1)
        entries.append(
            ManifestEntry(handle, study, _count(row[1], "size"), _bin(row[2], 32, "digest"))
        )
    return Manifest(_bin(value["token_id"], DIGEST_SIZE, "token id"), refs, tuple(entries), pending)


# -- instance stream ----------------------------------------------------------------------


def begin_message(handle: int) -> bytes:
    return BEGIN + _U32.pack(handle)


def end_message(count: int) -> bytes:
    return END + _U32.pack(count)


@dataclass(frozen=True)
class Begin:
    entry: ManifestEntry


@dataclass(frozen=True)
class Data:
    chunk: memoryview  # a view into the message: no copy of instance data


@dataclass(frozen=True)
class Complete:
    entry: ManifestEntry


@dataclass(frozen=True)
class End:
    count: int


StreamEvent = Begin | Data | Complete | End


class InstanceStreamParser:
    """Checks the plaintext messages of an instance stream against the manifest.

    Only requested handles, each at most once, each exactly its manifest size; the final
    message must come after a complete instance and state the right count; compressed
    pieces only in the ``codecs`` the request offered, each within the instance's
    remaining size. Raises BadInput on any breach.
    """

    def __init__(
        self, manifest: Manifest, requested: Iterable[int], codecs: Collection[str] = ()
    ) -> None:
        self._manifest = manifest
        self._codecs = {CODEC_MESSAGES[codec]: codec for codec in codecs}
        self._pending = set(requested)
        self._current: ManifestEntry | None = None
        self._remaining = 0
        self.completed = 0
        self.ended = False

    def feed(self, message: bytes, final: bool) -> list[StreamEvent]:
        if self.ended:
            raise BadInput("instance stream continues after its end")
        kind = message[:1]
        if kind == DATA:
            return self._data(memoryview(message)[1:])
        codec = self._codecs.get(kind)
        if codec is not None:
            if self._current is None:
                raise BadInput("instance stream sent data outside an instance")
            piece = decompress_piece(memoryview(message)[1:], self._remaining, codec)
            return self._data(memoryview(piece))
        if self._current is not None:
            raise BadInput("instance stream moved on before an instance was complete")
        if kind == BEGIN and len(message) == 5 and not final:
            (handle,) = _U32.unpack_from(message, 1)
            if handle not in self._pending:
                raise BadInput("instance stream sent an instance that was not asked for")
            self._pending.discard(handle)
            entry = self._manifest.instances[handle]
            self._current, self._remaining = entry, entry.size
            events: list[StreamEvent] = [Begin(entry)]
            if entry.size == 0:
                events.append(self._complete())
            return events
        if kind == END and len(message) == 5 and final:
            (count,) = _U32.unpack_from(message, 1)
            if count != self.completed:
                raise BadInput("instance stream's final count does not match what came")
            self.ended = True
            return [End(count)]
        raise BadInput("instance stream holds a malformed message")

    def _data(self, chunk: memoryview) -> list[StreamEvent]:
        if self._current is None or len(chunk) > self._remaining:
            raise BadInput("instance stream sent more data than the manifest size")
        self._remaining -= len(chunk)
        events: list[StreamEvent] = [Data(chunk)]
        if self._remaining == 0:
            events.append(self._complete())
        return events

    def _complete(self) -> Complete:
        assert self._current is not None
        entry, self._current = self._current, None
        self.completed += 1
        return Complete(entry)
