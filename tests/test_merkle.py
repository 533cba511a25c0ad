"""RFC 6962 / 9162 hashing and proofs against the published vectors, must-fail ones included."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from node.core.merkle import (
    EMPTY_ROOT,
    MemoryTree,
    MerkleFrontier,
    StreamingConsistency,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_inclusion,
    root_from_leaf_hashes,
    subtree_indexes,
    verify_consistency,
    verify_inclusion,
)
from node.errors import BadInput
from tests.support.vectors import rfc6962_vectors

VECTORS: dict[str, Any] = rfc6962_vectors()
LEAVES = [bytes.fromhex(x) for x in VECTORS["leaf_inputs_hex"]]
TREE = MemoryTree([leaf_hash(x) for x in LEAVES])


def h(x: str) -> bytes:
    return bytes.fromhex(x)


def probe_bytes(value: str) -> bytes:
    return base64.b64decode(value)


INCLUSION_PROBES = [p for p in VECTORS["testdata_probes_sample"] if "leafIdx" in p]
CONSISTENCY_PROBES = [p for p in VECTORS["testdata_probes_sample"] if "size1" in p]


class TestHasher:
    def test_matches_the_hasher_vectors(self) -> None:
        vectors = VECTORS["hasher"]
        assert EMPTY_ROOT.hex() == vectors["empty_root"]
        assert leaf_hash(b"").hex() == vectors["leaf_hash_of_empty_string"]
        assert leaf_hash(b"L123456").hex() == vectors["leaf_hash_of_ascii_L123456"]
        assert node_hash(b"N123", b"N456").hex() == vectors["node_hash_of_ascii_N123_N456"]

    def test_leaf_hashes_match(self) -> None:
        assert [leaf_hash(x).hex() for x in LEAVES] == VECTORS["leaf_hashes_hex"]

    @pytest.mark.parametrize("size", range(9))
    def test_roots_by_size_match(self, size: int) -> None:
        expected = VECTORS["roots_hex_by_size"][str(size)]
        assert TREE.root(size).hex() == expected
        assert root_from_leaf_hashes(TREE.levels[0][:size]).hex() == expected

    def test_subtree_indexes_are_aligned_and_cover_the_range(self) -> None:
        assert subtree_indexes(0, 7) == [(2, 0), (1, 2), (0, 6)]
        assert subtree_indexes(4, 8) == [(2, 1)]
        assert subtree_indexes(6, 13) == [(1, 3), (2, 2), (0, 12)]


class TestInclusion:
    @pytest.mark.parametrize(
        "case", VECTORS["inclusion_proofs"], ids=lambda c: str(c["leaf_index"])
    )
    def test_proofgen_vectors_generate_and_verify(self, case: dict[str, Any]) -> None:
        size, index = case["tree_size"], case["leaf_index"]
        proof = inclusion_proof(TREE, index, size)
        assert [p.hex() for p in proof] == case["proof"]
        assert verify_inclusion(proof, h(case["leaf_hash"]), index, size, h(case["root"]))

    @pytest.mark.parametrize("case", VECTORS["all_inclusion_proofs_sizes_1_8"])
    def test_every_proof_up_to_size_8_matches(self, case: dict[str, Any]) -> None:
        size, index = case["tree_size"], case["leaf_index"]
        proof = inclusion_proof(TREE, index, size)
        assert [p.hex() for p in proof] == case["proof"]
        assert verify_inclusion(proof, TREE.levels[0][index], index, size, TREE.root(size))

    @pytest.mark.parametrize("probe", INCLUSION_PROBES, ids=lambda p: p["desc"])
    def test_testdata_probes(self, probe: dict[str, Any]) -> None:
        proof = [probe_bytes(p) for p in probe["proof"] or []]
        ok = verify_inclusion(
            proof,
            probe_bytes(probe["leafHash"]),
            probe["leafIdx"],
            probe["treeSize"],
            probe_bytes(probe["root"]),
        )
        assert ok is not probe["wantErr"]

    def test_tampered_proofs_fail(self) -> None:
        size, index = 8, 5
        proof = inclusion_proof(TREE, index, size)
        leaf, root = TREE.levels[0][index], TREE.root(size)
        assert verify_inclusion(proof, leaf, index, size, root)
        flipped = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
        assert not verify_inclusion(flipped, leaf, index, size, root)
        assert not verify_inclusion(proof[:-1], leaf, index, size, root)
        assert not verify_inclusion([*proof, proof[0]], leaf, index, size, root)
        assert not verify_inclusion(proof, leaf, index + 1, size, root)
        assert not verify_inclusion(proof, leaf, index, size + 1, root)
        assert not verify_inclusion(proof, leaf, index, size, TREE.root(7))
        assert not verify_inclusion(proof, leaf, 8, 8, root)
        assert not verify_inclusion(proof, leaf, -1, 8, root)
        assert root_from_inclusion([b"short"], leaf, 0, 2) is None

    def test_out_of_range_request_is_refused(self) -> None:
        with pytest.raises(BadInput):
            inclusion_proof(TREE, 8, 8)

    def test_every_leaf_of_larger_trees_verifies(self) -> None:
        tree = MemoryTree([leaf_hash(i.to_bytes(2, "big")) for i in range(130)])
        for size in (1, 2, 3, 63, 64, 65, 127, 128, 129, 130):
            root = tree.root(size)
            assert root == root_from_leaf_hashes(tree.levels[0][:size])
            for index in range(size):
                proof = inclusion_proof(tree, index, size)
                assert verify_inclusion(proof, tree.levels[0][index], index, size, root)


class TestConsistency:
    @pytest.mark.parametrize("case", VECTORS["consistency_proofs"], ids=lambda c: str(c["size2"]))
    def test_proofgen_vectors_generate_and_verify(self, case: dict[str, Any]) -> None:
        old, new = case["size1"], case["size2"]
        proof = consistency_proof(TREE, old, new)
        assert [p.hex() for p in proof] == case["proof"]
        assert verify_consistency(proof, old, new, h(case["root1"]), h(case["root2"]))

    @pytest.mark.parametrize("case", VECTORS["all_consistency_proofs_sizes_1_8"])
    def test_every_proof_up_to_size_8_matches(self, case: dict[str, Any]) -> None:
        old, new = case["size1"], case["size2"]
        proof = consistency_proof(TREE, old, new)
        assert [p.hex() for p in proof] == case["proof"]
        assert verify_consistency(proof, old, new, TREE.root(old), TREE.root(new))

    @pytest.mark.parametrize("probe", CONSISTENCY_PROBES, ids=lambda p: p["desc"])
    def test_testdata_probes(self, probe: dict[str, Any]) -> None:
        proof = [probe_bytes(p) for p in probe["proof"] or []]
        ok = verify_consistency(
            proof,
            probe["size1"],
            probe["size2"],
            probe_bytes(probe["root1"]),
            probe_bytes(probe["root2"]),
        )
        assert ok is not probe["wantErr"]

    def test_every_pair_of_sizes_verifies_and_tampering_fails(self) -> None:
        tree = MemoryTree([leaf_hash(i.to_bytes(2, "big")) for i in range(70)])
        for new in range(1, 71):
            new_root = tree.root(new)
            for old in range(1, new + 1):
                old_root = tree.root(old)
                proof = consistency_proof(tree, old, new)
                assert verify_consistency(proof, old, new, old_root, new_root)
                if proof:
                    assert not verify_consistency(proof[:-1], old, new, old_root, new_root)
                    assert not verify_consistency(proof, old, new, new_root, old_root)
                    bad = [bytes(32), *proof[1:]]
                    assert not verify_consistency(bad, old, new, old_root, new_root)

    def test_empty_old_tree_is_consistent_only_with_an_empty_proof(self) -> None:
        assert verify_consistency([], 0, 5, EMPTY_ROOT, TREE.root(5))
        assert not verify_consistency([EMPTY_ROOT], 0, 5, EMPTY_ROOT, TREE.root(5))

    def test_bad_sizes_are_refused(self) -> None:
        with pytest.raises(BadInput):
            consistency_proof(TREE, 5, 4)
        assert not verify_consistency([], 5, 4, TREE.root(5), TREE.root(4))


class TestStreamingConsistency:
    def test_matches_the_stored_tree_for_every_pair_of_sizes_and_any_batching(self) -> None:
        leaves = [leaf_hash(bytes([i])) for i in range(21)]
        tree = MemoryTree(leaves)
        for new in range(1, len(leaves) + 1):
            for old in range(new + 1):
                for batch in (1, 3, 8):
                    streamed = StreamingConsistency(old, new)
                    for at in range(0, new, batch):
                        streamed.push(leaves[at : min(at + batch, new)])
                    assert streamed.old_root() == tree.root(old)
                    assert streamed.new_root() == tree.root(new)
                    assert streamed.proof() == consistency_proof(tree, old, new)

    def test_more_leaves_than_the_tree_or_too_few_are_refused(self) -> None:
        streamed = StreamingConsistency(1, 2)
        with pytest.raises(BadInput):
            streamed.new_root()
        with pytest.raises(BadInput):
            streamed.push([leaf_hash(b"a")] * 3)


class TestMerkleFrontier:
    def test_root_and_completed_subtrees_match_the_whole_tree_at_every_size(self) -> None:
        leaves = [leaf_hash(bytes([i])) for i in range(40)]
        tree = MemoryTree(leaves)
        frontier = MerkleFrontier()
        assert frontier.root() == EMPTY_ROOT
        for size, leaf in enumerate(leaves, start=1):
            for level, n, digest in frontier.push(leaf):
                assert level >= 1 and tree.levels[level][n] == digest
            assert frontier.size == size and frontier.root() == tree.root(size)
            indexes = subtree_indexes(0, size)
            assert [(lv, n) for lv, n, _ in frontier.subtrees] == indexes
            assert [d for _, _, d in frontier.subtrees] == tree.read_hashes(indexes)

    def test_a_frontier_rebuilt_from_stored_subtrees_grows_the_same_tree(self) -> None:
        """What the ledger store does: reload the right edge, append, never re-read the rest."""
        leaves = [leaf_hash(bytes([i])) for i in range(23)]
        tree = MemoryTree(leaves)
        for held in range(len(leaves)):
            indexes = subtree_indexes(0, held)
            resumed = MerkleFrontier(
                held, [(*i, d) for i, d in zip(indexes, tree.read_hashes(indexes), strict=True)]
            )
            copy = resumed.copy()
            for leaf in leaves[held:]:
                resumed.push(leaf)
            assert resumed.root() == tree.root() and copy.size == held
