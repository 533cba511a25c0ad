"""The signed-refusal and address-proof formats: each binds every field it names."""

from __future__ import annotations

import dataclasses
import os

import pytest

from node.core.keys import NodeIdentity
from node.core.refusals import sign_refusal, verify_refusal
from node.core.roster import make_member, sign_address_proof, verify_address_proof
from node.core.signed_requests import SignedHeaders

CUSTODIAN = NodeIdentity("a.example/imageshare", bytes(range(32)))
REQUEST = SignedHeaders(
    "node:b.example/imageshare", CUSTODIAN.origin, 1_800_000_000, b"n" * 16, b"s" * 64
)
BODY = b'{"error": "refused (revoked)", "rule": "revoked"}'


def signed() -> str:
    return sign_refusal(CUSTODIAN.sign, CUSTODIAN.origin, REQUEST, 403, BODY)


class TestSignedRefusal:
    def test_the_custodians_refusal_of_this_request_verifies(self) -> None:
        header = signed()
        assert verify_refusal(CUSTODIAN.public_key, header, CUSTODIAN.origin, REQUEST, 403, BODY)

    @pytest.mark.parametrize(
        "changed",
        [
            {"signer": "node:c.example/imageshare"},
            {"nonce": b"m" * 16},
            {"signature": b"t" * 64},
        ],
    )
    def test_a_refusal_of_another_request_does_not_verify(self, changed: dict[str, object]) -> None:
        other = dataclasses.replace(REQUEST, **changed)  # type: ignore[arg-type]
        header = signed()
        assert not verify_refusal(CUSTODIAN.public_key, header, CUSTODIAN.origin, other, 403, BODY)

    def test_another_status_body_refuser_or_key_does_not_verify(self) -> None:
        header, key, origin = signed(), CUSTODIAN.public_key, CUSTODIAN.origin
        assert not verify_refusal(key, header, origin, REQUEST, 401, BODY)
        assert not verify_refusal(
            key, header, origin, REQUEST, 403, BODY.replace(b"revoked", b"expired")
        )
        assert not verify_refusal(key, header, "c.example/imageshare", REQUEST, 403, BODY)
        other_key = NodeIdentity(origin, os.urandom(32)).public_key
        assert not verify_refusal(other_key, header, origin, REQUEST, 403, BODY)

    @pytest.mark.parametrize("header", [None, "", "not base64url!", "AAAA", signed() + "A"])
    def test_a_missing_or_malformed_header_does_not_verify(self, header: str | None) -> None:
        assert not verify_refusal(
            CUSTODIAN.public_key, header, CUSTODIAN.origin, REQUEST, 403, BODY
        )


class TestAddressProof:
    member = make_member(CUSTODIAN.origin, "", CUSTODIAN.vkey)
    url = "http://192.0.2.7:8600"
    challenge = b"c" * 32

    def test_the_members_proof_for_this_url_and_challenge_verifies(self) -> None:
        proof = sign_address_proof(CUSTODIAN.sign, CUSTODIAN.origin, self.url, self.challenge)
        assert verify_address_proof(self.member, self.url, self.challenge, proof)

    def test_a_proof_for_another_url_challenge_origin_or_key_does_not_verify(self) -> None:
        proof = sign_address_proof(CUSTODIAN.sign, CUSTODIAN.origin, self.url, self.challenge)
        assert not verify_address_proof(self.member, "http://192.0.2.8:8600", self.challenge, proof)
        assert not verify_address_proof(self.member, self.url, b"d" * 32, proof)
        other_origin = sign_address_proof(CUSTODIAN.sign, "c.example/x", self.url, self.challenge)
        assert not verify_address_proof(self.member, self.url, self.challenge, other_origin)
        liar = NodeIdentity(CUSTODIAN.origin, os.urandom(32))
        forged = sign_address_proof(liar.sign, CUSTODIAN.origin, self.url, self.challenge)
        assert not verify_address_proof(self.member, self.url, self.challenge, forged)
