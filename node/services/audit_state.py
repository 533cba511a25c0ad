"""The auditor's memory between runs (``--state DIR``): per log, the last checkpoint it
verified and the entries that checkpoint covers (node.store.audit_state).

A rerun then reads from each node only the entries after the saved size, and judges
every rule over the saved entries (streamed back from the database) and the new ones
together. Nothing saved is trusted
blindly: on load each checkpoint must verify under the key pinned with it, and the
right edge of the kept entries' tree must give its root (the last entry's leaf bound
to it by hashing the edge's smallest subtree again); kept entries read back are hashed
as they stream and must give that root too. Otherwise the audit stops with a clear
error (a tampered or torn state is refused, never half-used). A log is saved only when its history
verified (node.core.audit_rules.HISTORY_RULES); consent findings are judged again from
the saved entries on every run, so they keep being reported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from node.core.chain import LogChain
from node.core.keys import parse_verifier_key
from node.core.merkle import HASH_SIZE, MerkleFrontier, leaf_hash, subtree_indexes
from node.core.notes import verify_note
from node.core.origins import is_node_origin, log_id
from node.errors import BadInput, ImageShareError, Unauthorized
from node.store.audit_state import (
    AuditStateStore,
    JudgedRows,
    LogRow,
    is_state_database_error,
)
from node.store.entry_spool import EntriesFrom, EntrySource


@dataclass(frozen=True)
class SavedCheckpoint:
    """The last checkpoint of one log that the auditor verified."""

    origin: str
    vkey: str
    size: int
    root_hash: bytes
    note: str
    # The node whose copy was judged (the entries to keep come from it); not state.
    source: str | None = field(default=None, compare=False)
    # What judging that copy left (to keep with its entries); not part of the checkpoint.
    judged: JudgedRows | None = field(default=None, compare=False, repr=False)
    # The right edge of that copy's tree (to keep with its entries); not state either.
    edge: LogChain | None = field(default=None, compare=False, repr=False)

    @property
    def log_id(self) -> str:
        return log_id(self.origin)


@dataclass(frozen=True)
class VerifiedPrefix:
    """A log's entries up to its saved checkpoint, checked against that checkpoint (read
    back from the state on demand, never held), and the chain's right edge after them
    (to check a node's next entries against)."""

    entries_from: EntriesFrom
    chain: LogChain
    # What judging the log left last time (None: judge it whole again).
    judged: SavedJudging | None = None

    @property
    def size(self) -> int:
        return self.chain.size


@dataclass(frozen=True)
class SavedJudging:
    """What judging a log left in the state: its walkers' state (opaque here), and
    readers of its mappings' rows by name and of its receipt halves."""

    state: bytes
    map_rows: Callable[[str], Iterator[tuple[bytes, bytes]]]
    halves: Callable[[], Iterator[bytes]]


T = TypeVar("T")


class AuditState:
    """The --state directory: load checked saved checkpoints, save verified ones durably."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._rows: dict[str, LogRow] = {}

    def _open(self) -> AuditStateStore:
        try:
            return AuditStateStore(self.directory)
        except ImageShareError:
            raise
        except Exception as exc:
            if is_state_database_error(exc):
                raise BadInput(f"audit state in {self.directory} is corrupt: {exc}") from exc
            raise

    def load(self) -> dict[str, SavedCheckpoint]:
        """Saved checkpoints by origin; raises BadInput if one is corrupt or tampered."""
        if not self.directory.is_dir():
            return {}
        store = self._open()
        try:
            rows = store.logs()
        except ValueError as exc:
            raise BadInput(f"audit state in {self.directory} is corrupt: {exc}") from exc
        finally:
            store.close()
        saved = {}
        for row in rows:
            saved[row.origin] = _checked(row)
            self._rows[row.origin] = row
        return saved

    def verified_prefix(self, origin: str) -> VerifiedPrefix | None:
        """The entries kept for a log loaded by ``load``, checked to hash to its saved
        root (None if none are kept); raises BadInput if they do not."""
        row = self._rows.get(origin)
        if row is None or row.entries_kept == 0:
            return None
        if row.edge is None:  # saved by an earlier version: hash them all now
            chain = LogChain()
            for raw in self._entries(origin, 0):
                chain.push_leaf(leaf_hash(raw))
            _check_root(row, chain.frontier)
            entries_from: EntriesFrom = functools.partial(self._entries, origin)
        else:
            chain = self._saved_edge(row)
            entries_from = functools.partial(self._checked_entries, row)
        store = self._open()
        try:
            state = store.judged_state(origin)
        except ValueError as exc:
            raise BadInput(f"audit state of {origin} is corrupt: {exc}") from exc
        finally:
            store.close()
        judged = None
        if state is not None:
            judged = SavedJudging(
                state,
                lambda name: self._read(origin, lambda s: s.judged_map(origin, name)),
                lambda: self._read(origin, lambda s: s.judged_halves(origin)),
            )
        return VerifiedPrefix(entries_from, chain, judged)

    def _saved_edge(self, row: LogRow) -> LogChain:
        """The right edge saved with a log's entries, checked against its signed root;
        the last entry's leaf hash is bound to it by hashing the frontier's smallest
        subtree again from the kept entries (one entry at an odd size; at most half the
        log, at a power of two). BadInput if they do not match."""
        indexes = subtree_indexes(0, row.size)
        edge = row.edge or b""
        if len(edge) != HASH_SIZE * len(indexes):
            raise BadInput(f"audit state of {row.origin} is corrupt: a malformed right edge")
        subtrees = [
            (level, n, edge[i * HASH_SIZE : (i + 1) * HASH_SIZE])
            for i, (level, n) in enumerate(indexes)
        ]
        frontier = MerkleFrontier(row.size, subtrees)
        _check_root(row, frontier)
        level, n, digest = subtrees[-1]
        smallest = LogChain()
        for raw in self._entries(row.origin, n << level):
            smallest.push_leaf(leaf_hash(raw))
        if smallest.size != 1 << level or smallest.root() != digest:
            raise BadInput(_TAMPERED.format(row.origin))
        return LogChain(frontier, smallest.last_leaf)

    def _checked_entries(self, row: LogRow, start: int) -> Iterator[bytes]:
        """The kept entries from ``start`` on, each hashed from entry 0 as they stream:
        BadInput once they end if they do not give the signed root (a tampered entry
        stops the audit before its verdict, as when the state is loaded)."""
        frontier = MerkleFrontier()
        for index, raw in enumerate(self._entries(row.origin, 0)):
            frontier.push(leaf_hash(raw))
            if index >= start:
                yield raw
        _check_root(row, frontier)

    def _entries(self, origin: str, start: int) -> Iterator[bytes]:
        """The entries kept for a log from index ``start`` on, streamed from the database."""
        return self._read(origin, lambda store: store.entries(origin, start))

    def _read(self, origin: str, rows: Callable[[AuditStateStore], Iterator[T]]) -> Iterator[T]:
        """Rows of a log streamed from the database (BadInput if they cannot be read)."""
        store = self._open()
        try:
            yield from rows(store)
        except ValueError as exc:
            raise BadInput(f"audit state of {origin} is corrupt: {exc}") from exc
        finally:
            store.close()

    def save(
        self,
        checkpoint: SavedCheckpoint,
        entries: EntrySource | None = None,
        judged: JudgedRows | None = None,
        edge: LogChain | None = None,
    ) -> None:
        """Replace the log's saved checkpoint (and the entries it covers, what judging
        them left and the right edge of their tree, if given) atomically and durably."""
        store = self._open()
        try:
            store.save(
                checkpoint.origin,
                checkpoint.vkey,
                checkpoint.size,
                checkpoint.root_hash,
                checkpoint.note,
                entries,
                judged,
                None if edge is None else b"".join(d for _, _, d in edge.frontier.subtrees),
            )
        finally:
            store.close()


_TAMPERED = (
    "audit state of {} is tampered: its entries do not hash to the checkpoint saved with them"
)


def _check_root(row: LogRow, frontier: MerkleFrontier) -> None:
    """BadInput unless ``frontier`` is the tree of the checkpoint saved in ``row``."""
    if frontier.size != row.size or frontier.root() != row.root:
        raise BadInput(_TAMPERED.format(row.origin))


def _checked(row: LogRow) -> SavedCheckpoint:
    """A saved row as a checkpoint, if it still proves itself; else BadInput."""
    where = f"audit state of {row.origin!r}"
    if not is_node_origin(row.origin) or len(row.root) != 32 or row.size < 0:
        raise BadInput(f"{where} is corrupt: mistyped fields")
    if row.entries_kept not in (0, row.size):
        raise BadInput(f"{where} is corrupt: {row.entries_kept} entries for size {row.size}")
    try:
        key = parse_verifier_key(row.vkey)
        checkpoint = verify_note(row.note, key)
    except (BadInput, Unauthorized) as exc:
        raise BadInput(f"{where} is tampered: its checkpoint does not verify: {exc}") from exc
    if key.name != row.origin or (checkpoint.size, checkpoint.root_hash) != (row.size, row.root):
        raise BadInput(f"{where} is tampered: its fields are not the signed checkpoint's")
    return SavedCheckpoint(row.origin, row.vkey, row.size, row.root, row.note)
