"""C2SP tlog-tiles: tile coordinates, their paths, and entry bundles.

A log served as tiles is the ``checkpoint`` plus two kinds of immutable file under its
prefix:

- ``tile/<L>/<N>[.p/<W>]``: the hashes of Merkle level ``8 * L``, indexes
  ``[256 * N, 256 * N + W)``, concatenated (32 bytes each). ``W`` is 256 for a full
  tile (no ``.p/`` suffix), 1..255 for the partial tile at the right edge of a tree.
- ``tile/entries/<N>[.p/<W>]``: an entry bundle, the entries ``[256 * N, 256 * N + W)``,
  each as a big-endian uint16 length and the entry bytes.

``<N>`` is written in groups of three decimal digits, every group but the last prefixed
with ``x``: 1234067 is ``x001/x234/067``. Each hash a tile holds is a complete subtree
hash (level ``8 * L``, index ``n``), which never changes once the tree holds it, so a
tile's bytes never change either: a partial tile is only ever replaced by a wider one.

Pure: parsing and encoding only; the store reads the hashes.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from node.core.merkle import HASH_SIZE, SubtreeIndex
from node.errors import BadInput

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
# An entry bundle prefixes each entry with its length as a big-endian uint16.
MAX_BUNDLED_ENTRY = 0xFFFF
# Levels a tree of up to 2**63 leaves can have tiles at.
MAX_TILE_LEVEL = 63 // TILE_HEIGHT
_GROUP = re.compile(r"^x[0-9]{3}$")
_LAST_GROUP = re.compile(r"^[0-9]{3}$")
_WIDTH = re.compile(r"^[1-9][0-9]{0,2}$")
_LEVEL = re.compile(r"^(0|[1-9][0-9]?)$")
ENTRIES_LEVEL = "entries"


@dataclass(frozen=True)
class TileRef:
    """One tile: ``level`` (None for an entry bundle), index ``n`` and ``width`` (1..256)."""

    level: int | None
    n: int
    width: int = TILE_WIDTH

    @property
    def partial(self) -> bool:
        return self.width < TILE_WIDTH

    @property
    def merkle_level(self) -> int:
        """The Merkle level whose hashes the tile holds (0 for entry bundles' leaves)."""
        return TILE_HEIGHT * (self.level or 0)

    def path(self) -> str:
        """The tile's path under a log's prefix, e.g. ``tile/1/x001/067.p/3``."""
        level = ENTRIES_LEVEL if self.level is None else str(self.level)
        suffix = f".p/{self.width}" if self.partial else ""
        return f"tile/{level}/{encode_tile_index(self.n)}{suffix}"

    def subtree_indexes(self) -> list[SubtreeIndex]:
        """The complete subtrees (level, n) whose hashes the tile holds, in order."""
        first = self.n * TILE_WIDTH
        return [(self.merkle_level, first + i) for i in range(self.width)]

    def entry_range(self) -> tuple[int, int]:
        """The entry indexes [start, end) an entry bundle holds."""
        start = self.n * TILE_WIDTH
        return start, start + self.width

    def available_width(self, tree_size: int) -> int:
        """How many of the tile's hashes (or entries) a tree of ``tree_size`` holds (0..256)."""
        held = tree_size >> self.merkle_level
        return max(0, min(TILE_WIDTH, held - self.n * TILE_WIDTH))


def encode_tile_index(n: int) -> str:
    """``n`` as tlog-tiles path groups: 1234067 -> ``x001/x234/067``."""
    if not isinstance(n, int) or n < 0:
        raise BadInput("a tile index is a non-negative integer")
    groups = []
    while True:
        groups.append(f"{n % 1000:03d}")
        n //= 1000
        if n == 0:
            break
    groups.reverse()
    return "/".join([*(f"x{g}" for g in groups[:-1]), groups[-1]])


def parse_tile_path(path: str) -> TileRef:
    """The tile a path under a log's prefix names (``tile/...``); BadInput if it names none.

    Only the one canonical spelling is accepted (no leading-zero level or width, no
    ``.p/256``, no superfluous ``x000`` group), so one tile has one path to cache under.
    """
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile" or len(path) > 200:
        raise BadInput("a tile path is tile/<L>/<N>[.p/<W>]")
    level_text, groups = parts[1], parts[2:]
    width = TILE_WIDTH
    if len(groups) >= 2 and groups[-2].endswith(".p"):
        width_text = groups[-1]
        groups = [*groups[:-2], groups[-2][:-2]]
        if not _WIDTH.match(width_text) or not 1 <= int(width_text) < TILE_WIDTH:
            raise BadInput("a partial tile's width is 1..255")
        width = int(width_text)
    if (
        not groups
        or not _LAST_GROUP.match(groups[-1])
        or not all(_GROUP.match(g) for g in groups[:-1])
    ):
        raise BadInput("a tile index is groups of three digits, all but the last x-prefixed")
    if len(groups) > 7:
        raise BadInput("the tile index is too large")
    digits = "".join(g.lstrip("x") for g in groups)
    n = int(digits)
    if encode_tile_index(n) != "/".join(groups):
        raise BadInput("the tile index has superfluous leading groups")
    if level_text == ENTRIES_LEVEL:
        return TileRef(None, n, width)
    if not _LEVEL.match(level_text) or int(level_text) > MAX_TILE_LEVEL:
        raise BadInput(f"a tile level is 0..{MAX_TILE_LEVEL} or 'entries'")
    return TileRef(int(level_text), n, width)


def encode_entry_bundle(entries: Sequence[bytes]) -> bytes:
    """An entry bundle: each entry as a big-endian uint16 length and its bytes."""
    parts = []
    for entry in entries:
        if len(entry) > MAX_BUNDLED_ENTRY:
            raise BadInput(f"an entry in a bundle is at most {MAX_BUNDLED_ENTRY} bytes")
        parts.append(struct.pack(">H", len(entry)))
        parts.append(entry)
    return b"".join(parts)


def iter_entry_bundle(data: bytes) -> Iterator[bytes]:
    """The entries of a bundle, in order; BadInput if it is truncated."""
    at, end = 0, len(data)
    while at < end:
        if end - at < 2:
            raise BadInput("entry bundle ends inside a length prefix")
        (length,) = struct.unpack_from(">H", data, at)
        at += 2
        if end - at < length:
            raise BadInput("entry bundle ends inside an entry")
        yield bytes(data[at : at + length])
        at += length


def parse_entry_bundle(data: bytes, count: int) -> list[bytes]:
    """Exactly ``count`` entries from a bundle; BadInput if it holds another number."""
    entries = []
    for entry in iter_entry_bundle(data):
        entries.append(entry)
        if len(entries) > count:
            raise BadInput(f"entry bundle holds more than {count} entries")
    if len(entries) != count:
        raise BadInput(f"entry bundle holds {len(entries)} entries, not {count}")
    return entries


def split_tile_hashes(data: bytes, width: int) -> list[bytes]:
    """The ``width`` hashes of a tile's bytes; BadInput if the length is not width * 32."""
    if len(data) != width * HASH_SIZE:
        raise BadInput(f"a tile of width {width} is {width * HASH_SIZE} bytes, not {len(data)}")
    return [bytes(data[i : i + HASH_SIZE]) for i in range(0, len(data), HASH_SIZE)]


def entry_bundles(start: int, end: int) -> list[TileRef]:
    """The entry bundles that hold entries [start, end) of a tree of size ``end``, in order;
    the last one partial when ``end`` is not a multiple of 256."""
    refs = []
    for n in range(start // TILE_WIDTH, (end + TILE_WIDTH - 1) // TILE_WIDTH):
        refs.append(TileRef(None, n, min(TILE_WIDTH, end - n * TILE_WIDTH)))
    return refs
