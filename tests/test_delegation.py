"""Delegation (pure): the format, the chain a delegate's grant carries, and its rules."""

from __future__ import annotations

import hashlib
import os

import pytest

from node.core.audit_rules import SignatureChecks, plan_consent_checks
from node.core.consent import (
    ConsentPolicy,
    ConsentView,
    Delegation,
    GrantFields,
    KeyStatus,
    Power,
    Rule,
    admit_grant,
    decode_delegation,
    decode_grant,
    decode_revocation,
    sign_delegation,
    sign_grant,
    sign_revocation,
    token_id_of,
)
from node.core.encoding import canonical_decode, canonical_encode
from node.core.entries import DelegationEntry, Enroll, Grant, LedgerEntry, Revoke
from node.core.patient_keys import PatientKey
from node.errors import BadInput

CUSTODIAN = "a.example/imageshare"
GRANTEE = "b.example/imageshare"
NOW = 1_800_000_000
DAY = 86_400
PATIENT = PatientKey.derive(bytes(range(32)), CUSTODIAN)
GUARDIAN = PatientKey.derive(bytes(32), CUSTODIAN)
STRANGER = PatientKey.derive(bytes([7]) * 32, CUSTODIAN)
SUBJECT = hashlib.sha256(b"subject").digest()
STUDY_A, STUDY_B = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
POLICY = ConsentPolicy(CUSTODIAN, max_lifetime=365 * DAY, clock_skew=300)


def delegation(
    powers: tuple[Power, ...] = (Power.GRANT,),
    scope: tuple[bytes, ...] | None = None,
    delegate: PatientKey = GUARDIAN,
    expires: int = NOW + 30 * DAY,
) -> bytes:
    unsigned = Delegation(
        PATIENT.public_key,
        CUSTODIAN,
        delegate.public_key,
        scope,
        powers,
        NOW - 60,
        expires,
        os.urandom(16),
    )
    return sign_delegation(unsigned, PATIENT.sign)


def delegate_grant(
    chain: bytes,
    signer: PatientKey = GUARDIAN,
    scope: tuple[bytes, ...] | None = None,
    expires: int = NOW + DAY,
) -> bytes:
    fields = GrantFields(
        signer.public_key, CUSTODIAN, GRANTEE, scope, NOW, expires, os.urandom(16), chain
    )
    return sign_grant(fields, signer.sign)


def view(chain: bytes, revoked: bool = False) -> ConsentView:
    delegation_id = token_id_of(chain)
    return ConsentView(
        keys={PATIENT.public_key: KeyStatus(SUBJECT)},
        studies_of_subject={SUBJECT: frozenset({STUDY_A, STUDY_B})},
        revoked=frozenset({(PATIENT.public_key, delegation_id)} if revoked else set()),
        delegations=frozenset({delegation_id}),
    )


def admitted(token: bytes, state: ConsentView, now: int = NOW) -> str:
    return admit_grant(token, state, POLICY, now).reason


class TestFormat:
    def test_a_delegation_round_trips_with_a_valid_signature(self) -> None:
        decoded = decode_delegation(delegation(scope=(STUDY_A,)))
        assert decoded.signature_valid() and decoded.scope == (STUDY_A,)
        assert decoded.delegate_key == GUARDIAN.public_key

    def test_a_delegates_grant_carries_the_chain_and_names_the_patient(self) -> None:
        chain = delegation()
        token = decode_grant(delegate_grant(chain))
        assert token.delegation is not None and token.fields.delegation == chain
        assert token.patient_key == PATIENT.public_key  # the principal, not the signer
        assert token.fields.patient_key == GUARDIAN.public_key and token.signature_valid()

    def test_a_patients_own_grant_is_unchanged_version_1(self) -> None:
        fields = GrantFields(PATIENT.public_key, CUSTODIAN, GRANTEE, None, NOW, NOW + 1, bytes(16))
        token = sign_grant(fields, PATIENT.sign)
        assert canonical_decode(token)[0] == 1 and len(canonical_decode(token)) == 9

    def test_an_unknown_power_is_refused(self) -> None:
        value = canonical_decode(delegation())
        value[6] = ["grant", "sell"]
        with pytest.raises(BadInput, match="powers"):
            decode_delegation(canonical_encode(value))


class TestChainAttacks:
    def test_a_stranger_using_someone_elses_delegation_is_a_bad_signature(self) -> None:
        chain = delegation()
        assert admitted(delegate_grant(chain, signer=STRANGER), view(chain)) == "bad_signature"

    def test_a_forged_delegation_is_a_bad_signature(self) -> None:
        value = canonical_decode(delegation())
        value[6] = ["grant", "revoke"]  # widen the powers after the patient signed
        forged = canonical_encode(value)
        assert admitted(delegate_grant(forged), view(forged)) == "bad_signature"


class TestAdmission:
    def test_a_live_delegation_with_the_power_admits_the_grant(self) -> None:
        chain = delegation()
        assert admitted(delegate_grant(chain), view(chain)) == "ok"

    def test_a_revoked_delegation_ends_the_power_at_once(self) -> None:
        chain = delegation()
        assert admitted(delegate_grant(chain), view(chain, revoked=True)) == "delegation_revoked"

    def test_an_unrecorded_or_expired_delegation_is_not_live(self) -> None:
        chain = delegation(expires=NOW + DAY)
        unrecorded = ConsentView(keys={PATIENT.public_key: KeyStatus(SUBJECT)})
        assert admitted(delegate_grant(chain), unrecorded) == "delegation_not_live"
        # Presented two days on, a week-long grant finds its one-day delegation over.
        weeklong = delegate_grant(chain, expires=NOW + 7 * DAY)
        assert admitted(weeklong, view(chain), NOW + 2 * DAY) == "delegation_not_live"

    def test_a_delegation_without_the_power_to_grant(self) -> None:
        chain = delegation(powers=(Power.VIEW_LOG,))
        assert admitted(delegate_grant(chain), view(chain)) == "delegation_no_power"

    def test_a_grant_beyond_the_delegations_studies(self) -> None:
        chain = delegation(scope=(STUDY_A,))
        assert admitted(delegate_grant(chain, scope=(STUDY_A,)), view(chain)) == "ok"
        wider = delegate_grant(chain, scope=(STUDY_A, STUDY_B))
        assert admitted(wider, view(chain)) == "delegation_out_of_scope"
        assert admitted(delegate_grant(chain), view(chain)) == "delegation_out_of_scope"


class TestAuditor:
    def test_a_grant_recorded_after_its_delegation_was_revoked_is_rejected(self) -> None:
        chain = delegation()
        before, after = delegate_grant(chain), delegate_grant(chain)
        revocation = sign_revocation(PATIENT.public_key, token_id_of(chain), NOW, PATIENT.sign)
        bodies = [
            Enroll(subject=SUBJECT, key=PATIENT.public_key, replaces=None),
            DelegationEntry(delegation=chain),
            Grant(token=before),
            Revoke(revocation=revocation),
            Grant(token=after),
        ]
        entries = [LedgerEntry.of(bytes(32), NOW, body) for body in bodies]
        grants = {t: decode_grant(t) for t in (before, after)}
        checks = SignatureChecks(
            grants=grants,
            grants_valid=frozenset(grants),
            revocations={revocation: decode_revocation(revocation)},
            revocations_valid=frozenset({revocation}),
        )
        found, _ = plan_consent_checks(CUSTODIAN, entries, checks, 300)
        assert [(v.index, v.rule) for v in found] == [(4, "grant_outside_delegation")]
        assert Rule.DELEGATION_REVOKED.value in found[0].detail
