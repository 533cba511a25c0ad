"""PDI media downloads against a real node: the ZIP's layout, its DICOMDIR read by pydicom
and by DCMTK, every instance byte-identical, bounded memory on the 400-instance study,
and who may download (staff with the admin token, the patient with a signed request)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.fileset import FileSet

from node.core.patient_keys import PatientKey
from node.samples import SyntheticStudy, make_ct_study
from tests.support.memory import peak_rss_bytes
from tests.support.nodes import NodeProcess, init_node
from tests.support.patients import call, enroll_new_key, signed_headers
from tests.support.samples import copy_pydicom_samples

PEAK_RSS_LIMIT = 150 * 1024 * 1024
# PS3.10 8.2 / PS3.12: File ID components of 1-8 upper-case letters, digits and "_".
FILE_ID_COMPONENT = re.compile(r"[A-Z0-9_]{1,8}")
# rtdose has no Instance Number (its RT DOSE record needs one); SC_rgb_jpeg no Patient ID.
SAMPLES = ("rtdose.dcm", "SC_rgb_jpeg.dcm", "image_dfl.dcm")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(url: str, headers: dict[str, str], target: Path) -> requests.Response:
    """GET ``url`` streamed into ``target``; the response (its body already consumed)."""
    with requests.get(url, headers=headers, stream=True, timeout=300) as response:
        if response.status_code == 200:
            with open(target, "wb") as f:
                for chunk in response.iter_content(1024 * 1024):
                    f.write(chunk)
        else:
            target.write_bytes(response.content)
        return response


def unzip(archive: Path, target: Path) -> list[str]:
    with zipfile.ZipFile(archive) as z:
        assert z.testzip() is None  # every CRC checks
        z.extractall(target)
        return z.namelist()


@dataclass
class Media:
    node: NodeProcess
    study: SyntheticStudy
    damaged: SyntheticStudy  # its files get damaged in the store by a test
    samples: dict[str, Path]
    patient: PatientKey
    work: Path

    def staff_url(self, study_uid: str) -> str:
        return f"{self.node.url}/admin/api/studies/{study_uid}/media.zip"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Media]:
    base = tmp_path_factory.mktemp("pdi")
    node = init_node(base, "pdi.example/imageshare")
    study = make_ct_study(base / "in" / "ct", series=2, slices=3, rows=16, columns=16)
    damaged = make_ct_study(
        base / "in" / "damaged", series=1, slices=2, rows=16, columns=16, patient_id="MRN-0002"
    )
    samples = copy_pydicom_samples(SAMPLES, base / "in" / "samples")
    node.cli("import", str(base / "in"))
    patient = enroll_new_key(node, study.patient_id)
    node.start()
    try:
        yield Media(node, study, damaged, samples, patient, base / "work")
    finally:
        node.stop()


class TestLayout:
    def test_a_study_downloads_as_pdi_media_with_every_instance_unchanged(
        self, media: Media
    ) -> None:
        archive, out = media.work / "ct.zip", media.work / "ct"
        media.work.mkdir(exist_ok=True)
        response = download(media.staff_url(media.study.study_uid), media.node.auth, archive)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/zip"
        assert "attachment" in response.headers["Content-Disposition"]
        names = unzip(archive, out)
        assert names[:3] == ["README.TXT", "INDEX.HTM", "DICOMDIR"]
        instance_names = names[3:]
        assert len(instance_names) == 6
        for name in instance_names:
            assert all(FILE_ID_COMPONENT.fullmatch(c) for c in name.split("/")), name
        file_set = FileSet(pydicom.dcmread(out / "DICOMDIR"))
        assert len(file_set) == 6
        stored = {sha256_of(p) for p in media.study.files}
        listed = {sha256_of(Path(instance.path)) for instance in file_set}
        assert listed == stored
        assert "6 images" in (out / "README.TXT").read_text()
        assert "CT CHEST" in (out / "INDEX.HTM").read_text()

    @pytest.mark.parametrize("name", SAMPLES)
    def test_instances_lacking_directory_record_values_are_still_listed_unchanged(
        self, media: Media, name: str
    ) -> None:
        ds = pydicom.dcmread(media.samples[name], stop_before_pixels=True)
        archive, out = media.work / f"{name}.zip", media.work / name
        media.work.mkdir(exist_ok=True)
        assert download(media.staff_url(ds.StudyInstanceUID), media.node.auth, archive).ok
        unzip(archive, out)
        [instance] = list(FileSet(pydicom.dcmread(out / "DICOMDIR")))
        assert instance.SOPInstanceUID == ds.SOPInstanceUID
        assert sha256_of(Path(instance.path)) == sha256_of(media.samples[name])

    def test_dcmtk_reads_the_dicomdir(self, media: Media) -> None:
        archive, out = media.work / "dcmtk.zip", media.work / "dcmtk"
        media.work.mkdir(exist_ok=True)
        download(media.staff_url(media.study.study_uid), media.node.auth, archive)
        unzip(archive, out)
        result = subprocess.run(
            ["dcmdump", "+sd", "DICOMDIR"], cwd=out, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("IMAGE") >= 6
        assert "E:" not in result.stderr


class TestAccess:
    def test_staff_need_the_admin_token(self, media: Media) -> None:
        response = requests.get(media.staff_url(media.study.study_uid), timeout=30)
        assert response.status_code == 401

    def test_an_unknown_study_is_404_in_json_before_any_zip_byte(self, media: Media) -> None:
        response = requests.get(media.staff_url("1.2.3.4"), headers=media.node.auth, timeout=30)
        assert response.status_code == 404
        assert "no such study" in response.json()["error"]

    def test_a_damaged_stored_file_is_a_500_in_json_before_any_zip_byte(self, media: Media) -> None:
        digest = sha256_of(media.damaged.files[1])
        stored = media.node.data_dir / "objects" / digest[:2] / f"{digest}.dcm"
        assert stored.exists()
        with open(stored, "r+b") as f:
            f.truncate(stored.stat().st_size // 2)
        response = requests.get(
            media.staff_url(media.damaged.study_uid), headers=media.node.auth, timeout=30
        )
        assert response.status_code == 500
        assert "missing or damaged" in response.json()["error"]

    def test_the_patient_downloads_their_own_study_with_a_signed_request(
        self, media: Media
    ) -> None:
        status, answer = call(media.node, media.patient, "GET", "/patient/studies")
        assert status == 200
        [study] = answer["studies"]
        path = f"/patient/studies/{study['ref']}/media.zip"
        archive, out = media.work / "patient.zip", media.work / "patient"
        media.work.mkdir(exist_ok=True)
        headers = signed_headers(media.patient, "GET", path)
        response = download(media.node.url + path, headers, archive)
        assert response.status_code == 200
        assert response.headers["Cache-Control"] == "private, no-store"
        unzip(archive, out)
        assert len(FileSet(pydicom.dcmread(out / "DICOMDIR"))) == 6

    def test_a_patient_cannot_download_another_patients_study(self, media: Media) -> None:
        stranger = enroll_new_key(media.node, "MRN-STRANGER")
        _, answer = call(media.node, media.patient, "GET", "/patient/studies")
        path = f"/patient/studies/{answer['studies'][0]['ref']}/media.zip"
        response = requests.get(
            media.node.url + path, headers=signed_headers(stranger, "GET", path), timeout=30
        )
        assert response.status_code == 403
        unsigned = requests.get(media.node.url + path, timeout=30)
        assert unsigned.status_code == 401


@pytest.mark.slow
class TestReferenceStudy:
    def test_the_400_instance_study_streams_as_media_in_bounded_memory(
        self, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        base = tmp_path_factory.mktemp("pdi_big")
        study = make_ct_study(base / "in", series=2, slices=200, rows=512, columns=512)
        node = init_node(base, "pdibig.example/imageshare")
        node.cli("import", str(base / "in"), timeout=600)
        node.start()
        try:
            archive, out = base / "study.zip", base / "out"
            url = f"{node.url}/admin/api/studies/{study.study_uid}/media.zip"
            assert download(url, node.auth, archive).status_code == 200
            assert node.process is not None
            peak = peak_rss_bytes(node.process.pid)
        finally:
            node.stop()
        assert peak is not None and peak < PEAK_RSS_LIMIT
        unzip(archive, out)
        file_set = FileSet(pydicom.dcmread(out / "DICOMDIR"))
        assert len(file_set) == 400
        listed = {sha256_of(Path(instance.path)) for instance in file_set}
        assert listed == {sha256_of(p) for p in study.files}
        result = subprocess.run(
            ["dcmdump", "+sd", "DICOMDIR"], cwd=out, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.count('"IMAGE"') + result.stdout.count("[IMAGE") >= 400
