"""The one check that a run of ledger entries is a log: every entry decodes, chains to the
one before it (its ``prev`` is the leaf hash of the entry before; 32 zero bytes before
entry 0), and their leaf hashes give the root that a checkpoint signs.

The ledger store's own appends, its re-derivation of a stored log (StoredLog.verify) and
its mirroring of a peer's entries (MirrorLog.extend), the auditor and the patient's log
reader all walk entries through a LogChain; each says what it finds in its own terms (a
problem list, a refusal, audit findings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from node.core.entries import LedgerEntry, decode_entry
from node.core.merkle import ZERO_HASH, MerkleFrontier, Subtree, leaf_hash
from node.core.notes import Checkpoint
from node.errors import BadInput


@dataclass(frozen=True)
class Link:
    """One entry walked: where it is, its leaf hash, the entry (None when it does not
    decode, with why), whether it chains to the entry before, and the subtrees it completes."""

    index: int
    leaf: bytes
    entry: LedgerEntry | None
    error: BadInput | None
    chains: bool
    completed: list[Subtree]


class LogChain:
    """A log's right edge, grown entry by entry: its Merkle frontier and last leaf hash."""

    def __init__(self, frontier: MerkleFrontier | None = None, last_leaf: bytes = ZERO_HASH):
        self.frontier = frontier if frontier is not None else MerkleFrontier()
        self.last_leaf = last_leaf

    @property
    def size(self) -> int:
        return self.frontier.size

    def append(self, raw: bytes, decode: Callable[[bytes], LedgerEntry] = decode_entry) -> Link:
        """Walk the next entry's wire bytes; never raises for a bad entry, the Link says.

        ``decode`` may memoise decode_entry; it must raise BadInput for a malformed entry.
        """
        index = self.size
        try:
            entry: LedgerEntry | None = decode(raw)
            error = None
        except BadInput as exc:
            entry, error = None, exc
        chains = entry is not None and entry.prev == self.last_leaf
        leaf = leaf_hash(raw)
        return Link(index, leaf, entry, error, chains, self.push_leaf(leaf))

    def push_leaf(self, leaf: bytes) -> list[Subtree]:
        """Add the leaf hash of an entry built on ``last_leaf`` (the log writer's own)."""
        self.last_leaf = leaf
        return self.frontier.push(leaf)

    def root(self) -> bytes:
        return self.frontier.root()

    def gives_root_of(self, checkpoint: Checkpoint) -> bool:
        """True if the entries walked are exactly the tree ``checkpoint`` signs."""
        return self.size == checkpoint.size and self.root() == checkpoint.root_hash

    def copy(self) -> LogChain:
        return LogChain(self.frontier.copy(), self.last_leaf)
