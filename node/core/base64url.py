"""The base64 rules. Base64url (RFC 4648 §5, no padding) is the text form of patient keys,
consent tokens, study references, nonces and signatures on the wire; standard base64
(§4, padded) is what C2SP formats use: note signatures, checkpoint roots, vkeys, proof
lines and tlog-proof files.

Either way a value has exactly one text: only the alphabet (and, for standard base64,
the padding it needs), no whitespace, and the unused low bits of the last character zero,
so two texts never decode to one value and a flipped bit never goes unnoticed. The
length is bounded before anything is decoded. Text a person typed or pasted is stripped
by the parser that reads it, never here: a wire value is taken as sent.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass

from node.errors import BadInput

# fullmatch, not "^...$": "$" would also accept a trailing newline.
_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")
_STANDARD = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
DEFAULT_MAX_BYTES = 4096


@dataclass(frozen=True)
class _Variant:
    name: str
    alphabet: re.Pattern[str]
    encode: Callable[[bytes], str]
    decode: Callable[[str], bytes]
    max_chars: Callable[[int], int]

    def strict_decode(self, text: str, what: str, size: int | None, max_bytes: int) -> bytes:
        limit = max_bytes if size is None else size
        if (
            not isinstance(text, str)
            or not text
            or len(text) > self.max_chars(limit)
            or not self.alphabet.fullmatch(text)
        ):
            raise BadInput(f"{what} is not {self.name}")
        try:
            data = self.decode(text)
        except (binascii.Error, ValueError) as exc:
            raise BadInput(f"{what} is not {self.name}") from exc
        if self.encode(data) != text:
            raise BadInput(f"{what} is not canonical {self.name}")
        if size is not None and len(data) != size:
            raise BadInput(f"{what} must be {size} bytes in {self.name}")
        return data


def b64url_encode(data: bytes) -> str:
    """``data`` as base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64_encode(data: bytes) -> str:
    """``data`` as standard padded base64."""
    return base64.b64encode(data).decode()


_URL = _Variant(
    "base64url",
    _ALPHABET,
    b64url_encode,
    lambda text: base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)),
    lambda limit: (limit * 4 + 2) // 3,
)
_STANDARD_VARIANT = _Variant(
    "base64",
    _STANDARD,
    b64_encode,
    lambda text: base64.b64decode(text, validate=True),
    lambda limit: (limit + 2) // 3 * 4,
)


def b64url_decode(
    text: str, what: str, *, size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """The bytes of canonical unpadded base64url ``text``: exactly ``size`` of them if given,
    else 1 to ``max_bytes``.

    Raises BadInput naming ``what`` if ``text`` is empty, too long, has a character outside
    the alphabet (padding and whitespace included), is not canonical, or has the wrong size.
    """
    return _URL.strict_decode(text, what, size, max_bytes)


def b64_decode(
    text: str, what: str, *, size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """The bytes of canonical standard padded base64 ``text``: exactly ``size`` of them if
    given, else 1 to ``max_bytes``.

    Raises BadInput naming ``what`` like b64url_decode (the padding a length needs is
    required, any other "=" refused).
    """
    return _STANDARD_VARIANT.strict_decode(text, what, size, max_bytes)
