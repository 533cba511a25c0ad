"""Ledger entries: every kind round-trips; anything else is refused with BadInput only."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.encoding import canonical_encode
from node.core.entries import (
    ENTRY_KINDS,
    ENTRY_TYPES,
    Access,
    Enroll,
    LedgerEntry,
    Witness,
    decode_entry,
    encode_entry,
)
from node.errors import BadInput

H = bytes(range(32))
SAMPLES: dict[str, dict[str, Any]] = {
    "enroll": {"subject": H, "key": b"\x01" * 32, "replaces": None},
    "grant": {"token": b"patient-signed token bytes"},
    "revoke": {"revocation": b"patient-signed revocation"},
    "access": {
        "token_id": H,
        "grantee": "b.example/imageshare",
        "study": H,
        "instances": 400,
        "bytes": 200_000_000,
        "digest": H,
    },
    "denial": {"token_id": H, "requester": "c.example/x", "rule": "expired", "study": None},
    "receipt": {
        "token_id": H,
        "custodian": "a.example/imageshare",
        "study": H,
        "instances": 1,
        "bytes": 0,
        "digest": H,
    },
    "witness": {"log_id": H, "size": 70, "root": H},
    "roster": {"note": b"imageshare-roster/v1\n...signed note"},
    "contribution": {"token_id": H, "study": H, "digest": H},
    "key_rotation": {
        "old_key": H,
        "new_key": H,
        "old_signature": None,
        "new_signature": bytes(64),
        "reason": "compromised",
    },
    "emergency_policy": {"policy": b"patient-signed emergency policy"},
    "delegation": {"delegation": b"patient-signed delegation"},
    "desk_delegation": {"delegation": b"delegation signed with a minor's custodian-held key"},
    "break_glass": {
        "request": H,
        "requester": "b.example/imageshare",
        "reason": "ETREAT",
        "subject": H,
        "patient_key": None,
        "policy": "any_member",
        "policy_index": None,
        "studies": H + H,
    },
}


def raw_entry(**overrides: Any) -> bytes:
    value: dict[str, Any] = {"v": 1, "kind": "grant", "prev": bytes(32), "time": 5, "token": b"t"}
    value.update(overrides)
    return canonical_encode({k: v for k, v in value.items() if v is not ...})


class TestRoundTrip:
    def test_every_registered_kind_has_a_sample(self) -> None:
        assert set(SAMPLES) == set(ENTRY_KINDS)

    @pytest.mark.parametrize("kind", sorted(SAMPLES))
    def test_round_trips(self, kind: str) -> None:
        entry = LedgerEntry(kind, H, 1_700_000_000, SAMPLES[kind])
        raw = encode_entry(entry)
        assert decode_entry(raw) == entry
        assert encode_entry(decode_entry(raw)) == raw

    def test_optional_fields_take_a_value_too(self) -> None:
        entry = LedgerEntry("enroll", H, 1, {**SAMPLES["enroll"], "replaces": H})
        assert decode_entry(encode_entry(entry)).fields["replaces"] == H


class TestRefusals:
    @pytest.mark.parametrize(
        ("raw", "match"),
        [
            (raw_entry(v=2), "version"),
            (raw_entry(v=True), "version"),
            (raw_entry(v=...), "version"),
            (raw_entry(kind="party"), "kind"),
            (raw_entry(kind=7), "kind"),
            (raw_entry(extra=b"x"), "unexpected"),
            (raw_entry(token=...), "lacks"),
            (raw_entry(token="text, not bytes"), "token"),
            (raw_entry(prev=bytes(31)), "prev"),
            (raw_entry(prev=...), "lacks"),
            (raw_entry(time=-1), "time"),
            (raw_entry(time=...), "lacks"),
            (canonical_encode([1, 2]), "map"),
            (raw_entry() + b"\x00", "trailing"),
            (b"\x86" + raw_entry()[1:], "msgpack"),
        ],
    )
    def test_refuses_malformed_entries(self, raw: bytes, match: str) -> None:
        with pytest.raises(BadInput, match=match):
            decode_entry(raw)

    def test_refuses_non_canonical_encoding(self) -> None:
        raw = raw_entry()
        # The same map with the time as a uint8 instead of a fixint.
        widened = raw.replace(b"\xa4time\x05", b"\xa4time\xcc\x05")
        assert widened != raw
        with pytest.raises(BadInput, match="canonical"):
            decode_entry(widened)

    @pytest.mark.parametrize(
        ("kind", "field", "value"),
        [
            ("access", "instances", -1),
            ("access", "bytes", True),
            ("access", "grantee", b"bytes"),
            ("access", "digest", bytes(31)),
            ("enroll", "subject", None),
            ("key_rotation", "new_signature", bytes(32)),
            ("denial", "rule", "x" * 2000),
        ],
    )
    def test_encode_refuses_mistyped_fields(self, kind: str, field: str, value: Any) -> None:
        with pytest.raises(BadInput, match=field):
            encode_entry(LedgerEntry(kind, H, 1, {**SAMPLES[kind], field: value}))

    def test_encode_refuses_oversize_entries(self) -> None:
        with pytest.raises(BadInput, match="larger"):
            encode_entry(LedgerEntry("grant", H, 1, {"token": bytes(70_000)}))


class TestFuzz:
    @given(st.binary(max_size=200))
    @settings(max_examples=400, deadline=None)
    def test_random_bytes_raise_only_bad_input(self, data: bytes) -> None:
        with contextlib.suppress(BadInput):
            decode_entry(data)

    @given(st.sampled_from(sorted(SAMPLES)), st.data())
    @settings(max_examples=300, deadline=None)
    def test_mutated_entries_raise_only_bad_input_or_decode_canonically(
        self, kind: str, data: st.DataObject
    ) -> None:
        raw = bytearray(encode_entry(LedgerEntry(kind, H, 1_700_000_000, SAMPLES[kind])))
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] = data.draw(st.integers(0, 255))
        try:
            entry = decode_entry(bytes(raw))
        except BadInput:
            return
        assert encode_entry(entry) == bytes(raw)


# Wire bytes written by the string-keyed entries before the typed classes: the form must
# not change, or no existing log would verify.
WIRE_BEFORE_TYPED = {
    "access": "8aa17601a46b696e64a6616363657373a470726576c420000102030405060708090a0b0c0d0e0f"
    "101112131415161718191a1b1c1d1e1fa474696d65ce6553f100a56279746573ce0bebc200a5737475"
    "6479c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa664696765"
    "7374c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa76772616e"
    "746565b4622e6578616d706c652f696d6167657368617265a8746f6b656e5f6964c420000102030405"
    "060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa9696e7374616e636573cd0190",
    "enroll": "87a17601a36b6579c42001010101010101010101010101010101010101010101010101010101"
    "01010101a46b696e64a6656e726f6c6ca470726576c420000102030405060708090a0b0c0d0e0f1011"
    "12131415161718191a1b1c1d1e1fa474696d6507a77375626a656374c420000102030405060708090a"
    "0b0c0d0e0f101112131415161718191a1b1c1d1e1fa87265706c61636573c0",
}


class TestTypedKinds:
    @pytest.mark.parametrize("kind", sorted(SAMPLES))
    def test_each_kind_is_a_class_whose_entry_has_the_same_wire_bytes(self, kind: str) -> None:
        body = ENTRY_TYPES[kind](**SAMPLES[kind])
        assert body.kind == kind and list(body.wire_fields()) == list(ENTRY_KINDS[kind])
        typed = LedgerEntry.of(H, 1_700_000_000, body)
        raw = encode_entry(typed)
        assert raw == encode_entry(LedgerEntry(kind, H, 1_700_000_000, SAMPLES[kind]))
        assert decode_entry(raw).body == body

    def test_entries_written_before_the_typed_classes_decode_byte_identically(self) -> None:
        access = Access(
            token_id=H,
            grantee="b.example/imageshare",
            study=H,
            instances=400,
            bytes=200_000_000,
            digest=H,
        )
        enroll = Enroll(subject=H, key=b"\x01" * 32, replaces=None)
        for body, time in ((access, 1_700_000_000), (enroll, 7)):
            raw = bytes.fromhex(WIRE_BEFORE_TYPED[body.kind])
            assert decode_entry(raw).body == body
            assert encode_entry(LedgerEntry.of(H, time, body)) == raw

    def test_a_malformed_entry_has_no_typed_body(self) -> None:
        with pytest.raises(BadInput, match="lacks field root"):
            _ = LedgerEntry("witness", H, 1, {"log_id": H, "size": 1}).body
        with pytest.raises(BadInput, match="size must be int"):
            _ = LedgerEntry.of(H, 1, Witness(H, -1, H)).body

    def test_each_field_spec_refuses_what_it_does_not_name(self) -> None:
        enroll = {"subject": H, "key": b"\x01" * 32, "replaces": None}
        assert LedgerEntry("enroll", H, 1, enroll).body == Enroll(H, b"\x01" * 32, None)
        refused: dict[str, dict[str, Any]] = {
            "subject must not be nil": enroll | {"subject": None},
            "key must be bin32": enroll | {"key": b"\x01" * 31},
            "replaces must be bin32?": enroll | {"replaces": "x" * 32},
            "unexpected field extra": enroll | {"extra": 1},
            "lacks field key": {"subject": H, "replaces": None},
        }
        for message, fields in refused.items():
            with pytest.raises(BadInput, match=re.escape(message)):
                _ = LedgerEntry("enroll", H, 1, fields).body
        witness: dict[str, Any] = {"log_id": H, "size": 1, "root": H}
        for size in (True, 2**63, -1, 1.0):
            with pytest.raises(BadInput, match="size must be int"):
                _ = LedgerEntry("witness", H, 1, witness | {"size": size}).body
