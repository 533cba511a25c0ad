"""Node key rotation: the rotation entry and the chain of keys (core), the key history of
the stored logs (store), and one node's key rotated mid-story in a three-node federation
(real processes), checked end to end by replication, a transfer, the auditor and an
independent checkpoint verifier."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from node.core.entries import LedgerEntry, decode_entry
from node.core.key_rotation import (
    COMPROMISED,
    ROUTINE,
    KeyChain,
    KeyRotation,
    chain_of_log,
    check_rotation,
    rotation_message,
    sign_rotation,
)
from node.core.keys import NodeIdentity
from node.core.notes import Checkpoint, sign_note, verify_note
from node.errors import BadInput, Conflict, Unauthorized
from node.store.ledger import KeyRotated, LedgerStore, OwnLog

ORIGIN = "b.example/imageshare"


def rotation_entry(rotation: KeyRotation) -> LedgerEntry:
    return LedgerEntry("key_rotation", bytes(32), 1, rotation.fields())


class TestRotationRule:
    """node.core.key_rotation: which rotations move a log's key on."""

    old = NodeIdentity.generate(ORIGIN)
    new = NodeIdentity.generate(ORIGIN)

    def test_rotation_signed_by_both_keys_is_accepted(self) -> None:
        rotation = sign_rotation(self.old, self.new, self.old.public_key)
        check_rotation(ORIGIN, self.old.public_key, rotation)
        chain = KeyChain.starting_with(ORIGIN, self.old.public_key).following([(4, rotation)])
        assert chain.key_at(0) == chain.key_at(4) == self.old.public_key
        assert chain.key_at(5) == chain.key_at(99) == self.new.public_key

    def test_rotation_signed_by_new_key_only_needs_the_roster_confirmation(self) -> None:
        rotation = sign_rotation(None, self.new, self.old.public_key)
        assert rotation.reason == COMPROMISED and rotation.old_signature is None
        with pytest.raises(Unauthorized, match="not confirmed"):
            check_rotation(ORIGIN, self.old.public_key, rotation)
        with pytest.raises(Unauthorized, match="not confirmed"):
            check_rotation(ORIGIN, self.old.public_key, rotation, self.old.public_key)
        check_rotation(ORIGIN, self.old.public_key, rotation, confirmed_key=self.new.public_key)

    def test_routine_rotation_without_old_signature_is_refused(self) -> None:
        routine = sign_rotation(self.old, self.new, self.old.public_key)
        rotation = replace(routine, old_signature=None)
        with pytest.raises(BadInput, match="compromised"):
            check_rotation(ORIGIN, self.old.public_key, rotation, self.new.public_key)

    def test_rotation_with_a_bad_signature_is_refused(self) -> None:
        good = sign_rotation(self.old, self.new, self.old.public_key)
        stranger = NodeIdentity.generate(ORIGIN)
        forged_old = replace(good, old_signature=stranger.sign(b"x"))
        forged_new = replace(good, new_signature=bytes(64))
        for rotation in (forged_old, forged_new):
            with pytest.raises(Unauthorized):
                check_rotation(ORIGIN, self.old.public_key, rotation)

    def test_rotation_is_bound_to_its_log(self) -> None:
        rotation = sign_rotation(self.old, self.new, self.old.public_key)
        with pytest.raises(Unauthorized):
            check_rotation("c.example/imageshare", self.old.public_key, rotation)

    def test_forged_rotation_by_a_hostile_member_is_refused(self) -> None:
        # The hostile member holds its own key, not B's: it can sign a "rotation" of B's
        # log from a key of its choosing, but B's key in force never signed it.
        hostile = NodeIdentity.generate(ORIGIN)
        forged = sign_rotation(hostile, NodeIdentity.generate(ORIGIN), hostile.public_key)
        with pytest.raises(BadInput, match="key in force"):
            check_rotation(ORIGIN, self.old.public_key, forged)
        # Claiming B's key in force as the old key: the hostile key's signature is no B's.
        hostile_new = NodeIdentity.generate(ORIGIN)
        message = rotation_message(ORIGIN, self.old.public_key, hostile_new.public_key, ROUTINE)
        claimed = KeyRotation(
            self.old.public_key,
            hostile_new.public_key,
            hostile.sign(message),
            hostile_new.sign(message),
            ROUTINE,
        )
        with pytest.raises(Unauthorized, match="old key"):
            check_rotation(ORIGIN, self.old.public_key, claimed)

    def test_replayed_rotation_is_refused(self) -> None:
        rotation = sign_rotation(self.old, self.new, self.old.public_key)
        chain = KeyChain.starting_with(ORIGIN, self.old.public_key).following([(2, rotation)])
        with pytest.raises(BadInput, match="key in force"):
            chain.following([(7, rotation)])

    def test_chain_of_log_must_hold_the_trusted_key(self) -> None:
        rotation = sign_rotation(self.old, self.new, self.old.public_key)
        entries = [None, rotation_entry(rotation), None]
        for anchor in (self.old.public_key, self.new.public_key):
            chain = chain_of_log(ORIGIN, entries, anchor)
            assert chain.key_at(1) == self.old.public_key
            assert chain.key_at(2) == self.new.public_key
        with pytest.raises(Unauthorized, match="trusted"):
            chain_of_log(ORIGIN, entries, NodeIdentity.generate(ORIGIN).public_key)


