"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification.

Pure functions over hashes. Proofs are computed from *complete subtree hashes*: the hash
of the aligned range of leaves [n * 2**level, (n + 1) * 2**level), named (level, n).
Every RFC 6962 subtree that a root or proof needs is either such a complete subtree or
a right-edge fold of a few of them, so a store that keeps every complete subtree hash
answers any root or proof with O(log n) reads, made in one batch through a HashReader.

Verification functions never raise on a bad proof: they return False.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from node.errors import BadInput

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
ZERO_HASH = bytes(HASH_SIZE)

SubtreeIndex = tuple[int, int]  # (level, n): leaves [n << level, (n + 1) << level)


def leaf_hash(entry: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || entry)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


class HashReader(Protocol):
    """Reads stored complete subtree hashes; raises if one is missing."""

    def read_hashes(self, indexes: Sequence[SubtreeIndex]) -> list[bytes]: ...


def subtree_indexes(start: int, end: int) -> list[SubtreeIndex]:
    """The maximal aligned complete subtrees covering leaves [start, end), left to right."""
    indexes: list[SubtreeIndex] = []
    while start < end:
        level = (start & -start).bit_length() - 1 if start else (end - start).bit_length() - 1
        while (1 << level) > end - start:
            level -= 1
        indexes.append((level, start >> level))
        start += 1 << level
    return indexes


def fold_right(hashes: Sequence[bytes]) -> bytes:
    """Combine the hashes of consecutive subtrees (largest first) into their RFC 6962 root."""
    if not hashes:
        return EMPTY_ROOT
    result = hashes[-1]
    for h in reversed(hashes[:-1]):
        result = node_hash(h, result)
    return result


