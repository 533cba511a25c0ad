"""C2SP tlog-witness: a node's POST /witness/add-checkpoint, spoken to with requests built
by hand from the spec, every answer the spec gives for its case; and two nodes that
cosign each other's logs through it, with a witness policy that says when a checkpoint
counts as published."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from nacl.signing import VerifyKey

from node.core.consent import GrantFields, sign_grant, token_id_of
from node.core.entries import Access, Grant
from node.core.equivocation import EquivocationProof, verify_equivocation
from node.core.keys import NodeIdentity
from node.core.merkle import MemoryTree, consistency_proof, leaf_hash
from node.core.notes import (
    MAX_SIGNATURES,
    Checkpoint,
    cosign_checkpoint,
    parse_note,
    parse_vkey,
    sign_note,
    verify_cosignature,
    verify_note,
)
from node.core.patient_keys import PatientKey
from node.core.proof_file import parse_tlog_proof, verify_tlog_proof
from node.core.witness import (
    MAX_PROOF_LINES,
    WitnessPolicy,
    WitnessRefusal,
    parse_add_checkpoint,
    parse_cosignature_lines,
    with_cosignature,
)
from node.errors import BadInput, Unauthorized
from node.services.proof_export import export_proof
from node.store.ledger import LedgerStore
from tests.support.browser import chromium_session
from tests.support.nodes import (
    NodeProcess,
    init_node,
    peer_each_other,
    run_cli,
    wait_until,
)

LOG_ORIGIN = "log.example/imageshare"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class FakeLog:
    """A member's log held in the test: its entries' tree and its key."""

    def __init__(self, identity: NodeIdentity, leaves: int = 0) -> None:
        self.identity = identity
        self.tree = MemoryTree([leaf_hash(b"entry %d" % i) for i in range(leaves)])

    def grow(self, count: int, salt: bytes = b"") -> None:
        for _ in range(count):
            self.tree.append(leaf_hash(b"entry %d" % self.tree.size + salt))

    def note(self, size: int | None = None, signer: NodeIdentity | None = None) -> str:
        size = self.tree.size if size is None else size
        body = Checkpoint(self.identity.origin, size, self.tree.root(size)).body()
        return sign_note(body, signer or self.identity)

    def request(self, old: int, proof: list[bytes] | None = None, note: str = "") -> bytes:
        """A hand-built add-checkpoint body: old line, proof lines, blank line, note."""
        if proof is None:
            proof = consistency_proof(self.tree, old, self.tree.size)
        lines = [f"old {old}", *(b64(h) for h in proof)]
        return ("\n".join(lines) + "\n\n" + (note or self.note())).encode()


def post(node: NodeProcess, body: bytes) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=30)
    try:
        conn.request("POST", "/witness/add-checkpoint", body=body)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


def check_cosignature_by_hand(line: str, witness_vkey: str, checkpoint_body: str) -> int:
    """Verify a cosignature/v1 line from the spec alone; returns its timestamp."""
    name, _, key_b64 = witness_vkey.split("+", 2)
    public_key = base64.b64decode(key_b64)[1:]
    dash, signer, value = line.rstrip("\n").split(" ")
    raw = base64.b64decode(value)
    assert dash == "—" and signer == name and len(raw) == 4 + 8 + 64
    cosigner_id = hashlib.sha256(name.encode() + b"\n\x04" + public_key).digest()[:4]
    assert raw[:4] == cosigner_id
    (timestamp,) = struct.unpack(">Q", raw[4:12])
    message = f"cosignature/v1\ntime {timestamp}\n{checkpoint_body}".encode()
    VerifyKey(public_key).verify(message, raw[12:])  # raises if bad
    return int(timestamp)


@pytest.fixture(scope="module")
def witnesses() -> list[NodeIdentity]:
    """More witnesses than a note may carry signatures."""
    return [NodeIdentity.generate(f"w{i}.example/imageshare") for i in range(MAX_SIGNATURES + 20)]


class TestCosignaturesANoteCanCarry:
    """A federation has more members than a note may carry signatures (Go refuses > 100)."""

    @staticmethod
    def cosigned_by(note: str, witnesses: list[NodeIdentity], preferred: set[str]) -> str:
        body = parse_note(note)[0]
        for witness in witnesses:
            updated = with_cosignature(note, cosign_checkpoint(body, witness, 7), preferred)
            note = note if updated is None else updated
        return note

    def test_a_full_note_keeps_the_first_cosignatures_and_still_verifies(
        self, witnesses: list[NodeIdentity]
    ) -> None:
        log = FakeLog(NodeIdentity.generate(LOG_ORIGIN), leaves=3)
        note = self.cosigned_by(log.note(), witnesses, preferred=set())
        body, signatures = parse_note(note)
        assert len(signatures) == MAX_SIGNATURES
        assert signatures[0].name == LOG_ORIGIN
        assert [s.name for s in signatures[1:]] == [
            w.origin for w in witnesses[: MAX_SIGNATURES - 1]
        ]
        verify_note(note, log.identity.vkey)
        for witness, signature in zip(witnesses, signatures[1:], strict=False):
            assert verify_cosignature(body, signature, witness.vkey) is not None

    def test_a_policy_witness_arriving_last_takes_the_place_of_one_the_policy_does_not_count(
        self, witnesses: list[NodeIdentity]
    ) -> None:
        log = FakeLog(NodeIdentity.generate(LOG_ORIGIN), leaves=3)
        late = [witnesses[-1].origin, witnesses[-2].origin]
        note = self.cosigned_by(log.note(), witnesses, preferred=set(late))
        names = [s.name for s in parse_note(note)[1]]
        assert len(names) == MAX_SIGNATURES and names[0] == LOG_ORIGIN
        assert set(late) <= set(names)
        policy = WitnessPolicy((parse_vkey(witnesses[-1].vkey), parse_vkey(witnesses[-2].vkey)), 2)
        assert policy.met_by(note)

    def test_a_full_note_of_policy_witnesses_drops_the_next_and_a_refresh_replaces_in_place(
        self, witnesses: list[NodeIdentity]
    ) -> None:
        log = FakeLog(NodeIdentity.generate(LOG_ORIGIN), leaves=3)
        everyone = {w.origin for w in witnesses}
        full = self.cosigned_by(log.note(), witnesses[: MAX_SIGNATURES - 1], everyone)
        body = parse_note(full)[0]
        assert with_cosignature(full, cosign_checkpoint(body, witnesses[-1], 7), everyone) is None
        again = with_cosignature(full, cosign_checkpoint(body, witnesses[0], 9), everyone)
        assert again is not None
        signatures = parse_note(again)[1]
        assert len(signatures) == MAX_SIGNATURES
        refreshed = [s for s in signatures if s.name == witnesses[0].origin]
        assert len(refreshed) == 1
        assert verify_cosignature(body, refreshed[0], witnesses[0].vkey) == 9


class TestRequestFormat:
    def test_a_well_formed_request_parses(self) -> None:
        log = FakeLog(NodeIdentity(LOG_ORIGIN, os.urandom(32)), 5)
        log.grow(3)
        request = parse_add_checkpoint(log.request(5))
        assert request.old_size == 5 and request.checkpoint.size == 8
        assert list(request.proof) == consistency_proof(log.tree, 5, 8)
        assert parse_add_checkpoint(request.encode()) == request

    @pytest.mark.parametrize(
        "body",
        [
            b"old 0\n",  # no blank line, no checkpoint
            b"old 01\n\n",  # not canonical decimal
            b"old -1\n\n",
            b"new 0\n\n",
            b"old 0\nnot base64!\n\n",
            b"old 0\n" + b64(b"x" * 31).encode() + b"\n\n",  # not 32 bytes
            b"old 0\n" + (b64(bytes(32)).encode() + b"\n") * (MAX_PROOF_LINES + 1) + b"\n",
            b"old 0\n\nnot a checkpoint\n",
            b"old 0\n\xff\n\n",
            b"old 0\n\n" + b"x" * 70_000,
        ],
    )
    def test_malformed_requests_are_400(self, body: bytes) -> None:
        log = FakeLog(NodeIdentity(LOG_ORIGIN, os.urandom(32)), 1)
        if body.endswith(b"\n\n"):
            body += log.note().encode()
        with pytest.raises(WitnessRefusal) as refused:
            parse_add_checkpoint(body)
        assert refused.value.http_status == 400

    def test_old_size_beyond_the_checkpoint_is_400(self) -> None:
        log = FakeLog(NodeIdentity(LOG_ORIGIN, os.urandom(32)), 2)
        with pytest.raises(WitnessRefusal) as refused:
            parse_add_checkpoint(log.request(3, proof=[]))
        assert refused.value.http_status == 400


@dataclass
class Federation:
    """Two running nodes, w and b, that witness each other; w's roster also has the log
    this test plays (never up), and an outside witness that never answers."""

    w: NodeProcess
    b: NodeProcess
    log: FakeLog
    outside: NodeIdentity


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("witness")
    identity = NodeIdentity(LOG_ORIGIN, os.urandom(32))
    outside = NodeIdentity("outside.example/witness", os.urandom(32))
    w, b = init_node(base, "w.example/imageshare"), init_node(base, "b.example/imageshare")
    peer_each_other(w, b)
    w.append_config(
        f'[[peers]]\norigin = "{LOG_ORIGIN}"\nurl = "http://127.0.0.1:9"\n'
        f'vkey = "{identity.vkey}"\n\n'
        # w needs b and the outside witness: its policy is never met.
        f'[witness]\npolicy = ["{b.origin}", "{outside.origin}"]\nthreshold = 2\n\n'
        f'[[witness.outside]]\nvkey = "{outside.vkey}"\nurl = "http://127.0.0.1:9/w"'
    )
    b.append_config(f'[witness]\npolicy = ["{w.origin}"]\nthreshold = 1')
    w.start()
    b.start()
    try:
        yield Federation(w, b, FakeLog(identity), outside)
    finally:
        w.stop()
        b.stop()


@pytest.fixture(scope="module")
def witness(federation: Federation) -> tuple[NodeProcess, FakeLog]:
    return federation.w, federation.log


class TestAddCheckpoint:
    """In order: each request builds on what the witness accepted before."""

    def test_unknown_origin_is_404(self, witness: tuple[NodeProcess, FakeLog]) -> None:
        node, _ = witness
        stranger = FakeLog(NodeIdentity("other.example/imageshare", os.urandom(32)), 3)
        assert post(node, stranger.request(0))[0] == 404

    def test_a_checkpoint_not_signed_by_the_members_key_is_403(
        self, witness: tuple[NodeProcess, FakeLog]
    ) -> None:
        node, log = witness
        log.grow(5)
        impostor = NodeIdentity(LOG_ORIGIN, os.urandom(32))
        assert post(node, log.request(0, note=log.note(signer=impostor)))[0] == 403
        # The log's own node signs under its origin, but the body must be what was signed.
        note = log.note().replace(f"\n{log.tree.size}\n", f"\n{log.tree.size + 1}\n")
        assert post(node, log.request(0, proof=[], note=note))[0] == 403

    def test_malformed_bodies_are_400(self, witness: tuple[NodeProcess, FakeLog]) -> None:
        node, log = witness
        assert post(node, b"old 0\n" + log.note().encode())[0] == 400
        assert post(node, log.request(log.tree.size + 1, proof=[]))[0] == 400
        assert post(node, b"\xff" * 100)[0] == 400
        # Larger than any note with its proof: refused before it is read whole.
        assert post(node, b"old 0\n\n" + b"x" * 70_000)[0] == 413

    def test_first_checkpoint_is_cosigned_as_cosignature_v1(
        self, witness: tuple[NodeProcess, FakeLog]
    ) -> None:
        node, log = witness
        status, content_type, answer = post(node, log.request(0))
        assert status == 200, answer
        assert content_type.startswith("text/plain")
        body = Checkpoint(LOG_ORIGIN, 5, log.tree.root()).body()
        [signature] = parse_cosignature_lines(answer)
        stamp = check_cosignature_by_hand(answer, node.vkey, body)
        assert verify_cosignature(body, signature, node.vkey) == stamp
        # The same checkpoint again is cosigned again (old = size, empty proof).
        assert post(node, log.request(5))[0] == 200

    def test_an_old_size_the_witness_did_not_cosign_is_409_with_its_size(
        self, witness: tuple[NodeProcess, FakeLog]
    ) -> None:
        node, log = witness
        log.grow(4)
        for old in (0, 3, 6):
            status, content_type, answer = post(node, log.request(old))
            assert (status, content_type, answer) == (409, "text/x.tlog.size", "5\n"), old

    def test_a_proof_that_does_not_verify_is_422(
        self, witness: tuple[NodeProcess, FakeLog]
    ) -> None:
        node, log = witness
        good = consistency_proof(log.tree, 5, log.tree.size)
        for bad in ([], good[:-1], [*good[:-1], bytes(32)], [*good, bytes(32)]):
            assert post(node, log.request(5, proof=bad))[0] == 422
        # A fork: another history of the same first 5 entries' size.
        fork = FakeLog(log.identity, 4)
        fork.grow(5, salt=b"fork")
        assert post(node, fork.request(5, proof=consistency_proof(fork.tree, 5, 9)))[0] == 422

    def test_a_consistent_growth_is_cosigned_and_moves_the_witness_on(
        self, witness: tuple[NodeProcess, FakeLog]
    ) -> None:
        node, log = witness
        status, _, answer = post(node, log.request(5))
        assert status == 200
        body = Checkpoint(LOG_ORIGIN, 9, log.tree.root()).body()
        check_cosignature_by_hand(answer, node.vkey, body)
        assert post(node, log.request(5))[:3:2] == (409, "9\n")
        # The same size with another root: the log signed two views of size 9. The two
        # checkpoints alone prove it: the witness keeps and serves the proof.
        fork = FakeLog(log.identity, 8)
        fork.grow(1, salt=b"fork")
        assert post(node, fork.request(9, proof=[]))[0] == 422
        proofs = node.get_json("/ledger/equivocations", auth=False)
        [proof] = [p for p in proofs if p["origin"] == LOG_ORIGIN]
        verified = verify_equivocation(EquivocationProof.from_json(proof), log.identity.vkey)
        sizes = {Checkpoint.parse(parse_note(n)[0]).size for n in verified.proof.notes}
        assert sizes == {9} and len(set(verified.proof.notes)) == 2

    def test_racing_requests_from_one_size_move_the_witness_once(
        self, witness: tuple[NodeProcess, FakeLog]
    ) -> None:
        node, log = witness
        fork = FakeLog(log.identity, 9)
        fork.tree = MemoryTree(log.tree.levels[0])
        log.grow(3)
        fork.grow(3, salt=b"fork")
        bodies = [log.request(9), fork.request(9)] * 4
        answers: dict[int, int] = {}

        def send(n: int) -> None:
            answers[n] = post(node, bodies[n])[0]

        threads = [threading.Thread(target=send, args=(n,)) for n in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # The check and the update are one transaction: one request moves the witness from
        # 9 to 12, every other one from 9 finds it at 12.
        winners = [n for n, status in answers.items() if status == 200]
        assert len(winners) == 1 and sorted(answers.values()) == [200] + [409] * 7
        won, lost = (log, fork) if winners[0] % 2 == 0 else (fork, log)
        assert post(node, won.request(12))[0] == 200
        assert post(node, lost.request(12, proof=[]))[0] == 422


class TestNodesWitnessEachOther:
    def test_each_node_cosigns_the_others_log_and_the_policy_publishes(
        self, federation: Federation
    ) -> None:
        w, b = federation.w, federation.b
        for node, other in ((w, b), (b, w)):
            wait_until(
                lambda node=node, other=other: other.origin in _cosigners(node),
                timeout=20,
                message=f"{other.origin} to cosign {node.origin}'s checkpoint",
            )
        stores = {n.origin: LedgerStore(n.data_dir) for n in (w, b)}
        try:
            own_b = stores[b.origin].own_log(b.origin)
            published = wait_until(own_b.published_note, timeout=10, message="b to publish")
            assert WitnessPolicy((parse_vkey(w.vkey),), 1).met_by(published)
            # w's policy needs the outside witness too, which never answers.
            assert stores[w.origin].own_log(w.origin).published_note() is None
        finally:
            for store in stores.values():
                store.close()


def _cosigners(node: NodeProcess) -> set[str]:
    conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
    log_id = hashlib.sha256(node.origin.encode()).hexdigest()
    conn.request("GET", f"/ledger/logs/{log_id}/checkpoint")
    note = conn.getresponse().read().decode()
    conn.close()
    _, signatures = parse_note(note)
    return {s.name for s in signatures if s.name != node.origin}


@pytest.fixture(scope="module")
def exported(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    b = federation.b
    patient = PatientKey.derive(os.urandom(32), b.origin)
    now = int(time.time())
    fields = GrantFields(
        patient.public_key,
        b.origin,
        federation.w.origin,
        None,
        now,
        now + 3600,
        os.urandom(16),
    )
    token = sign_grant(fields, patient.sign)
    token_id = token_id_of(token)
    store = LedgerStore(b.data_dir)
    try:
        own = store.own_log(b.origin)
        access = Access(token_id, bytes(32), 3, 1000, bytes(32), federation.w.origin)
        own.append_many([(Grant(token), now), (access, now)])
        size = own.size()

        def published_at_size() -> bool:
            note = own.published_note()
            return note is not None and Checkpoint.parse(parse_note(note)[0]).size == size

        wait_until(published_at_size, timeout=20, message="b to publish its new size")
    finally:
        store.close()
    out = tmp_path_factory.mktemp("proofs")
    files = out / "grant.tlog-proof", out / "access.tlog-proof"
    run_cli("proof", "export", token_id.hex(), "--custodian", b.url, "-o", str(files[0]))

    async def export_access() -> bytes:
        async with aiohttp.ClientSession() as session:
            return (await export_proof(session, b.url, token_id, "access")).encode()

    files[1].write_bytes(asyncio.run(export_access()))
    return files


class TestProofFiles:
    """A grant and an access in b's log, exported as tlog-proof files by the CLI once w
    (b's witness policy) has cosigned, verified offline."""

    def test_exported_proofs_verify_offline_with_the_cli(
        self, federation: Federation, exported: tuple[Path, Path]
    ) -> None:
        grant_file, access_file = exported
        assert grant_file.read_bytes().startswith(b"c2sp.org/tlog-proof@v1\nextra ")
        done = run_cli(
            "proof",
            "verify",
            str(grant_file),
            "--log-key",
            federation.b.vkey,
            "--witness",
            federation.w.vkey,
            "--json",
        )
        result = json.loads(done.stdout)
        assert result["kind"] == "grant" and result["cosigners"] == [federation.w.origin]
        assert result["origin"] == federation.b.origin
        log_key, w_key = parse_vkey(federation.b.vkey), parse_vkey(federation.w.vkey)
        access = verify_tlog_proof(parse_tlog_proof(access_file.read_bytes()), log_key, [w_key])
        assert access.entry.kind == "access" and access.index == result["index"] + 1
        # Another log's key, or a witness policy the file does not meet, fails.
        with pytest.raises(Unauthorized):
            verify_tlog_proof(parse_tlog_proof(grant_file.read_bytes()), w_key, [w_key])
        outside = parse_vkey(federation.outside.vkey)
        with pytest.raises(Unauthorized, match="2 are needed"):
            verify_tlog_proof(
                parse_tlog_proof(grant_file.read_bytes()), log_key, [w_key, outside], 2
            )

    def test_every_flipped_byte_fails(
        self, federation: Federation, exported: tuple[Path, Path]
    ) -> None:
        data = exported[0].read_bytes()
        log_key, witnesses = parse_vkey(federation.b.vkey), [parse_vkey(federation.w.vkey)]
        verify_tlog_proof(parse_tlog_proof(data), log_key, witnesses, 1)
        for at in range(len(data)):
            for flip in (0x01, 0x20):
                changed = data[:at] + bytes([data[at] ^ flip]) + data[at + 1 :]
                with pytest.raises((BadInput, Unauthorized)):
                    verify_tlog_proof(parse_tlog_proof(changed), log_key, witnesses, 1)
        # Cut short or grown at the end fails too.
        for changed in (data[:-1], data + b"\n", data + b"x"):
            with pytest.raises((BadInput, Unauthorized)):
                verify_tlog_proof(parse_tlog_proof(changed), log_key, witnesses, 1)
        flipped = exported[0].with_name("flipped.tlog-proof")
        flipped.write_bytes(data.replace(b"index ", b"index 1", 1))
        done = run_cli("proof", "verify", str(flipped), "--log-key", federation.b.vkey, check=False)
        assert done.returncode == 1 and "does not verify" in done.stderr

    def test_the_web_wallet_verifies_the_file_and_refuses_every_flipped_byte(
        self, federation: Federation, exported: tuple[Path, Path]
    ) -> None:
        data = exported[0].read_bytes()
        with chromium_session("wallet-proof") as browser:
            page = browser.new_page()
            page.goto(federation.b.url + "/wallet/")
            script = """async ([file, logKey, witness]) => {
                const m = await import('/wallet/proof.js');
                const bytes = Uint8Array.from(atob(file), (c) => c.charCodeAt(0));
                const good = await m.verifyProofFile(bytes, logKey, [witness], 1);
                const passed = [];
                for (let at = 0; at < bytes.length; at++) {
                    const changed = bytes.slice();
                    changed[at] ^= 0x01;
                    try {
                        await m.verifyProofFile(changed, logKey, [witness], 1);
                        passed.push(at);
                    } catch {}
                }
                return { good, passed };
            }"""
            result = page.evaluate(
                script,
                [base64.b64encode(data).decode(), federation.b.vkey, federation.w.vkey],
            )
        assert result["good"]["kind"] == "grant"
        assert result["good"]["cosigners"] == [federation.w.origin]
        assert result["passed"] == []
