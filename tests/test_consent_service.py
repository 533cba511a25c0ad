"""Consent at the custodian, in process: enrollment, recording, check_access, replay."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.core.consent import sign_revocation, token_id_of
from node.core.entries import decode_entry
from node.core.patient_keys import PatientKey
from node.errors import Conflict, Forbidden, NotFound
from node.samples import SyntheticStudy, make_ct_study
from node.services import consent
from node.services.runtime import NodeRuntime, open_runtime
from node.store.instances import SqliteInstanceStore
from tests.support.nodes import init_node, run_cli
from tests.support.patients import make_grant

CUSTODIAN = "a.example/imageshare"
GRANTEE = "b.example/imageshare"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticStudy]:
    base = tmp_path_factory.mktemp("consent-service")
    node = init_node(base, CUSTODIAN)
    study = make_ct_study(base / "study", series=1, slices=2, patient_id="MRN-1")
    make_ct_study(base / "other", series=1, slices=1, patient_id="MRN-2")
    node.cli("import", str(base / "study"), str(base / "other"))
    return node.config, study


@pytest.fixture
def runtime(prepared: tuple[Path, SyntheticStudy]) -> Iterator[NodeRuntime]:
    runtime = open_runtime(prepared[0])
    yield runtime
    runtime.close()


def new_key() -> PatientKey:
    return PatientKey.derive(os.urandom(32), CUSTODIAN)


def own_entries(runtime: NodeRuntime) -> list[tuple[str, dict[str, object]]]:
    own = runtime.services.ledger.own
    return [(e.kind, e.fields) for e in map(decode_entry, own.entries(0, own.size()))]


def now() -> int:
    return int(time.time())


class TestReferences:
    def test_study_reference_resolves_and_is_keyed(
        self, runtime: NodeRuntime, prepared: tuple[Path, SyntheticStudy]
    ) -> None:
        study = prepared[1]
        ref = consent.study_reference(runtime, study.study_uid)
        assert len(ref) == 32 and study.study_uid.encode() not in ref
        assert consent.resolve_study_reference(runtime, ref) == study.study_uid
        key_file = runtime.config.data_dir / consent.REFERENCE_KEY_FILE
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    def test_unknown_reference_is_not_found(self, runtime: NodeRuntime) -> None:
        with pytest.raises(NotFound):
            consent.resolve_study_reference(runtime, bytes(32))


class TestEnrollPatient:
    def test_enrolling_the_same_key_twice_writes_one_entry(self, runtime: NodeRuntime) -> None:
        key = new_key()
        first = consent.enroll_patient(runtime, "MRN-1", key.public_key)
        again = consent.enroll_patient(runtime, "MRN-1", key.public_key)
        assert first.index is not None and again.index is None
        kinds = [k for k, f in own_entries(runtime) if f.get("key") == key.public_key]
        assert kinds == ["enroll"]

    def test_cli_enrolls_directly_when_no_daemon_runs(
        self, prepared: tuple[Path, SyntheticStudy]
    ) -> None:
        key = new_key()
        result = run_cli(
            "enroll",
            "--patient-id",
            "MRN-1",
            "--key",
            key.public_key_text,
            "--json",
            config=prepared[0],
        )
        assert json.loads(result.stdout)["studies"] == 1
        runtime = open_runtime(prepared[0])
        try:
            assert consent.enrolled_key(runtime, key.public_key) == key.public_key
        finally:
            runtime.close()

    def test_key_of_one_patient_cannot_be_enrolled_for_another(self, runtime: NodeRuntime):
        key = new_key()
        consent.enroll_patient(runtime, "MRN-1", key.public_key)
        with pytest.raises(Conflict):
            consent.enroll_patient(runtime, "MRN-2", key.public_key)


class TestCheckAccess:
    def test_grantee_presenting_an_unsubmitted_grant_gets_it_recorded_and_allowed(
        self, runtime: NodeRuntime
    ) -> None:
        key = new_key()
        consent.enroll_patient(runtime, "MRN-1", key.public_key)
        token = make_grant(key, CUSTODIAN, GRANTEE)
        verdict = consent.check_access(runtime, token, GRANTEE, None, now())
        assert verdict.allowed and len(verdict.studies) == 1
        again = consent.check_access(runtime, token, GRANTEE, None, now())
        assert again.allowed
        grants = [f for k, f in own_entries(runtime) if k == "grant" and f["token"] == token]
        assert len(grants) == 1

    def test_refusal_is_written_as_a_denial_naming_the_rule(self, runtime: NodeRuntime):
        key = new_key()
        consent.enroll_patient(runtime, "MRN-1", key.public_key)
        token = make_grant(key, CUSTODIAN, GRANTEE)
        verdict = consent.check_access(runtime, token, "c.example/imageshare", None, now())
        assert verdict.reason == "wrong_grantee"
        kind, fields = own_entries(runtime)[-1]
        assert kind == "denial"
        assert fields["token_id"] == token_id_of(token) and fields["rule"] == "wrong_grantee"
        assert fields["requester"] == "c.example/imageshare"

    def test_tokens_no_enrolled_key_signed_are_refused_without_a_denial(
        self, runtime: NodeRuntime
    ) -> None:
        key = new_key()
        consent.enroll_patient(runtime, "MRN-1", key.public_key)
        forged = make_grant(key, CUSTODIAN, GRANTEE)
        forged = forged[:-64] + bytes(64)  # the enrolled key, another signature
        stranger = make_grant(new_key(), CUSTODIAN, GRANTEE)  # a key nobody enrolled
        size = runtime.services.ledger.own.size()
        assert consent.check_access(runtime, forged, GRANTEE, None, now()).reason == (
            "bad_signature"
        )
        assert consent.check_access(runtime, stranger, GRANTEE, None, now()).reason == (
            "unknown_patient"
        )
        assert runtime.services.ledger.own.size() == size

    def test_a_retired_keys_grant_tried_again_is_on_the_record(self, runtime: NodeRuntime):
        key = new_key()
        consent.enroll_patient(runtime, "MRN-1", key.public_key)
        token = make_grant(key, CUSTODIAN, GRANTEE)
        consent.enroll_patient(runtime, "MRN-1", new_key().public_key)  # a lost phone
        assert consent.check_access(runtime, token, GRANTEE, None, now()).reason == "key_retired"
        kind, fields = own_entries(runtime)[-1]
        assert (kind, fields["rule"]) == ("denial", "key_retired")

    def test_tampered_token_is_refused_without_an_entry(self, runtime: NodeRuntime) -> None:
        size = runtime.services.ledger.own.size()
        assert consent.check_access(runtime, b"junk", GRANTEE, None, now()).reason == "tampered"
        assert runtime.services.ledger.own.size() == size

    def test_revoked_and_retired_grants_are_refused(self, runtime: NodeRuntime) -> None:
        key = new_key()
        consent.enroll_patient(runtime, "MRN-1", key.public_key)
        revoked, kept = (make_grant(key, CUSTODIAN, GRANTEE) for _ in range(2))
        consent.record_grant(runtime, revoked)
        revocation = sign_revocation(key.public_key, token_id_of(revoked), now(), key.sign)
        assert consent.record_revocation(runtime, revocation).newly
        assert not consent.record_revocation(runtime, revocation).newly
        assert consent.check_access(runtime, revoked, GRANTEE, None, now()).reason == "revoked"
        assert consent.check_access(runtime, kept, GRANTEE, None, now()).allowed
        consent.enroll_patient(runtime, "MRN-1", new_key().public_key)
        assert consent.check_access(runtime, kept, GRANTEE, None, now()).reason == "key_retired"

    def test_record_grant_refuses_a_grant_of_another_patients_study(
        self, runtime: NodeRuntime, prepared: tuple[Path, SyntheticStudy]
    ) -> None:
        key = new_key()
        consent.enroll_patient(runtime, "MRN-2", key.public_key)
        janes = consent.study_reference(runtime, prepared[1].study_uid)
        with pytest.raises(Forbidden, match="not_owner"):
            consent.record_grant(runtime, make_grant(key, CUSTODIAN, GRANTEE, (janes,)))

    def test_fetched_studies_are_not_owned_by_a_local_patient(
        self, runtime: NodeRuntime, prepared: tuple[Path, SyntheticStudy]
    ) -> None:
        uid = prepared[1].study_uid
        key = new_key()
        consent.enroll_patient(runtime, "MRN-1", key.public_key)
        assert len(consent.patient_studies(runtime, key.public_key)) == 1
        store = runtime.store
        assert isinstance(store, SqliteInstanceStore)  # the embedded backend's own setter
        store.set_study_source(uid, "fetched from x.example under token 00")
        try:
            assert consent.patient_studies(runtime, key.public_key) == []
        finally:
            store.set_study_source(uid, "local")


class TestStateFollowsTheLog:
    def test_lost_consent_tables_are_rebuilt_from_the_log(
        self, prepared: tuple[Path, SyntheticStudy]
    ) -> None:
        runtime = open_runtime(prepared[0])
        key = new_key()
        try:
            consent.enroll_patient(runtime, "MRN-1", key.public_key)
            token = make_grant(key, CUSTODIAN, GRANTEE)
            consent.record_grant(runtime, token)
            revocation = sign_revocation(key.public_key, token_id_of(token), now(), key.sign)
            consent.record_revocation(runtime, revocation)
        finally:
            runtime.close()
        data_dir = prepared[0].parent
        for leftover in data_dir.glob("consent.sqlite*"):
            leftover.unlink()
        runtime = open_runtime(prepared[0])
        try:
            assert consent.enrolled_key(runtime, key.public_key) == key.public_key
            assert len(consent.patient_studies(runtime, key.public_key)) == 1
            statuses = consent.token_statuses(runtime, key.public_key, now())
            assert [s["status"] for s in statuses] == ["revoked"]
        finally:
            runtime.close()
