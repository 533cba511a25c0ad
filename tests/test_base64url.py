"""One base64url rule: patient keys, consent tokens and study references accept and refuse
the same texts (the signed-request headers' cases are in test_signed_requests). One
standard-base64 rule for the C2SP formats, as strict."""

from __future__ import annotations

import contextlib
import hashlib
import os

import pytest

from node.core.base64url import b64_decode, b64_encode, b64url_decode, b64url_encode
from node.core.consent import parse_token_text
from node.core.patient_keys import parse_public_key
from node.errors import BadInput
from node.services.wallet import parse_study_ref

# Fixed, so that every pytest-xdist worker collects the same test ids.
KEY = hashlib.sha256(b"a fixed test key").digest()
REFUSED = [
    "",
    b64url_encode(KEY) + "=",  # padding
    b64url_encode(KEY)[:-1] + "B",  # the last character's unused bits are not zero
    b64url_encode(KEY)[:-1] + "+",  # standard base64, not the URL alphabet
    b64url_encode(KEY) + "\n",  # "$" in a regex would let this one through
    " " + b64url_encode(KEY),
    b64url_encode(KEY)[:21] + " " + b64url_encode(KEY)[21:],
    b64url_encode(KEY)[:-1] + "٣",  # a digit of another script
    b64url_encode(KEY)[:-1],  # 31 bytes and a bit: no whole number of bytes
    b64url_encode(KEY + b"x"),  # 33 bytes
]


class TestRule:
    @pytest.mark.parametrize("size", [1, 2, 3, 16, 31, 32, 33, 64, 4096])
    def test_every_size_round_trips(self, size: int) -> None:
        data = os.urandom(size)
        assert b64url_decode(b64url_encode(data), "x") == data
        assert b64url_decode(b64url_encode(data), "x", size=size) == data

    @pytest.mark.parametrize("text", REFUSED)
    def test_malformed_or_wrong_size_text_is_refused_naming_it(self, text: str) -> None:
        with pytest.raises(BadInput, match=r"^thing "):
            b64url_decode(text, "thing", size=32)

    def test_more_than_max_bytes_is_refused_before_decoding(self) -> None:
        with pytest.raises(BadInput, match="not base64url"):
            b64url_decode(b64url_encode(bytes(17)), "x", max_bytes=16)
        assert b64url_decode(b64url_encode(bytes(16)), "x", max_bytes=16) == bytes(16)


STANDARD_REFUSED = [
    "",
    b64_encode(KEY)[:-1],  # padding missing
    b64_encode(KEY) + "=",  # padding grown
    b64_encode(KEY)[:-2] + "1=",  # "0" (52) and "1" (53) differ in an unused bit only
    b64_encode(KEY).replace("=", "A"),  # a data character where padding belongs
    b64_encode(KEY)[:-1] + "\n",
    b64_encode(KEY)[:10] + "\n" + b64_encode(KEY)[10:],
    "-" + b64_encode(KEY)[1:],  # a character of the URL alphabet
    b64_encode(KEY + b"x"),  # 33 bytes
]


class TestStandardRule:
    @pytest.mark.parametrize("size", [1, 2, 3, 31, 32, 33, 68, 76])
    def test_every_size_round_trips(self, size: int) -> None:
        data = os.urandom(size)
        assert b64_decode(b64_encode(data), "x", size=size) == data

    @pytest.mark.parametrize("text", STANDARD_REFUSED, ids=range(len(STANDARD_REFUSED)))
    def test_malformed_or_wrong_size_text_is_refused_naming_it(self, text: str) -> None:
        with pytest.raises(BadInput, match=r"^thing "):
            b64_decode(text, "thing", size=32)

    @pytest.mark.parametrize("size", [1, 2, 31, 32, 68, 76])
    def test_no_value_has_a_second_text(self, size: int) -> None:
        """Every flip of bit 0 or bit 5 of any character is refused or decodes to other bytes."""
        data = hashlib.sha256(bytes([size])).digest() * 3
        text = b64_encode(data[:size])
        for at in range(len(text)):
            for flip in (0x01, 0x20):
                changed = text[:at] + chr(ord(text[at]) ^ flip) + text[at + 1 :]
                with contextlib.suppress(BadInput):
                    assert b64_decode(changed, "x", max_bytes=size + 3) != data[:size]


class TestCallersAgree:
    """Each caller applies the one rule; only the error it maps a refusal to differs."""

    @pytest.mark.parametrize("text", REFUSED)
    def test_patient_key_and_study_reference_refuse_the_same_texts(self, text: str) -> None:
        if text.strip() != text and text.strip() == b64url_encode(KEY):
            return  # a pasted key may carry surrounding whitespace: see below
        with pytest.raises(BadInput):
            parse_public_key(text)
        with pytest.raises(BadInput):
            parse_study_ref(text)

    def test_study_reference_from_a_url_keeps_no_whitespace(self) -> None:
        with pytest.raises(BadInput):
            parse_study_ref(b64url_encode(KEY) + " ")

    def test_pasted_patient_key_and_token_may_carry_surrounding_whitespace(self) -> None:
        assert parse_public_key(f"  {b64url_encode(KEY)}\n") == KEY
        assert parse_token_text(f" {b64url_encode(b'token bytes')}\n") == b"token bytes"
