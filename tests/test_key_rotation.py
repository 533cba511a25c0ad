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

from node.core.audit_rules import check_history
from node.core.entries import EntryBody, Grant, LedgerEntry, decode_entry, encode_entry
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
from node.core.keys import NodeIdentity, parse_verifier_key
from node.core.merkle import MemoryTree, leaf_hash
from node.core.notes import Checkpoint, sign_note, verify_note
from node.core.roster import log_id
from node.errors import BadInput, ConfigError, Conflict, Unauthorized
from node.samples import SyntheticStudy, make_ct_study
from node.services.audit import LogListing, PeerView, ServedLog, audit_views
from node.services.replication import ReplicationService
from node.services.roster import add_peer, load_roster, move_member_key
from node.services.runtime import open_runtime
from node.services.wallet import Wallet
from node.store.ledger import KeyRotated, LedgerStore, OwnLog
from node.store.node_keys import create_next_key, load_identity, retired_keys
from node.store.secrets import read_seed, write_seed
from tests.support.nodes import NodeProcess, init_node, run_cli, wait_until
from tests.test_federation import identity_of, p2p
from tests.test_ledger_api import mth, open_checkpoint, rfc_leaf

ORIGIN = "b.example/imageshare"


def rotation_entry(rotation: KeyRotation) -> LedgerEntry:
    return LedgerEntry("key_rotation", bytes(32), 1, rotation.wire_fields())


def forged_rotation(victim_key: bytes, signer: NodeIdentity, new: NodeIdentity) -> KeyRotation:
    """A "routine" rotation of the victim's key to ``new``, its old signature by ``signer``."""
    message = rotation_message(ORIGIN, victim_key, new.public_key, ROUTINE)
    return KeyRotation(victim_key, new.public_key, signer.sign(message), new.sign(message), ROUTINE)


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
        claimed = forged_rotation(self.old.public_key, hostile, hostile_new)
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


def chained(*entries: tuple[str, dict[str, Any]]) -> list[bytes]:
    """Raw entries chained by ``prev``, written by hand (no store refuses them)."""
    raws: list[bytes] = []
    for kind, fields in entries:
        prev = leaf_hash(raws[-1]) if raws else bytes(32)
        raws.append(encode_entry(LedgerEntry(kind, prev, 1, fields)))
    return raws


def signed_by(identity: NodeIdentity, raws: list[bytes]) -> str:
    root = MemoryTree([leaf_hash(r) for r in raws]).root(len(raws))
    return sign_note(Checkpoint(ORIGIN, len(raws), root).body(), identity)


class TestAuditorChain:
    """node.core.audit_rules.check_history: checkpoints under the key in force."""

    old = NodeIdentity.generate(ORIGIN)
    new = NodeIdentity.generate(ORIGIN)

    def rules(self, raws: list[bytes], note: str, anchor: NodeIdentity, **kw: Any) -> set[str]:
        key = parse_verifier_key(anchor.vkey)
        history, found = check_history(ORIGIN, key, "http://b", note, raws, **kw)
        assert history.intact == (not found)
        return {v.rule for v in found}

    def test_a_rotated_log_verifies_from_its_old_or_its_new_key(self) -> None:
        rotation = sign_rotation(self.old, self.new, self.old.public_key)
        raws = chained(("grant", {"token": b"t"}), ("key_rotation", rotation.wire_fields()))
        for anchor in (self.old, self.new):
            assert self.rules(raws, signed_by(self.new, raws), anchor) == set()
        assert self.rules(raws[:1], signed_by(self.old, raws[:1]), self.old) == set()
        # Before the rotation only the old key signs; after it only the new one.
        assert self.rules(raws[:1], signed_by(self.new, raws[:1]), self.old) == {
            "bad_checkpoint_signature"
        }
        assert self.rules(raws, signed_by(self.old, raws), self.old) == {"bad_checkpoint_signature"}

    def test_a_forged_rotation_is_a_bad_key_rotation(self) -> None:
        hostile = NodeIdentity.generate(ORIGIN)
        forged = forged_rotation(self.old.public_key, hostile, hostile)
        raws = chained(("key_rotation", forged.wire_fields()))
        assert self.rules(raws, signed_by(hostile, raws), self.old) == {"bad_key_rotation"}

    def test_a_compromised_key_rotation_counts_once_the_members_confirm_it(self) -> None:
        rotation = sign_rotation(None, self.new, self.old.public_key)
        raws = chained(("key_rotation", rotation.wire_fields()))
        note = signed_by(self.new, raws)
        assert self.rules(raws, note, self.old) == {"bad_key_rotation"}
        assert self.rules(raws, note, self.old, confirmed_key=self.new.public_key) == set()


WITNESS = ("witness", {"log_id": bytes(32), "size": 0, "root": bytes(32)})


