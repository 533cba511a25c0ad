"""The ledger HTTP API of a running node, checked by an independent RFC 6962 verifier.

The verifier below is written from the RFC's recursive definitions and does not import
the node's Merkle or note code, so a shared misunderstanding cannot pass unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
from collections.abc import Iterator
from functools import cache
from typing import Any

import msgpack
import pytest
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from node.core.entries import Grant
from node.core.keys import NodeIdentity
from node.core.notes import cosign_checkpoint, parse_note, sign_note
from node.store.ledger import LedgerStore, OwnLog
from node.store.secrets import read_seed
from tests.support.nodes import NodeProcess, init_node

# ---- independent RFC 6962 verifier ------------------------------------------------------


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def rfc_leaf(entry: bytes) -> bytes:
    return sha256(b"\x00" + entry)


def rfc_node(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right)


def split_point(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves: tuple[bytes, ...]) -> bytes:
    """MTH(D[n]) exactly as RFC 6962 section 2.1 defines it, over leaf hashes."""

    @cache
    def tree(lo: int, hi: int) -> bytes:
        if hi - lo == 0:
            return sha256(b"")
        if hi - lo == 1:
            return leaves[lo]
        k = split_point(hi - lo)
        return rfc_node(tree(lo, lo + k), tree(lo + k, hi))

    return tree(0, len(leaves))


def root_from_path(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes | None:
    """Rebuild the root from an audit path by following RFC 6962 PATH(m, D[n]) backwards."""
    if size == 1:
        return leaf if not path else None
    if not path:
        return None
    k = split_point(size)
    last, rest = path[-1], path[:-1]
    if index < k:
        inner = root_from_path(index, k, leaf, rest)
        return None if inner is None else rfc_node(inner, last)
    inner = root_from_path(index - k, size - k, leaf, rest)
    return None if inner is None else rfc_node(last, inner)


def roots_from_consistency(
    m: int, n: int, proof: list[bytes], old_root: bytes, complete: bool = True
) -> tuple[bytes, bytes] | None:
    """(old root, new root) implied by a proof, following RFC 6962 SUBPROOF backwards."""
    if m == n:
        if complete:
            return (old_root, old_root) if not proof else None
        return (proof[0], proof[0]) if len(proof) == 1 else None
    if not proof:
        return None
    k = split_point(n)
    last, rest = proof[-1], proof[:-1]
    if m <= k:
        inner = roots_from_consistency(m, k, rest, old_root, complete)
        return None if inner is None else (inner[0], rfc_node(inner[1], last))
    inner = roots_from_consistency(m - k, n - k, rest, old_root, False)
    return None if inner is None else (rfc_node(last, inner[0]), rfc_node(last, inner[1]))


def open_checkpoint(note: str, vkey: str) -> tuple[str, int, bytes]:
    """Check a C2SP signed checkpoint by hand: (origin, size, root) if the log signed it."""
    name, key_id_hex, key_b64 = vkey.split("+", 2)
    key = base64.b64decode(key_b64)
    assert key[0] == 0x01 and len(key) == 33
    assert sha256(name.encode() + b"\n" + key[:1] + key[1:])[:4].hex() == key_id_hex
    body, _, signatures = note.rpartition("\n\n")
    body += "\n"
    for line in signatures.splitlines():
        dash, signer, value = line.split(" ")
        raw = base64.b64decode(value)
        if dash == "—" and signer == name and raw[:4].hex() == key_id_hex:
            try:
                VerifyKey(key[1:]).verify(body.encode(), raw[4:])
            except BadSignatureError as exc:
                raise AssertionError("the log's checkpoint signature is bad") from exc
            origin, size, root = body.splitlines()[:3]
            return origin, int(size), base64.b64decode(root)
    raise AssertionError("the checkpoint carries no signature of the log key")


# ---- HTTP helpers ------------------------------------------------------------------------


class Client:
    """A keep-alive HTTP client for the node's public ledger API."""

    def __init__(self, node: NodeProcess) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=30)

    def get(self, path: str) -> tuple[int, str, bytes]:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()

    def json(self, path: str) -> Any:
        status, _, body = self.get(path)
        assert status == 200, (path, body)
        return json.loads(body)

    def proof(self, path: str) -> list[bytes]:
        return [base64.b64decode(h) for h in self.json(path)["proof"]]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[NodeProcess, OwnLog, Client, str]]:
    """One running node for the module, a handle on its ledger store, a client, the log path.

    The test process appends to the node's own log through the store while the daemon
    serves it (SQLite arbitrates between the two processes); tests only ever grow the log.
    """
    node = init_node(tmp_path_factory.mktemp("ledger-api"), "a.example/imageshare").start()
    identity = NodeIdentity(node.origin, read_seed(node.data_dir / "node.key"))
    store = LedgerStore(node.data_dir)
    own = store.own_log(identity.origin, identity.vkey)
    client = Client(node)
    base = f"/ledger/logs/{hashlib.sha256(identity.origin.encode()).hexdigest()}"
    try:
        yield node, own, client, base
    finally:
        client.conn.close()
        store.close()
        node.stop()


