"""A share link's permissions in its patient-signed grant (version 3), and the auditor's
rule that every ``contribution`` (an opinion returned through a link) was allowed by it.

Pure: grants are signed with the consent library, logs are lists of entries, and the
auditor's planner judges them exactly as `imageshare audit` does after fetching a log.
"""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.audit_rules import SignatureChecks, Violation, plan_consent_checks
from node.core.consent import (
    OPINIONS,
    PERMISSIONS_VERSION,
    GrantFields,
    decode_grant,
    link_grantee,
    sign_grant,
    sign_revocation,
    token_id_of,
)
from node.core.encoding import canonical_decode, canonical_encode
from node.core.entries import Contribution, Enroll, EntryBody, Grant, LedgerEntry, Revoke
from node.core.patient_keys import PatientKey
from node.errors import BadInput
from node.services.audit import verify_grants, verify_revocations

CUSTODIAN = "a.example/imageshare"
NODE_GRANTEE = "b.example/imageshare"
T0 = 1_800_000_000
WEEK = 7 * 86_400
SKEW = 300
PATIENT = PatientKey.derive(bytes(range(32)), CUSTODIAN)


def ref(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def link(name: str) -> str:
    return link_grantee(ref(name))


def signed(
    grantee: str,
    permissions: tuple[str, ...] = (OPINIONS,),
    scope: tuple[bytes, ...] | None = None,
    expires: int = T0 + WEEK,
    nonce: bytes = bytes(16),
) -> bytes:
    fields = GrantFields(
        PATIENT.public_key, CUSTODIAN, grantee, scope, T0, expires, nonce, permissions=permissions
    )
    return sign_grant(fields, PATIENT.sign)


class TestGrantPermissions:
    def test_a_link_grant_with_the_opinions_permission_round_trips_as_version_3(self) -> None:
        token = signed(link("x"))
        decoded = decode_grant(token)
        assert canonical_decode(token)[0] == PERMISSIONS_VERSION
        assert decoded.fields.permits(OPINIONS) and decoded.signature_valid()
        assert decoded.token_id == token_id_of(token)

    def test_a_link_grant_without_permissions_stays_version_1(self) -> None:
        token = signed(link("x"), permissions=())
        assert canonical_decode(token)[0] == 1
        assert not decode_grant(token).fields.permits(OPINIONS)

    def test_the_permission_is_signed_dropping_it_breaks_the_signature(self) -> None:
        value = canonical_decode(signed(link("x")))
        stripped = canonical_encode([1, *value[1:8], value[9]])
        assert not decode_grant(stripped).signature_valid()

    @pytest.mark.parametrize(
        ("grantee", "permissions", "why"),
        [
            (NODE_GRANTEE, (OPINIONS,), "only a share link"),
            (link("x"), ("write",), "some of"),
            (link("x"), (OPINIONS, OPINIONS), "sorted and distinct"),
        ],
    )
    def test_permissions_that_are_not_a_links_known_words_are_refused(
        self, grantee: str, permissions: tuple[str, ...], why: str
    ) -> None:
        with pytest.raises(BadInput, match=why):
            signed(grantee, permissions=permissions)
        # Nor does a decoder take them, signed or not.
        fields = [3, PATIENT.public_key, CUSTODIAN, grantee, None, T0, T0 + WEEK, bytes(16)]
        with pytest.raises(BadInput, match=why):
            decode_grant(canonical_encode([*fields, list(permissions), bytes(64)]))

    def test_a_version_3_grant_with_an_empty_list_is_refused(self) -> None:
        fields = [3, PATIENT.public_key, CUSTODIAN, link("x"), None, T0, T0 + WEEK, bytes(16)]
        with pytest.raises(BadInput, match="one or more permissions"):
            decode_grant(canonical_encode([*fields, [], bytes(64)]))

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.lists(st.none() | st.text(max_size=12) | st.binary(max_size=8), max_size=4))
    def test_any_permissions_value_decodes_or_is_refused_with_bad_input(
        self, permissions: list[object]
    ) -> None:
        fields = [3, PATIENT.public_key, CUSTODIAN, link("x"), None, T0, T0 + WEEK, bytes(16)]
        with contextlib.suppress(BadInput):
            decode_grant(canonical_encode([*fields, permissions, bytes(64)]))


