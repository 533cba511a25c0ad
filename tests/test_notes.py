"""C2SP signed notes, checkpoints and cosignatures against the published vectors."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from node.core.keys import NodeIdentity
from node.core.notes import (
    Checkpoint,
    NoteSignature,
    add_signatures,
    cosign_checkpoint,
    cosigner_vkey_string,
    parse_cosigner_key,
    parse_note,
    sign_note,
    verify_cosignature,
    verify_note,
    verify_signed_body,
)
from node.errors import BadInput, Unauthorized
from tests.support.vectors import rfc6962_vectors

VECTORS: dict[str, Any] = rfc6962_vectors()
GO = VECTORS["signed_note_go_vectors"]
DERIVED = VECTORS["derived_checkpoint_example"]
ROOT_8 = bytes.fromhex(VECTORS["roots_hex_by_size"]["8"])


def go_test_identity(name: str = "PeterNeumann") -> NodeIdentity:
    """The Go test suite's public test key (skey: PRIVATE+KEY+name+id+base64(0x01||seed))."""
    encoded = GO["skey"].split("+", 4)[4]
    return NodeIdentity(name, base64.b64decode(encoded)[1:])


class TestSignedNote:
    def test_c2sp_example_verifies(self) -> None:
        example = VECTORS["signed_note_example"]
        assert verify_signed_body(example["note"], example["vkey"]) == example["signed_text"]

    def test_signing_reproduces_the_go_vector(self) -> None:
        identity = go_test_identity()
        assert identity.vkey == GO["vkey_peter"]
        assert sign_note(GO["text"], identity) == GO["expected_signed_note"]
        assert verify_signed_body(GO["expected_signed_note"], GO["vkey_peter"]) == GO["text"]

    def test_note_with_two_signers_verifies_for_each(self) -> None:
        note = GO["expected_signed_note"] + GO["enoch_sig_line"]
        assert verify_signed_body(note, GO["vkey_enoch"]) == GO["text"]
        assert verify_signed_body(note, GO["vkey_peter"]) == GO["text"]
        assert len(parse_note(note)[1]) == 2

    def test_wrong_key_is_unauthorized(self) -> None:
        with pytest.raises(Unauthorized):
            verify_signed_body(GO["expected_signed_note"], GO["vkey_enoch"])

    def test_tampered_text_is_unauthorized(self) -> None:
        tampered = GO["expected_signed_note"].replace("answer", "Answer")
        with pytest.raises(Unauthorized):
            verify_signed_body(tampered, GO["vkey_peter"])

    def test_tampered_signature_is_unauthorized(self) -> None:
        body, (sig,) = parse_note(GO["expected_signed_note"])
        bad = NoteSignature(sig.name, sig.key_id, bytes([sig.signature[0] ^ 1]) + sig.signature[1:])
        with pytest.raises(Unauthorized):
            verify_signed_body(body + "\n" + bad.line(), GO["vkey_peter"])

    def test_a_signature_line_with_a_nonzero_unused_bit_is_refused(self) -> None:
        """68 bytes of key ID and signature leave two unused bits in the last character: a
        text with one set decodes to the same signature, so a lenient parser would verify a
        changed note."""
        body, (sig,) = parse_note(GO["expected_signed_note"])
        encoded = sig.line().split(" ")[-1].rstrip("\n")
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        last = alphabet.index(encoded[-2])
        changed = encoded[:-2] + alphabet[last ^ 1] + "="
        assert base64.b64decode(changed) == base64.b64decode(encoded)
        note = body + "\n— PeterNeumann " + changed + "\n"
        with pytest.raises(BadInput, match="not canonical"):
            verify_signed_body(note, GO["vkey_peter"])

    @pytest.mark.parametrize(
        "note",
        [
            GO["text"],  # no blank line, no signature
            GO["text"] + "\n",  # blank line, no signatures
            GO["expected_signed_note"].rstrip("\n"),  # signature line lacks its final newline
            "\x01" + GO["expected_signed_note"],  # leading control byte
            GO["expected_signed_note"].replace("— PeterNeumann", "— Bad Name"),
            GO["expected_signed_note"] + "Unexpected line.\n",
            GO["text"] + "\n" + GO["enoch_sig_line"] * 101,  # more than 100 signatures
            b"\xff" + GO["expected_signed_note"].encode(),  # invalid UTF-8
            GO["text"] + "\n— PeterNeumann !!!notbase64\n",
            GO["text"] + "\n— PeterNeumann AAAA\n",  # shorter than a key ID and a byte
        ],
        ids=range(10),
    )
    def test_malformed_notes_are_refused(self, note: str | bytes) -> None:
        with pytest.raises(BadInput):
            parse_note(note)
        with pytest.raises(BadInput):
            verify_signed_body(note, GO["vkey_peter"])


