"""`imageshare audit` against real node processes serving real ledgers.

Logs are written into stopped nodes' ledgers with the ledger store (as the nodes would
write them, with crafted fields where a test needs a violation), patient tokens are
signed with the consent library, and the nodes then serve them over HTTP. Tampering is
done on the stored rows of a stopped node's ledger (ledger.sqlite, or the same tables on
PostgreSQL).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.config import load_config
from node.core.consent import GrantFields, sign_grant, sign_revocation, token_id_of
from node.core.entries import (
    Access,
    Denial,
    Enroll,
    EntryBody,
    Grant,
    LedgerEntry,
    Receipt,
    Revoke,
    Witness,
    decode_entry,
    encode_entry,
)
from node.core.keys import NodeIdentity
from node.core.merkle import ZERO_HASH, LeafHashes, leaf_hash
from node.core.notes import Checkpoint, sign_note
from node.core.origins import log_id
from node.core.patient_keys import PatientKey
from node.errors import BadInput
from node.services.audit import (
    LogListing,
    PeerView,
    ServedLog,
    Workers,
    audit_views,
    parse_entries_page,
    parse_listing,
    verify_grants,
)
from node.services.audit_state import AuditState
from node.store.audit_state import (
    BATCH,
    MIGRATIONS,
    STATE_FILE,
    AuditStateStore,
    JudgedRows,
    pack_items,
    unpack_items,
)
from node.store.backends import open_ledger_store
from node.store.ledger import LedgerStoreBase
from node.store.secrets import read_seed
from node.store.sqlite import open_database
from tests.support.nodes import (
    STATE_TABLES,
    NodeProcess,
    free_port,
    init_node,
    run_cli,
    wait_until,
)

NOW = int(time.time())
T0 = NOW - 100_000  # crafted entries are old enough to be judged (past the receipt grace)
WEEK = 7 * 86_400
A_ORIGIN = "a.example/imageshare"
B_ORIGIN = "b.example/imageshare"
C_ORIGIN = "c.example/imageshare"


def make_node(base: Path, origin: str, name: str | None = None) -> NodeProcess:
    """An initialised, stopped node; LAN discovery off (the audit is given URLs)."""
    node = init_node(base, origin, name)
    node.append_config("[federation]\ndiscovery = false")
    return node


def identity_of(node: NodeProcess) -> NodeIdentity:
    return NodeIdentity(node.origin, read_seed(node.data_dir / "node.key"))


def ledger_of(node: NodeProcess) -> LedgerStoreBase:
    """The ledger store the node's node.toml names (SQLite or PostgreSQL)."""
    return open_ledger_store(load_config(node.config))


def append(node: NodeProcess, items: Sequence[tuple[EntryBody, int]]) -> list[int]:
    """Append entries to a stopped node's own log and sign a checkpoint of it."""
    identity = identity_of(node)
    store = ledger_of(node)
    try:
        log = store.own_log(node.origin, identity.vkey)
        results = log.append_many(items)
        log.publish_checkpoint(identity, NOW)
    finally:
        store.close()
    return [r.index for r in results]


def mirror(into: NodeProcess, of: NodeProcess) -> None:
    """Copy ``of``'s log into ``into``'s mirror, verified, as replication would."""
    source = ledger_of(of)
    target = ledger_of(into)
    try:
        own = source.own_log(of.origin)
        note = own.checkpoint_note()
        assert note is not None
        held = target.mirror(of.origin, of.vkey)
        held.extend(own.entries(held.size(), own.size()), note)
    finally:
        source.close()
        target.close()


