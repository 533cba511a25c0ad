"""Canonical msgpack: one encoding per value, everything else refused."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.encoding import MAX_DEPTH, canonical_decode, canonical_encode
from node.errors import BadInput

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=40)
    | st.binary(max_size=300),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 500), children, max_size=5)
    ),
    max_leaves=20,
)


class TestCanonicalEncode:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (0, b"\x00"),
            (127, b"\x7f"),
            (128, b"\xcc\x80"),
            (256, b"\xcd\x01\x00"),
            (2**32, b"\xcf\x00\x00\x00\x01\x00\x00\x00\x00"),
            (-1, b"\xff"),
            (-32, b"\xe0"),
            (-33, b"\xd0\xdf"),
            (-(2**63), b"\xd3\x80" + bytes(7)),
            ("", b"\xa0"),
            ("a" * 32, b"\xd9\x20" + b"a" * 32),
            (b"", b"\xc4\x00"),
            (b"x" * 256, b"\xc5\x01\x00" + b"x" * 256),
            ([], b"\x90"),
            ({}, b"\x80"),
            (None, b"\xc0"),
            (True, b"\xc3"),
            (False, b"\xc2"),
        ],
    )
    def test_uses_the_smallest_header(self, value: object, expected: bytes) -> None:
        assert canonical_encode(value) == expected

    def test_sorts_map_keys_by_encoded_bytes(self) -> None:
        # "b" (0xa1 0x62) sorts before "aa" (0xa2 ...) because its header is smaller.
        assert canonical_encode({"aa": 1, "b": 2}) == b"\x82\xa1b\x02\xa2aa\x01"
        assert canonical_encode({"b": 2, "aa": 1}) == canonical_encode({"aa": 1, "b": 2})

    @pytest.mark.parametrize("value", [1.5, {1.0: 2}, object(), 2**64, -(2**63) - 1, {1, 2}])
    def test_refuses_values_it_cannot_hold(self, value: object) -> None:
        with pytest.raises(BadInput):
            canonical_encode(value)

    def test_refuses_nesting_deeper_than_the_limit(self) -> None:
        value: list[object] = []
        for _ in range(MAX_DEPTH + 2):
            value = [value]
        with pytest.raises(BadInput, match="deeper"):
            canonical_encode(value)

    @given(values)
    @settings(max_examples=300, deadline=None)
    def test_round_trips_and_matches_msgpack_for_sorted_maps(self, value: object) -> None:
        data = canonical_encode(value)
        assert canonical_decode(data) == value
        assert canonical_encode(canonical_decode(data)) == data


class TestCanonicalDecode:
    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"\xcc\x05", "int with a wider header than needed"),
            (b"\xd9\x01a", "str8 for a fixstr"),
            (b"\xc5\x00\x01x", "bin16 for a bin8"),
            (b"\xdc\x00\x00", "array16 for a fixarray"),
            (b"\x82\xa1b\x01\xa1a\x02", "unsorted map keys"),
            (b"\x82\xa1a\x01\xa1a\x02", "duplicate map key"),
            (b"\xcb" + bytes(8), "float64"),
            (b"\xd4\x01\x00", "ext type"),
            (b"\xa1\xff", "invalid UTF-8"),
            (b"\x01\x02", "trailing bytes"),
            (b"\x92\x01", "truncated array"),
            (b"", "empty input"),
            (b"\xc1", "reserved byte"),
            (b"\x91" * 40 + b"\x90", "too deep"),
            (b"\xdb\xff\xff\xff\xff", "length beyond the input"),
        ],
    )
    def test_refuses_non_canonical_or_malformed_bytes(self, data: bytes, reason: str) -> None:
        with pytest.raises(BadInput):
            canonical_decode(data)

    def test_keys_out_of_order_are_refused_after_the_same_keys_in_order(self) -> None:
        """Key orders found canonical are remembered: another order of them is not one."""
        assert canonical_decode(msgpack.packb({"kind": 1, "prev": 2})) == {"kind": 1, "prev": 2}
        with pytest.raises(BadInput):
            canonical_decode(msgpack.packb({"prev": 2, "kind": 1}))
        with pytest.raises(BadInput):  # True and 1 are one key to Python, not to msgpack
            canonical_decode(b"\x82\xc3\x01\x01\x02")

    @pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
    @pytest.mark.parametrize("leaf", [[], [7], {}, {"k": 7}])
    def test_decodes_a_nesting_exactly_when_it_encodes(self, depth: int, leaf: object) -> None:
        value: object = leaf
        for _ in range(depth):
            value = [value]
        data = msgpack.packb(value)
        try:
            canonical_encode(value)
        except BadInput:
            with pytest.raises(BadInput):
                canonical_decode(data)
        else:
            assert canonical_decode(data) == value

    def test_accepts_what_msgpack_packs_for_canonical_values(self) -> None:
        value = {"a": [1, -2, b"\x00", "é"], "b": None}
        assert canonical_decode(msgpack.packb(value, use_bin_type=True)) == value

    @given(st.binary(max_size=64))
    @settings(max_examples=500, deadline=None)
    def test_garbage_never_raises_anything_but_bad_input(self, data: bytes) -> None:
        try:
            value = canonical_decode(data)
        except BadInput:
            return
        assert canonical_encode(value) == data

    @given(
        st.recursive(
            st.none() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=4),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=3) | st.integers(-3, 300), children, max_size=4)
            ),
            max_leaves=12,
        )
    )
    @settings(max_examples=500, deadline=None)
    def test_accepts_a_packing_exactly_when_it_is_the_canonical_encoding(
        self, value: object
    ) -> None:
        data = msgpack.packb(value, use_bin_type=True)  # maps in insertion order, floats kept
        try:
            expected: bytes | None = canonical_encode(msgpack.unpackb(data, strict_map_key=False))
        except BadInput:
            expected = None
        try:
            canonical_decode(data)
            accepted = True
        except BadInput:
            accepted = False
        assert accepted == (expected == data)
