"""Break-glass formats and the one rule (pure): policies, requests, and attacks on both."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.consent import Rule, decode_grant
from node.core.emergency import (
    Choice,
    EmergencyCase,
    PatientIdentity,
    decode_policy,
    decode_request,
    is_emergency_request,
    join_references,
    judge_request,
    open_identity,
    sign_policy,
    sign_request,
    split_references,
)
from node.core.encoding import canonical_decode, canonical_encode
from node.core.keys import NodeIdentity
from node.core.patient_keys import PatientKey
from node.errors import BadInput

CUSTODIAN = NodeIdentity.generate("a.example/imageshare")
REQUESTER = NodeIdentity.generate("b.example/imageshare")
OTHER = NodeIdentity.generate("c.example/imageshare")
PATIENT = PatientKey.derive(bytes(range(32)), CUSTODIAN.origin)
NOW = 1_800_000_000
IDENTITY = PatientIdentity("MRN-1", "unconscious; prior CT wanted")


def request(
    signer: NodeIdentity = REQUESTER, audience: NodeIdentity = CUSTODIAN, **changes: object
):
    fields: dict[str, object] = {"reason": "ETREAT", "issued_at": NOW, "identity": IDENTITY}
    fields.update(changes)
    return sign_request(
        signer.origin,
        audience.origin,
        audience.public_key,
        str(fields["reason"]),
        fields["identity"],  # type: ignore[arg-type]
        int(fields["issued_at"]),  # type: ignore[call-overload]
        os.urandom(16),
        signer.sign,
    )


def policy(choice: Choice, members: tuple[str, ...] = ()) -> bytes:
    return sign_policy(PATIENT.public_key, CUSTODIAN.origin, choice, members, NOW, PATIENT.sign)


def case(**changes: object) -> EmergencyCase:
    fields: dict[str, object] = {
        "requester": REQUESTER.origin,
        "requester_key": REQUESTER.public_key,
        "custodian": CUSTODIAN.origin,
        "now": NOW + 10,
        "clock_skew": 300,
        "policy": None,
        "default": Choice.ANY_MEMBER,
        "patient_known": True,
    }
    fields.update(changes)
    return EmergencyCase(**fields)  # type: ignore[arg-type]


class TestPolicyFormat:
    def test_a_policy_round_trips_and_its_signature_verifies(self) -> None:
        decoded = decode_policy(policy(Choice.NAMED_MEMBERS, (REQUESTER.origin,)))
        assert decoded.signature_valid() and decoded.choice is Choice.NAMED_MEMBERS
        assert decoded.allows(REQUESTER.origin) and not decoded.allows(OTHER.origin)

    def test_a_changed_choice_breaks_the_signature(self) -> None:
        value = canonical_decode(policy(Choice.NEVER))
        value[4] = "any_member"
        assert not decode_policy(canonical_encode(value)).signature_valid()

    def test_named_members_without_members_is_refused(self) -> None:
        with pytest.raises(BadInput, match="names members exactly"):
            policy(Choice.NAMED_MEMBERS)
        with pytest.raises(BadInput, match="names members exactly"):
            policy(Choice.NEVER, (REQUESTER.origin,))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_garbage_is_bad_input_and_nothing_else(self, data: bytes) -> None:
        for decode in (decode_policy, decode_request):
            with contextlib.suppress(BadInput):
                decode(data)


class TestRequestFormat:
    def test_the_patient_id_and_note_are_sealed_to_the_custodian_only(self) -> None:
        raw = request()
        assert b"MRN-1" not in raw and b"unconscious" not in raw
        assert open_identity(decode_request(raw), CUSTODIAN.seed) == IDENTITY
        with pytest.raises(BadInput, match="not sealed to this node"):
            open_identity(decode_request(raw), OTHER.seed)

    def test_a_request_never_decodes_as_a_grant(self) -> None:
        raw = request()
        assert is_emergency_request(raw)
        with pytest.raises(BadInput):
            decode_grant(raw)

    def test_an_unknown_reason_code_is_refused(self) -> None:
        with pytest.raises(BadInput, match="BTG, ETREAT"):
            request(reason="CURIOUS")

    def test_study_references_join_and_split(self) -> None:
        refs = (bytes(32), bytes([1]) * 32)
        assert split_references(join_references(refs)) == refs
        with pytest.raises(BadInput):
            split_references(bytes(33))


class TestRule:
    def test_the_default_allows_any_member_when_no_policy_is_signed(self) -> None:
        assert judge_request(decode_request(request()), case()) is None

    def test_a_policy_of_never_refuses(self) -> None:
        refused = case(policy=decode_policy(policy(Choice.NEVER)))
        assert judge_request(decode_request(request()), refused) is Rule.EMERGENCY_NOT_ALLOWED

    def test_named_members_admit_only_those(self) -> None:
        named = decode_policy(policy(Choice.NAMED_MEMBERS, (OTHER.origin,)))
        verdict = judge_request(decode_request(request()), case(policy=named))
        assert verdict is Rule.EMERGENCY_NOT_ALLOWED

    def test_a_patients_policy_outranks_a_default_of_never(self) -> None:
        allowed = case(policy=decode_policy(policy(Choice.ANY_MEMBER)), default=Choice.NEVER)
        assert judge_request(decode_request(request()), allowed) is None

    def test_a_request_signed_by_another_key_is_refused(self) -> None:
        forged = request(signer=OTHER)
        value = canonical_decode(forged)
        value[2] = REQUESTER.origin  # claims to be B, signed by C
        attack = decode_request(canonical_encode(value))
        assert judge_request(attack, case()) is Rule.BAD_SIGNATURE

    def test_a_member_replaying_anothers_request_is_not_its_requester(self) -> None:
        # C presents B's signed request in its own signed transfer request.
        stolen = decode_request(request())
        replayed = case(requester=OTHER.origin)
        assert judge_request(stolen, replayed) is Rule.WRONG_GRANTEE

    def test_a_request_for_another_custodian_is_refused(self) -> None:
        elsewhere = decode_request(request(audience=OTHER))
        assert judge_request(elsewhere, case()) is Rule.WRONG_CUSTODIAN

    def test_a_stale_request_is_refused(self) -> None:
        stale = decode_request(request(issued_at=NOW - 3600))
        assert judge_request(stale, case()) is Rule.EMERGENCY_STALE

    def test_an_unknown_patient_is_refused(self) -> None:
        unknown = case(patient_known=False)
        assert judge_request(decode_request(request()), unknown) is Rule.EMERGENCY_UNKNOWN_PATIENT