class TestCheckpoint:
    def test_derived_checkpoint_verifies_and_reproduces(self) -> None:
        checkpoint = verify_note(DERIVED["checkpoint"], GO["vkey_peter"])
        assert checkpoint == Checkpoint("PeterNeumann", 8, ROOT_8)
        assert sign_note(checkpoint.body(), go_test_identity()) == DERIVED["checkpoint"]

    def test_body_round_trips_with_extensions(self) -> None:
        checkpoint = Checkpoint("a.example/log", 42, bytes(range(32)), ("ext one", "x"))
        assert Checkpoint.parse(checkpoint.body()) == checkpoint

    @pytest.mark.parametrize(
        "body",
        [
            "PeterNeumann\n8\n",
            "PeterNeumann\n08\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
            "PeterNeumann\n-1\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
            "PeterNeumann\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg\n",
            "PeterNeumann\n8\nAAAA\n",
            "PeterNeumann\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
            "\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
            "PeterNeumann\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n\n",
        ],
        ids=range(8),
    )
    def test_malformed_bodies_are_refused(self, body: str) -> None:
        with pytest.raises(BadInput):
            Checkpoint.parse(body)

    def test_checkpoint_of_another_origin_is_refused(self) -> None:
        identity = go_test_identity()
        note = sign_note(Checkpoint("someone.else", 1, bytes(32)).body(), identity)
        with pytest.raises(BadInput, match="origin"):
            verify_note(note, identity.vkey)

    def test_node_identity_signs_a_checkpoint_that_verifies(self) -> None:
        identity = NodeIdentity.generate("a.example/imageshare")
        note = sign_note(Checkpoint(identity.origin, 3, bytes(32)).body(), identity)
        assert verify_note(note, identity.vkey).size == 3
        other = NodeIdentity.generate("a.example/imageshare")
        with pytest.raises(Unauthorized):
            verify_note(note, other.vkey)


class TestCosignature:
    def test_derived_cosignature_verifies_with_either_vkey_form(self) -> None:
        body, signatures = parse_note(DERIVED["checkpoint"] + DERIVED["cosignature_line"])
        cosignature = signatures[1]
        assert verify_cosignature(body, cosignature, DERIVED["witness_vkey"]) == 1700000000
        witness = go_test_identity("PeterNeumann-witness")
        assert verify_cosignature(body, cosignature, witness.vkey) == 1700000000
        assert cosigner_vkey_string(witness.origin, witness.public_key) == DERIVED["witness_vkey"]
        assert parse_cosigner_key(DERIVED["witness_vkey"]).public_key == witness.public_key

    def test_cosigning_reproduces_the_derived_line(self) -> None:
        witness = go_test_identity("PeterNeumann-witness")
        body = Checkpoint("PeterNeumann", 8, ROOT_8).body()
        assert cosign_checkpoint(body, witness, 1700000000).line() == DERIVED["cosignature_line"]

    def test_round_trip_and_rejections(self) -> None:
        log = NodeIdentity.generate("a.example/imageshare")
        witness = NodeIdentity.generate("b.example/imageshare")
        body = Checkpoint(log.origin, 5, bytes(range(32))).body()
        cosignature = cosign_checkpoint(body, witness, 1234)
        assert verify_cosignature(body, cosignature, witness.vkey) == 1234
        # The log's own key, another body, a tampered timestamp: all fail.
        assert verify_cosignature(body, cosignature, log.vkey) is None
        other_body = Checkpoint(log.origin, 6, bytes(range(32))).body()
        assert verify_cosignature(other_body, cosignature, witness.vkey) is None
        forged = NoteSignature(
            cosignature.name,
            cosignature.key_id,
            (1235).to_bytes(8, "big") + cosignature.signature[8:],
        )
        assert verify_cosignature(body, forged, witness.vkey) is None
        assert verify_cosignature(body, cosignature, "not a vkey") is None
        # A plain note signature by the witness is not a cosignature.
        plain = parse_note(sign_note(body, witness))[1][0]
        assert verify_cosignature(body, plain, witness.vkey) is None

    def test_add_signatures_serves_cosignatures_with_the_note(self) -> None:
        log = NodeIdentity.generate("a.example/imageshare")
        witness = NodeIdentity.generate("b.example/imageshare")
        body = Checkpoint(log.origin, 5, bytes(range(32))).body()
        note = sign_note(body, log)
        first = add_signatures(note, [cosign_checkpoint(body, witness, 10)])
        again = add_signatures(first, [cosign_checkpoint(body, witness, 20)])
        assert verify_note(again, log.vkey).size == 5
        _, signatures = parse_note(again)
        assert len(signatures) == 2
        assert verify_cosignature(body, signatures[1], witness.vkey) == 20