def grants(count: int) -> list[tuple[str, dict[str, object], int]]:
    return [("grant", {"token": i.to_bytes(4, "big")}, 1_700_000_000 + i) for i in range(count)]


class TestStoredKeyHistory:
    """node.store.ledger: a log's key history, own and mirrored."""

    old = NodeIdentity.generate(ORIGIN)

    @pytest.fixture
    def stores(self, tmp_path: Path) -> Iterator[tuple[LedgerStore, LedgerStore]]:
        """B's ledger store (its own log, first key ``old``) and A's, which mirrors it."""
        (tmp_path / "b").mkdir()
        (tmp_path / "a").mkdir()
        b, a = LedgerStore(tmp_path / "b"), LedgerStore(tmp_path / "a")
        yield b, a
        b.close()
        a.close()

    @pytest.fixture
    def own(self, stores: tuple[LedgerStore, LedgerStore]) -> OwnLog:
        return stores[0].own_log(ORIGIN, self.old.vkey)

    def rotated(self, own: OwnLog, old: NodeIdentity) -> tuple[NodeIdentity, int]:
        new = NodeIdentity.generate(ORIGIN)
        result = own.append("key_rotation", sign_rotation(old, new, old.public_key).fields(), 9)
        return new, result.index

    def test_checkpoints_are_signed_by_the_key_in_force_at_their_size(
        self, stores: tuple[LedgerStore, LedgerStore], own: OwnLog
    ) -> None:
        store, _ = stores
        old = self.old
        own.append_many(grants(3))
        before = own.publish_checkpoint(old, 1)
        new, index = self.rotated(own, old)
        assert index == 3
        with pytest.raises(KeyRotated):
            own.publish_checkpoint(old, 2)
        after = own.publish_checkpoint(new, 2)
        assert verify_note(before, old.vkey).size == 3
        assert verify_note(after, new.vkey).size == 4
        assert own.vkey == new.vkey and own.vkey_at(3) == old.vkey and own.vkey_at(4) == new.vkey
        assert own.verify(old.vkey).ok and own.verify(new.vkey).ok
        assert not own.verify(NodeIdentity.generate(ORIGIN).vkey).ok
        # An opener still holding the old key does not move the log's key back.
        store.own_log(ORIGIN, old.vkey)
        assert own.vkey == new.vkey

    def test_own_log_refuses_a_rotation_not_from_the_key_in_force(self, own: OwnLog) -> None:
        self.rotated(own, self.old)
        with pytest.raises(BadInput, match="key in force"):
            self.rotated(own, self.old)  # a second rotation racing from the same old key
        assert own.size() == 1

    def test_mirror_follows_a_rotation_and_refuses_new_key_checkpoint_before_it(
        self, stores: tuple[LedgerStore, LedgerStore], own: OwnLog
    ) -> None:
        _, peer_store = stores
        old = self.old
        own.append_many(grants(3))
        mirror = peer_store.mirror(ORIGIN, old.vkey)
        mirror.extend(own.entries(0, 2), _note(own, old, 2))
        new, _ = self.rotated(own, old)
        own.append_many(grants(2))
        # A checkpoint of a size before the rotation, signed by the new key: refused.
        early = _note(own, new, 3)
        with pytest.raises(Unauthorized):
            mirror.extend(own.entries(2, 3), early)
        assert mirror.size() == 2
        mirror.extend(own.entries(2, own.size()), own.publish_checkpoint(new, 3))
        assert mirror.size() == 6 and mirror.vkey == new.vkey
        assert peer_store.mirror(ORIGIN, old.vkey) is mirror  # a retired key of its chain
        assert mirror.verify().ok

    def test_mirror_takes_a_compromised_key_rotation_only_once_confirmed(
        self, stores: tuple[LedgerStore, LedgerStore], own: OwnLog
    ) -> None:
        _, peer_store = stores
        old = self.old
        mirror = peer_store.mirror(ORIGIN, old.vkey)
        new = NodeIdentity.generate(ORIGIN)
        own.append("key_rotation", sign_rotation(None, new, old.public_key).fields(), 1)
        note = own.publish_checkpoint(new, 2)
        with pytest.raises(Unauthorized, match="not confirmed"):
            mirror.extend(own.entries(0, 1), note, old.vkey)
        with pytest.raises(Conflict):
            peer_store.mirror(ORIGIN, new.vkey)  # not a key of the mirror's chain yet
        mirror.extend(own.entries(0, 1), note, new.vkey)
        assert mirror.vkey == new.vkey
        assert decode_entry(mirror.entry(0)).fields["reason"] == COMPROMISED


def _note(own: OwnLog, identity: NodeIdentity, size: int) -> str:
    """A checkpoint of ``own`` at ``size`` signed by ``identity`` (whatever key is in force)."""
    return sign_note(Checkpoint(ORIGIN, size, own.root(size)).body(), identity)