def append_grants(own: OwnLog, count: int) -> None:
    start = own.size()
    own.append_many(
        [
            (Grant(token=i.to_bytes(4, "big")), 1_700_000_000)
            for i in range(start, start + count)
        ]
    )


def fetch_leaves(client: Client, base: str, size: int) -> tuple[bytes, ...]:
    entries: list[bytes] = []
    while len(entries) < size:
        status, content_type, body = client.get(f"{base}/entries?start={len(entries)}&end={size}")
        assert status == 200 and content_type == "application/msgpack"
        batch = msgpack.unpackb(body, raw=True)
        assert batch, "the server returned no entries"
        entries += batch
    return tuple(rfc_leaf(e) for e in entries)


class TestCheckpointsAndProofs:
    def test_log_checkpoint_is_public_and_matches_the_entries(
        self, served: tuple[NodeProcess, OwnLog, Client, str]
    ) -> None:
        # First in the module, so this also covers the empty log (size 0, empty root).
        node, own, client, base = served
        status, _, note = client.get(f"{base}/checkpoint")
        assert status == 200
        size = own.size()
        leaves = fetch_leaves(client, base, size)
        assert open_checkpoint(note.decode(), node.vkey) == (node.origin, size, mth(leaves))
        assert msgpack.unpackb(client.get(f"{base}/entries?start={size}&end={size + 9}")[2]) == []

    def test_every_size_up_to_70_verifies_independently(
        self, served: tuple[NodeProcess, OwnLog, Client, str]
    ) -> None:
        node, own, client, base = served
        checkpoints: dict[int, bytes] = {}
        # Sizes 1..70 when the module runs in order (the log is empty before this test).
        start = own.size()
        sizes = [
            start + s for s in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 70)
        ]
        for size in sizes:
            append_grants(own, size - own.size())
            status, content_type, note = client.get(f"{base}/checkpoint")
            assert status == 200 and content_type.startswith("text/plain")
            origin, signed_size, root = open_checkpoint(note.decode(), node.vkey)
            assert (origin, signed_size) == (node.origin, size)
            leaves = fetch_leaves(client, base, size)
            assert mth(leaves) == root
            checkpoints[size] = root
            for index in range(size):
                path = client.proof(f"{base}/proof/inclusion?index={index}&size={size}")
                assert root_from_path(index, size, leaves[index], path) == root
        for new in sizes:
            for old in [s for s in sizes if s <= new]:
                proof = client.proof(f"{base}/proof/consistency?old={old}&new={new}")
                roots = roots_from_consistency(old, new, proof, checkpoints[old])
                assert roots == (checkpoints[old], checkpoints[new]), (old, new)

    def test_larger_log_pages_entries_and_proves(
        self, served: tuple[NodeProcess, OwnLog, Client, str]
    ) -> None:
        node, own, client, base = served
        append_grants(own, 2500 - own.size())
        _, _, note = client.get(f"{base}/checkpoint")
        _, size, root = open_checkpoint(note.decode(), node.vkey)
        assert size == own.size() == 2500
        status, _, body = client.get(f"{base}/entries?start=0&end=2500")
        assert status == 200 and len(msgpack.unpackb(body)) == 1000  # capped; client continues
        leaves = fetch_leaves(client, base, size)
        assert mth(leaves) == root
        for index in (0, 1, 999, 1000, 1023, 1024, 2047, 2048, 2498, 2499):
            path = client.proof(f"{base}/proof/inclusion?index={index}&size={size}")
            assert root_from_path(index, size, leaves[index], path) == root
        for old in (1, 2, 3, 1000, 1024, 1025, 2048, 2499, 2500):
            proof = client.proof(f"{base}/proof/consistency?old={old}&new={size}")
            old_root = mth(leaves[:old])
            assert roots_from_consistency(old, size, proof, old_root) == (old_root, root)

    def test_wrong_root_or_path_fails_the_independent_verifier(
        self, served: tuple[NodeProcess, OwnLog, Client, str]
    ) -> None:
        _, own, client, base = served
        append_grants(own, 11)
        leaves = fetch_leaves(client, base, 11)
        path = client.proof(f"{base}/proof/inclusion?index=4&size=11")
        assert root_from_path(4, 11, leaves[4], path) == mth(leaves)
        assert root_from_path(4, 11, leaves[5], path) != mth(leaves)
        assert root_from_path(4, 11, leaves[4], path[:-1]) != mth(leaves)
        proof = client.proof(f"{base}/proof/consistency?old=5&new=11")
        assert roots_from_consistency(5, 11, proof, mth(leaves[:5])) == (
            mth(leaves[:5]),
            mth(leaves),
        )
        assert roots_from_consistency(5, 11, proof[1:], mth(leaves[:5])) != (
            mth(leaves[:5]),
            mth(leaves),
        )

    def test_cosignatures_are_served_with_the_checkpoint(
        self, served: tuple[NodeProcess, OwnLog, Client, str]
    ) -> None:
        node, own, client, base = served
        append_grants(own, 3)
        _, _, note = client.get(f"{base}/checkpoint")
        body, _ = parse_note(note.decode())
        witness = NodeIdentity.generate("b.example/imageshare")
        own.add_cosignature(cosign_checkpoint(body, witness, 1_700_000_000), witness.vkey)
        _, _, served_note = client.get(f"{base}/checkpoint")
        assert served_note.decode().count("\n— ") == 2
        assert "— b.example/imageshare " in served_note.decode()
        open_checkpoint(served_note.decode(), node.vkey)


