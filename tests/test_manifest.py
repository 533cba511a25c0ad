"""Transfer wire formats: requests, manifest, instance stream framing, the shared digest."""

from __future__ import annotations

import contextlib
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.encoding import canonical_encode
from node.core.manifest import (
    DATA,
    Begin,
    Complete,
    Data,
    End,
    InstanceStreamParser,
    Manifest,
    ManifestEntry,
    OpenRequest,
    OpenResponse,
    begin_message,
    decode_handles,
    decode_manifest,
    decode_open_request,
    decode_open_response,
    encode_handles,
    end_message,
    transfer_digest,
)
from node.errors import BadInput

STUDY_A, STUDY_B = os.urandom(32), os.urandom(32)


def _manifest(sizes: tuple[int, ...] = (3, 0, 5)) -> Manifest:
    entries = tuple(
        ManifestEntry(i, i % 2, size, hashlib.sha256(bytes([i])).digest())
        for i, size in enumerate(sizes)
    )
    return Manifest(os.urandom(32), (STUDY_A, STUDY_B), entries)


class TestMessages:
    def test_round_trips(self) -> None:
        manifest = _manifest()
        assert decode_manifest(manifest.encode()) == manifest
        request = OpenRequest(b"token", os.urandom(32))
        assert decode_open_request(request.encode()) == request
        response = OpenResponse("ab12", os.urandom(32), b"sealed")
        assert decode_open_response(response.encode()) == response
        assert decode_handles(encode_handles([2, 0]), 3) == [2, 0]

    def test_a_partial_manifest_carries_its_pending_count_and_a_whole_one_none(self) -> None:
        whole = _manifest()
        partial = Manifest(whole.token_id, whole.studies, whole.instances, pending=7)
        assert decode_manifest(partial.encode()) == partial
        assert b"pending" not in whole.encode()  # a whole manifest is encoded as it was
        fields = {"v": 1, "token_id": bytes(32), "studies": [], "instances": []}
        for bad in (0, -1, True, "7"):
            with pytest.raises(BadInput, match="pending"):
                decode_manifest(canonical_encode({**fields, "pending": bad}))

    def test_handles_out_of_range_or_repeated_are_refused(self) -> None:
        with pytest.raises(BadInput):
            decode_handles(encode_handles([3]), 3)
        with pytest.raises(BadInput, match="distinct"):
            decode_handles(encode_handles([1, 1]), 3)

    def test_manifest_with_bad_study_index_is_refused(self) -> None:
        data = canonical_encode(
            {"v": 1, "token_id": bytes(32), "studies": [STUDY_A], "instances": [[1, 5, bytes(32)]]}
        )
        with pytest.raises(BadInput, match="study index"):
            decode_manifest(data)

    def test_unknown_version_and_extra_keys_are_refused(self) -> None:
        with pytest.raises(BadInput, match="version"):
            decode_open_request(canonical_encode({"v": 2, "token": b"t", "ephemeral": bytes(32)}))
        with pytest.raises(BadInput):
            decode_handles(canonical_encode({"v": 1, "handles": [], "x": 1}), 3)

    def test_transfer_digest_ignores_order_and_counts_repeats(self) -> None:
        a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
        assert transfer_digest([a, b]) == transfer_digest([b, a])
        assert transfer_digest([a, a, b]) != transfer_digest([a, b])
        assert transfer_digest([a, b]) == hashlib.sha256(b"".join(sorted([a, b]))).digest()

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_decoders_fail_closed_on_garbage(self, data: bytes) -> None:
        for decode in (
            decode_manifest,
            decode_open_request,
            decode_open_response,
            lambda d: decode_handles(d, 10),
        ):
            with contextlib.suppress(BadInput):  # anything else fails the test
                decode(data)


class TestInstanceStreamParser:
    def test_well_formed_stream_yields_every_instance(self) -> None:
        parser = InstanceStreamParser(_manifest(), [0, 1, 2])
        events = []
        events += parser.feed(begin_message(0), False)
        events += parser.feed(DATA + b"abc", False)
        events += parser.feed(begin_message(1), False)  # empty instance completes at once
        events += parser.feed(begin_message(2), False)
        events += parser.feed(DATA + b"12", False)
        events += parser.feed(DATA + b"345", False)
        events += parser.feed(end_message(3), True)
        assert [type(e) for e in events] == [
            Begin, Data, Complete, Begin, Complete, Begin, Data, Data, Complete, End,
        ]  # fmt: skip
        assert parser.ended

    def test_instance_not_asked_for_is_refused(self) -> None:
        parser = InstanceStreamParser(_manifest(), [0])
        with pytest.raises(BadInput, match="not asked"):
            parser.feed(begin_message(2), False)

    def test_more_data_than_the_manifest_size_is_refused(self) -> None:
        parser = InstanceStreamParser(_manifest(), [0])
        parser.feed(begin_message(0), False)
        with pytest.raises(BadInput, match="more data"):
            parser.feed(DATA + b"abcd", False)

    def test_end_before_an_instance_is_complete_is_refused(self) -> None:
        parser = InstanceStreamParser(_manifest(), [0])
        parser.feed(begin_message(0), False)
        parser.feed(DATA + b"ab", False)
        with pytest.raises(BadInput, match="moved on"):
            parser.feed(end_message(0), True)

    def test_wrong_final_count_is_refused(self) -> None:
        parser = InstanceStreamParser(_manifest(), [1])
        parser.feed(begin_message(1), False)
        with pytest.raises(BadInput, match="count"):
            parser.feed(end_message(2), True)

    def test_same_instance_twice_is_refused(self) -> None:
        parser = InstanceStreamParser(_manifest(), [1])
        parser.feed(begin_message(1), False)
        with pytest.raises(BadInput):
            parser.feed(begin_message(1), False)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.binary(max_size=8), st.booleans()), max_size=8))
    def test_parser_fails_closed_on_garbage(self, messages: list[tuple[bytes, bool]]) -> None:
        parser = InstanceStreamParser(_manifest(), [0, 1, 2])
        with contextlib.suppress(BadInput):  # anything else fails the test
            for message, final in messages:
                parser.feed(message, final)
