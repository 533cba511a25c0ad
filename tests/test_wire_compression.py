"""Compression on the wire: the level a link gets, and what is worth compressing."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from node.core.wire_compression import (
    LEVEL_OFF,
    LEVEL_SLOW_LINK,
    ZSTD,
    ZSTD_SHUFFLE,
    LinkCompression,
    PieceCompressor,
    decompress_piece,
    level_for_rate,
    shuffle_lanes,
    unshuffle_lanes,
)
from node.errors import BadInput

BLOCK = 1024 * 1024


def _stream_over(
    rate: float,
    blocks: int = 8,
    ratio: float = 2.0,
    raw_rate: float | None = None,
) -> LinkCompression:
    """A stream whose connection took each compressed 1 MiB block at ``rate`` bytes per
    second, each carrying ``ratio`` MiB of instance data, and each raw block at
    ``raw_rate`` (default: ``rate``)."""
    link = LinkCompression()
    now = 0.0
    for _ in range(blocks):
        seconds = BLOCK / (rate if link.level or raw_rate is None else raw_rate)
        now += seconds
        link.wrote(BLOCK, int(BLOCK * (ratio if link.level else 1)), seconds, now)
    return link


class TestLevelForTheLink:
    def test_loopback_and_fast_lans_are_sent_raw(self) -> None:
        assert _stream_over(500e6).level == LEVEL_OFF
        assert _stream_over(100e6).level == LEVEL_OFF

    def test_slower_links_get_stronger_compression_up_to_level_3(self) -> None:
        levels = [_stream_over(rate, 20).level for rate in (40e6, 12.5e6, 2.5e6)]
        assert LEVEL_OFF < levels[0] < levels[1] == levels[2] == LEVEL_SLOW_LINK

    def test_a_very_slow_link_never_tries_raw(self) -> None:
        link = LinkCompression()
        for n in range(1, 17):
            link.wrote(BLOCK, 3 * BLOCK, BLOCK / 2.5e6, n * BLOCK / 2.5e6)
            assert link.level == LEVEL_SLOW_LINK

    def test_a_fast_link_tries_raw_and_keeps_it_where_it_moves_more(self) -> None:
        # A link of 40 MB/s: compressed 2x, 80 MB/s of instances against 40 raw.
        assert _stream_over(40e6, 16, ratio=2.0).level != LEVEL_OFF
        # A receiver that shares the sender's CPU takes compressed blocks at 40 MB/s
        # (44 of instances), raw ones at 60: compression does not pay.
        assert _stream_over(40e6, 16, ratio=1.1, raw_rate=60e6).level == LEVEL_OFF

    def test_while_socket_buffers_fill_the_link_is_judged_by_what_it_acknowledged(
        self,
    ) -> None:
        # 20 Mbit/s (2.5 MB/s): the kernel takes 1 MiB blocks every 0.1 s without the
        # sender waiting, but the peer acknowledges only 0.25 MB of each: a slow link,
        # not a fast one (where the unacknowledged bytes would not grow).
        link, unacknowledged = LinkCompression(), 0
        for n in range(1, 9):
            unacknowledged += BLOCK - 250_000
            link.wrote(BLOCK, 3 * BLOCK, 0.0, 0.1 * n, unacknowledged)
        assert link.level == LEVEL_SLOW_LINK
        steady = LinkCompression()
        for n in range(1, 9):
            steady.wrote(BLOCK, 3 * BLOCK, 0.0, 0.1 * n, 300_000)
        assert steady.level == LEVEL_OFF

    def test_a_sender_that_never_waits_turns_compression_off(self) -> None:
        # Its own work is the bottleneck: compressing would only slow it further.
        link = LinkCompression()
        for n in range(8):
            link.wrote(BLOCK, 2 * BLOCK, 0.0, 0.01 * n)
        assert link.level == LEVEL_OFF

    def test_the_first_megabytes_do_not_decide(self) -> None:
        link = LinkCompression()
        start = link.level
        link.wrote(BLOCK, 2 * BLOCK, 0.0, 0.0)  # socket buffers take it at once
        assert link.level == start != LEVEL_OFF

    def test_off_stays_off_near_the_threshold(self) -> None:
        assert level_for_rate(55e6, LEVEL_OFF) == LEVEL_OFF
        assert level_for_rate(55e6, 1) != LEVEL_OFF


def _ct_like_piece(samples: int) -> bytes:
    """Little-endian 16-bit samples of a smooth image with noise in the low bits (seeded)."""
    rng = np.random.default_rng(7)
    ramp = (np.arange(samples) % 512) * 4 + 1000
    return (ramp + rng.integers(0, 64, samples)).astype("<u2").tobytes()


class TestShuffledPieces:
    @pytest.mark.parametrize("size", [0, 1, 2, 3, 65535, 65536])
    def test_lanes_are_undone_exactly_for_even_and_odd_sizes(self, size: int) -> None:
        piece = random.Random(size).randbytes(size)
        assert unshuffle_lanes(shuffle_lanes(piece)) == piece
        assert shuffle_lanes(b"abcde") == b"acbde"  # the even bytes, the odd, the last

    def test_the_probe_picks_the_lanes_for_16_bit_samples_and_they_decode(self) -> None:
        piece = _ct_like_piece(200_000)
        codec, frame = PieceCompressor([ZSTD, ZSTD_SHUFFLE]).probe(piece, 1) or ("", b"")
        assert codec == ZSTD_SHUFFLE
        plain = PieceCompressor().compress(piece, 1)
        assert plain is not None and len(frame) < len(plain)
        assert decompress_piece(frame, len(piece), ZSTD_SHUFFLE) == piece

    def test_later_probes_try_the_last_winner_first_and_all_codecs_again_when_it_fails(
        self,
    ) -> None:
        compressor = PieceCompressor([ZSTD, ZSTD_SHUFFLE])
        samples = _ct_like_piece(50_000)
        assert (compressor.probe(samples, 1) or ("",))[0] == ZSTD_SHUFFLE
        text = b"a plain text piece, no 16-bit samples here; " * 2000
        # The lanes still shrink text, so the winner stays on for a while...
        assert (compressor.probe(text, 1) or ("",))[0] == ZSTD_SHUFFLE
        # ...and noise, which neither shrinks, makes the next probe try every codec.
        assert compressor.probe(random.Random(3).randbytes(65536), 1) is None
        assert (compressor.probe(text, 1) or ("",))[0] == ZSTD

    def test_the_probe_offers_only_what_the_grantee_decodes(self) -> None:
        probed = PieceCompressor([ZSTD]).probe(_ct_like_piece(50_000), 1)
        assert probed is not None and probed[0] == ZSTD
        assert (
            PieceCompressor([ZSTD, ZSTD_SHUFFLE]).probe(random.Random(4).randbytes(65536), 1)
            is None
        )

    def test_a_shuffled_frame_is_bounded_like_any_other(self) -> None:
        frame = PieceCompressor([ZSTD_SHUFFLE]).compress(bytes(4096), 1, ZSTD_SHUFFLE)
        assert frame is not None
        with pytest.raises(BadInput, match="beyond"):
            decompress_piece(frame, 4095, ZSTD_SHUFFLE)


def test_pieces_that_do_not_shrink_are_not_compressed() -> None:
    compressor = PieceCompressor()
    assert compressor.compress(os.urandom(65536), 3) is None
    frame = compressor.compress(bytes(65536), 3)
    assert frame is not None and len(frame) < 1000
