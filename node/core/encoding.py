"""Canonical msgpack: exactly one byte string for every value, so equal values hash equal.

Rules (the one place they are written):

- types: nil, bool, int (-2**63 .. 2**64-1), str (UTF-8), bin (bytes), array, map;
  floats, ext types and timestamps are refused;
- every header is the smallest that fits (fixint/fixstr/fixarray/fixmap first);
- map keys are unique and sorted by their encoded bytes;
- nesting is at most ``MAX_DEPTH`` deep; nothing may follow the value.

Decoding re-encodes what it read and compares: any byte string that is not the single
canonical encoding of its value is refused with BadInput. (The re-encoding is msgpack's
own, in C, once the value is known to hold nothing it would encode otherwise.)
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack

from node.errors import BadInput

MAX_DEPTH = 32
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def canonical_encode(value: Any) -> bytes:
    """The canonical msgpack bytes of ``value``; raises BadInput for a type it cannot hold."""
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def canonical_decode(data: bytes) -> Any:
    """Decode canonical msgpack; raises BadInput if ``data`` is not exactly one canonical value.

    Maps decode to dicts, arrays to lists, bin to bytes, str to str.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadInput("msgpack input must be bytes")
    data = bytes(data)
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,
        )
    except msgpack.ExtraData as exc:
        raise BadInput("trailing bytes after the msgpack value") from exc
    except msgpack.StackError as exc:
        raise BadInput(f"msgpack nesting is deeper than {MAX_DEPTH} levels") from exc
    except (ValueError, TypeError, UnicodeDecodeError, msgpack.UnpackException) as exc:
        raise BadInput(f"malformed msgpack: {exc or type(exc).__name__}") from exc
    except RecursionError as exc:
        raise BadInput("msgpack nesting is too deep") from exc
    if msgpack.packb(value) == data and _plain(value, 0):
        return value  # the same bytes canonical_encode gives, found in C
    if canonical_encode(value) != data:  # raises, or says, why not
        raise BadInput("msgpack is not in canonical form")
    return value


# The exact types whose values packb encodes canonically on their own.
_SCALARS = frozenset({type(None), bool, int, str, bytes})
# Key sequences of maps (all str keys) found in canonical order: the maps of one kind of
# ledger entry share one, so most maps are checked by one lookup. Bounded: any input
# may bring new ones, and only these many are remembered.
_SORTED_KEYS: set[tuple[str, ...]] = set()
_MAX_SORTED_KEYS = 4096


def _plain(value: Any, depth: int) -> bool:
    """True if msgpack.packb's encoding of the decoded ``value`` is its canonical one: only
    the types canonical msgpack holds, maps in encoded-key order, no deeper than allowed.
    (packb already picks the smallest header of each, as the rules do.)"""
    if depth > MAX_DEPTH:
        return False
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is not list and kind is not dict:
        return False  # a float, an ext type, a timestamp
    if depth == MAX_DEPTH:
        return not value  # its items (or keys) would be nested too deep
    if kind is dict:
        if not _keys_sorted(value, depth):
            return False
        items = value.values()
    else:
        items = value
    # A scalar item (most are) is plain at this depth: no call for it.
    return all(type(item) in _SCALARS or _plain(item, depth + 1) for item in items)


def _keys_sorted(value: dict[Any, Any], depth: int) -> bool:
    """True if a map's keys are canonical values, unique, in encoded-key order."""
    keys = tuple(value)
    if keys in _SORTED_KEYS:
        return True
    packed = [msgpack.packb(key) for key in keys if _plain(key, depth + 1)]
    if len(packed) != len(keys) or not all(a < b for a, b in itertools.pairwise(packed)):
        return False
    # Only str keys: keys equal in Python (1, 1.0, True) need not encode alike.
    if len(_SORTED_KEYS) < _MAX_SORTED_KEYS and all(type(key) is str for key in keys):
        _SORTED_KEYS.add(keys)
    return True


def _encode(value: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BadInput(f"value is nested deeper than {MAX_DEPTH} levels")
    if value is None:
        out.append(0xC0)
    elif value is True:
        out.append(0xC3)
    elif value is False:
        out.append(0xC2)
    elif isinstance(value, int):
        _encode_int(value, out)
    elif isinstance(value, str):
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadInput("string is not valid Unicode") from exc
        _header(len(raw), out, fix=(0xA0, 31), sizes=(0xD9, 0xDA, 0xDB))
        out += raw
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        _header(len(raw), out, fix=None, sizes=(0xC4, 0xC5, 0xC6))
        out += raw
    elif isinstance(value, list | tuple):
        _header(len(value), out, fix=(0x90, 15), sizes=(None, 0xDC, 0xDD))
        for item in value:
            _encode(item, out, depth + 1)
    elif isinstance(value, dict):
        items = []
        for key, item in value.items():
            encoded_key = bytearray()
            _encode(key, encoded_key, depth + 1)
            items.append((bytes(encoded_key), item))
        items.sort(key=lambda pair: pair[0])
        for (a, _), (b, _) in itertools.pairwise(items):
            if a == b:
                raise BadInput("map has a duplicate key")
        _header(len(items), out, fix=(0x80, 15), sizes=(None, 0xDE, 0xDF))
        for key_bytes, item in items:
            out += key_bytes
            _encode(item, out, depth + 1)
    else:
        raise BadInput(f"canonical msgpack cannot hold a {type(value).__name__}")


def _encode_int(value: int, out: bytearray) -> None:
    if value < _INT_MIN or value > _INT_MAX:
        raise BadInput("integer does not fit in 64 bits")
    if 0 <= value <= 0x7F:
        out.append(value)
    elif -32 <= value < 0:
        out.append(value & 0xFF)
    elif value > 0:
        for tag, fmt, limit in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 2**32 - 1)):
            if value <= limit:
                out.append(tag)
                out += struct.pack(fmt, value)
                return
        out.append(0xCF)
        out += struct.pack(">Q", value)
    else:
        for tag, fmt, limit in (
            (0xD0, ">b", -(2**7)),
            (0xD1, ">h", -(2**15)),
            (0xD2, ">i", -(2**31)),
        ):
            if value >= limit:
                out.append(tag)
                out += struct.pack(fmt, value)
                return
        out.append(0xD3)
        out += struct.pack(">q", value)


def _header(
    length: int,
    out: bytearray,
    fix: tuple[int, int] | None,
    sizes: tuple[int | None, int, int],
) -> None:
    """Append the smallest length header: fix form, then 8-, 16-, 32-bit lengths."""
    if fix is not None and length <= fix[1]:
        out.append(fix[0] | length)
        return
    tag8, tag16, tag32 = sizes
    if tag8 is not None and length <= 0xFF:
        out.append(tag8)
        out.append(length)
    elif length <= 0xFFFF:
        out.append(tag16)
        out += struct.pack(">H", length)
    elif length <= 0xFFFFFFFF:
        out.append(tag32)
        out += struct.pack(">I", length)
    else:
        raise BadInput("value is too long for msgpack")