def judge(items: list[tuple[EntryBody, int]]) -> list[Violation]:
    """The auditor's consent findings on a custodian log made of ``items``."""
    entries, prev = [], bytes(32)
    for body, time in items:
        entry = LedgerEntry.of(prev, time, body)
        entries.append(entry)
        prev = ref(str(len(entries)))  # the chain is checked elsewhere, not here
    grants = [e.body.token for e in entries if isinstance(e.body, Grant)]
    revocations = [e.body.revocation for e in entries if isinstance(e.body, Revoke)]
    checked_grants = dict(zip(grants, verify_grants(grants), strict=True))
    checked_revocations = dict(zip(revocations, verify_revocations(revocations), strict=True))
    signatures = SignatureChecks(
        {raw: token for raw, (token, _) in checked_grants.items()},
        frozenset(raw for raw, (_, ok) in checked_grants.items() if ok),
        {raw: revocation for raw, (revocation, _) in checked_revocations.items()},
        frozenset(raw for raw, (_, ok) in checked_revocations.items() if ok),
    )
    found, _ = plan_consent_checks(CUSTODIAN, entries, signatures, SKEW)
    return found


def contribution(token: bytes, study: bytes = ref("study")) -> Contribution:
    return Contribution(token_id=token_id_of(token), study=study, digest=ref("file"))


class TestContributionRule:
    def test_each_contribution_not_allowed_by_its_link_grant_is_named_with_its_index(
        self,
    ) -> None:
        allowed = signed(link("allowed"), nonce=b"a" * 16)
        read_only = signed(link("read-only"), permissions=(), nonce=b"b" * 16)
        revoked = signed(link("revoked"), nonce=b"c" * 16)
        short = signed(link("short"), expires=T0 + 100, nonce=b"d" * 16)
        scoped = signed(link("scoped"), scope=(ref("study"),), nonce=b"e" * 16)
        to_node = signed(NODE_GRANTEE, permissions=(), nonce=b"f" * 16)
        forged = bytearray(signed(link("forged"), nonce=b"g" * 16))
        forged[-1] ^= 1
        later = signed(link("later"), nonce=b"h" * 16)
        revocation = sign_revocation(PATIENT.public_key, token_id_of(revoked), T0 + 6, PATIENT.sign)
        items: list[tuple[EntryBody, int]] = [
            (Enroll(subject=ref("mrn"), key=PATIENT.public_key, replaces=None), T0),  # 0
            *((Grant(token=t), T0 + 1) for t in (allowed, read_only, revoked, short)),  # 1-4
            *((Grant(token=t), T0 + 1) for t in (scoped, to_node, bytes(forged))),  # 5-7
            (contribution(allowed), T0 + 2),  # 8: allowed
            (contribution(read_only), T0 + 3),  # 9: no permission
            (contribution(revoked), T0 + 4),  # 10: allowed, before its revocation
            (Revoke(revocation=revocation), T0 + 6),  # 11
            (contribution(revoked), T0 + 7),  # 12: after it
            (contribution(short), T0 + 100 + SKEW + 1),  # 13: expired
            (contribution(scoped), T0 + 8),  # 14: allowed, its study
            (contribution(scoped, ref("other study")), T0 + 9),  # 15: outside the scope
            (contribution(to_node), T0 + 10),  # 16: not a link's grant
            (contribution(bytes(forged)), T0 + 11),  # 17: the signature does not verify
            (contribution(later), T0 + 12),  # 18: its grant is recorded only after it
            (Grant(token=later), T0 + 13),  # 19
            (contribution(later), T0 + 14),  # 20: allowed
        ]
        found = judge(items)
        flagged = {v.index: v.detail for v in found if v.rule == "contribution_without_permission"}
        assert set(flagged) == {9, 12, 13, 15, 16, 17, 18}, found
        assert "opinions permission" in flagged[9]
        assert "revoked" in flagged[12]
        assert "validity" in flagged[13]
        assert "scope" in flagged[15]
        assert "share link" in flagged[16]
        assert "signature" in flagged[17]
        assert "no grant" in flagged[18]

    def test_a_log_of_allowed_opinions_has_no_finding(self) -> None:
        allowed = signed(link("allowed"))
        items: list[tuple[EntryBody, int]] = [
            (Enroll(subject=ref("mrn"), key=PATIENT.public_key, replaces=None), T0),
            (Grant(token=allowed), T0 + 1),
            *((contribution(allowed, ref(f"s{n}")), T0 + 2 + n) for n in range(3)),
        ]
        assert judge(items) == []
