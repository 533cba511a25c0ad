"""Equivocation proofs (node.core.equivocation): checkable with the log's key alone.

A valid proof of each kind is accepted; each forged or incomplete one is refused with
BadInput or Unauthorized, never anything else.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from typing import Any

import pytest

from node.core.equivocation import EquivocationProof, verify_equivocation
from node.core.keys import NodeIdentity
from node.core.merkle import EMPTY_ROOT, MemoryTree, consistency_proof, leaf_hash
from node.core.notes import Checkpoint, cosign_checkpoint, parse_note, sign_note
from node.errors import BadInput, Unauthorized

LOG = NodeIdentity.generate("c.example/imageshare")
WITNESS = NodeIdentity.generate("w.example/imageshare")


def tree(*labels: str) -> MemoryTree:
    return MemoryTree([leaf_hash(label.encode()) for label in labels])


def note(t: MemoryTree, signer: NodeIdentity = LOG, origin: str = LOG.origin) -> str:
    return sign_note(Checkpoint(origin, t.size, t.root()).body(), signer)


def split(smaller: MemoryTree, larger: MemoryTree) -> EquivocationProof:
    """The proof a node holding ``larger`` builds when shown ``smaller``."""
    m, n = smaller.size, larger.size
    return EquivocationProof(
        LOG.origin,
        (note(smaller), note(larger)),
        larger.root(m),
        tuple(consistency_proof(larger, m, n)),
    )


X = tree("e0", "x1")
Y = tree("e0", "y1", "y2")
X_SAME_SIZE = tree("e0", "y1")


def refused(proof: EquivocationProof) -> None:
    with pytest.raises((BadInput, Unauthorized)):
        verify_equivocation(proof, LOG.vkey)


class TestValidProofs:
    def test_forks_of_different_sizes_are_proven_by_the_larger_trees_prefix(self) -> None:
        verified = verify_equivocation(split(X, Y), LOG.vkey)
        assert "size 2" in verified.reason and "size 3" in verified.reason

    def test_a_fork_at_one_size_needs_only_the_two_notes(self) -> None:
        proof = EquivocationProof(LOG.origin, (note(X), note(X_SAME_SIZE)))
        assert "size 2" in verify_equivocation(proof, LOG.vkey).reason

    def test_an_empty_tree_signed_with_another_root_is_proven(self) -> None:
        made_up = hashlib.sha256(b"x").digest()
        bogus_empty = sign_note(Checkpoint(LOG.origin, 0, made_up).body(), LOG)
        proof = EquivocationProof(LOG.origin, (bogus_empty, note(Y)), EMPTY_ROOT, ())
        assert "size 0" in verify_equivocation(proof, LOG.vkey).reason

    def test_canonical_form_is_smaller_first_without_cosignatures(self) -> None:
        larger = note(Y)
        body, _ = parse_note(larger)
        witnessed = larger + cosign_checkpoint(body, WITNESS, 1).line()
        proof = split(X, Y)
        swapped = replace(proof, notes=(witnessed, note(X)))
        assert verify_equivocation(swapped, LOG.vkey).proof == proof

    def test_wire_form_round_trips(self) -> None:
        proof = split(X, Y)
        assert EquivocationProof.from_json(proof.as_json()) == proof
        document = {**proof.as_json(), "reason": "informative", "detected_at": 1}
        assert EquivocationProof.from_json(document) == proof


class TestForgedOrIncompleteProofs:
    def test_a_note_signed_by_another_key_is_refused(self) -> None:
        impostor = NodeIdentity.generate(LOG.origin)
        refused(replace(split(X, Y), notes=(note(X, impostor), note(Y))))

    def test_a_note_with_its_checkpoint_altered_after_signing_is_refused(self) -> None:
        text = note(X)
        body, _ = parse_note(text)
        altered = text.replace(body.splitlines()[2], base64.b64encode(bytes(32)).decode())
        refused(replace(split(X, Y), notes=(altered, note(Y))))

    def test_a_checkpoint_of_another_origin_is_refused(self) -> None:
        other = note(X, origin="d.example/imageshare")
        refused(replace(split(X, Y), notes=(other, note(Y))))

    def test_the_same_tree_head_twice_is_refused(self) -> None:
        refused(EquivocationProof(LOG.origin, (note(X), note(X))))

    def test_a_consistent_pair_is_refused(self) -> None:
        extended = tree("e0", "x1", "x2")
        refused(split(X, extended))

    def test_different_sizes_without_the_prefix_root_are_refused(self) -> None:
        refused(replace(split(X, Y), prefix_root=None, consistency=()))

    def test_a_prefix_root_the_consistency_proof_does_not_lead_from_is_refused(self) -> None:
        refused(replace(split(X, Y), prefix_root=hashlib.sha256(b"made up").digest()))

    def test_a_consistency_proof_of_another_tree_is_refused(self) -> None:
        # Consistent in itself, but it ends at a root the log never signed.
        other = tree("e0", "z1", "z2")
        path = tuple(consistency_proof(other, 2, 3))
        refused(replace(split(X, Y), prefix_root=other.root(2), consistency=path))

    def test_a_truncated_consistency_proof_is_refused(self) -> None:
        proof = split(X, Y)
        refused(replace(proof, consistency=proof.consistency[:-1]))

    def test_an_empty_tree_proof_with_a_made_up_prefix_root_is_refused(self) -> None:
        empty = sign_note(Checkpoint(LOG.origin, 0, EMPTY_ROOT).body(), LOG)
        refused(EquivocationProof(LOG.origin, (empty, note(Y)), hashlib.sha256(b"x").digest()))

    def test_one_size_with_extra_hashes_is_refused(self) -> None:
        refused(EquivocationProof(LOG.origin, (note(X), note(X_SAME_SIZE)), EMPTY_ROOT))

    def test_a_proof_about_another_log_is_refused(self) -> None:
        with pytest.raises(BadInput):
            verify_equivocation(split(X, Y), WITNESS.vkey)

    @pytest.mark.parametrize(
        "change",
        [
            {"log_id": "00" * 32},
            {"origin": 7},
            {"notes": ["only one"]},
            {"notes": ["a", 2]},
            {"notes": "ab"},
            {"prefix_root": "not base64!"},
            {"prefix_root": base64.b64encode(b"short").decode()},
            {"consistency": "AAAA"},
            {"consistency": [base64.b64encode(bytes(32)).decode()] * 200},
        ],
    )
    def test_malformed_wire_forms_are_bad_input(self, change: dict[str, Any]) -> None:
        with pytest.raises(BadInput):
            EquivocationProof.from_json({**split(X, Y).as_json(), **change})

    @pytest.mark.parametrize("document", [None, [], "proof", 3])
    def test_a_proof_that_is_not_an_object_is_bad_input(self, document: Any) -> None:
        with pytest.raises(BadInput):
            EquivocationProof.from_json(document)