class TestAuditorViews:
    """node.services.audit.audit_views: copies of a rotated log from several nodes."""

    old = NodeIdentity.generate(ORIGIN)
    new = NodeIdentity.generate(ORIGIN)

    def view(
        self, url: str, origin: str, raws: list[bytes], signer: NodeIdentity, listed: str = ""
    ) -> PeerView:
        listing = LogListing(ORIGIN, log_id(ORIGIN), listed or signer.vkey, len(raws))
        return PeerView(url, origin, [ServedLog(url, listing, signed_by(signer, raws), raws)], [])

    def test_a_member_that_has_not_followed_yet_is_no_violation(self) -> None:
        rotation = sign_rotation(self.old, self.new, self.old.public_key)
        raws = chained(WITNESS, ("key_rotation", rotation.wire_fields()))
        own = self.view("http://b", ORIGIN, raws, self.new)
        lagging = self.view("http://c", "c.example/imageshare", raws[:1], self.old)
        report, saved = audit_views([own, lagging], {}, now=10)
        assert report.violations == []
        assert [s.vkey for s in saved] == [self.new.vkey]
        # The same prefix signed by the new key: before the rotation, so refused.
        early = self.view("http://c", "c.example/imageshare", raws[:1], self.new)
        report, _ = audit_views([own, early], {}, now=10)
        assert {(v.rule, v.source) for v in report.violations} == {
            ("bad_checkpoint_signature", "http://c")
        }

    def test_a_node_listing_a_key_that_is_none_of_the_logs_is_a_key_mismatch(self) -> None:
        raws = chained(WITNESS)
        own = self.view("http://b", ORIGIN, raws, self.old)
        stranger = NodeIdentity.generate(ORIGIN).vkey
        liar = self.view("http://c", "c.example/imageshare", raws, self.old, listed=stranger)
        report, _ = audit_views([own, liar], {}, now=10)
        assert {(v.rule, v.source) for v in report.violations} == {("key_mismatch", "http://c")}


def grants(count: int) -> list[tuple[EntryBody, int]]:
    return [(Grant(token=i.to_bytes(4, "big")), 1_700_000_000 + i) for i in range(count)]


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
        result = own.append(rotation, 9)
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
        own.append(sign_rotation(None, new, old.public_key), 1)
        note = own.publish_checkpoint(new, 2)
        with pytest.raises(Unauthorized, match="not confirmed"):
            mirror.extend(own.entries(0, 1), note, old.vkey)
        with pytest.raises(Conflict):
            peer_store.mirror(ORIGIN, new.vkey)  # not a key of the mirror's chain yet
        mirror.extend(own.entries(0, 1), note, new.vkey)
        assert mirror.vkey == new.vkey
        assert decode_entry(mirror.entry(0)).fields["reason"] == COMPROMISED

    def test_mirror_refuses_a_forged_rotation_served_by_a_hostile_copy(
        self, stores: tuple[LedgerStore, LedgerStore], own: OwnLog
    ) -> None:
        _, peer_store = stores
        own.append_many(grants(2))
        mirror = peer_store.mirror(ORIGIN, self.old.vkey)
        mirror.extend(own.entries(0, 2), _note(own, self.old, 2))
        # A hostile member serves B's log with a rotation to its own key appended, and a
        # checkpoint of that history signed by its key.
        hostile = NodeIdentity.generate(ORIGIN)
        forged = forged_rotation(self.old.public_key, hostile, hostile)
        prev = own.leaf_hash(1)
        raw = encode_entry(LedgerEntry("key_rotation", prev, 5, forged.wire_fields()))
        root = MemoryTree([own.leaf_hash(0), prev, leaf_hash(raw)]).root(3)
        note = sign_note(Checkpoint(ORIGIN, 3, root).body(), hostile)
        with pytest.raises(Unauthorized, match="old key"):
            mirror.extend([raw], note, self.old.vkey)
        assert mirror.size() == 2 and mirror.vkey == self.old.vkey


