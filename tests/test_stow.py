"""STOW-RS against a real node: dicomweb-client uploads, mixed parts, bad input, limits."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from requests.exceptions import HTTPError

from node.samples import make_ct_study
from tests.support.nodes import NodeProcess, init_node, wait_until

BOUNDARY = "stow-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
MAX_BODY_BYTES = 400_000
MAX_INSTANCE_BYTES = 64 * 1024
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_STUDY_MISMATCH = 0xA900
FAILURE_DUPLICATE_SOP_INSTANCE = 0x0111


def multipart(*bodies: bytes, boundary: str = BOUNDARY) -> bytes:
    out = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body + b"\r\n"
        for body in bodies
    )
    return out + f"--{boundary}--\r\n".encode()


def dicom_bytes(path: Path, **changes: Any) -> bytes:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Uploads:
    """One running node with small limits, and the files to send it."""

    def __init__(self, node: NodeProcess, base: Path) -> None:
        self.node = node
        self.base = base
        self.client = DICOMwebClient(url=node.url + "/dicomweb", headers=node.auth)
        self._made = 0

    def study(self, slices: int = 2) -> Any:
        self._made += 1
        return make_ct_study(
            self.base / f"study{self._made}", series=1, slices=slices, rows=32, columns=32
        )

    def post(
        self,
        body: bytes | Iterator[bytes],
        path: str = "/studies",
        content_type: str = CONTENT_TYPE,
    ) -> requests.Response:
        headers = {**self.node.auth, "Content-Type": content_type}
        url = self.node.url + "/dicomweb" + path
        return requests.post(url, data=body, headers=headers, timeout=30)

    def counts(self) -> tuple[int, int]:
        query = "SELECT (SELECT COUNT(*) FROM instances), (SELECT COUNT(*) FROM studies)"
        instances, studies = self.node.query_index(query)[0]
        return instances, studies

    def assert_nothing_left_over(self) -> None:
        assert list((self.node.data_dir / "tmp").iterdir()) == []
        health = requests.get(self.node.url + "/healthz", timeout=5)
        assert health.status_code == 200


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uploads]:
    base = tmp_path_factory.mktemp("stow")
    node = init_node(base, "stow.example/imageshare")
    config = node.config.read_text()
    node.config.write_text(
        config.replace("[http]\n", f"[http]\nmax_body_bytes = {MAX_BODY_BYTES}\n")
    )
    node.append_config(f"[store]\nmax_instance_bytes = {MAX_INSTANCE_BYTES}")
    node.start()
    try:
        yield Uploads(node, base)
    finally:
        node.stop()


def failed_items(response: requests.Response) -> list[dict[str, Any]]:
    return response.json().get("00081198", {}).get("Value", [])


def referenced_uids(response: requests.Response) -> list[str]:
    items = response.json().get("00081199", {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in items]


class TestStoreThroughDicomwebClient:
    def test_stored_instances_are_searchable_and_retrievable(self, uploads: Uploads) -> None:
        study = uploads.study()
        datasets = [pydicom.dcmread(p) for p in study.files]
        result = uploads.client.store_instances(datasets)
        stored = [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence]
        assert sorted(stored) == sorted(study.sop_uids)
        assert "FailedSOPSequence" not in result
        found = uploads.client.search_for_instances(study_instance_uid=study.study_uid)
        assert len(found) == 2
        back = uploads.client.retrieve_study(study.study_uid)
        assert {ds.SOPInstanceUID for ds in back} == set(study.sop_uids)

    def test_posted_bytes_come_back_unchanged(self, uploads: Uploads) -> None:
        study = uploads.study(slices=1)
        body = study.files[0].read_bytes()
        response = uploads.post(multipart(body), path=f"/studies/{study.study_uid}")
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/dicom+json"
        url = response.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
        retrieved = requests.get(url, headers=uploads.node.auth, timeout=10)
        assert body in retrieved.content

    def test_resending_is_idempotent(self, uploads: Uploads) -> None:
        study = uploads.study()
        body = multipart(*(p.read_bytes() for p in study.files))
        assert uploads.post(body).status_code == 200
        before = uploads.counts()
        again = uploads.post(body)
        assert again.status_code == 200
        assert sorted(referenced_uids(again)) == sorted(study.sop_uids)
        assert uploads.counts() == before

    def test_the_stored_study_is_named_in_location_headers(self, uploads: Uploads) -> None:
        study = uploads.study(slices=1)
        response = uploads.post(multipart(study.files[0].read_bytes()))
        url = f"{uploads.node.url}/dicomweb/studies/{study.study_uid}"
        assert response.headers["Content-Location"] == url
        assert response.headers["Location"] == url
        assert response.json()["00081190"]["Value"] == [url]

    def test_a_resend_with_other_content_fails_and_keeps_the_stored_instance(
        self, uploads: Uploads
    ) -> None:
        # The same SOP Instance UID with other bytes is no success (PS3.18 10.5.3): it is
        # reported as a Duplicate SOP Instance and the stored instance stays as it was.
        study = uploads.study(slices=1)
        original = study.files[0].read_bytes()
        assert uploads.post(multipart(original)).status_code == 200
        changed = dicom_bytes(study.files[0], PatientName="Other^Patient")
        response = uploads.post(multipart(changed))
        assert response.status_code == 409
        [failure] = failed_items(response)
        assert failure["00081197"]["Value"] == [FAILURE_DUPLICATE_SOP_INSTANCE]
        assert failure["00081155"]["Value"] == [study.sop_uids[0]]
        assert "other content" in failure["00000902"]["Value"][0]
        [back] = uploads.client.retrieve_study(study.study_uid)
        assert str(back.PatientName) == str(pydicom.dcmread(study.files[0]).PatientName)


def json_store_body(documents: bytes, bulk: dict[str, bytes]) -> bytes:
    """A STOW-RS body of datasets in the JSON model and their bulk data parts."""
    parts = [f"--{BOUNDARY}\r\nContent-Type: application/dicom+json\r\n\r\n".encode() + documents]
    for location, value in bulk.items():
        head = (
            f"--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Location: {location}\r\n\r\n"
        )
        parts.append(head.encode() + value)
    return b"\r\n".join(parts) + f"\r\n--{BOUNDARY}--\r\n".encode()


JSON_CONTENT_TYPE = f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'


class TestStoreJsonModel:
    def test_datasets_in_the_json_model_are_stored_with_their_bulk_data(
        self, uploads: Uploads
    ) -> None:
        study = uploads.study(slices=1)
        ds = pydicom.dcmread(study.files[0])
        document = ds.to_json_dict(
            bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "urn:pixels:1"
        )
        body = json_store_body(json.dumps([document]).encode(), {"urn:pixels:1": ds.PixelData})
        response = uploads.post(body, content_type=JSON_CONTENT_TYPE)
        assert response.status_code == 200, response.text
        assert referenced_uids(response) == [ds.SOPInstanceUID]
        [back] = uploads.client.retrieve_study(study.study_uid)
        assert back.PixelData == ds.PixelData
        assert back.PatientName == ds.PatientName
        assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"

    def test_a_dataset_naming_a_missing_part_fails_alone(self, uploads: Uploads) -> None:
        ds = pydicom.dcmread(uploads.study(slices=1).files[0])
        document = ds.to_json_dict(
            bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "urn:nowhere"
        )
        response = uploads.post(
            json_store_body(json.dumps([document]).encode(), {}), content_type=JSON_CONTENT_TYPE
        )
        assert response.status_code == 409
        [failure] = failed_items(response)
        assert failure["00081197"]["Value"] == [FAILURE_CANNOT_UNDERSTAND]
        assert "names no part" in failure["00000902"]["Value"][0]

    @pytest.mark.parametrize("metadata", [b"{not json", b'{"a": 1}', b"[" * 100_000])
    def test_metadata_that_is_no_array_of_datasets_is_refused_whole(
        self, uploads: Uploads, metadata: bytes
    ) -> None:
        before = uploads.counts()
        response = uploads.post(json_store_body(metadata, {}), content_type=JSON_CONTENT_TYPE)
        assert response.status_code == 400
        assert uploads.counts() == before
        uploads.assert_nothing_left_over()


class TestPartialFailures:
    def test_mixed_good_and_bad_parts_store_the_good_ones(self, uploads: Uploads) -> None:
        study = uploads.study(slices=1)
        good = study.files[0].read_bytes()
        before = uploads.counts()
        response = uploads.post(
            multipart(
                good,
                b"this is not a DICOM file at all" * 10,
                good[: len(good) // 2],
                dicom_bytes(study.files[0], SOPInstanceUID="1.2.3.997", StudyInstanceUID=None),
                dicom_bytes(study.files[0], SOPInstanceUID="1.2.3.998", SeriesInstanceUID=None),
                dicom_bytes(study.files[0], SOPInstanceUID=None),
            )
        )
        assert response.status_code == 202
        assert referenced_uids(response) == [study.sop_uids[0]]
        failed = failed_items(response)
        assert len(failed) == 5
        assert {f["00081197"]["Value"][0] for f in failed} == {FAILURE_CANNOT_UNDERSTAND}
        reasons = [f["00000902"]["Value"][0] for f in failed]
        assert "not a DICOM" in reasons[0] and "truncated" in reasons[1]
        assert [r.split()[-1] for r in reasons[2:]] == [
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
        ]
        assert uploads.counts() == (before[0] + 1, before[1] + 1)
        uploads.assert_nothing_left_over()

    def test_all_parts_failing_is_a_conflict(self, uploads: Uploads) -> None:
        before = uploads.counts()
        response = uploads.post(multipart(b"garbage", b"\x00" * 200))
        assert response.status_code == 409
        assert len(failed_items(response)) == 2
        assert uploads.counts() == before
        uploads.assert_nothing_left_over()

    def test_dicomweb_client_reports_a_conflict_as_an_error(self, uploads: Uploads) -> None:
        study = uploads.study(slices=1)
        with pytest.raises(HTTPError) as raised:
            uploads.client.store_instances(
                [pydicom.dcmread(study.files[0])], study_instance_uid="1.2.3.4"
            )
        assert raised.value.response is not None
        assert raised.value.response.status_code == 409

    def test_instance_of_another_study_than_the_path_fails(self, uploads: Uploads) -> None:
        study = uploads.study()
        other = uploads.study(slices=1)
        before = uploads.counts()
        response = uploads.post(
            multipart(study.files[0].read_bytes(), other.files[0].read_bytes()),
            path=f"/studies/{study.study_uid}",
        )
        assert response.status_code == 202
        assert referenced_uids(response) == [study.sop_uids[0]]
        [failure] = failed_items(response)
        assert failure["00081155"]["Value"] == [other.sop_uids[0]]
        assert failure["00081197"]["Value"] == [FAILURE_STUDY_MISMATCH]
        assert uploads.counts() == (before[0] + 1, before[1] + 1)
        uploads.assert_nothing_left_over()

    def test_instance_over_the_instance_limit_fails_alone(self, uploads: Uploads) -> None:
        study = uploads.study(slices=1)
        big = make_ct_study(uploads.base / "big", series=1, slices=1, rows=256, columns=256)
        before = uploads.counts()
        response = uploads.post(multipart(big.files[0].read_bytes(), study.files[0].read_bytes()))
        assert response.status_code == 202
        [failure] = failed_items(response)
        assert failure["00081197"]["Value"] == [FAILURE_OUT_OF_RESOURCES]
        assert referenced_uids(response) == [study.sop_uids[0]]
        assert uploads.counts()[0] == before[0] + 1
        uploads.assert_nothing_left_over()


class TestRefusedRequests:
    def test_wrong_content_type_is_unsupported_media_type(self, uploads: Uploads) -> None:
        study = uploads.study(slices=1)
        body = study.files[0].read_bytes()
        assert uploads.post(body, content_type="application/dicom").status_code == 415
        xml_parts = f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}'
        assert uploads.post(multipart(body), content_type=xml_parts).status_code == 415
        uploads.assert_nothing_left_over()

    def test_malformed_body_stores_nothing(self, uploads: Uploads) -> None:
        study = uploads.study()
        good = study.files[0].read_bytes()
        before = uploads.counts()
        cut_short = multipart(good, study.files[1].read_bytes())[: len(good) + 300]
        response = uploads.post(cut_short)
        assert response.status_code == 400
        assert "malformed" in response.json()["error"]
        no_boundary = uploads.post(good, content_type='multipart/related; type="application/dicom"')
        assert no_boundary.status_code == 400
        assert uploads.counts() == before
        uploads.assert_nothing_left_over()

    def test_body_over_the_limit_is_refused_whole(self, uploads: Uploads) -> None:
        studies = [uploads.study(slices=1) for _ in range(3)]
        padding = make_ct_study(uploads.base / "pad", series=1, slices=10, rows=150, columns=150)
        bodies = [s.files[0].read_bytes() for s in studies] + [
            p.read_bytes() for p in padding.files
        ]
        body = multipart(*bodies)
        assert len(body) > MAX_BODY_BYTES
        before = uploads.counts()
        assert uploads.post(body).status_code == 413
        chunked = uploads.post(iter([body[i : i + 50_000] for i in range(0, len(body), 50_000)]))
        assert chunked.status_code == 413
        assert uploads.counts() == before
        uploads.assert_nothing_left_over()

    def test_client_hanging_up_mid_upload_stores_nothing(self, uploads: Uploads) -> None:
        study = uploads.study()
        body = multipart(*(p.read_bytes() for p in study.files))
        before = uploads.counts()
        head = (
            f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {uploads.node.admin_token}\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", uploads.node.http_port)) as conn:
            conn.sendall(head + body[: len(body) - 1000])
            wait_until(lambda: list((uploads.node.data_dir / "tmp").iterdir()), timeout=10)
        wait_until(lambda: not list((uploads.node.data_dir / "tmp").iterdir()), timeout=10)
        assert uploads.counts() == before
        uploads.assert_nothing_left_over()

    def test_daemon_killed_mid_upload_restarts_with_nothing_half_stored(
        self, uploads: Uploads
    ) -> None:
        study = uploads.study()
        body = multipart(*(p.read_bytes() for p in study.files))
        before = uploads.counts()
        head = (
            f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {uploads.node.admin_token}\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", uploads.node.http_port)) as conn:
            conn.sendall(head + body[: len(body) - 1000])
            wait_until(lambda: list((uploads.node.data_dir / "tmp").iterdir()), timeout=10)
            uploads.node.kill9()
        uploads.node.start()
        assert uploads.counts() == before
        uploads.assert_nothing_left_over()
        assert uploads.client.search_for_studies(search_filters={"PatientID": "MRN-0001"})

    def test_missing_admin_token_is_refused(self, uploads: Uploads) -> None:
        study = uploads.study(slices=1)
        response = requests.post(
            uploads.node.url + "/dicomweb/studies",
            data=multipart(study.files[0].read_bytes()),
            headers={"Content-Type": CONTENT_TYPE},
            timeout=10,
        )
        assert response.status_code == 401
