"""Security review findings: each test pins one bug that was found and fixed."""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.core.patient_keys import PatientKey
from node.samples import make_ct_study
from node.services import consent
from node.services.runtime import open_runtime
from tests.support.nodes import NodeProcess, init_node
from tests.support.patients import send, signed_headers

CUSTODIAN = "a.example/imageshare"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    base = tmp_path_factory.mktemp("review-security")
    node = init_node(base, CUSTODIAN)
    make_ct_study(base / "study", series=1, slices=1, patient_id="MRN-R1")
    node.cli("import", str(base / "study"))
    node.start()
    yield node
    node.stop()


def enroll(node: NodeProcess, patient_id: str) -> PatientKey:
    key = PatientKey.derive(os.urandom(32), CUSTODIAN)
    body = json.dumps({"patient_id": patient_id, "key": key.public_key_text}).encode()
    headers = {**node.auth, "Content-Type": "application/json"}
    assert send(node, "POST", "/admin/api/enrollments", headers, body)[0] == 200
    return key


def test_patient_get_with_chunked_body_is_bounded(node: NodeProcess) -> None:
    """A /patient body is at most 64 KiB, also when it comes chunked (no Content-Length):
    otherwise anyone naming an enrolled (public) key makes the node buffer up to the
    app-wide limit (2 GiB) before the signature is checked."""
    key = enroll(node, "MRN-R1")
    body = b"x" * (200 * 1024)
    headers = signed_headers(key, "GET", "/patient/studies", body)
    connection = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=30)
    try:
        chunks = (body[i : i + 16384] for i in range(0, len(body), 16384))
        connection.request(
            "GET", "/patient/studies", body=chunks, headers=headers, encode_chunked=True
        )
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 413


def test_patient_without_subject_mapping_lists_no_other_studies(tmp_path: Path) -> None:
    """An enrolled key whose patient id the node cannot resolve (the private subject table
    lost with consent.sqlite, the patient holding no study yet) must see no study, not
    the studies whose PatientID is empty."""
    node = init_node(tmp_path, CUSTODIAN)
    make_ct_study(tmp_path / "anon", series=1, slices=1, patient_id="")
    node.cli("import", str(tmp_path / "anon"))
    key = PatientKey.derive(os.urandom(32), CUSTODIAN)
    runtime = open_runtime(node.config)
    try:
        consent.enroll_patient(runtime, "MRN-NO-STUDIES", key.public_key)
    finally:
        runtime.close()
    # "Deleting the file loses nothing": the tables are rebuilt from the log.
    for suffix in ("", "-wal", "-shm"):
        (node.data_dir / f"consent.sqlite{suffix}").unlink(missing_ok=True)
    runtime = open_runtime(node.config)
    try:
        assert consent.enrolled_key(runtime, key.public_key) == key.public_key
        assert consent.patient_studies(runtime, key.public_key) == []
    finally:
        runtime.close()
