"""Transfer wire formats: requests, manifest, instance stream framing, the shared digest."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tracemalloc

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.channel import MAX_MESSAGE
from node.core.encoding import canonical_encode
from node.core.manifest import (
    COMPRESSED,
    DATA,
    SHUFFLED,
    Begin,
    Complete,
    Data,
    End,
    InstancesRequest,
    InstanceStreamParser,
    Manifest,
    ManifestEntry,
    OpenRequest,
    OpenResponse,
    begin_message,
    decode_instances_request,
    decode_manifest,
    decode_open_request,
    decode_open_response,
    encode_handles,
    end_message,
    transfer_digest,
)
from node.core.wire_compression import ZSTD, ZSTD_SHUFFLE, shuffle_lanes
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
        assert decode_instances_request(encode_handles([2, 0]), 3) == InstancesRequest([2, 0], ())

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
            decode_instances_request(encode_handles([3]), 3)
        with pytest.raises(BadInput, match="distinct"):
            decode_instances_request(encode_handles([1, 1], ["zstd"]), 3)

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
            decode_instances_request(canonical_encode({"v": 1, "handles": [], "x": 1}), 3)
        with pytest.raises(BadInput):
            decode_instances_request(
                canonical_encode({"v": 1, "handles": [], "compression": []}), 3
            )
        with pytest.raises(BadInput):
            decode_instances_request(canonical_encode({"v": 3, "handles": []}), 3)

    def test_version_2_offers_compression_and_unknown_codecs_are_ignored(self) -> None:
        offered = decode_instances_request(encode_handles([1], ["brotli", "zstd"]), 3)
        assert offered == InstancesRequest([1], ("zstd",))
        assert decode_instances_request(encode_handles([1], ["brotli"]), 3).compression == ()
        with pytest.raises(BadInput, match="codec"):
            decode_instances_request(encode_handles([1], ["zstd"] * 9), 3)

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
            lambda d: decode_instances_request(d, 10),
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


def _zstd(data: bytes, declare_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=declare_size).compress(data)


class TestCompressedPieces:
    def test_compressed_pieces_yield_the_stored_bytes(self) -> None:
        parser = InstanceStreamParser(_manifest((3, 0, 5)), [0, 2], codecs=[ZSTD])
        data: list[bytes] = []
        for message in (begin_message(0), COMPRESSED + _zstd(b"abc"), begin_message(2)):
            data += [bytes(e.chunk) for e in parser.feed(message, False) if isinstance(e, Data)]
        for message in (DATA + b"12", COMPRESSED + _zstd(b"345")):
            data += [bytes(e.chunk) for e in parser.feed(message, False) if isinstance(e, Data)]
        parser.feed(end_message(2), True)
        assert data == [b"abc", b"12", b"345"]

    def test_compressed_pieces_are_refused_unless_offered(self) -> None:
        parser = InstanceStreamParser(_manifest(), [0])
        parser.feed(begin_message(0), False)
        with pytest.raises(BadInput, match="moved on"):
            parser.feed(COMPRESSED + _zstd(b"abc"), False)

    def test_a_piece_that_inflates_past_the_instance_size_is_refused(self) -> None:
        parser = InstanceStreamParser(_manifest((3,)), [0], codecs=[ZSTD])
        parser.feed(begin_message(0), False)
        with pytest.raises(BadInput, match="beyond"):
            parser.feed(COMPRESSED + _zstd(b"abcd"), False)

    def test_a_piece_without_its_size_or_with_hidden_data_is_refused(self) -> None:
        parser = InstanceStreamParser(_manifest((6,)), [0], codecs=[ZSTD])
        parser.feed(begin_message(0), False)
        with pytest.raises(BadInput, match="declare"):
            parser.feed(COMPRESSED + _zstd(b"abc", declare_size=False), False)
        with pytest.raises(BadInput, match="decode"):
            parser.feed(COMPRESSED + _zstd(b"abc") + _zstd(b"def"), False)
        with pytest.raises(BadInput, match="zstd"):
            parser.feed(COMPRESSED + b"not a frame", False)

    def test_a_decompression_bomb_is_refused_with_bounded_memory(self) -> None:
        # A hostile custodian's instance of 1 GiB, announced in the manifest: one frame of
        # 30 KB that claims (and would inflate to) the whole GiB is refused before any
        # of it is allocated; so is a frame that hides its size.
        gib = 1024**3
        parser = InstanceStreamParser(_manifest((gib,)), [0], codecs=[ZSTD])
        parser.feed(begin_message(0), False)
        compressor = zstandard.ZstdCompressor(level=1)
        chunk = bytes(MAX_MESSAGE)
        with compressor.stream_writer(sink := io.BytesIO(), closefd=False, size=gib) as writer:
            for _ in range(gib // MAX_MESSAGE):
                writer.write(chunk)
        bomb = sink.getvalue()
        assert len(bomb) < 1024**2 and zstandard.frame_content_size(bomb) == gib
        tracemalloc.start()
        try:
            with pytest.raises(BadInput, match="beyond"):
                parser.feed(COMPRESSED + bomb, False)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 * 1024**2


class TestShuffledPiecesInTheStream:
    def test_shuffled_pieces_yield_the_stored_bytes_only_when_offered(self) -> None:
        frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(
            shuffle_lanes(b"12345")
        )
        parser = InstanceStreamParser(_manifest((5,)), [0], codecs=[ZSTD, ZSTD_SHUFFLE])
        parser.feed(begin_message(0), False)
        events = parser.feed(SHUFFLED + frame, False)
        assert [bytes(e.chunk) for e in events if isinstance(e, Data)] == [b"12345"]
        plain_only = InstanceStreamParser(_manifest((5,)), [0], codecs=[ZSTD])
        plain_only.feed(begin_message(0), False)
        with pytest.raises(BadInput, match="moved on"):
            plain_only.feed(SHUFFLED + frame, False)
