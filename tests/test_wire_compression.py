"""Compression on the wire: the level a link gets, and what is worth compressing."""

from __future__ import annotations

import os

from node.core.wire_compression import (
    LEVEL_OFF,
    LinkCompression,
    PieceCompressor,
    level_for_rate,
)

BLOCK = 1024 * 1024


def _stream_over(
    rate: float, blocks: int = 8, ratio: float = 2.0, raw_rate: float | None = None
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

    def test_slower_links_get_stronger_compression(self) -> None:
        levels = [_stream_over(rate, 20).level for rate in (40e6, 12.5e6, 2.5e6)]
        assert LEVEL_OFF < levels[0] < levels[1] < levels[2]

    def test_a_fast_link_tries_raw_and_keeps_it_where_it_moves_more(self) -> None:
        # A link of 40 MB/s: compressed 2x, 80 MB/s of instances against 40 raw.
        assert _stream_over(40e6, 16, ratio=2.0).level != LEVEL_OFF
        # A receiver that shares the sender's CPU takes compressed blocks at 40 MB/s
        # (44 of instances), raw ones at 60: compression does not pay.
        assert _stream_over(40e6, 16, ratio=1.1, raw_rate=60e6).level == LEVEL_OFF

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


def test_pieces_that_do_not_shrink_are_not_compressed() -> None:
    compressor = PieceCompressor()
    assert compressor.compress(os.urandom(65536), 3) is None
    frame = compressor.compress(bytes(65536), 3)
    assert frame is not None and len(frame) < 1000