def range_hash(reader: HashReader, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a range that RFC 6962 recursion produces (start aligned)."""
    return fold_right(reader.read_hashes(subtree_indexes(start, end)))


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """The RFC 6962 Merkle tree hash of a list of leaf hashes."""
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    # Pairwise reduction; an odd last node is carried up unchanged, as RFC 6962 prescribes.
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def tree_root(reader: HashReader, size: int) -> bytes:
    """The root of the first ``size`` leaves."""
    return range_hash(reader, 0, size) if size else EMPTY_ROOT


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes form the RFC 9162 inclusion proof, leaf to root."""
    if not 0 <= index < size:
        raise BadInput(f"index {index} is outside a tree of size {size}")
    ranges: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    ranges.reverse()
    return ranges


def consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes form the RFC 9162 consistency proof."""
    if not 0 <= old_size <= new_size:
        raise BadInput(f"cannot prove size {old_size} consistent with size {new_size}")
    if old_size in (0, new_size):
        return []
    ranges: list[tuple[int, int]] = []
    start, end, complete = 0, new_size, True
    m = old_size
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
            m -= k
            complete = False
    if not complete:
        ranges.append((start, end))
    ranges.reverse()
    return ranges


def inclusion_proof(reader: HashReader, index: int, size: int) -> list[bytes]:
    """RFC 9162 audit path for leaf ``index`` in the tree of ``size``; BadInput if out of range."""
    return _hashes_of_ranges(reader, inclusion_ranges(index, size))


def consistency_proof(reader: HashReader, old_size: int, new_size: int) -> list[bytes]:
    """RFC 9162 consistency proof from ``old_size`` to ``new_size``; BadInput if not 0<=old<=new."""
    return _hashes_of_ranges(reader, consistency_ranges(old_size, new_size))


def _hashes_of_ranges(reader: HashReader, ranges: list[tuple[int, int]]) -> list[bytes]:
    # One batched read for every subtree of every range.
    per_range = [subtree_indexes(a, b) for a, b in ranges]
    flat = [index for indexes in per_range for index in indexes]
    hashes = reader.read_hashes(flat)
    proof, at = [], 0
    for indexes in per_range:
        proof.append(fold_right(hashes[at : at + len(indexes)]))
        at += len(indexes)
    return proof


def _well_formed(proof: Sequence[bytes], *hashes: bytes) -> bool:
    return all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in (*proof, *hashes))


def root_from_inclusion(proof: Sequence[bytes], leaf: bytes, index: int, size: int) -> bytes | None:
    """The root that ``proof`` implies for ``leaf`` at ``index`` (RFC 9162 2.1.3.2), or None."""
    if not _well_formed(proof, leaf) or not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(
    proof: Sequence[bytes], leaf_hash: bytes, index: int, size: int, root: bytes
) -> bool:
    """True if ``proof`` shows ``leaf_hash`` at ``index`` in the tree of ``size`` with ``root``."""
    computed = root_from_inclusion(proof, leaf_hash, index, size)
    return computed is not None and isinstance(root, bytes) and computed == root


def verify_consistency(
    proof: Sequence[bytes], old_size: int, new_size: int, old_root: bytes, new_root: bytes
) -> bool:
    """True if ``proof`` shows the tree (old_size, old_root) is a prefix of (new_size, new_root).

    Follows RFC 9162 2.1.4.2; like Go's tlog, any tree is consistent with the empty tree
    (old_size 0, empty proof).
    """
    if not (proof is not None and _well_formed(proof, old_root, new_root)):
        return False
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # old tree is one complete subtree of the new one
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0


Subtree = tuple[int, int, bytes]  # (level, n, hash) of the complete subtree SubtreeIndex names


class MerkleFrontier:
    """The right edge of an RFC 6962 tree grown leaf by leaf: its maximal complete subtrees,
    largest first. Its root is the tree's root, in O(log n) memory.

    The one append rule for a tree held whole nowhere: the ledger store's writers (which
    also store the subtrees a leaf completes), the checks of a log's entries and streaming
    consistency proofs all grow their trees here.
    """

    def __init__(self, size: int = 0, subtrees: Sequence[Subtree] = ()) -> None:
        self.size = size
        self.subtrees = list(subtrees)

    def push(self, leaf: bytes) -> list[Subtree]:
        """Add a leaf hash; returns the subtrees above the leaves (level >= 1) it completes."""
        self.subtrees.append((0, self.size, leaf))
        self.size += 1
        completed = []
        while len(self.subtrees) >= 2 and self.subtrees[-1][0] == self.subtrees[-2][0]:
            level, _, right = self.subtrees.pop()
            _, n, left = self.subtrees.pop()
            parent = (level + 1, n >> 1, node_hash(left, right))
            self.subtrees.append(parent)
            completed.append(parent)
        return completed

    def root(self) -> bytes:
        """The root of the tree of every leaf pushed (EMPTY_ROOT for none)."""
        return fold_right([digest for _, _, digest in self.subtrees])

    def copy(self) -> MerkleFrontier:
        return MerkleFrontier(self.size, self.subtrees)


class StreamingConsistency:
    """Roots at ``old_size`` and ``new_size`` and the RFC 9162 consistency proof between
    them, from the new tree's leaf hashes pushed in order, in O(log n) memory.

    For checking a tree that is only read once (a peer's whole copy), without holding it.
    Raises BadInput unless 0 <= old_size <= new_size.
    """

    def __init__(self, old_size: int, new_size: int) -> None:
        self.old_size, self.new_size = old_size, new_size
        self._proof_ranges = consistency_ranges(old_size, new_size)
        ranges = {(0, old_size), (0, new_size), *self._proof_ranges}
        self._roots = {r: MerkleFrontier() for r in ranges}
        self.pushed = 0

    def push(self, leaves: Sequence[bytes]) -> None:
        """Add the next leaf hashes, in order; BadInput past ``new_size``."""
        first, last = self.pushed, self.pushed + len(leaves)
        if last > self.new_size:
            raise BadInput(f"more than {self.new_size} leaves")
        for (start, end), accumulator in self._roots.items():
            for leaf in leaves[max(start, first) - first : max(min(end, last) - first, 0)]:
                accumulator.push(leaf)
        self.pushed = last

    def _root(self, start: int, end: int) -> bytes:
        if self.pushed != self.new_size:
            raise BadInput(f"{self.pushed} of {self.new_size} leaves were pushed")
        return self._roots[(start, end)].root()

    def old_root(self) -> bytes:
        return self._root(0, self.old_size)

    def new_root(self) -> bytes:
        return self._root(0, self.new_size)

    def proof(self) -> list[bytes]:
        return [self._root(start, end) for start, end in self._proof_ranges]


class MemoryTree:
    """All complete subtree hashes of a list of leaf hashes, in memory (tests, small logs)."""

    def __init__(self, leaf_hashes: Sequence[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        for h in leaf_hashes:
            self.append(h)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def append(self, leaf: bytes) -> None:
        self.levels[0].append(leaf)
        level, n = 0, len(self.levels[0]) - 1
        while n & 1:
            if len(self.levels) == level + 1:
                self.levels.append([])
            row = self.levels[level]
            self.levels[level + 1].append(node_hash(row[n - 1], row[n]))
            level, n = level + 1, n >> 1

    def read_hashes(self, indexes: Sequence[SubtreeIndex]) -> list[bytes]:
        return [self.levels[level][n] for level, n in indexes]

    def root(self, size: int | None = None) -> bytes:
        return tree_root(self, self.size if size is None else size)


class LeafHashes(Sequence[bytes]):
    """A log's leaf hashes packed 32 bytes each (a list of bytes objects costs 73), with
    the roots of its prefixes computed by one pass each, in O(log n) memory besides.

    For a verifier that holds leaf hashes, not the tree: the auditor compares copies and
    checks prefixes (witnessed and saved checkpoints) against them.
    """

    def __init__(self, leaf_hashes: Sequence[bytes] = ()) -> None:
        self._packed = bytearray()
        self._roots: dict[int, bytes] = {}
        for leaf in leaf_hashes:
            self.append(leaf)

    def append(self, leaf: bytes) -> None:
        self._packed += leaf

    def copy(self) -> LeafHashes:
        copied = LeafHashes()
        copied._packed = bytearray(self._packed)
        return copied

    def __len__(self) -> int:
        return len(self._packed) // HASH_SIZE

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        start = (index % len(self)) * HASH_SIZE
        return bytes(self._packed[start : start + HASH_SIZE])

    def root(self, size: int | None = None) -> bytes:
        """The root of the first ``size`` leaves (all of them by default)."""
        return self.roots([len(self) if size is None else size])[0]

    def roots(self, sizes: Sequence[int]) -> list[bytes]:
        """The roots of the first ``size`` leaves for each of ``sizes``, in one pass."""
        wanted = sorted({s for s in sizes if s not in self._roots})
        if wanted and not 0 <= wanted[0] <= wanted[-1] <= len(self):
            raise BadInput(f"a prefix of {wanted[-1]} leaves of a tree of {len(self)}")
        frontier = MerkleFrontier()
        view = memoryview(self._packed)
        for size in wanted:
            for i in range(frontier.size, size):
                frontier.push(bytes(view[i * HASH_SIZE : (i + 1) * HASH_SIZE]))
            self._roots[size] = frontier.root()
        return [self._roots[s] for s in sizes]
