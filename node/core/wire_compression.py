"""Compression of instance data on the wire of a transfer: codec, bounds, and level choice.

A grantee that can decode zstd says so in its instances request; the custodian may then
send a piece of instance data as ``b"Z" + one zstd frame`` instead of ``b"D" + bytes``
(node.core.manifest). Compression comes before encryption; digests stay those of the
stored bytes. A frame must declare its content size, which must fit both the current
instance's remaining bytes and one channel message (MAX_MESSAGE): a frame that would
inflate beyond that, or hides extra data, is refused before anything is allocated for
it, so a hostile custodian's decompression bomb costs the grantee at most one message.

Whether compression pays depends on the link: zstd at level 1 compresses CT at about
150-200 MB/s on one core of the reference machine, so on a fast LAN or loopback it only
spends CPU, while on a WAN of 100 Mbit/s and below it halves the time or better. The
custodian measures the rate at which the connection takes its bytes and picks the
level from that (``LinkCompression``); each instance's first piece is a probe: an
instance whose first piece does not shrink (already compressed pixels, noise) is sent
raw.

A second codec, ``zstd-shuffle2``, compresses the piece with its bytes regrouped in two
lanes (every even byte, then every odd one), as Blosc and HDF5 do for 16-bit samples:
the high bytes of CT pixels vary little and compress far better apart (the phantom CT
at level 1: ratio 3.0 against 2.2, and faster). The probe tries both when the grantee
offered both, and the instance keeps the one that shrank it more; as the instances of
a series are alike, a stream then probes with the last winner alone, and with every
codec again only every REPROBE_EVERY instances or when the winner does not shrink one.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np
import zstandard

from node.core.channel import MAX_MESSAGE
from node.errors import BadInput

ZSTD = "zstd"
ZSTD_SHUFFLE = "zstd-shuffle2"
CODECS = (ZSTD, ZSTD_SHUFFLE)
# The decoder's window limit: our frames hold one message of at most MAX_MESSAGE bytes.
MAX_WINDOW = MAX_MESSAGE
# A compressed piece must be at most this fraction of the raw one to be sent compressed.
WORTH_SENDING = 0.9
# Plaintext bytes compressed as one piece: zstd finds more to reuse in a larger piece
# (level 3 on the phantom CT: ratio 2.49 in 64 KiB pieces, 2.70 in 1 MiB ones); kept
# under MAX_MESSAGE so that a piece that does not shrink still fits a raw message.
PIECE_BYTES = MAX_MESSAGE - 1024
# Levels by the link's measured rate (wire bytes per second): off above FAST_LINK
# (compressing would only cost CPU), level 1 down to SLOW_LINK, level 3 below (level 6
# gains nothing over it on CT in two lanes, ratio 3.02 against 3.07, at a third of its
# speed: a rate misjudged low would make the sender CPU bound). Below VERY_SLOW_LINK
# compression surely pays, so there is no raw trial. Hysteresis around FAST_LINK keeps
# a rate near the threshold from switching back and forth.
FAST_LINK = 50e6
FAST_LINK_HYSTERESIS = 1.25
SLOW_LINK = 15e6
VERY_SLOW_LINK = 5e6
LEVEL_OFF = 0
LEVEL_FAST = 1
LEVEL_SLOW_LINK = 3
# The rate is measured over the last few blocks handed to the connection, once this
# many bytes have been written (before, socket buffers take bytes faster than the link).
RATE_WINDOW_BLOCKS = 4
RATE_WARMUP_BYTES = 2 * 1024 * 1024
# The connection fell behind what was written when the bytes it has not acknowledged
# grew by this much over the window: its socket buffers were filling (the start of a
# stream on a slow link, where writes do not wait yet), so its pace is what it
# delivered, not what it took. A window shorter than RATE_MIN_SECONDS decides nothing.
BACKLOG_GROWTH_BYTES = 256 * 1024
RATE_MIN_SECONDS = 0.05
# Every this many probes, all offered codecs are tried again, not just the last winner.
REPROBE_EVERY = 16


def shuffle_lanes(piece: bytes) -> bytes:
    """Every even byte of ``piece``, then every odd one (an odd last byte stays last)."""
    even = len(piece) & ~1
    lanes = np.frombuffer(piece, dtype=np.uint8, count=even).reshape(-1, 2)
    return lanes.T.tobytes() + piece[even:]


def unshuffle_lanes(data: bytes) -> bytes:
    """The inverse of ``shuffle_lanes``."""
    half = len(data) // 2
    lanes = np.frombuffer(data, dtype=np.uint8, count=2 * half)
    # Strided stores into one buffer: several times faster than a transposed copy.
    merged = np.empty(2 * half, dtype=np.uint8)
    merged[0::2], merged[1::2] = lanes[:half], lanes[half:]
    return merged.tobytes() + data[2 * half :]


def decompress_piece(frame: bytes | memoryview, limit: int, codec: str = ZSTD) -> bytes:
    """The data of one compressed piece, at most ``limit`` bytes; BadInput otherwise.

    The size the frame declares is checked before decoding, so memory stays bounded by
    ``limit`` (at most MAX_MESSAGE) whatever the frame claims. A ``ZSTD_SHUFFLE`` piece
    is put back in byte order after decoding.
    """
    limit = min(limit, MAX_MESSAGE)
    frame = bytes(frame)
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise BadInput("compressed instance data is not a zstd frame") from exc
    if declared < 0:
        raise BadInput("compressed instance data does not declare its size")
    if declared > limit:
        raise BadInput("compressed instance data inflates beyond the instance's size")
    try:
        data = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompress(
            frame, max_output_size=limit, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise BadInput(f"compressed instance data does not decode: {exc}") from exc
    if len(data) != declared:
        raise BadInput("compressed instance data is not the size it declares")
    return unshuffle_lanes(data) if codec == ZSTD_SHUFFLE else data


class PieceCompressor:
    """Compresses pieces of one stream at a level that may change between pieces, with
    the codecs the grantee offered (ZSTD and/or ZSTD_SHUFFLE)."""

    def __init__(self, codecs: Collection[str] = (ZSTD,)) -> None:
        self._codecs = [codec for codec in CODECS if codec in codecs]
        self._compressors: dict[int, zstandard.ZstdCompressor] = {}
        self._winner: str | None = None  # the codec of the last probe that paid
        self._probes = 0

    def compress(self, piece: bytes, level: int, codec: str = ZSTD) -> bytes | None:
        """The piece as one zstd frame, or None if it does not shrink enough to pay."""
        compressor = self._compressors.get(level)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
            self._compressors[level] = compressor
        frame = compressor.compress(shuffle_lanes(piece) if codec == ZSTD_SHUFFLE else piece)
        return frame if len(frame) <= WORTH_SENDING * len(piece) else None

    def probe(self, piece: bytes, level: int) -> tuple[str, bytes] | None:
        """The offered codec that shrinks an instance's first piece most (the last
        winner alone between re-probes), and the piece in it; None if none pays."""
        self._probes += 1
        if self._winner is not None and self._probes % REPROBE_EVERY:
            frame = self.compress(piece, level, self._winner)
            if frame is not None:
                return self._winner, frame
        best: tuple[str, bytes] | None = None
        for codec in self._codecs:
            frame = self.compress(piece, level, codec)
            if frame is not None and (best is None or len(frame) < len(best[1])):
                best = (codec, frame)
        self._winner = best[0] if best is not None else None
        return best


@dataclass
class _Written:
    wire: int  # bytes handed to the connection
    raw: int  # instance bytes they carry
    waited: float  # seconds the sender waited for the connection to take them
    at: float  # when it had (monotonic seconds)
    unacknowledged: int | None  # bytes written that the peer had not acknowledged then


def _raw_rate(window: Iterable[_Written]) -> float:
    """Instance bytes per second over a window (its first block only marks the start)."""
    blocks = list(window)
    elapsed = blocks[-1].at - blocks[0].at
    return sum(w.raw for w in blocks[1:]) / elapsed if elapsed > 0 else float("inf")


@dataclass
class LinkCompression:
    """The compression level for a stream, from the rate its connection takes bytes.

    Call ``wrote(wire, raw, waited, at, unacknowledged)`` after each block
    the connection accepted. Wire bytes over waiting time is the rate of the link (or of
    the receiver) when it is the bottleneck, once the socket buffers are full; while
    they fill, writes do not wait, and the rate is what the peer acknowledged over the
    window's time (when the connection can tell: ``unacknowledged``, from the kernel's
    send queue). When the sender's own work is the bottleneck, it hardly waits, the
    rate looks high and compression is turned off, which is right: then it would only
    cost the sender time. Unless the link is very slow (below VERY_SLOW_LINK, where
    compression surely pays and a raw trial would cost most), the stream tries a few
    blocks uncompressed once and keeps whichever moved more instance bytes per second:
    a receiver that shares the sender's CPU, or is slower than the link, gains nothing
    from compression, and the rate alone cannot tell such a receiver from a slow link.
    ``level`` 0 is off. Starts at level 3: a fast link is recognised within
    the first few MB, where compressing costs little, while a slow one would pay for
    every raw byte.
    """

    level: int = LEVEL_SLOW_LINK
    written: int = 0
    _recent: collections.deque[_Written] = field(
        default_factory=lambda: collections.deque(maxlen=RATE_WINDOW_BLOCKS)
    )
    _trial: list[_Written] | None = None  # blocks sent raw to compare, while trying
    _tried: bool = False
    _compressed_rate: float = 0.0
    _resume_level: int = LEVEL_FAST

    def wrote(
        self,
        wire: int,
        raw: int,
        waited: float,
        at: float,
        unacknowledged: int | None = None,
    ) -> None:
        self.written += wire
        block = _Written(wire, raw, waited, at, unacknowledged)
        if self._trial is not None:
            self._trial.append(block)
            if len(self._trial) > RATE_WINDOW_BLOCKS:  # the first one was already compressed
                raw_wins = _raw_rate(self._trial[1:]) > self._compressed_rate
                self.level = LEVEL_OFF if raw_wins else self._resume_level
                self._trial = None
                self._recent.clear()
            return
        self._recent.append(block)
        if self.written < RATE_WARMUP_BYTES or len(self._recent) < RATE_WINDOW_BLOCKS:
            return
        rate = _link_rate(self._recent)
        if rate is None:
            return
        level = level_for_rate(rate, self.level)
        if level != LEVEL_OFF and rate >= VERY_SLOW_LINK and not self._tried:
            self._tried = True
            self._compressed_rate = _raw_rate(self._recent)
            self._resume_level, self._trial, level = level, [], LEVEL_OFF
        self.level = level


def _link_rate(window: Iterable[_Written]) -> float | None:
    """Wire bytes per second the connection moves (see LinkCompression); None: undecided."""
    blocks = list(window)
    first, last = blocks[0], blocks[-1]
    growth = (
        last.unacknowledged - first.unacknowledged
        if first.unacknowledged is not None and last.unacknowledged is not None
        else 0
    )
    if growth >= BACKLOG_GROWTH_BYTES:
        elapsed = last.at - first.at
        if elapsed < RATE_MIN_SECONDS:
            return None
        return (sum(w.wire for w in blocks[1:]) - growth) / elapsed
    waiting = sum(w.waited for w in blocks)
    return sum(w.wire for w in blocks) / waiting if waiting > 0 else float("inf")


def level_for_rate(rate: float, current: int) -> int:
    """The zstd level for a link taking ``rate`` wire bytes per second (0: off)."""
    # Off stays off down to a lower rate than it takes to turn off (hysteresis).
    hysteresis = 1 / FAST_LINK_HYSTERESIS if current == LEVEL_OFF else FAST_LINK_HYSTERESIS
    if rate >= FAST_LINK * hysteresis:
        return LEVEL_OFF
    if rate >= SLOW_LINK:
        return LEVEL_FAST
    return LEVEL_SLOW_LINK
