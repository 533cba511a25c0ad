"""Node key rotation: the rotation entry and the chain of keys (core), the key history of
the stored logs (store), and one node's key rotated mid-story in a three-node federation
(real processes), checked end to end by replication, a transfer, the auditor and an
independent checkpoint verifier."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
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
from node.core.roster import log_id
from node.errors import BadInput, Conflict, Unauthorized
from node.samples import SyntheticStudy, make_ct_study
from node.services.wallet import Wallet
from node.store.ledger import KeyRotated, LedgerStore, OwnLog
from node.store.secrets import read_seed
from tests.support.nodes import NodeProcess, init_node, run_cli, wait_until
from tests.test_ledger_api import mth, open_checkpoint, rfc_leaf

ORIGIN = "b.example/imageshare"


def rotation_entry(rotation: KeyRotation) -> LedgerEntry:
    return LedgerEntry("key_rotation", bytes(32), 1, rotation.wire_fields())


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
        rotation = sign_rotation(old, new, old.public_key)
        result = own.append("key_rotation", rotation.wire_fields(), 9)
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
        own.append("key_rotation", sign_rotation(None, new, old.public_key).wire_fields(), 1)
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


# ---- three real nodes: B's key rotated mid-story ----------------------------------------


@dataclass
class Federation:
    a: NodeProcess
    b: NodeProcess
    c: NodeProcess
    wallet: Wallet
    study: SyntheticStudy
    state: Path


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A, B (the custodian, whose key rotates) and C, each a member of the others' roster."""
    base = tmp_path_factory.mktemp("rotation")
    a, b, c = (init_node(base, f"{n}.example/imageshare", n) for n in "abc")
    settings = "[federation]\ndiscovery = false\nreplicate_interval = 0.3\n"
    for node in (a, b, c):
        node.append_config(settings + "".join(o.roster_entry() for o in (a, b, c) if o is not node))
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(NodeProcess.start, (a, b, c)))
        study = make_ct_study(base / "study", series=1, slices=2, rows=32, columns=32)
        b.cli("import", str(base / "study"))
        wallet = Wallet.create(base / "wallet", None)
        key = wallet.key_for(b.origin).public_key_text
        b.cli("enroll", "--patient-id", study.patient_id, f"--key={key}")
        yield Federation(a, b, c, wallet, study, base / "audit-state")
    finally:
        for node in (a, b, c):
            node.stop()


def _fetch_from_b(fed: Federation, grantee: NodeProcess) -> dict[str, Any]:
    async def grant() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            return await fed.wallet.grant(session, fed.b.url, grantee.origin, None, 3600)

    token = asyncio.run(grant())
    return dict(json.loads(grantee.cli("fetch", token["url"], "--json").stdout))


def _listed(node: NodeProcess, origin: str) -> dict[str, Any]:
    logs = node.get_json("/ledger/logs", auth=False)
    return next((dict(log) for log in logs if log["origin"] == origin), {})


def _roster_key(node: NodeProcess, origin: str) -> str:
    members = json.loads(node.cli("peers", "list", "--json").stdout)
    return str(next(m["vkey"] for m in members if m["origin"] == origin))


def _checkpoint(node: NodeProcess, origin: str) -> str:
    path = f"/ledger/logs/{log_id(origin)}/checkpoint"
    with urllib.request.urlopen(node.url + path, timeout=10) as response:
        return str(response.read().decode())


def _leaves(node: NodeProcess, origin: str, size: int) -> tuple[bytes, ...]:
    path = f"/ledger/logs/{log_id(origin)}/entries?start=0&end={size}"
    with urllib.request.urlopen(node.url + path, timeout=10) as response:
        entries = msgpack.unpackb(response.read())
    assert len(entries) == size
    return tuple(rfc_leaf(e) for e in entries)


def _converged(fed: Federation) -> bool:
    nodes = (fed.a, fed.b, fed.c)
    sizes = {n.origin: _listed(n, n.origin)["size"] for n in nodes}
    return all(_listed(n, o).get("size") == s for n in nodes for o, s in sizes.items())


