"""/patient over HTTP against a real node: signed requests, replay, enrollment, grants."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from node.core.base64url import b64url_encode
from node.core.consent import sign_revocation, token_id_of
from node.core.patient_keys import PatientKey
from node.samples import make_ct_study
from tests.support import patients
from tests.support.nodes import NodeProcess, init_node
from tests.support.patients import call, send, signed_headers

CUSTODIAN = "a.example/imageshare"
GRANTEE = "b.example/imageshare"


def make_grant(key: PatientKey, scope: tuple[bytes, ...] | None = None, **changes: Any) -> bytes:
    fields = {"custodian": CUSTODIAN, "grantee": GRANTEE, **changes}
    return patients.make_grant(key, fields.pop("custodian"), fields.pop("grantee"), scope, **fields)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One custodian for the whole module: every test uses fresh patient keys."""
    base = tmp_path_factory.mktemp("patient-api")
    node = init_node(base, CUSTODIAN)
    make_ct_study(base / "study", series=1, slices=2, patient_id="MRN-7")
    node.cli("import", str(base / "study"))
    node.start()
    yield node
    node.stop()


@pytest.fixture
def alice(node: NodeProcess) -> PatientKey:
    """A fresh key enrolled for MRN-7 through the admin API (the CLI is tested below)."""
    key = PatientKey.derive(os.urandom(32), CUSTODIAN)
    body = json.dumps({"patient_id": "MRN-7", "key": key.public_key_text}).encode()
    headers = {**node.auth, "Content-Type": "application/json"}
    assert send(node, "POST", "/admin/api/enrollments", headers, body)[0] == 200
    return key