class TestLogsAndErrors:
    def test_lists_own_log_and_only_mirrors_it_can_serve(
        self, served: tuple[NodeProcess, OwnLog, Client, str]
    ) -> None:
        node, own, client, base = served
        peer = NodeIdentity.generate("b.example/imageshare")
        (node.data_dir.parent / "peer").mkdir()
        peer_store = LedgerStore(node.data_dir.parent / "peer")
        peer_log = peer_store.own_log(peer.origin, peer.vkey)
        peer_log.append_many([(Grant(token=b"x"), 1), (Grant(token=b"y"), 2)])
        peer_note = peer_log.publish_checkpoint(peer, 3)
        mirror = own.store.mirror(peer.origin, peer.vkey)
        logs = client.json("/ledger/logs")
        assert logs == [
            {
                "origin": node.origin,
                "log_id": base.rsplit("/", 1)[1],
                "vkey": node.vkey,
                "size": own.size(),
                "root": base64.b64encode(own.root()).decode(),
            }
        ]  # the mirror holds no checkpoint yet: nothing of it to serve, so it is not listed
        mirror_base = f"/ledger/logs/{hashlib.sha256(peer.origin.encode()).hexdigest()}"
        mirror.extend(peer_log.entries(0, 2), peer_note)
        assert client.get(f"{mirror_base}/checkpoint")[2].decode() == peer_note
        listed = client.json("/ledger/logs")[1]
        assert (listed["origin"], listed["size"]) == (peer.origin, 2)
        assert listed["root"] == base64.b64encode(peer_log.root(2)).decode()
        assert fetch_leaves(client, mirror_base, 2) == (
            peer_log.leaf_hash(0),
            peer_log.leaf_hash(1),
        )
        peer_store.close()

    @pytest.mark.parametrize(
        "query",
        [
            "/entries?start=0",
            "/entries?start=a&end=2",
            "/entries?start=-1&end=2",
            "/entries?start=3&end=2",
            "/entries?start={after}&end={after_more}",
            "/proof/inclusion?index={size}&size={size}",
            "/proof/inclusion?index=0&size={after}",
            "/proof/inclusion?index=0&size=0",
            "/proof/inclusion?index=1e3&size=5",
            "/proof/inclusion?index=+1&size=5",
            "/proof/consistency?old=3&new=2",
            "/proof/consistency?old=1&new={after}",
            "/proof/consistency?old=1",
        ],
    )
    def test_bad_parameters_are_400_with_a_reason(
        self, served: tuple[NodeProcess, OwnLog, Client, str], query: str
    ) -> None:
        _, own, client, base = served
        append_grants(own, max(0, 5 - own.size()))
        size = own.size()
        query = query.format(size=size, after=size + 1, after_more=size + 4)
        status, _, body = client.get(base + query)
        assert status == 400
        assert json.loads(body)["error"]

    @pytest.mark.parametrize("log_id", ["00" * 32, "nothex", "ab" * 31, "AB" * 32 + "00"])
    def test_unknown_log_is_404(
        self, served: tuple[NodeProcess, OwnLog, Client, str], log_id: str
    ) -> None:
        _, _, client, _ = served
        for tail in ("/checkpoint", "/entries?start=0&end=1", "/proof/inclusion?index=0&size=1"):
            assert client.get(f"/ledger/logs/{log_id}{tail}")[0] == 404


def test_sign_note_is_what_the_hand_verifier_accepts() -> None:
    identity = NodeIdentity.generate("x.example/log")
    body = f"{identity.origin}\n0\n{base64.b64encode(sha256(b'')).decode()}\n"
    assert open_checkpoint(sign_note(body, identity), identity.vkey)[1] == 0
