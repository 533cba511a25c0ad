"""One chain-and-root rule: the ledger store's mirror, its integrity check and the auditor
judge a run of entries alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.core.audit_rules import check_history, check_same_copy
from node.core.chain import LogChain
from node.core.entries import LedgerEntry, encode_entry
from node.core.keys import NodeIdentity, parse_verifier_key
from node.core.merkle import ZERO_HASH, MemoryTree, leaf_hash
from node.core.notes import Checkpoint, sign_note, verify_note
from node.errors import BadInput, Conflict
from node.store.ledger import LedgerStore

IDENTITY = NodeIdentity.generate("a.example/imageshare")


def entry(prev: bytes, time: int) -> bytes:
    fields = {"log_id": bytes(32), "size": time, "root": bytes(32)}
    return encode_entry(LedgerEntry("witness", prev, time, fields))


def honest_run(count: int) -> list[bytes]:
    run, prev = [], ZERO_HASH
    for time in range(count):
        run.append(entry(prev, time))
        prev = leaf_hash(run[-1])
    return run


def note_over(run: list[bytes]) -> str:
    root = MemoryTree([leaf_hash(raw) for raw in run]).root()
    return sign_note(Checkpoint(IDENTITY.origin, len(run), root).body(), IDENTITY)


def reordered(run: list[bytes]) -> list[bytes]:
    return [run[0], run[2], run[1], *run[3:]]


def unchained(run: list[bytes]) -> list[bytes]:
    return [*run[:2], entry(b"\x01" * 32, 2), *run[3:]]


def malformed(run: list[bytes]) -> list[bytes]:
    return [*run[:2], b"\xc1not msgpack", *run[3:]]


BROKEN: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "reordered": reordered,
    "unchained": unchained,
    "malformed": malformed,
}


class TestLogChain:
    def test_an_honest_run_chains_and_gives_its_checkpoints_root(self) -> None:
        run = honest_run(9)
        chain = LogChain()
        links = [chain.append(raw) for raw in run]
        assert all(link.chains and link.error is None for link in links)
        assert [link.index for link in links] == list(range(9))
        assert chain.gives_root_of(verify_note(note_over(run), IDENTITY.vkey))
        assert chain.root() == MemoryTree([leaf_hash(raw) for raw in run]).root()

    def test_a_malformed_entry_is_reported_and_the_walk_goes_on(self) -> None:
        chain = LogChain()
        links = [chain.append(raw) for raw in malformed(honest_run(5))]
        assert links[2].entry is None and isinstance(links[2].error, BadInput)
        assert not links[2].chains
        # The next entry's prev is the leaf hash of the honest entry 2, not of the bytes served.
        assert [link.chains for link in links] == [True, True, False, False, True]

    def test_a_checkpoint_of_another_size_is_not_given(self) -> None:
        run = honest_run(4)
        chain = LogChain()
        for raw in run[:3]:
            chain.append(raw)
        root = MemoryTree([leaf_hash(raw) for raw in run[:3]]).root()
        assert chain.gives_root_of(Checkpoint(IDENTITY.origin, 3, root))
        assert not chain.gives_root_of(Checkpoint(IDENTITY.origin, 4, root))

    def test_a_copy_grows_apart_from_its_original(self) -> None:
        run = honest_run(3)
        chain = LogChain()
        chain.append(run[0])
        copy = chain.copy()
        copy.append(run[1])
        assert (chain.size, copy.size) == (1, 2) and chain.last_leaf == leaf_hash(run[0])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LedgerStore]:
    ledger = LedgerStore(tmp_path)
    yield ledger
    ledger.close()


class TestCallersAgree:
    def test_an_honest_run_is_mirrored_verified_and_audited_intact(
        self, store: LedgerStore
    ) -> None:
        run = honest_run(6)
        note = note_over(run)
        mirror = store.mirror(IDENTITY.origin, IDENTITY.vkey)
        mirror.extend(run, note)
        assert mirror.verify().problems == []
        history, violations = check_history(
            IDENTITY.origin, parse_verifier_key(IDENTITY.vkey), "a", note, run
        )
        assert history.intact and violations == []

    @pytest.mark.parametrize("breakage", BROKEN)
    def test_a_broken_run_is_refused_by_the_mirror_and_found_by_the_auditor(
        self, store: LedgerStore, breakage: str
    ) -> None:
        honest = honest_run(6)
        run = BROKEN[breakage](honest)
        note = note_over(honest)
        mirror = store.mirror(IDENTITY.origin, IDENTITY.vkey)
        with pytest.raises((BadInput, Conflict)):
            mirror.extend(run, note)
        assert mirror.size() == 0
        history, violations = check_history(
            IDENTITY.origin, parse_verifier_key(IDENTITY.vkey), "a", note, run
        )
        rules = {v.rule for v in violations}
        assert not history.intact
        assert rules & {"malformed_entry", "broken_chain"} and "root_mismatch" in rules


class TestSameCopyShortCut:
    """A mirror's copy proven equal to a verified one shares its judged entries."""

    def test_a_copy_of_the_verified_checkpoint_shares_its_entries_without_a_new_walk(
        self,
    ) -> None:
        run = honest_run(7)
        note = note_over(run)
        verified, _ = check_history(
            IDENTITY.origin, parse_verifier_key(IDENTITY.vkey), "a", note, run
        )
        copy = check_same_copy(verified, "b", note, list(run))
        assert copy is not None and copy.intact and copy.source == "b"
        assert copy.leaf_hashes is verified.leaf_hashes

    @pytest.mark.parametrize("breakage", BROKEN)
    def test_a_copy_serving_other_bytes_under_the_same_checkpoint_is_judged_whole(
        self, breakage: str
    ) -> None:
        honest = honest_run(6)
        note = note_over(honest)
        key = parse_verifier_key(IDENTITY.vkey)
        verified, _ = check_history(IDENTITY.origin, key, "a", note, honest)
        served = BROKEN[breakage](honest)
        assert check_same_copy(verified, "b", note, served) is None
        history, violations = check_history(IDENTITY.origin, key, "b", note, served)
        assert not history.intact and "root_mismatch" in {v.rule for v in violations}

    def test_a_copy_of_another_size_or_signer_is_not_taken_for_the_verified_one(self) -> None:
        run = honest_run(5)
        verified, _ = check_history(
            IDENTITY.origin, parse_verifier_key(IDENTITY.vkey), "a", note_over(run), run
        )
        shorter = run[:4]
        assert check_same_copy(verified, "b", note_over(shorter), shorter) is None
        other = NodeIdentity.generate(IDENTITY.origin)
        root = MemoryTree([leaf_hash(raw) for raw in run]).root()
        forged = sign_note(Checkpoint(IDENTITY.origin, len(run), root).body(), other)
        assert check_same_copy(verified, "b", forged, run) is None