def _audit(fed: Federation) -> tuple[int, dict[str, Any]]:
    urls = [fed.a.url, fed.b.url, fed.c.url]
    result = run_cli("audit", *urls, "--state", str(fed.state), "--json", check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


class TestRotationInAFederation:
    def test_rotation_mid_story_keeps_replication_transfer_and_audit_clean(
        self, fed: Federation
    ) -> None:
        a, b, c = fed.a, fed.b, fed.c
        old_vkey = b.vkey
        _fetch_from_b(fed, a)
        wait_until(lambda: _converged(fed), timeout=30, message="logs to converge")
        status, report = _audit(fed)  # pins B's old key in the auditor's state
        assert (status, report["violations"]) == (0, [])
        old_note = _checkpoint(b, b.origin)

        rotated = json.loads(b.cli("key", "rotate", "--json").stdout)  # B keeps running
        assert rotated["old_vkey"] == old_vkey and rotated["vkey"] != old_vkey
        new_vkey = rotated["vkey"]
        assert _listed(b, b.origin)["vkey"] == new_vkey
        for peer in (a, c):
            wait_until(
                lambda peer=peer: _roster_key(peer, b.origin) == new_vkey,
                timeout=30,
                message=f"{peer.origin} to follow B's rotation",
            )
        # B signs with the new key from the rotation on, its requests included.
        fetched = _fetch_from_b(fed, c)
        assert fetched["custodian"] == b.origin
        assert fetched["instances"] == len(fed.study.files)
        wait_until(lambda: _converged(fed), timeout=30, message="logs to converge again")
        for node in (a, c):
            assert _listed(node, b.origin)["vkey"] == new_vkey

        # The auditor, pinned to B's old key, follows the chain to the new one.
        status, report = _audit(fed)
        assert (status, report["violations"]) == (0, [])
        assert b.cli("ledger", "verify").returncode == 0

        # Independent check (RFC 6962 by hand, C2SP note by hand): B's old checkpoint
        # still verifies under the old key, the new one under the new key only.
        origin, old_size, old_root = open_checkpoint(old_note, old_vkey)
        assert origin == b.origin and old_size <= rotated["index"]
        new_note = _checkpoint(a, b.origin)
        _, new_size, new_root = open_checkpoint(new_note, new_vkey)
        assert new_size > rotated["index"]
        with pytest.raises(AssertionError, match="no signature"):
            open_checkpoint(new_note, old_vkey)
        leaves = _leaves(a, b.origin, new_size)
        assert mth(leaves[:old_size]) == old_root and mth(leaves) == new_root

        # The old key is archived (owner-only), never to sign again.
        (retired,) = (b.data_dir / "retired-keys").glob("*.key")
        assert retired.stat().st_mode & 0o777 == 0o600
        assert (b.data_dir / "node.key").stat().st_mode & 0o777 == 0o600
        assert NodeIdentity(b.origin, read_seed(retired)).vkey == old_vkey

    def test_compromised_key_rotation_is_followed_only_once_the_operator_confirms(
        self, fed: Federation
    ) -> None:
        a, b, c = fed.a, fed.b, fed.c
        before = _roster_key(a, b.origin)
        rotated = json.loads(b.cli("key", "rotate", "--compromised", "--json").stdout)
        assert rotated["reason"] == "compromised"
        size = rotated["index"] + 1

        def refused_at(node: NodeProcess) -> bool:
            peers = node.get_json("/admin/api/federation")["peers"]
            status = next(p for p in peers if p["origin"] == b.origin)
            return "not confirmed" in status["last_error"]

        wait_until(lambda: refused_at(a), timeout=30, message="A to refuse the rotation")
        assert _roster_key(a, b.origin) == before and _listed(a, b.origin)["size"] < size
        for node in (a, c):
            node.cli("peers", "confirm-key", b.origin, rotated["vkey"])
        wait_until(
            lambda: all(_listed(n, b.origin).get("size", 0) >= size for n in (a, c)),
            timeout=30,
            message="A and C to follow the confirmed rotation",
        )
        assert _listed(a, b.origin)["vkey"] == rotated["vkey"]
        status, report = _audit(fed)
        assert (status, report["violations"]) == (0, [])