def ref(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


class Patient:
    """A wallet's key at one custodian, signing with the consent library."""

    def __init__(self, custodian: str, seed: bytes | None = None) -> None:
        self.key = PatientKey.derive(seed or os.urandom(32), custodian)
        self.custodian = custodian

    def enroll(self, subject: str, at: int = T0) -> tuple[Enroll, int]:
        return Enroll(subject=ref(subject), key=self.key.public_key, replaces=None), at

    def token(
        self,
        grantee: str,
        not_before: int = T0,
        expires: int = T0 + WEEK,
        scope: tuple[bytes, ...] | None = None,
    ) -> bytes:
        fields = GrantFields(
            self.key.public_key, self.custodian, grantee, scope, not_before, expires, os.urandom(16)
        )
        return sign_grant(fields, self.key.sign)

    def revocation(self, token: bytes, at: int) -> bytes:
        return sign_revocation(self.key.public_key, token_id_of(token), at, self.key.sign)


def delivered(token: bytes, study: bytes, digest: bytes) -> tuple[bytes, bytes, int, int, bytes]:
    """What an access and its receipt both record: token id, study, instances, bytes, digest."""
    return token_id_of(token), study, 3, 3000, digest


def access(token: bytes, grantee: str, study: bytes, digest: bytes) -> Access:
    return Access(*delivered(token, study, digest), grantee=grantee)


def receipt(token: bytes, custodian: str, study: bytes, digest: bytes) -> Receipt:
    return Receipt(*delivered(token, study, digest), custodian=custodian)


def recent_access(
    a: NodeProcess, b: NodeProcess, mrn: str, study: bytes, digest: bytes
) -> tuple[bytes, int]:
    """A patient enrolled at A grants B, and B's access is logged at A (mirrored by B) a
    minute ago: inside the default 300 s receipt grace. The grant token and that time."""
    patient = Patient(A_ORIGIN)
    token = patient.token(B_ORIGIN, not_before=NOW - 3600, expires=NOW + WEEK)
    # From the clock now, not the module's NOW: a slow run reaches here minutes later.
    recent = int(time.time()) - 60
    append(
        a,
        [
            patient.enroll(mrn, at=recent),
            (Grant(token=token), recent),
            (access(token, B_ORIGIN, study, digest), recent),
        ],
    )
    mirror(b, a)
    return token, recent


def audit(*urls: str, state: Path | None = None) -> tuple[int, dict[str, Any]]:
    args = ["audit", *urls, "--json"]
    if state is not None:
        args += ["--state", str(state)]
    result = run_cli(*args, check=False)
    assert result.returncode in (0, 1, 2), result.stderr
    return result.returncode, json.loads(result.stdout)


def change_kept_entry(directory: Path, origin: str, index: int) -> None:
    """Flip the first byte of one entry the state directory keeps (inside its batch)."""
    with sqlite3.connect(directory / "audit-state.sqlite") as db:
        where = "WHERE origin = ? AND first = ?"
        first = index - index % BATCH
        (raws,) = db.execute(f"SELECT raws FROM entry_batches {where}", (origin, first)).fetchone()
        batch = unpack_items(raws)
        raw = batch[index - first]
        batch[index - first] = bytes([raw[0] ^ 1]) + raw[1:]
        db.execute(f"UPDATE entry_batches SET raws = ? {where}", (pack_items(batch), origin, first))


def rules(report: dict[str, Any]) -> set[tuple[str, int | None, str]]:
    return {(v["log"], v["index"], v["rule"]) for v in report["violations"]}


def rule_names(report: dict[str, Any]) -> set[str]:
    return {v["rule"] for v in report["violations"]}


def reset(*nodes: NodeProcess) -> None:
    """Stop the nodes and forget their ledgers (and what was derived from them)."""
    for node in nodes:
        node.kill9()  # what they held is thrown away next: no need for a clean shutdown
        node.forget_state(("ledger", "consent", "federation"))


def clean_federation(a: NodeProcess, b: NodeProcess) -> tuple[NodeProcess, NodeProcess]:
    """A (custodian) and B (grantee), each mirroring the other, with one consented fetch."""
    reset(a, b)
    patient = Patient(A_ORIGIN)
    token = patient.token(B_ORIGIN)
    study, digest = ref("study-1"), ref("digest-1")
    append(
        a,
        [
            patient.enroll("mrn-1"),
            (Grant(token=token), T0 + 10),
            (access(token, B_ORIGIN, study, digest), T0 + 20),
            (
                Denial(
                    token_id=token_id_of(token),
                    requester=C_ORIGIN,
                    rule="wrong_grantee",
                    study=None,
                ),
                T0 + 30,
            ),
        ]
        + [(Witness(log_id=ref(str(i)), size=i, root=ref(f"r{i}")), T0 + 40) for i in range(12)],
    )
    append(b, [(receipt(token, A_ORIGIN, study, digest), T0 + 25)])
    mirror(b, a)
    mirror(a, b)
    return a, b


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """Nodes A and B, initialised once; each test rewrites their ledgers while stopped."""
    base = tmp_path_factory.mktemp("audit")
    a, b = make_node(base, A_ORIGIN), make_node(base, B_ORIGIN)
    yield a, b
    reset(a, b)


@pytest.fixture
def federation(nodes: tuple[NodeProcess, NodeProcess]) -> tuple[NodeProcess, NodeProcess]:
    return clean_federation(*nodes)


class StoredLedger:
    """The stopped node's stored ledger (ledger.sqlite, or its tables on PostgreSQL),
    edited behind the store's back."""

    def __init__(self, node: NodeProcess) -> None:
        self.db = node.state_database("ledger")
        [(self.log,)] = self.db.execute("SELECT id FROM logs WHERE origin=?", (node.origin,))

    def __enter__(self) -> StoredLedger:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.db.__exit__(kind, *exc)

    def data(self, index: int) -> bytes:
        [(data,)] = self.db.execute(
            "SELECT data FROM entries WHERE log=? AND idx=?", (self.log, index)
        )
        return bytes(data)

    def set_data(self, index: int, data: bytes) -> None:
        self.db.execute("UPDATE entries SET data=? WHERE log=? AND idx=?", (data, self.log, index))

    def execute(self, sql: str, *params: Any) -> None:
        self.db.execute(sql.replace(":log", str(self.log)), params)

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every stored row of the ledger, by table."""
        return {t: self.db.execute(f"SELECT * FROM {t}") for t in STATE_TABLES["ledger"]}

    def put_back(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """The ledger's tables holding ``rows`` (from ``rows()``) again, and only them."""
        for table, held in rows.items():
            self.db.execute(f"DELETE FROM {table}")
            for row in held:
                marks = ", ".join("?" * len(row))
                self.db.execute(f"INSERT INTO {table} VALUES ({marks})", row)


class TestCleanFederation:
    @pytest.fixture(scope="class")
    @classmethod
    def running(
        cls, nodes: tuple[NodeProcess, NodeProcess]
    ) -> Iterator[tuple[NodeProcess, NodeProcess]]:
        a, b = clean_federation(*nodes)
        a.start()
        b.start()
        yield a, b
        reset(a, b)

    def test_audit_of_untampered_federation_is_clean(
        self, running: tuple[NodeProcess, NodeProcess]
    ) -> None:
        a, b = running
        status, report = audit(a.url, b.url)
        assert report["violations"] == []
        assert status == 0
        logs = {log["origin"]: log for log in report["logs"]}
        assert logs[A_ORIGIN]["counts"] == {
            "enroll": 1,
            "grant": 1,
            "revoke": 0,
            "access": 1,
            "denial": 1,
            "receipt": 0,
        }
        assert logs[B_ORIGIN]["counts"]["receipt"] == 1
        assert sorted(logs[A_ORIGIN]["sources"]) == sorted([a.url, b.url])
        assert all(log["verified"] for log in logs.values())

    def test_human_report_names_every_log_and_says_clean(
        self, running: tuple[NodeProcess, NodeProcess]
    ) -> None:
        a, b = running
        result = run_cli("audit", a.url, b.url, check=False)
        assert result.returncode == 0
        assert A_ORIGIN in result.stdout and B_ORIGIN in result.stdout
        assert "clean: 2 log(s) verified" in result.stdout

    def test_unreachable_peer_exits_2(self, running: tuple[NodeProcess, NodeProcess]) -> None:
        a, _ = running
        status, report = audit(a.url, f"http://127.0.0.1:{free_port()}")
        assert status == 2
        assert len(report["unreachable"]) == 1

    def test_state_keeps_the_last_verified_checkpoint_of_each_log(
        self, running: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, b = running
        state = tmp_path / "state"
        assert audit(a.url, b.url, state=state)[0] == 0
        saved = AuditState(state).load()
        assert {origin: c.size for origin, c in saved.items()} == {A_ORIGIN: 16, B_ORIGIN: 1}
        status, report = audit(a.url, b.url, state=state)
        assert (status, report["entries_read"]) == (0, 0)


class TestStoredBytesTampering:
    def test_flipped_byte_in_stored_entry_is_located(
        self, federation: tuple[NodeProcess, NodeProcess]
    ) -> None:
        a, b = federation
        with StoredLedger(a) as ledger:  # entry 2 is the access; its last byte is a value
            data = bytearray(ledger.data(2))
            data[-1] ^= 0x01
            ledger.set_data(2, bytes(data))
        a.start()
        b.start()
        status, report = audit(a.url, b.url)
        assert status == 1
        found = {
            (v["rule"], v["index"])
            for v in report["violations"]
            if v["log"] == A_ORIGIN and v["source"] == a.url
        }
        assert ("broken_chain", 3) in found
        assert ("root_mismatch", 2) in found  # located by B's intact copy

    def test_dropped_entry_breaks_the_chain(
        self, federation: tuple[NodeProcess, NodeProcess]
    ) -> None:
        a, _ = federation
        with StoredLedger(a) as ledger:
            ledger.execute("DELETE FROM entries WHERE log=:log AND idx=5")
            # Through negatives, so that no row meets another's key on its way down.
            ledger.execute("UPDATE entries SET idx = -idx WHERE log=:log AND idx > 5")
            ledger.execute("UPDATE entries SET idx = -idx - 1 WHERE log=:log AND idx < 0")
        a.start()
        try:
            status, report = audit(a.url)
        finally:
            a.stop()
        assert status == 1
        # The node still claims 16 entries but holds 15: it serves 0..4, then stops.
        assert rule_names(report) & {"broken_chain", "entries_unavailable"}

    def test_swapped_entries_break_the_chain(
        self, federation: tuple[NodeProcess, NodeProcess]
    ) -> None:
        a, _ = federation
        with StoredLedger(a) as ledger:
            six, seven = ledger.data(6), ledger.data(7)
            ledger.set_data(6, seven)
            ledger.set_data(7, six)
        a.start()
        try:
            status, report = audit(a.url)
        finally:
            a.stop()
        assert status == 1
        assert {(A_ORIGIN, 6, "broken_chain"), (A_ORIGIN, 7, "broken_chain")} <= rules(report)
        assert (A_ORIGIN, None, "root_mismatch") in rules(report)


class TestConsentRules:
    """One federation whose custodian log breaks each consent rule once, audited once."""

    @pytest.fixture(scope="class")
    @classmethod
    def judged(cls, nodes: tuple[NodeProcess, NodeProcess]) -> dict[str, Any]:
        a, b = nodes
        reset(a, b)
        alice, bob = Patient(A_ORIGIN), Patient(A_ORIGIN)
        stranger = Patient(A_ORIGIN)  # never enrolled
        good = alice.token(B_ORIGIN)
        forged = bytearray(alice.token(B_ORIGIN))
        forged[-1] ^= 1  # the signature is the token's last field
        revoked = alice.token(B_ORIGIN)
        short = alice.token(B_ORIGIN, expires=T0 + 100)
        to_c = alice.token(C_ORIGIN)
        unenrolled = stranger.token(B_ORIGIN)
        scoped = bob.token(B_ORIGIN, scope=(ref("bob-study"),))
        ghost = os.urandom(40)  # stands for a token that was never granted
        late = T0 + 5000  # after the short token's expiry
        s, d = ref("study"), ref("digest")
        items: list[tuple[EntryBody, int]] = [
            alice.enroll("mrn-alice"),  # 0
            bob.enroll("mrn-bob"),  # 1
            (Grant(token=good), T0 + 1),  # 2
            (access(good, B_ORIGIN, s, d), T0 + 2),  # 3: clean
            (Grant(token=bytes(forged)), T0 + 3),  # 4: grant_bad_signature
            (access(ghost, B_ORIGIN, s, d), T0 + 4),  # 5: no grant
            (Grant(token=revoked), T0 + 5),  # 6
            (Revoke(revocation=alice.revocation(revoked, T0 + 6)), T0 + 6),  # 7
            (access(revoked, B_ORIGIN, s, d), T0 + 7),  # 8: after revocation
            (Grant(token=short), T0 + 8),  # 9
            (access(short, B_ORIGIN, s, d), late),  # 10: after expiry
            (access(good, B_ORIGIN, ref("other"), d), late + 11),  # 11: no receipt
            (Grant(token=to_c), late + 12),  # 12
            (access(to_c, B_ORIGIN, s, d), late + 13),  # 13: wrong grantee
            (Grant(token=unenrolled), late + 14),  # 14: grant_unenrolled_key
            (Revoke(revocation=bob.revocation(good, late + 15)), late + 15),  # 15: not alice
            (Grant(token=scoped), late + 16),  # 16
            (access(scoped, B_ORIGIN, ref("not-bob"), d), late + 17),  # 17: out of scope
            (access(good, B_ORIGIN, s, d), late + 18),  # 18: still fine after 15
        ]
        # A witnessed B's log at size 1: once truly (19), once with another root (20).
        b_first = receipt(good, A_ORIGIN, s, d)
        b_root = leaf_hash(encode_entry(LedgerEntry.of(ZERO_HASH, T0 + 20, b_first)))
        b_log_id = hashlib.sha256(B_ORIGIN.encode()).digest()
        items += [
            (Witness(log_id=b_log_id, size=1, root=b_root), late + 19),  # 19
            (Witness(log_id=b_log_id, size=1, root=ref("forked")), late + 19),  # 20
            (Witness(log_id=ref("z"), size=1, root=ref("z")), T0),  # 21: backdated
        ]
        append(a, items)
        append(
            b,
            [
                (receipt(t, A_ORIGIN, study, d), T0 + 20)
                for t, study in [
                    (good, s),
                    (revoked, s),
                    (short, s),
                    (to_c, s),
                    (scoped, ref("not-bob")),
                    (good, s),
                    (ghost, s),
                ]
            ]
            + [(receipt(os.urandom(40), A_ORIGIN, s, d), T0 + 21)],  # 7: no access
        )
        a.start()
        b.start()
        try:
            status, report = audit(a.url, b.url)
        finally:
            reset(a, b)
        return {"status": status, "report": report, "rules": rules(report)}

    @pytest.mark.parametrize(
        ("log", "index", "rule"),
        [
            (A_ORIGIN, 4, "grant_bad_signature"),
            (A_ORIGIN, 5, "access_without_grant"),
            (A_ORIGIN, 8, "access_after_revocation"),
            (A_ORIGIN, 10, "access_outside_validity"),
            (A_ORIGIN, 11, "access_without_receipt"),
            (A_ORIGIN, 13, "access_wrong_grantee"),
            (A_ORIGIN, 14, "grant_unenrolled_key"),
            (A_ORIGIN, 15, "revocation_bad_signature"),
            (A_ORIGIN, 17, "access_out_of_scope"),
            (B_ORIGIN, 7, "receipt_without_access"),
            (A_ORIGIN, 20, "witness_mismatch"),
            (A_ORIGIN, 21, "time_out_of_order"),
        ],
    )
    def test_broken_rule_is_named_with_log_and_index(
        self, judged: dict[str, Any], log: str, index: int, rule: str
    ) -> None:
        assert (log, index, rule) in judged["rules"]
        assert judged["status"] == 1

    def test_consented_accesses_are_not_flagged(self, judged: dict[str, Any]) -> None:
        flagged = {(log, index) for log, index, _ in judged["rules"]}
        assert (A_ORIGIN, 3) not in flagged
        assert (A_ORIGIN, 18) not in flagged
        assert (A_ORIGIN, 19) not in flagged
        expected = 12
        assert len(judged["rules"]) == expected, judged["report"]["violations"]


class TestViews:
    def test_node_serving_a_forked_history_is_a_split_view_and_an_equivocation(
        self, federation: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, _ = federation
        # A second process holding A's key serves another history of A's log (the same
        # first entries, then a different one) to witness W, which mirrors A's real log
        # and replicates from the fork: W keeps the two signed notes as a proof.
        fork = make_node(tmp_path, A_ORIGIN, name="a_fork")
        shutil.copy(a.data_dir / "node.key", fork.data_dir / "node.key")
        source = ledger_of(a)
        try:
            first = [decode_entry(e) for e in source.own_log(A_ORIGIN).entries(0, 4)]
        finally:
            source.close()
        append(fork, [(e.body, e.time) for e in first])
        append(fork, [(Witness(log_id=ref("x"), size=1, root=ref("y")), T0 + 99)])
        witness = make_node(tmp_path, "w.example/imageshare")
        mirror(witness, a)
        witness.append_config(
            f'[[peers]]\norigin = "{A_ORIGIN}"\nurl = "{fork.url}"\nvkey = "{a.vkey}"'
        )
        fork.start()
        witness.start()
        try:
            wait_until(
                lambda: witness.get_json("/ledger/equivocations", auth=False),
                message="the witness to keep an equivocation proof",
            )
            status, report = audit(fork.url, witness.url)
        finally:
            fork.stop()
            witness.stop()
        assert status == 1
        found = {(v["log"], v["rule"], v["source"]) for v in report["violations"]}
        assert (A_ORIGIN, "split_view", witness.url) in found
        assert (A_ORIGIN, "equivocation", witness.url) in found

    def test_log_rolled_back_between_two_audits(
        self, nodes: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, b = nodes
        reset(a, b)
        append(
            a,
            [(Witness(log_id=ref("x"), size=i, root=ref("y")), T0) for i in range(5)],
        )
        with StoredLedger(a) as ledger:
            backup = ledger.rows()
        append(
            a,
            [(Witness(log_id=ref("x"), size=i, root=ref("y")), T0) for i in range(5, 9)],
        )
        state = tmp_path / "audit-state"
        a.start()
        try:
            first_status, _ = audit(a.url, state=state)
            a.stop()
            with StoredLedger(a) as ledger:
                ledger.put_back(backup)
            a.start()
            second_status, report = audit(a.url, state=state)
        finally:
            a.stop()
        assert first_status == 0
        assert second_status == 1
        assert (A_ORIGIN, 5, "rollback") in rules(report)

    def test_log_rewritten_between_two_audits_is_a_fork(
        self, nodes: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, b = nodes
        reset(a, b)
        witnessed = [(Witness(log_id=ref("x"), size=i, root=ref("y")), T0) for i in range(6)]
        append(a, witnessed)
        state = tmp_path / "audit-state"
        a.start()
        try:
            first_status, _ = audit(a.url, state=state)
            # The node's operator rewrites history with the node key: entry 3 differs, and
            # the log grows past what the auditor saw, all validly signed.
            reset(a)
            changed = Witness(log_id=ref("x"), size=3, root=ref("changed"))
            append(a, [*witnessed[:3], (changed, T0), *witnessed[4:], *witnessed])
            a.start()
            second_status, report = audit(a.url, state=state)
        finally:
            a.stop()
        assert (first_status, second_status) == (0, 1)
        assert (A_ORIGIN, None, "fork") in rules(report)


class TestAuditState:
    """--state: a rerun reads and judges only what is new, resuming from what the rules
    kept, and still judges every rule over the whole history."""

    def test_rerun_reads_and_judges_only_the_entries_after_the_saved_checkpoint(
        self, federation: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, b = federation  # A's log of 16 and B's of 1, each also mirrored by the other
        state = tmp_path / "state"
        a.start()
        b.start()
        first_status, first = audit(a.url, b.url, state=state)
        a.stop()
        b.stop()
        # 300 more: the rest of the partial bundle A's log ended in, then a new one.
        append(a, [(Witness(log_id=ref("w"), size=i, root=ref("w")), T0 + 50) for i in range(300)])
        mirror(b, a)
        a.start()
        b.start()
        second_status, second = audit(a.url, b.url, state=state)
        third_status, third = audit(a.url, b.url, state=state)
        read = {log["origin"]: log["entries_read"] for log in second["logs"]}
        judged = {log["origin"]: log["entries_judged"] for log in second["logs"]}
        assert (first_status, second_status, third_status) == (0, 0, 0)
        assert first["entries_read"] == 2 * (16 + 1) and first["entries_judged"] == 16 + 1
        assert read == {A_ORIGIN: 2 * 300, B_ORIGIN: 0}  # from A and from its mirror on B
        assert judged == {A_ORIGIN: 300, B_ORIGIN: 0}  # each distinct entry once
        assert second["logs"][0]["size"] == 316
        assert (third["entries_read"], third["entries_judged"]) == (0, 0)
        assert [log["counts"] for log in third["logs"]] == [log["counts"] for log in second["logs"]]
        modes = [path.stat().st_mode & 0o777 for path in (state, state / "audit-state.sqlite")]
        assert modes == [0o700, 0o600]

    def test_access_against_a_grant_revoked_in_an_earlier_run_is_caught_and_a_foreign_state_refused(
        self, nodes: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, b = nodes
        reset(a, b)
        patient = Patient(A_ORIGIN)
        token = patient.token(B_ORIGIN)
        revoke = Revoke(revocation=patient.revocation(token, T0 + 2))
        append(a, [patient.enroll("mrn-1"), (Grant(token=token), T0 + 1), (revoke, T0 + 2)])
        append(b, [(Witness(log_id=ref("w"), size=0, root=ref("w")), T0)])
        state = tmp_path / "state"
        a.start()
        b.start()
        first_status, _ = audit(a.url, b.url, state=state)
        # The two nodes are also two federations of one node each (neither mirrors).
        a_alone = tmp_path / "a-alone"
        assert audit(a.url, state=a_alone)[0] == 0
        foreign = run_cli("audit", b.url, "--state", str(a_alone), check=False)
        assert foreign.returncode == 1 and "another federation" in foreign.stderr
        a.stop()
        b.stop()
        study, digest = ref("study"), ref("digest")
        append(a, [(access(token, B_ORIGIN, study, digest), T0 + 3)])
        append(b, [(receipt(token, A_ORIGIN, study, digest), T0 + 4)])
        a.start()
        b.start()
        second_status, second = audit(a.url, b.url, state=state)
        third_status, third = audit(a.url, b.url, state=state)
        assert (first_status, second_status, third_status) == (0, 1, 1)
        # Only the access and its receipt are judged, against the revocation kept.
        assert (second["entries_read"], second["entries_judged"]) == (2, 2)
        assert rules(second) == {(A_ORIGIN, 3, "access_after_revocation")}
        # Saved with its finding: the next run reads and judges nothing, reports it again.
        assert (third["entries_read"], third["entries_judged"]) == (0, 0)
        assert rules(third) == rules(second)

    def test_access_still_awaiting_its_receipt_is_judged_on_a_later_run(
        self, federation: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, b = federation
        recent_access(a, b, "mrn-2", ref("s2"), ref("d2"))
        state = tmp_path / "state"
        a.start()
        b.start()
        first_status, _ = audit(a.url, b.url, state=state)
        args = ["audit", a.url, b.url, "--json", "--state", str(state), "--receipt-grace", "0"]
        result = run_cli(*args, check=False)
        report = json.loads(result.stdout)
        assert (first_status, result.returncode) == (0, 1)
        assert (report["entries_read"], report["entries_judged"]) == (0, 0)
        assert rules(report) == {(A_ORIGIN, 18, "access_without_receipt")}

    def test_receipt_recorded_after_a_run_settles_the_access_that_run_saw_pending(
        self, federation: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, b = federation
        study, digest = ref("s3"), ref("d3")
        token, recent = recent_access(a, b, "mrn-3", study, digest)
        state = tmp_path / "state"
        a.start()
        b.start()
        first_status, _ = audit(a.url, b.url, state=state)
        a.stop()
        b.stop()
        append(b, [(receipt(token, A_ORIGIN, study, digest), recent + 1)])
        mirror(a, b)
        a.start()
        b.start()
        graceless = ["--json", "--receipt-grace", "0"]
        rerun = run_cli("audit", a.url, b.url, "--state", str(state), *graceless, check=False)
        fresh = run_cli("audit", a.url, b.url, *graceless, check=False)
        second, whole = json.loads(rerun.stdout), json.loads(fresh.stdout)
        assert (first_status, rerun.returncode, fresh.returncode) == (0, 0, 0)
        assert second["entries_read"] == 2  # the receipt, from B and from its mirror on A
        # The receipt alone is judged; the access it settles was kept pending.
        assert second["entries_judged"] == 1 and whole["entries_judged"] > 1
        assert rules(second) == rules(whole) == set()

    def test_tampered_or_truncated_state_is_refused_with_a_clear_error(
        self, federation: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, b = federation
        a.start()
        b.start()
        state = tmp_path / "state"
        assert audit(a.url, b.url, state=state)[0] == 0
        entry_flipped, size_changed = tmp_path / "entry-flipped", tmp_path / "size-changed"
        truncated = tmp_path / "truncated"
        for copy in (entry_flipped, size_changed, truncated):
            shutil.copytree(state, copy)
        cut = truncated / "audit-state.sqlite"
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
        change_kept_entry(entry_flipped, A_ORIGIN, 3)
        with sqlite3.connect(size_changed / "audit-state.sqlite") as db:
            db.execute("DELETE FROM entry_batches WHERE origin = ?", (A_ORIGIN,))
            db.execute("UPDATE logs SET size = 0 WHERE origin = ?", (A_ORIGIN,))
        result = run_cli("audit", a.url, b.url, "--state", str(entry_flipped), check=False)
        assert result.returncode == 1
        assert f"audit state of {A_ORIGIN} is tampered" in result.stderr
        result = run_cli("audit", a.url, b.url, "--state", str(truncated), check=False)
        assert result.returncode == 1 and result.stdout == ""
        assert "audit state" in result.stderr and "corrupt" in result.stderr
        with pytest.raises(BadInput, match="fields are not the signed checkpoint's"):
            AuditState(size_changed).load()

    def test_rerun_from_the_saved_right_edge_finds_what_a_whole_audit_finds(
        self, federation: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, b = federation
        patient = Patient(A_ORIGIN)
        token = patient.token(B_ORIGIN)
        revoke = Revoke(revocation=patient.revocation(token, T0 + 60))
        append(a, [patient.enroll("mrn-9", T0 + 50), (Grant(token=token), T0 + 51)])
        mirror(b, a)
        state = tmp_path / "state"
        a.start()
        b.start()
        assert audit(a.url, b.url, state=state)[0] == 0
        a.stop()
        b.stop()
        study, digest = ref("late"), ref("late-digest")
        append(a, [(revoke, T0 + 60), (access(token, B_ORIGIN, study, digest), T0 + 61)])
        append(b, [(receipt(token, A_ORIGIN, study, digest), T0 + 62)])
        mirror(b, a)
        mirror(a, b)
        a.start()
        b.start()
        rerun_status, rerun = audit(a.url, b.url, state=state)
        whole_status, whole = audit(a.url, b.url)
        with sqlite3.connect(state / "audit-state.sqlite") as db:
            edges = db.execute("SELECT origin, length(edge) FROM logs ORDER BY origin").fetchall()
        assert (rerun_status, whole_status) == (1, 1)
        assert rerun["entries_read"] == 2 * 3  # each new entry, from its node and its mirror
        assert rules(rerun) == rules(whole) == {(A_ORIGIN, 19, "access_after_revocation")}
        assert [log["counts"] for log in rerun["logs"]] == [log["counts"] for log in whole["logs"]]
        # A's 20 entries: subtrees of 16 and 4; B's 2: one of 2.
        assert edges == [(A_ORIGIN, 2 * 32), (B_ORIGIN, 32)]

    def test_state_whose_right_edge_or_kept_entries_were_changed_is_refused(
        self, federation: tuple[NodeProcess, NodeProcess], tmp_path: Path
    ) -> None:
        a, b = federation
        append(a, [(Witness(log_id=ref("odd"), size=1, root=ref("odd")), T0 + 50)])
        mirror(b, a)  # A's log: 17 entries, its right edge a subtree of 16 and the last leaf
        a.start()
        b.start()
        state = tmp_path / "state"
        assert audit(a.url, b.url, state=state)[0] == 0
        edge, last, early = tmp_path / "edge", tmp_path / "last", tmp_path / "early"
        for copy in (edge, last, early):
            shutil.copytree(state, copy)

        def flip(directory: Path, sql: str) -> None:
            with sqlite3.connect(directory / "audit-state.sqlite") as db:
                db.create_function("flip", 1, lambda raw: bytes([raw[0] ^ 1]) + raw[1:])
                db.execute(sql, (A_ORIGIN,))

        flip(edge, "UPDATE logs SET edge = flip(edge) WHERE origin = ?")
        change_kept_entry(last, A_ORIGIN, 16)
        # An entry inside the edge's large subtree is checked when the entries are read
        # back: here because, without what judging them left, they are judged again.
        change_kept_entry(early, A_ORIGIN, 3)
        with sqlite3.connect(early / "audit-state.sqlite") as db:
            db.execute("DELETE FROM judged WHERE origin = ?", (A_ORIGIN,))
        for tampered in (edge, last, early):
            result = run_cli("audit", a.url, b.url, "--state", str(tampered), check=False)
            assert result.returncode == 1 and result.stdout == ""
            assert f"audit state of {A_ORIGIN} is tampered" in result.stderr

    def test_kept_entries_in_batches_read_back_whole_from_any_index_as_the_log_grows(
        self, tmp_path: Path
    ) -> None:
        raws = [b""] + [i.to_bytes(3) * (i % 7) for i in range(1, 2 * BATCH + 90)]
        halves = [bytes([i % 256]) * (i % 5) for i in range(BATCH + 1)]
        pairs = [(i.to_bytes(2), bytes(i % 3)) for i in range(BATCH + 3)]
        store = AuditStateStore(tmp_path)
        try:
            for size in (BATCH - 1, BATCH + 5, len(raws), 3):  # grows (a short batch), shrinks
                judged = JudgedRows(b"state", {"grants": pairs}, halves)
                store.save("o", "k", size, b"r", "n", raws[:size], judged)
                assert [row.entries_kept for row in store.logs()] == [size]
                assert list(store.entries("o")) == raws[:size]
            store.save("o", "k", len(raws), b"r", "n", raws)
            for start in (0, 1, BATCH - 1, BATCH, BATCH + 7, len(raws) - 1, len(raws)):
                assert list(store.entries("o", start)) == raws[start:]
            store.save("o", "k", 3, b"r", "n", raws[:3], judged)
            assert list(store.judged_map("o", "grants")) == pairs
            assert list(store.judged_halves("o")) == halves
        finally:
            store.close()

    def test_batch_cut_or_miscounted_or_missing_is_refused_not_half_read(
        self, tmp_path: Path
    ) -> None:
        raws = [bytes([i % 256]) * 40 for i in range(2 * BATCH + 1)]
        changes = {
            "cut": "UPDATE entry_batches SET raws = substr(raws, 1, 100) WHERE first = 0",
            "miscounted": f"UPDATE entry_batches SET count = count - 1 WHERE first = {BATCH}",
            "missing": f"DELETE FROM entry_batches WHERE first = {BATCH}",
            "halves cut": "UPDATE judged_halves SET halves = x'00000009aa'",
        }
        for name, sql in changes.items():
            store = AuditStateStore(tmp_path / name)
            judged = JudgedRows(b"state", {}, [b"half"])
            store.save("o", "k", len(raws), b"r", "n", raws, judged)
            store.close()
            with sqlite3.connect(tmp_path / name / STATE_FILE) as db:
                db.execute(sql)
            store = AuditStateStore(tmp_path / name)
            try:
                with pytest.raises(ValueError, match=r"missing|cut"):  # entries, else halves
                    list(store.entries("o"))
                    list(store.judged_halves("o"))
            finally:
                store.close()

    def test_state_saved_a_row_per_entry_loads_its_entries_and_judges_them_again(
        self, tmp_path: Path
    ) -> None:
        raws = [bytes([i % 256]) * 30 for i in range(BATCH + 10)]
        old = open_database(tmp_path / STATE_FILE, MIGRATIONS[:3])
        with old:
            old.execute("INSERT INTO logs VALUES ('o', 'k', ?, x'00', 'n', x'11')", (len(raws),))
            old.executemany("INSERT INTO entries VALUES ('o', ?, ?)", enumerate(raws))
            old.execute("INSERT INTO judged VALUES ('o', x'00')")
            old.execute("INSERT INTO judged_halves VALUES ('o', x'01')")
        old.close()
        store = AuditStateStore(tmp_path)
        try:
            [row] = store.logs()
            assert (row.size, row.entries_kept, row.edge) == (len(raws), len(raws), b"\x11")
            assert list(store.entries("o")) == raws
            assert store.judged_state("o") is None  # what judging left: made again
            assert list(store.judged_halves("o")) == []
        finally:
            store.close()

    def test_missing_directory_is_an_empty_state(self, tmp_path: Path) -> None:
        assert AuditState(tmp_path / "none").load() == {}

    def test_garbage_state_file_is_refused_not_ignored(self, tmp_path: Path) -> None:
        (tmp_path / "audit-state.sqlite").write_bytes(b"not a database" * 100)
        with pytest.raises(BadInput, match="corrupt"):
            AuditState(tmp_path).load()


def consented_stories(patients: int) -> tuple[list[bytes], list[bytes]]:
    """A's log (per patient: enroll, grant, two accesses) and B's (the two receipts), as
    wire bytes chained as each node would write them; every access consented."""
    key = PatientKey.derive(ref("one wallet for every story"), A_ORIGIN)
    a_items: list[tuple[EntryBody, int]] = []
    b_items: list[tuple[EntryBody, int]] = []
    for patient in range(patients):
        t = T0 + 10 * patient
        fields = GrantFields(
            key.public_key, A_ORIGIN, B_ORIGIN, None, T0, T0 + WEEK, patient.to_bytes(16, "big")
        )
        token = sign_grant(fields, key.sign)
        a_items += [(Enroll(subject=ref(f"s{patient}"), key=key.public_key, replaces=None), t)]
        a_items += [(Grant(token=token), t + 1)]
        for fetch in range(2):
            study, digest = ref(f"study{patient}"), ref(f"d{patient}.{fetch}")
            a_items.append((access(token, B_ORIGIN, study, digest), t + 2))
            b_items.append((receipt(token, A_ORIGIN, study, digest), t + 3))
    return chained(a_items), chained(b_items)


def chained(items: Sequence[tuple[EntryBody, int]]) -> list[bytes]:
    raws, prev = [], ZERO_HASH
    for body, at in items:
        raws.append(encode_entry(LedgerEntry.of(prev, at, body)))
        prev = leaf_hash(raws[-1])
    return raws


def served(identity: NodeIdentity, raws: list[bytes]) -> PeerView:
    """A node serving its own log of ``raws``, under a checkpoint it signed."""
    root = LeafHashes([leaf_hash(raw) for raw in raws]).root()
    note = sign_note(Checkpoint(identity.origin, len(raws), root).body(), identity)
    listing = LogListing(identity.origin, log_id(identity.origin), identity.vkey, len(raws))
    url = f"http://{identity.origin.split('/')[0]}"
    return PeerView(url, identity.origin, [ServedLog(url, listing, note, raws)], [])


class TestBoundedMemory:
    """What the auditor holds does not grow with the entries: the consent state beyond
    small caches waits on disk, and entries are held a batch at a time."""

    def test_memory_held_per_entry_stays_far_below_the_entries(self) -> None:
        a, b = NodeIdentity.generate(A_ORIGIN), NodeIdentity.generate(B_ORIGIN)
        peaks = {}
        for patients in (2500, 5000):
            a_log, b_log = consented_stories(patients)
            views = [served(a, a_log), served(b, b_log)]
            entries = len(a_log) + len(b_log)
            tracemalloc.start()
            report, _ = audit_views(views, {}, NOW, workers=Workers(processes=1))
            peaks[entries] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert report.violations == [] and report.logs[0].size == 4 * patients
        (small, low), (large, high) = sorted(peaks.items())
        # An entry is ~200 bytes on the wire and ~900 decoded; holding them cost 2.4 KB an
        # entry. Now the peak grows by its 32-byte leaf hash, plus how full the bounded
        # buffers (a batch being judged, halves and keys waiting to be written) happen to be.
        assert (high - low) / (large - small) < 400

    @given(st.binary(max_size=200))
    def test_entries_page_parser_raises_only_bad_input(self, body: bytes) -> None:
        try:
            page = parse_entries_page(body)
        except BadInput:
            return
        assert all(isinstance(entry, bytes) for entry in page)

    @given(st.recursive(st.none() | st.integers() | st.text(max_size=8), st.lists, max_leaves=8))
    def test_listing_parser_raises_only_bad_input(self, document: object) -> None:
        try:
            listings = parse_listing(document)
        except BadInput:
            return
        assert isinstance(listings, list)

    def test_listing_rows_need_every_field_with_its_type(self) -> None:
        good = {"origin": A_ORIGIN, "log_id": "00", "vkey": "k", "size": 1}
        assert parse_listing([good])[0].size == 1
        for broken in (
            {**good, "size": -1},
            {**good, "size": True},
            {**good, "vkey": None},
            {**good, "origin": "has space.example/x"},  # not a node origin: the one rule
            {**good, "origin": "ab"},
        ):
            with pytest.raises(BadInput):
                parse_listing([broken])


class TestWorkers:
    def test_process_pool_gives_the_in_process_results(self) -> None:
        patient = Patient(A_ORIGIN)
        tokens = [patient.token(B_ORIGIN) for _ in range(6)]
        tokens[2] = tokens[2][:-1] + bytes([tokens[2][-1] ^ 1])  # a bad signature
        tokens.append(b"not a token")
        alone = Workers(processes=1).map_chunks(verify_grants, tokens)
        pool = Workers(processes=2, threshold=1)
        try:
            spread = pool.map_chunks(verify_grants, tokens)
        finally:
            pool.close()
        assert spread == alone
        assert [ok for _, ok in spread] == [True, True, False, True, True, True, False]
        assert spread[-1][0] is None


class TestAuditCommand:
    def test_audit_loads_neither_the_other_commands_nor_their_libraries(self) -> None:
        """Its peak memory counts the program's: `imageshare audit` parses with its own
        module alone, while `imageshare --help` still lists every command."""
        probe = (
            "import sys; from node.edges.cli import build_parser;"
            " build_parser('audit').parse_args(['audit', 'http://127.0.0.1:1']);"
            " print(' '.join(sorted(sys.modules)))"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        )
        loaded = set(result.stdout.split())
        assert "node.edges.cli.audit_commands" in loaded
        heavy = {"pydicom", "numpy", "PIL", "joserfc", "node.edges.cli.node_commands"}
        assert loaded.isdisjoint(heavy)
        listed = run_cli("--help").stdout
        assert all(name in listed for name in ("audit", "import", "peers", "patient", "proof"))