class TestSignedPatientRequests:
    def test_enrolled_patient_lists_their_studies(self, node: NodeProcess, alice: PatientKey):
        status, answer = call(node, alice, "GET", "/patient/studies")
        assert status == 200
        assert [s["instances"] for s in answer["studies"]] == [2]
        assert set(answer["studies"][0]) == {
            "ref",
            "date",
            "modalities",
            "description",
            "instances",
        }

    def test_replayed_request_is_refused(self, node: NodeProcess, alice: PatientKey) -> None:
        headers = signed_headers(alice, "GET", "/patient/studies")
        assert send(node, "GET", "/patient/studies", headers)[0] == 200
        status, answer = send(node, "GET", "/patient/studies", headers)
        assert status == 401 and answer["error"] == "replayed nonce"

    def test_unenrolled_key_is_refused(self, node: NodeProcess) -> None:
        stranger = PatientKey.derive(os.urandom(32), CUSTODIAN)
        status, answer = call(node, stranger, "GET", "/patient/studies")
        assert status == 401 and "unknown signer" in answer["error"]

    def test_stale_request_is_refused(self, node: NodeProcess, alice: PatientKey) -> None:
        headers = signed_headers(alice, "GET", "/patient/studies", now=int(time.time()) - 3600)
        status, answer = send(node, "GET", "/patient/studies", headers)
        assert status == 401 and answer["error"] == "stale timestamp"

    def test_oversized_body_is_refused_before_reading(self, node: NodeProcess, alice: PatientKey):
        body = bytes(70 * 1024)
        headers = signed_headers(alice, "POST", "/patient/grants", body)
        assert send(node, "POST", "/patient/grants", headers, body)[0] == 413

    def test_chunked_body_is_refused(self, node: NodeProcess, alice: PatientKey) -> None:
        headers = signed_headers(alice, "POST", "/patient/grants", b"x")
        request = urllib.request.Request(
            node.url + "/patient/grants", data=iter([b"x"]), method="POST", headers=headers
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400

    def test_unsigned_request_is_refused(self, node: NodeProcess, alice: PatientKey) -> None:
        status, answer = send(node, "GET", "/patient/studies", {})
        assert status == 401 and "Signature" in answer["error"]


class TestGrantSubmission:
    def test_grant_is_recorded_once_with_a_proof(self, node: NodeProcess, alice: PatientKey):
        token = make_grant(alice)
        status, first = call(node, alice, "POST", "/patient/grants", token)
        assert status == 200 and first["token_id"] == token_id_of(token).hex()
        assert first["index"] < first["size"] and first["checkpoint"].startswith(CUSTODIAN)
        status, again = call(node, alice, "POST", "/patient/grants", token)
        assert status == 200 and again["index"] == first["index"]

    def test_grant_signed_by_someone_else_is_refused(self, node: NodeProcess, alice: PatientKey):
        other = PatientKey.derive(os.urandom(32), CUSTODIAN)
        assert call(node, alice, "POST", "/patient/grants", make_grant(other))[0] == 403

    @pytest.mark.parametrize(
        ("changes", "rule"),
        [
            ({"custodian": "c.example/imageshare"}, "wrong_custodian"),
            ({"expires": int(time.time()) + 400 * 86_400}, "lifetime_too_long"),
            ({"not_before": 1_000, "expires": 2_000}, "expired"),
            ({"scope": (bytes(32),)}, "not_owner"),
        ],
    )
    def test_grant_that_may_not_be_recorded_is_refused_with_its_rule(
        self, node: NodeProcess, alice: PatientKey, changes: dict[str, Any], rule: str
    ) -> None:
        status, answer = call(node, alice, "POST", "/patient/grants", make_grant(alice, **changes))
        assert status == 403 and rule in answer["error"]

    def test_garbage_grant_is_bad_input(self, node: NodeProcess, alice: PatientKey) -> None:
        status, _ = call(node, alice, "POST", "/patient/grants", b"\x93\x01\x02")
        assert status == 400

    def test_revocation_changes_the_token_status(self, node: NodeProcess, alice: PatientKey):
        token = make_grant(alice)
        call(node, alice, "POST", "/patient/grants", token)
        assert call(node, alice, "GET", "/patient/tokens")[1]["tokens"][0]["status"] == "active"
        revocation = sign_revocation(alice.public_key, token_id_of(token), 1, alice.sign)
        status, answer = call(node, alice, "POST", "/patient/revocations", revocation)
        assert status == 200 and answer["token_id"] == token_id_of(token).hex()
        assert call(node, alice, "GET", "/patient/tokens")[1]["tokens"][0]["status"] == "revoked"

    def test_revocation_signed_by_another_key_is_refused(
        self, node: NodeProcess, alice: PatientKey
    ) -> None:
        other = PatientKey.derive(os.urandom(32), CUSTODIAN)
        revocation = sign_revocation(other.public_key, bytes(32), 1, other.sign)
        assert call(node, alice, "POST", "/patient/revocations", revocation)[0] == 403


class TestEnrollment:
    def test_staff_cli_enrolls_and_a_new_key_retires_the_old(self, node: NodeProcess) -> None:
        first, second = (PatientKey.derive(os.urandom(32), CUSTODIAN) for _ in range(2))
        results = [
            json.loads(
                node.cli(
                    "enroll", "--patient-id", "MRN-9", "--key", k.public_key_text, "--json"
                ).stdout
            )
            for k in (first, second)
        ]
        assert results[0]["replaced"] is None and results[0]["index"] >= 0
        assert results[1]["replaced"] == first.public_key_text
        assert call(node, first, "GET", "/patient/studies")[0] == 401
        assert call(node, second, "GET", "/patient/studies")[1] == {"studies": []}

    def test_enrollment_needs_the_admin_token(self, node: NodeProcess) -> None:
        body = json.dumps({"patient_id": "MRN-7", "key": b64url_encode(bytes(32))}).encode()
        status, _ = send(node, "POST", "/admin/api/enrollments", {}, body)
        assert status == 401

    def test_key_of_another_patient_cannot_be_enrolled_again(
        self, node: NodeProcess, alice: PatientKey
    ) -> None:
        result = node.cli(
            "enroll", "--patient-id", "MRN-8", "--key", alice.public_key_text, check=False
        )
        assert result.returncode == 1 and "another patient" in result.stderr

    def test_malformed_key_is_a_clear_error(self, node: NodeProcess) -> None:
        result = node.cli("enroll", "--patient-id", "MRN-7", "--key", "not-a-key", check=False)
        assert result.returncode == 1 and "patient key" in result.stderr