class TestRosterFollows:
    """ReplicationService._follow_rotation: the roster moves forward along the chain only."""

    def test_roster_moves_to_a_proven_key_but_keeps_a_confirmation_ahead(
        self, tmp_path: Path
    ) -> None:
        a = init_node(tmp_path, "a.example/imageshare", "a")
        old, new = NodeIdentity.generate(ORIGIN), NodeIdentity.generate(ORIGIN)
        runtime = open_runtime(a.config)
        try:
            add_peer(runtime.config, ORIGIN, "http://127.0.0.1:9", old.vkey)
            service = ReplicationService(runtime)
            mirror = service._store().mirror(ORIGIN, old.vkey)
            # An operator confirmed a compromised-key rotation the mirror has not seen.
            move_member_key(runtime.config, ORIGIN, new.vkey)
            member = load_roster(runtime.config).get(ORIGIN)
            assert member is not None
            service._follow_rotation(member, mirror)
            assert load_roster(runtime.config).get(ORIGIN) == member
            # Once the mirror holds a proven rotation, a roster still on the old key moves.
            move_member_key(runtime.config, ORIGIN, old.vkey)
            (tmp_path / "b").mkdir()
            b_store = LedgerStore(tmp_path / "b")
            own = b_store.own_log(ORIGIN, old.vkey)
            own.append(sign_rotation(old, new, old.public_key), 1)
            mirror.extend(own.entries(0, 1), own.publish_checkpoint(new, 2))
            b_store.close()
            behind = load_roster(runtime.config).get(ORIGIN)
            assert behind is not None and behind.vkey == old.vkey
            service._follow_rotation(behind, mirror)
            moved = load_roster(runtime.config).get(ORIGIN)
            assert moved is not None and moved.vkey == new.vkey
            service.close()
        finally:
            runtime.close()


class TestKeyFiles:
    """node.store.node_keys: where the node key lives across a rotation."""

    def test_a_rotation_interrupted_after_its_entry_is_finished_on_next_load(
        self, tmp_path: Path
    ) -> None:
        old = NodeIdentity.generate(ORIGIN)
        key_path = tmp_path / "node.key"
        write_seed(key_path, old.seed)
        new = create_next_key(key_path, ORIGIN)
        # The crash: the log names the new key, the files still hold the old one.
        assert load_identity(key_path, ORIGIN, old.public_key) == old
        assert load_identity(key_path, ORIGIN, new.public_key) == new
        assert NodeIdentity(ORIGIN, read_seed(key_path)) == new
        assert [k.vkey for k in retired_keys(key_path, ORIGIN)] == [old.vkey]
        (retired,) = (tmp_path / "retired-keys").glob("*.key")
        assert retired.stat().st_mode & 0o777 == 0o600
        assert load_identity(key_path, ORIGIN, new.public_key) == new  # idempotent

    def test_a_key_in_force_held_in_no_file_is_a_clear_error(self, tmp_path: Path) -> None:
        key_path = tmp_path / "node.key"
        write_seed(key_path, NodeIdentity.generate(ORIGIN).seed)
        with pytest.raises(ConfigError, match="not in the data directory"):
            load_identity(key_path, ORIGIN, NodeIdentity.generate(ORIGIN).public_key)


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
    wallet_dir: Path
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
        yield Federation(a, b, c, wallet, base / "wallet", study, base / "audit-state")
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

        # The wallet pinned B's old key: its patient log follows the rotation in B's log.
        def patient_log_verified() -> bool:
            result = run_cli(
                "patient", "log", b.url, "--wallet", str(fed.wallet_dir), "--json", check=False
            )
            events = json.loads(result.stdout)["events"] if result.stdout else []
            return bool(events) and all(e["proof"]["log_signature"] for e in events)

        wait_until(patient_log_verified, timeout=30, message="the patient log to verify")
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
        keys = b.get_json("/admin/api/federation")["own_log"]["keys"]
        assert keys == [
            {"first_size": 0, "vkey": old_vkey},
            {"first_size": rotated["index"] + 1, "vkey": new_vkey},
        ]

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

        # The old key is archived (owner-only), never to sign again: members that
        # followed refuse a request it signs and take one the new key signs.
        (retired,) = (b.data_dir / "retired-keys").glob("*.key")
        assert retired.stat().st_mode & 0o777 == 0o600
        assert (b.data_dir / "node.key").stat().st_mode & 0o777 == 0o600
        old_identity = NodeIdentity(b.origin, read_seed(retired))
        assert old_identity.vkey == old_vkey
        assert p2p(a, old_identity, "/p2p/whoami") == (401, {"error": "bad signature"})
        assert p2p(a, identity_of(b), "/p2p/whoami")[0] == 200

    def test_compromised_key_rotation_is_followed_only_once_the_operator_confirms(
        self, fed: Federation
    ) -> None:
        a, b, c = fed.a, fed.b, fed.c
        before = _roster_key(a, b.origin)
        rotation = ["key", "rotate", "--data", str(b.data_dir), "--compromised", "--json"]
        rotated = json.loads(run_cli(*rotation).stdout)
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

    def test_confirm_key_refuses_non_members_and_misnamed_keys(self, fed: Federation) -> None:
        stranger = NodeIdentity.generate("x.example/imageshare").vkey
        refused = fed.a.cli("peers", "confirm-key", "x.example/imageshare", stranger, check=False)
        assert refused.returncode == 1 and "is not a member" in refused.stderr
        refused = fed.a.cli("peers", "confirm-key", fed.b.origin, stranger, check=False)
        assert refused.returncode == 1 and "named" in refused.stderr
        assert refused.stderr.count("\n") == 1  # one sentence, no traceback
