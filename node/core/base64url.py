"""The one base64url rule: RFC 4648 §5 without padding, the text form of patient keys,
consent tokens, study references, nonces and signatures on the wire.

A value has exactly one text: only the URL-safe alphabet, no padding, no whitespace, and
the unused low bits of the last character zero (so two texts never decode to one value).
The length is bounded before anything is decoded. Text a person typed or pasted is
stripped by the parser that reads it, never here: a wire value is taken as sent.
"""

from __future__ import annotations

import base64
import binascii
import re

from node.errors import BadInput

# fullmatch, not "^...$": "$" would also accept a trailing newline.
_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")
DEFAULT_MAX_BYTES = 4096


def b64url_encode(data: bytes) -> str:
    """``data`` as base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(
    text: str, what: str, *, size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """The bytes of canonical unpadded base64url ``text``: exactly ``size`` of them if given,
    else 1 to ``max_bytes``.

    Raises BadInput naming ``what`` if ``text`` is empty, too long, has a character outside
    the alphabet (padding and whitespace included), is not canonical, or has the wrong size.
    """
    limit = max_bytes if size is None else size
    if (
        not isinstance(text, str)
        or len(text) > (limit * 4 + 2) // 3
        or not _ALPHABET.fullmatch(text)
    ):
        raise BadInput(f"{what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"{what} is not base64url") from exc
    if b64url_encode(data) != text:
        raise BadInput(f"{what} is not canonical base64url")
    if size is not None and len(data) != size:
        raise BadInput(f"{what} must be {size} bytes in base64url")
    return data
