"""The consent rules, one refusal reason each, and the token formats (pure)."""

from __future__ import annotations

import contextlib
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.consent import (
    AccessRequest,
    ConsentPolicy,
    ConsentView,
    GrantFields,
    KeyStatus,
    Rule,
    admit_grant,
    decode_grant,
    decode_revocation,
    parse_token_text,
    sign_grant,
    sign_revocation,
    token_id_of,
    token_text,
    token_url,
    validate_grant,
)
from node.core.encoding import canonical_decode, canonical_encode
from node.core.patient_keys import PatientKey, parse_public_key
from node.errors import BadInput

CUSTODIAN = "ucsf.example/imageshare"
GRANTEE = "stanford.example/imageshare"
NOW = 1_800_000_000
DAY = 86_400
WALLET_SEED = bytes(range(32))
POLICY = ConsentPolicy(custodian_origin=CUSTODIAN, max_lifetime=365 * DAY, clock_skew=300)


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=40)
    | st.binary(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


def ref(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


STUDY_A, STUDY_B, OTHER_PATIENTS_STUDY = ref("a"), ref("b"), ref("other")
ALICE = PatientKey.derive(WALLET_SEED, CUSTODIAN)
MALLORY = PatientKey.derive(bytes(32), CUSTODIAN)


def grant(
    key: PatientKey = ALICE,
    scope: tuple[bytes, ...] | None = (STUDY_A,),
    not_before: int = NOW - 60,
    expires: int = NOW + 7 * DAY,
    grantee: str = GRANTEE,
    custodian: str = CUSTODIAN,
) -> bytes:
    fields = GrantFields(
        key.public_key, custodian, grantee, scope, not_before, expires, os.urandom(16)
    )
    return sign_grant(fields, key.sign)


def view(token: bytes | None = None, **changes: object) -> ConsentView:
    base: dict[str, object] = {
        "keys": {ALICE.public_key: KeyStatus(subject=ref("alice"))},
        "studies_of_subject": {
            ref("alice"): frozenset({STUDY_A, STUDY_B}),
            ref("bob"): frozenset({OTHER_PATIENTS_STUDY}),
        },
        "recorded": frozenset({token_id_of(token)} if token else set()),
    }
    base.update(changes)
    return ConsentView(**base)  # type: ignore[arg-type]


def request(studies: tuple[bytes, ...] | None = (STUDY_A,), **changes: object) -> AccessRequest:
    fields: dict[str, object] = {"requester_origin": GRANTEE, "study_refs": studies, "now": NOW}
    fields.update(changes)
    return AccessRequest(**fields)  # type: ignore[arg-type]


def reason(token: bytes, req: AccessRequest | None = None, state: ConsentView | None = None) -> str:
    return validate_grant(token, req or request(), state or view(token), POLICY).reason


class TestValidateGrant:
    def test_valid_grant_allows_its_study(self) -> None:
        token = grant()
        verdict = validate_grant(token, request(), view(token), POLICY)
        assert verdict.allowed and verdict.reason == "ok"
        assert verdict.studies == (STUDY_A,)
        assert verdict.token_id == token_id_of(token)

    def test_grant_of_all_studies_allows_every_study_of_the_patient(self) -> None:
        token = grant(scope=None)
        verdict = validate_grant(token, request(None), view(token), POLICY)
        assert verdict.allowed
        assert set(verdict.studies) == {STUDY_A, STUDY_B}

    def test_expired(self) -> None:
        token = grant(not_before=NOW - 10 * DAY, expires=NOW - DAY)
        assert reason(token) == "expired"

    def test_expiry_tolerates_the_clock_skew(self) -> None:
        token = grant(not_before=NOW - 10 * DAY, expires=NOW - 100)
        assert reason(token) == "ok"

    def test_not_yet_valid(self) -> None:
        token = grant(not_before=NOW + DAY, expires=NOW + 2 * DAY)
        assert reason(token) == "not_yet_valid"

    def test_revoked(self) -> None:
        token = grant()
        state = view(token, revoked=frozenset({(ALICE.public_key, token_id_of(token))}))
        assert reason(token, state=state) == "revoked"

    def test_revocation_by_another_key_does_not_count(self) -> None:
        token = grant()
        state = view(token, revoked=frozenset({(MALLORY.public_key, token_id_of(token))}))
        assert reason(token, state=state) == "ok"

    def test_wrong_grantee(self) -> None:
        assert reason(grant(), request(requester_origin="evil.example/imageshare")) == (
            "wrong_grantee"
        )

    def test_study_out_of_scope(self) -> None:
        assert reason(grant(scope=(STUDY_A,)), request((STUDY_B,))) == "out_of_scope"

    def test_study_of_another_patient_in_scope(self) -> None:
        token = grant(scope=(OTHER_PATIENTS_STUDY,))
        assert reason(token, request((OTHER_PATIENTS_STUDY,))) == "not_owner"

    def test_study_of_another_patient_under_an_all_grant(self) -> None:
        assert reason(grant(scope=None), request((OTHER_PATIENTS_STUDY,))) == "not_owner"

    def test_bad_signature(self) -> None:
        token = grant()
        value = canonical_decode(token)
        value[-1] = bytes(64)
        assert reason(canonical_encode(value)) == "bad_signature"

    def test_changed_field_breaks_the_signature(self) -> None:
        value = canonical_decode(grant())
        value[3] = "evil.example/imageshare"
        forged = canonical_encode(value)
        assert reason(forged, request(requester_origin="evil.example/imageshare")) == (
            "bad_signature"
        )

    def test_tampered_bytes(self) -> None:
        token = bytearray(grant())
        token[0] ^= 0x01  # the array header: no longer nine fields
        assert reason(bytes(token)) == "tampered"
        assert reason(grant() + b"\x00") == "tampered"
        assert reason(b"") == "tampered"
        assert reason(grant()[:-1]) == "tampered"

    def test_key_not_enrolled(self) -> None:
        assert reason(grant(key=MALLORY)) == "unknown_patient"

    def test_key_retired(self) -> None:
        token = grant()
        state = view(token, keys={ALICE.public_key: KeyStatus(ref("alice"), retired=True)})
        assert reason(token, state=state) == "key_retired"

    def test_lifetime_over_the_maximum(self) -> None:
        assert reason(grant(expires=NOW + 400 * DAY)) == "lifetime_too_long"

    def test_wrong_custodian(self) -> None:
        assert reason(grant(custodian="other.example/imageshare")) == "wrong_custodian"

    def test_grant_missing_from_the_log(self) -> None:
        token = grant()
        assert reason(token, state=view(None)) == "not_recorded"

    def test_every_rule_has_a_distinct_reason(self) -> None:
        # 13 rules of grants, 2 of share links (wrong_passcode, link_dead), 4 of
        # break-glass (emergency_stale, _unknown_patient, _not_allowed, _rate_limited),
        # 4 of delegates' grants (delegation_not_live, _revoked, _no_power, _out_of_scope)
        assert len({rule.value for rule in Rule}) == len(Rule) == 23


class TestAdmitGrant:
    def test_future_grant_may_be_recorded(self) -> None:
        token = grant(not_before=NOW + DAY, expires=NOW + 2 * DAY)
        assert admit_grant(token, view(), POLICY, NOW).allowed

    def test_grant_naming_another_patients_study_is_not_recorded(self) -> None:
        token = grant(scope=(OTHER_PATIENTS_STUDY,))
        assert admit_grant(token, view(), POLICY, NOW).reason == "not_owner"


class TestTokenFormat:
    def test_one_study_grant_fits_a_qr_code(self) -> None:
        token = grant(scope=(STUDY_A,))
        assert len(token_text(token)) <= 400
        assert len(token_url(token)) <= 420

    def test_text_and_url_forms_round_trip(self) -> None:
        token = grant()
        assert parse_token_text(token_text(token)) == token
        assert parse_token_text(token_url(token)) == token
        assert decode_grant(parse_token_text(token_url(token))).token_id == token_id_of(token)

    def test_text_with_padding_or_junk_is_refused(self) -> None:
        with pytest.raises(BadInput):
            parse_token_text(token_text(grant()) + "=")
        with pytest.raises(BadInput):
            parse_token_text("imageshare:other?x=1")

    def test_revocation_round_trips_and_verifies(self) -> None:
        token_id = token_id_of(grant())
        data = sign_revocation(ALICE.public_key, token_id, NOW, ALICE.sign)
        revocation = decode_revocation(data)
        assert revocation.token_id == token_id and revocation.signature_valid()

    def test_grant_signature_cannot_pass_as_a_revocation(self) -> None:
        revocation = decode_revocation(
            sign_revocation(ALICE.public_key, bytes(32), NOW, ALICE.sign)
        )
        assert not decode_revocation(
            canonical_encode([1, ALICE.public_key, bytes(32), NOW + 1, revocation.signature])
        ).signature_valid()

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=600))
    def test_decoding_garbage_raises_only_bad_input(self, data: bytes) -> None:
        for decode in (decode_grant, decode_revocation):
            with contextlib.suppress(BadInput):
                decode(data)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(MSGPACK_VALUES, min_size=9, max_size=9), st.booleans())
    def test_well_encoded_nonsense_raises_only_bad_input(
        self, fields: list[object], versioned: bool
    ) -> None:
        if versioned:
            fields[0] = 1
        for data in (canonical_encode(fields), canonical_encode(fields[:5])):
            for decode in (decode_grant, decode_revocation):
                with contextlib.suppress(BadInput):
                    decode(data)
            assert not validate_grant(data, request(), view(data), POLICY).allowed

    @settings(max_examples=200, deadline=None)
    @given(st.integers(min_value=0, max_value=300), st.integers(min_value=0, max_value=255))
    def test_any_byte_flip_of_a_token_is_refused(self, position: int, mask: int) -> None:
        token = bytearray(grant())
        position %= len(token)
        token[position] ^= mask or 1
        verdict = validate_grant(bytes(token), request(), view(bytes(token)), POLICY)
        assert not verdict.allowed


class TestPatientKeys:
    def test_keys_differ_per_custodian_and_are_stable(self) -> None:
        here = PatientKey.derive(WALLET_SEED, CUSTODIAN)
        there = PatientKey.derive(WALLET_SEED, GRANTEE)
        assert here.public_key != there.public_key
        assert here.public_key == PatientKey.derive(WALLET_SEED, CUSTODIAN).public_key

    def test_public_key_text_round_trips(self) -> None:
        assert parse_public_key(ALICE.public_key_text) == ALICE.public_key

    def test_malformed_public_key_is_refused(self) -> None:
        for text in ("", "abc", ALICE.public_key_text + "A", "x" * 43 + "!"):
            with pytest.raises(BadInput):
                parse_public_key(text)
