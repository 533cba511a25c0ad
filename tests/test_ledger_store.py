"""The ledger store: group-committed appends, checkpoints, cosignatures, verified mirrors."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from node.core.entries import EntryBody, Grant, Revoke, Witness, decode_entry
from node.core.keys import NodeIdentity
from node.core.merkle import (
    EMPTY_ROOT,
    ZERO_HASH,
    MemoryTree,
    consistency_proof,
    inclusion_proof,
    verify_consistency,
    verify_inclusion,
)
from node.core.notes import (
    Checkpoint,
    cosign_checkpoint,
    parse_note,
    parse_vkey,
    sign_note,
    verify_note,
)
from node.core.witness import AddCheckpoint, Witnessed, WitnessRefusal
from node.errors import BadInput, Conflict, StorageFailed, StorageFull, Unauthorized
from node.services.runtime import open_runtime
from node.store.ledger import LedgerStore, LedgerStoreBase, OwnLog
from tests.support.ledger_stores import LedgerStores
from tests.support.nodes import init_node

ORIGIN = "a.example/imageshare"


@pytest.fixture
def identity() -> NodeIdentity:
    return NodeIdentity.generate(ORIGIN)


@pytest.fixture
def store(tmp_path: Path, ledger_stores: LedgerStores) -> LedgerStoreBase:
    """The store under test, on each engine in turn."""
    return ledger_stores.open(tmp_path / "a")


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[LedgerStore]:
    """For what only the embedded engine lets a test do to its file."""
    (tmp_path / "a").mkdir()
    ledger = LedgerStore(tmp_path / "a")
    yield ledger
    ledger.close()


@pytest.fixture
def own(store: LedgerStoreBase, identity: NodeIdentity) -> OwnLog:
    return store.own_log(identity.origin, identity.vkey)


@dataclass(frozen=True)
class Unregistered(EntryBody):
    """A body of a kind the registry does not hold."""

    kind: ClassVar[str] = "nonsense"


def grants(count: int, start: int = 0) -> list[tuple[EntryBody, int]]:
    return [
        (Grant(token=i.to_bytes(4, "big")), 1_700_000_000 + i)
        for i in range(start, start + count)
    ]


class TestAppend:
    def test_entries_chain_and_roots_and_proofs_match_the_core(self, own: OwnLog) -> None:
        results = own.append_many(grants(37))
        assert [r.index for r in results] == list(range(37))
        assert decode_entry(results[0].entry).prev == ZERO_HASH
        for before, after in itertools.pairwise(results):
            assert decode_entry(after.entry).prev == before.leaf_hash
        tree = MemoryTree([r.leaf_hash for r in results])
        for size in range(38):
            assert own.root(size) == tree.root(size)
            for index in range(0, size, 5):
                assert own.inclusion_proof(index, size) == inclusion_proof(tree, index, size)
            for old in range(0, size + 1, 3):
                assert own.consistency_proof(old, size) == consistency_proof(tree, old, size)
        assert own.entries(3, 6) == [r.entry for r in results[3:6]]

    def test_concurrent_appends_get_distinct_indexes_and_one_chain(self, own: OwnLog) -> None:
        own.group_commit_wait = 0.002
        indexes: list[int] = []
        lock = threading.Lock()

        def work(thread: int) -> None:
            for i in range(40):
                result = own.append(Grant(token=f"{thread}-{i}".encode()), 1)
                with lock:
                    indexes.append(result.index)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(indexes) == list(range(400))
        assert own.commits < 400  # appends shared commits
        assert own.verify().ok

    def test_bad_entry_is_refused_without_disturbing_the_others(self, own: OwnLog) -> None:
        own.append_many(grants(3))
        with pytest.raises(BadInput, match="token"):
            own.append(Grant(token="not bytes"), 1)  # type: ignore[arg-type]
        with pytest.raises(BadInput, match="kind"):
            own.append(Unregistered(), 1)
        with pytest.raises(BadInput):
            own.append_many([*grants(2, 3), (Witness(log_id=b"short", size=1, root=bytes(32)), 1)])
        assert own.size() == 3
        assert own.append(Grant(token=b"x"), 1).index == 3
        assert own.verify().ok

    def test_a_failing_database_raises_storage_failed_not_sqlite_errors(
        self, sqlite_store: LedgerStore, identity: NodeIdentity
    ) -> None:
        store = sqlite_store
        own = store.own_log(identity.origin, identity.vkey)
        own.append_many(grants(2))
        damage = sqlite3.connect(store.path)
        damage.execute("DROP TABLE subtrees")
        damage.close()
        with pytest.raises(StorageFailed, match="ledger"):
            own.root()
        with pytest.raises(StorageFailed, match="ledger"):
            own.append_many(grants(2, 2))
        assert len(own.entries(0, 2)) == 2  # what the damage spared still reads

    def test_full_disk_refuses_the_append_and_the_log_carries_on(
        self, sqlite_store: LedgerStore, identity: NodeIdentity
    ) -> None:
        store = sqlite_store
        own = store.own_log(identity.origin, identity.vkey)
        own.append_many(grants(3))
        (pages,) = store.writer.execute("PRAGMA page_count").fetchone()
        store.writer.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(StorageFull):
            own.append(Grant(token=bytes(20_000)), 1)
        assert own.size() == 3
        store.writer.execute("PRAGMA max_page_count=1000000")
        assert own.append(Grant(token=bytes(20_000)), 1).index == 3
        assert own.verify().ok

    def test_a_second_store_on_the_same_ledger_continues_the_chain(
        self, ledger_stores: LedgerStores, own: OwnLog, identity: NodeIdentity, tmp_path: Path
    ) -> None:
        own.append_many(grants(5))
        other = ledger_stores.open(tmp_path / "a")
        other.own_log(ORIGIN).append_many(grants(4, 5))
        other.close()
        assert own.append(Grant(token=b"z"), 1).index == 9
        assert own.verify(identity.vkey).ok


class TestCheckpoints:
    def test_publish_signs_the_current_head_once_per_size(
        self, own: OwnLog, identity: NodeIdentity
    ) -> None:
        empty = verify_note(own.publish_checkpoint(identity, 1), identity.vkey)
        assert (empty.size, empty.root_hash) == (0, EMPTY_ROOT)
        own.append_many(grants(9))
        note = own.publish_checkpoint(identity, 2)
        checkpoint = verify_note(note, identity.vkey)
        assert (checkpoint.size, checkpoint.root_hash) == (9, own.root())
        assert own.publish_checkpoint(identity, 3) == note
        assert own.checkpoint_note() == note
        proof = own.consistency_proof(0, 9)
        assert verify_consistency(proof, 0, 9, EMPTY_ROOT, checkpoint.root_hash)
        assert verify_inclusion(own.inclusion_proof(4, 9), own.leaf_hash(4), 4, 9, own.root())

    def test_only_this_logs_key_may_publish(self, own: OwnLog) -> None:
        with pytest.raises(BadInput):
            own.publish_checkpoint(NodeIdentity.generate("b.example/x"), 1)

    def test_cosignatures_are_kept_verified_and_dropped_when_the_log_grows(
        self, own: OwnLog, identity: NodeIdentity
    ) -> None:
        own.append_many(grants(2))
        body, _ = parse_note(own.publish_checkpoint(identity, 1))
        witness = NodeIdentity.generate("b.example/imageshare")
        stranger = NodeIdentity.generate("c.example/imageshare")
        note = own.add_cosignature(cosign_checkpoint(body, witness, 7), witness.vkey, body)
        assert len(parse_note(note)[1]) == 2
        assert own.publish_checkpoint(identity, 2) == note  # same size: served with cosignature
        with pytest.raises(Unauthorized):
            own.add_cosignature(cosign_checkpoint(body, stranger, 7), witness.vkey)
        own.append(Grant(token=b"more"), 3)
        new_note = own.publish_checkpoint(identity, 4)
        assert len(parse_note(new_note)[1]) == 1
        with pytest.raises(Conflict):
            own.add_cosignature(cosign_checkpoint(body, witness, 8), witness.vkey, body)


class TestMirror:
    @pytest.fixture
    def peer(self, tmp_path: Path) -> Iterator[tuple[NodeIdentity, OwnLog]]:
        (tmp_path / "peer").mkdir()
        identity = NodeIdentity.generate("b.example/imageshare")
        peer_store = LedgerStore(tmp_path / "peer")
        log = peer_store.own_log(identity.origin, identity.vkey)
        log.append_many(grants(20))
        yield identity, log
        peer_store.close()

    def test_extends_in_steps_and_lists(
        self, store: LedgerStoreBase, own: OwnLog, peer: tuple[NodeIdentity, OwnLog]
    ) -> None:
        identity, log = peer
        mirror = store.mirror(identity.origin, identity.vkey)
        first = sign_note(Checkpoint(identity.origin, 8, log.root(8)).body(), identity)
        mirror.extend(log.entries(0, 8), first)
        assert mirror.size() == 8 and mirror.checkpoint_note() == first
        note = log.publish_checkpoint(identity, 1)
        mirror.extend(log.entries(8, 20), note)
        assert mirror.root() == log.root()
        mirror.extend([], first)  # an older, consistent checkpoint changes nothing
        assert mirror.checkpoint_note() == note
        assert [i.origin for i in store.logs()] == [ORIGIN, identity.origin]
        assert store.log_by_id(mirror.log_id.hex()) is mirror
        assert mirror.verify().ok

    def test_refuses_bad_signature_chain_count_and_root_before_storing(
        self, store: LedgerStoreBase, peer: tuple[NodeIdentity, OwnLog]
    ) -> None:
        identity, log = peer
        mirror = store.mirror(identity.origin, identity.vkey)
        note = log.publish_checkpoint(identity, 1)
        entries = log.entries(0, 20)
        impostor = NodeIdentity(identity.origin, bytes(32))
        forged = sign_note(parse_note(note)[0], impostor)
        with pytest.raises(Unauthorized):
            mirror.extend(entries, forged)
        with pytest.raises(BadInput, match="expected 20"):
            mirror.extend(entries[:19], note)
        with pytest.raises(BadInput, match="chain"):
            mirror.extend([entries[1], entries[0], *entries[2:]], note)
        with pytest.raises(BadInput, match="entry 3"):
            mirror.extend([*entries[:3], b"\xc1", *entries[4:]], note)
        assert mirror.size() == 0 and mirror.checkpoint_note() is None

    def test_inconsistent_checkpoint_is_a_conflict(
        self, store: LedgerStoreBase, peer: tuple[NodeIdentity, OwnLog]
    ) -> None:
        identity, log = peer
        mirror = store.mirror(identity.origin, identity.vkey)
        mirror.extend(log.entries(0, 20), log.publish_checkpoint(identity, 1))
        # The peer signs another tree head for a size it already committed: equivocation.
        fork = sign_note(Checkpoint(identity.origin, 10, bytes(32)).body(), identity)
        with pytest.raises(Conflict):
            mirror.extend([], fork)
        longer = sign_note(Checkpoint(identity.origin, 21, bytes(32)).body(), identity)
        extra = log.append(Grant(token=b"x"), 1).entry
        with pytest.raises(Conflict):
            mirror.extend([extra], longer)
        assert mirror.size() == 20

    def test_mirror_keys_and_origins_are_checked(
        self, store: LedgerStoreBase, own: OwnLog, peer: tuple[NodeIdentity, OwnLog]
    ) -> None:
        identity, _ = peer
        store.mirror(identity.origin, identity.vkey)
        with pytest.raises(Conflict):
            store.mirror(identity.origin, NodeIdentity.generate(identity.origin).vkey)
        with pytest.raises(BadInput):
            store.mirror("c.example/other", identity.vkey)
        with pytest.raises(Conflict):
            store.mirror(ORIGIN, NodeIdentity(ORIGIN, bytes(32)).vkey)
        assert store.log_by_id("zz") is None and store.log_by_id("00" * 32) is None


class TestLedgerService:
    def test_runtime_service_appends_durably_and_publishes(self, tmp_path: Path) -> None:
        node = init_node(tmp_path, ORIGIN)
        runtime = open_runtime(node.config)
        try:
            service = runtime.services.ledger
            assert runtime.services.ledger is service
            first = service.append(Grant(token=b"t"))
            second = asyncio.run(service.append_async(Revoke(revocation=b"r")))
            assert (first.index, second.index) == (0, 1)
            assert abs(decode_entry(second.entry).time - time.time()) < 60
            checkpoint = verify_note(service.checkpoint_note(), node.vkey)
            assert (checkpoint.size, checkpoint.root_hash) == (2, service.own.root())
            with pytest.raises(BadInput):
                service.append(Grant(token=5))  # type: ignore[arg-type]
            commits = service.own.commits
            assert service.append_many([]) == [] and service.own.commits == commits
            both = service.append_many([Grant(token=b"a"), Grant(token=b"b")])
            assert [r.index for r in both] == [2, 3] and service.own.commits == commits + 1
            with pytest.raises(BadInput):  # all or none
                service.append_many([Grant(token=b"c"), Grant(token=5)])  # type: ignore[arg-type]
        finally:
            runtime.close()
        reopened = LedgerStore(node.data_dir)
        assert reopened.own_log(ORIGIN).size() == 4
        reopened.close()


def race_to_witness(
    store: LedgerStoreBase, log: NodeIdentity, tree: MemoryTree, sizes: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Requests from old size 0 to each of ``sizes``, sent at once; (sizes cosigned,
    statuses of the refusals)."""
    notes = [sign_note(Checkpoint(log.origin, n, tree.root(n)).body(), log) for n in sizes]
    requests = [AddCheckpoint(0, (), n, Checkpoint.parse(parse_note(n)[0])) for n in notes]
    start = threading.Barrier(len(requests))
    won: list[int] = []
    refused: list[int] = []

    def race(request: AddCheckpoint) -> None:
        start.wait()
        try:
            won.append(store.witness(request, [parse_vkey(log.vkey)]).size)
        except WitnessRefusal as refusal:
            refused.append(refusal.http_status)

    threads = [threading.Thread(target=race, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused


class TestWitnessing:
    def test_of_racing_requests_from_one_old_size_only_one_moves_the_witness_on(
        self, store: LedgerStoreBase
    ) -> None:
        tree = MemoryTree([bytes([i]) * 32 for i in range(8)])
        for round_ in range(5):  # five logs: five races
            log = NodeIdentity.generate(f"c{round_}.example/imageshare")
            won, refused = race_to_witness(store, log, tree, (3, 5, 8))
            assert len(won) == 1 and refused == [409, 409], (won, refused)
            assert store.witnessed(log.origin) == Witnessed(won[0], tree.root(won[0]))
