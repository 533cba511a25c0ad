"""/patient over HTTP against a real node: signed requests, replay, enrollment, grants."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from node.core.consent import GrantFields, sign_grant, sign_revocation, token_id_of
from node.core.patient_keys import PatientKey, b64url
from node.core.signed_requests import make_headers, patient_signer
from tests.support.nodes import NodeProcess
from tests.support.studies import make_ct_study

CUSTODIAN = "a.example/imageshare"
GRANTEE = "b.example/imageshare"


def send(
    node: NodeProcess, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, Any]:
    request = urllib.request.Request(
        node.url + path, data=body if method == "POST" else None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def signed_headers(
    key: PatientKey, method: str, path: str, body: bytes = b"", now: int | None = None
) -> dict[str, str]:
    return make_headers(
        key.sign,
        patient_signer(key.public_key),
        method,
        path,
        body,
        int(time.time()) if now is None else now,
        os.urandom(16),
    )


def call(node: NodeProcess, key: PatientKey, method: str, path: str, body: bytes = b"") -> Any:
    return send(node, method, path, signed_headers(key, method, path, body), body)


def make_grant(key: PatientKey, scope: tuple[bytes, ...] | None = None, **changes: Any) -> bytes:
    now = int(time.time())
    fields: dict[str, Any] = {
        "patient_key": key.public_key,
        "custodian": CUSTODIAN,
        "grantee": GRANTEE,
        "scope": scope,
        "not_before": now,
        "expires": now + 3600,
        "nonce": os.urandom(16),
    }
    fields.update(changes)
    return sign_grant(GrantFields(**fields), key.sign)


@pytest.fixture
def node(node_factory: Any, tmp_path: Path) -> NodeProcess:
    node: NodeProcess = node_factory(CUSTODIAN)
    make_ct_study(tmp_path / "study", series=1, slices=2, patient_id="MRN-7")
    node.cli("import", str(tmp_path / "study"))
    return node.start()


@pytest.fixture
def alice(node: NodeProcess) -> PatientKey:
    key = PatientKey.derive(os.urandom(32), CUSTODIAN)
    node.cli("enroll", "--patient-id", "MRN-7", "--key", key.public_key_text)
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
    def test_enrollment_needs_the_admin_token(self, node: NodeProcess) -> None:
        body = json.dumps({"patient_id": "MRN-7", "key": b64url(bytes(32))}).encode()
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
