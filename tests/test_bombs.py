"""Deflate bombs against real node processes: STOW-RS, C-STORE, import, stored files, transfer.

A bomb is a small DICOM file in Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99)
whose dataset inflates to hundreds of MiB or more. The node must refuse it at every way in,
and never inflate one it already holds, while its peak RSS (VmHWM) stays under
PEAK_RSS_LIMIT and it goes on serving.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import sqlite3
import struct
import subprocess
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind as StudyFind,
)

from node.errors import BadInput
from node.services.wallet import Wallet
from node.store.dicom_header import InflateLimits, read_dataset
from tests.support.memory import peak_rss_bytes, run_with_peak_rss
from tests.support.nodes import IMAGESHARE, NodeProcess, init_node, wait_until
from tests.support.patients import signed_headers

PEAK_RSS_LIMIT = 300 * 1024 * 1024
MIB = 1024 * 1024
BOUNDARY = "bomb-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_CANNOT_UNDERSTAND = 0xC000
PATIENT_ID = "MRN-BOMB-1"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


# -- files ----------------------------------------------------------------------------


def _dataset(
    transfer_syntax: str, study_uid: str, series_uid: str, number: int, rows: int = 16
) -> Dataset:
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = PATIENT_ID
    ds.PatientName = "Bomb^Test"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def plain_file(study_uid: str, series_uid: str, number: int) -> bytes:
    """An ordinary Explicit VR Little Endian CT instance of 64 x 64 pixels."""
    ds = _dataset(ExplicitVRLittleEndian, study_uid, series_uid, number, rows=64)
    ds.PixelData = os.urandom(64 * 64 * 2)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def deflated_file(study_uid: str, series_uid: str, number: int) -> bytes:
    """An honest deflated instance, written by pydicom."""
    ds = _dataset(DeflatedExplicitVRLittleEndian, study_uid, series_uid, number, rows=64)
    ds.PixelData = bytes(range(256)) * 32
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def bomb(
    inflated_mib: int,
    declared_length: int | None = None,
    noise_per_mib: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    number: int = 1,
) -> bytes:
    """A deflated instance whose Pixel Data inflates to ``inflated_mib`` MiB.

    The deflated stream repeats one full-flushed block per MiB (zeros, with
    ``noise_per_mib`` random bytes to lower the ratio), so a GiB costs no time to build.
    ``declared_length`` gives the Pixel Data element another length than it holds.
    """
    ds = _dataset(
        DeflatedExplicitVRLittleEndian,
        study_uid or generate_uid(),
        series_uid or generate_uid(),
        number,
        rows=1024,
    )
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    length = inflated_mib * MIB if declared_length is None else declared_length
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)
    return head.getvalue() + repeated_deflate(
        body.getvalue() + pixel_header, inflated_mib, noise_per_mib
    )


def element_bomb(elements: int, deflated: bool) -> bytes:
    """An instance followed by ``elements`` tiny private elements (LO of 2 bytes), each
    with its own tag: 10 MB per million, which pydicom would turn into ~400 MB of objects."""
    syntax = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = _dataset(syntax, generate_uid(), generate_uid(), 1)
    del ds.PixelRepresentation  # every tag below the private groups that follow
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    layout = np.dtype([("g", "<u2"), ("e", "<u2"), ("vr", "S2"), ("n", "<u2"), ("v", "S2")])
    index = np.arange(elements)
    records = np.zeros(elements, layout)
    records["g"], records["e"] = 0x0029 + 2 * (index >> 12), 0x1000 + (index & 0xFFF)
    records["vr"], records["n"], records["v"] = b"LO", 2, b"ab"
    tiny = records.tobytes()
    if not deflated:
        return head.getvalue() + body.getvalue() + tiny
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    return head.getvalue() + deflater.compress(body.getvalue() + tiny) + deflater.flush()


def repeated_deflate(prefix: bytes, mib: int, noise_per_mib: int = 0) -> bytes:
    """A raw deflate stream of ``prefix`` then ``mib`` MiB of zeros (each with
    ``noise_per_mib`` random bytes first), built from one full-flushed block repeated."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = [deflater.compress(prefix), deflater.flush(zlib.Z_FULL_FLUSH)]
    noise = os.urandom(noise_per_mib)
    block = deflater.compress(noise + b"\0" * (MIB - len(noise)))
    stream += [block + deflater.flush(zlib.Z_FULL_FLUSH)] * mib
    stream.append(deflater.flush())
    return b"".join(stream)


def gzip_of_zeros(prefix: bytes, mib: int) -> bytes:
    """A gzip member (RFC 1952) of ``prefix`` then ``mib`` MiB of zeros."""
    crc = zlib.crc32(prefix)
    zeros = b"\0" * MIB
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    size = (len(prefix) + mib * MIB) % 2**32
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + repeated_deflate(prefix, mib) + struct.pack("<II", crc, size)


def multipart(*bodies: bytes) -> bytes:
    parts = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body + b"\r\n"
        for body in bodies
    )
    return parts + f"--{BOUNDARY}--\r\n".encode()


# -- node helpers -----------------------------------------------------------------------


def peak_rss(node: NodeProcess) -> int:
    assert node.process is not None
    peak = peak_rss_bytes(node.process.pid)
    assert peak is not None, "no VmHWM in /proc status"
    return peak


def counts(node: NodeProcess) -> tuple[int, int]:
    """(indexed instances, object files) of a node."""
    db = sqlite3.connect(f"file:{node.data_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        instances = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    finally:
        db.close()
    return int(instances), len(list((node.data_dir / "objects").rglob("*.dcm")))


def largest_object(node: NodeProcess) -> int:
    return max((p.stat().st_size for p in (node.data_dir / "objects").rglob("*.dcm")), default=0)


def stow(node: NodeProcess, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return requests.post(
        node.url + "/dicomweb/studies",
        data=body,
        headers={**node.auth, "Content-Type": STOW_TYPE, **(headers or {})},
        timeout=60,
    )


def failure_codes(response: requests.Response) -> list[int]:
    failed = response.json().get("00081198", {}).get("Value", [])
    return [item["00081197"]["Value"][0] for item in failed]


def failure_reasons(response: requests.Response) -> list[str]:
    failed = response.json().get("00081198", {}).get("Value", [])
    return [item["00000902"]["Value"][0] for item in failed]


def assert_serving(node: NodeProcess) -> None:
    with urllib.request.urlopen(node.url + "/healthz", timeout=10) as response:
        assert response.status == 200
    assert node.get_json("/dicomweb/studies?limit=1") is not None


def dcmtk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout, check=False
    )


# The bomber is a configured query/retrieve caller: its bombs must be stopped by the limits,
# not by access control.
BOMBER_CALLER = '[[dimse.callers]]\nae_title = "BOMBER"\nhost = "127.0.0.1"\n'


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node with the default limits (1 GiB per instance, inflation ratio 100)."""
    made = init_node(tmp_path_factory.mktemp("bombs"), "bombs.example/imageshare")
    made.append_config("[federation]\ndiscovery = false\n\n" + BOMBER_CALLER)
    made.start()
    wait_until(lambda: dcmtk("echoscu", *_aet(made)).returncode == 0, message="DIMSE")
    yield made
    made.stop()


def _aet(node: NodeProcess) -> list[str]:
    return ["-aet", "BOMBER", "-aec", "IMAGESHARE", "127.0.0.1", str(node.dimse_port)]


class TestBombsAreRefusedAtEveryWayIn:
    def test_stow_rs_bomb_of_1_gib_is_refused_early_in_bounded_memory(
        self, node: NodeProcess
    ) -> None:
        before = counts(node)
        honest = plain_file(generate_uid(), generate_uid(), 1)
        response = stow(node, multipart(bomb(1024), honest))
        assert response.status_code == 202, response.text
        assert failure_codes(response) == [FAILURE_OUT_OF_RESOURCES]
        assert "inflates more than 100 times" in failure_reasons(response)[0]
        assert counts(node) == (before[0] + 1, before[1] + 1)  # the honest part alone
        assert peak_rss(node) < PEAK_RSS_LIMIT
        assert_serving(node)

    def test_a_4_gib_length_declared_inside_the_deflated_stream_is_refused_as_truncated(
        self, node: NodeProcess
    ) -> None:
        before = counts(node)
        response = stow(node, multipart(bomb(1, declared_length=0xFFFFFFF0)))
        assert response.status_code == 409, response.text
        assert failure_codes(response) == [FAILURE_CANNOT_UNDERSTAND]
        assert "truncated" in failure_reasons(response)[0]
        assert counts(node) == before

    def test_stow_rs_file_of_a_million_tiny_elements_is_refused_in_bounded_memory(
        self, node: NodeProcess
    ) -> None:
        before = counts(node)
        response = stow(node, multipart(element_bomb(1_000_000, deflated=True)))
        assert response.status_code == 409, response.text
        assert failure_codes(response) == [FAILURE_CANNOT_UNDERSTAND]
        assert "too many elements" in failure_reasons(response)[0]
        assert counts(node) == before
        assert peak_rss(node) < PEAK_RSS_LIMIT
        assert_serving(node)

    def test_an_honest_deflated_instance_is_stored_and_its_metadata_served(
        self, node: NodeProcess
    ) -> None:
        study_uid, series_uid = generate_uid(), generate_uid()
        data = deflated_file(study_uid, series_uid, 1)
        response = stow(node, multipart(data))
        assert response.status_code == 200, response.text
        (document,) = node.get_json(f"/dicomweb/studies/{study_uid}/metadata")
        assert document["00100020"]["Value"] == [PATIENT_ID]
        assert document["00083002"]["Value"] == [DeflatedExplicitVRLittleEndian]

    def test_c_store_bomb_from_storescu_is_refused_in_bounded_memory(
        self, node: NodeProcess, tmp_path: Path
    ) -> None:
        before = counts(node)
        path = tmp_path / "bomb.dcm"
        path.write_bytes(bomb(256))
        # -xd -R: propose only deflated, so storescu sends the bomb deflated as it is.
        result = dcmtk("storescu", "-v", "-xd", "-R", *_aet(node), str(path))
        assert "Refused: OutOfResources" in result.stdout + result.stderr, result.stderr
        assert counts(node) == before
        assert peak_rss(node) < PEAK_RSS_LIMIT
        assert dcmtk("echoscu", *_aet(node)).returncode == 0
        assert_serving(node)

    def test_query_identifier_in_deflated_syntax_is_refused_in_bounded_memory(
        self, node: NodeProcess
    ) -> None:
        ae = AE(ae_title="BOMBER")
        ae.add_requested_context(StudyFind, DeflatedExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="IMAGESHARE")
        try:
            accepted = assoc.is_established and bool(assoc.accepted_contexts)
            if accepted:  # the attack, where the node takes the deflated context
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "STUDY"
                identifier.add_new(0x00291010, "OB", bytes(256 * MIB))  # ~256 KB deflated
                list(assoc.send_c_find(identifier, StudyFind))
        finally:
            if assoc.is_established:
                assoc.release()
        assert not accepted
        assert peak_rss(node) < PEAK_RSS_LIMIT
        assert dcmtk("echoscu", *_aet(node)).returncode == 0

    def test_import_rejects_the_bomb_with_its_reason_in_bounded_memory(
        self, node: NodeProcess, tmp_path: Path
    ) -> None:
        study_uid, series_uid = generate_uid(), generate_uid()
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "a_bomb.dcm").write_bytes(bomb(1024))
        (tmp_path / "in" / "b_honest.dcm").write_bytes(deflated_file(study_uid, series_uid, 1))
        run = _import(node.config, tmp_path / "in", tmp_path)
        assert run.peak_rss < PEAK_RSS_LIMIT
        summary = json.loads(run.stdout)
        assert summary["stored"] == 1
        ((rejected),) = summary["rejected"]
        assert rejected["path"].endswith("a_bomb.dcm")
        assert "inflates more than 100 times" in rejected["reason"]

    def test_import_rejects_a_plain_file_of_a_million_tiny_elements_in_bounded_memory(
        self, node: NodeProcess, tmp_path: Path
    ) -> None:
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "elements.dcm").write_bytes(element_bomb(1_000_000, deflated=False))
        run = _import(node.config, tmp_path / "in", tmp_path)
        assert run.peak_rss < PEAK_RSS_LIMIT
        ((rejected),) = json.loads(run.stdout)["rejected"]
        assert "too many elements" in rejected["reason"]

    def test_the_instance_limit_holds_for_a_bomb_below_the_ratio(self, tmp_path: Path) -> None:
        small = init_node(tmp_path, "small.example/imageshare")
        small.append_config(f"[store]\nmax_instance_bytes = {32 * MIB}")
        (tmp_path / "in").mkdir()
        # About 40 times smaller than it inflates: under the ratio, over the 32 MiB limit.
        (tmp_path / "in" / "bomb.dcm").write_bytes(bomb(48, noise_per_mib=16 * 1024))
        run = _import(small.config, tmp_path / "in", tmp_path)
        ((rejected),) = json.loads(run.stdout)["rejected"]
        assert f"inflates past the limit of {32 * MIB} bytes" in rejected["reason"]
        assert counts(small) == (0, 0)

    def test_gzip_stow_body_that_inflates_past_the_ratio_is_refused_in_bounded_memory(
        self, node: NodeProcess
    ) -> None:
        before = counts(node)
        # One part of 1 GiB of zeros: about 1 MB once gzipped.
        head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body = gzip_of_zeros(head, 1024)
        response = stow(node, body, {"Content-Encoding": "gzip"})
        assert response.status_code == 413, response.text
        assert "inflates more than" in response.json()["error"]
        assert counts(node) == before
        assert peak_rss(node) < PEAK_RSS_LIMIT
        assert_serving(node)

    def test_gzip_stow_body_within_the_limits_is_stored(self, node: NodeProcess) -> None:
        data = deflated_file(generate_uid(), generate_uid(), 1)
        response = stow(node, gzip.compress(multipart(data)), {"Content-Encoding": "gzip"})
        assert response.status_code == 200, response.text


@dataclass
class ImportRun:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int


def _import(config: Path, directory: Path, scratch: Path) -> ImportRun:
    """`imageshare import --json` as a child process, with its own peak RSS."""
    command = [*IMAGESHARE, "import", str(directory), "-c", str(config), "--json"]
    out_path, err_path = scratch / "import.out", scratch / "import.err"
    with open(out_path, "w+") as out, open(err_path, "w+") as err:
        measured = run_with_peak_rss(command, stdout=out, stderr=err)
    return ImportRun(
        measured.returncode, out_path.read_text(), err_path.read_text(), measured.peak_rss
    )


# -- a bomb already stored (before the limits held) ------------------------------------


@dataclass
class Hospitals:
    a: NodeProcess  # custodian: holds a bomb among a study, stored with a lax ratio
    b: NodeProcess  # grantee, default limits
    study_uid: str
    series_uid: str
    bomb_uid: str
    wallet: Wallet


LAX_RATIO = "[store]\nmax_inflation_ratio = 1000000000.0\n"


def _peer(node: NodeProcess) -> str:
    return f'[[peers]]\norigin = "{node.origin}"\nurl = "{node.url}"\nvkey = "{node.vkey}"\n'


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hospitals]:
    base = tmp_path_factory.mktemp("stored")
    a = init_node(base, "a.example/imageshare", "a")
    b = init_node(base, "b.example/imageshare", "b")
    settings = "[federation]\ndiscovery = false\nreplicate_interval = 0.3\n"
    a.append_config(settings + _peer(b) + BOMBER_CALLER)
    b.append_config(settings + _peer(a))
    study_uid, series_uid = generate_uid(), generate_uid()
    files = base / "study"
    files.mkdir()
    (files / "1.dcm").write_bytes(plain_file(study_uid, series_uid, 1))
    (files / "2.dcm").write_bytes(bomb(256, study_uid=study_uid, series_uid=series_uid, number=2))
    (files / "3.dcm").write_bytes(plain_file(study_uid, series_uid, 3))
    # As a node stored it before it bounded inflation; then it runs with the default limits.
    original = a.config.read_text()
    a.append_config(LAX_RATIO)
    assert json.loads(a.cli("import", str(files), "--json").stdout)["stored"] == 3
    a.config.write_text(original)
    bomb_uid = str(read_file_meta_info(files / "2.dcm").MediaStorageSOPInstanceUID)
    wallet = Wallet.create(base / "wallet", None)
    a.cli("enroll", "--patient-id", PATIENT_ID, f"--key={wallet.key_for(a.origin).public_key_text}")
    try:
        a.start()
        b.start()
        yield Hospitals(a, b, study_uid, series_uid, bomb_uid, wallet)
    finally:
        a.stop()
        b.stop()


def _patient_get(node: NodeProcess, wallet: Wallet, path: str) -> tuple[int, bytes]:
    headers = signed_headers(wallet.key_for(node.origin), "GET", path)
    request = urllib.request.Request(node.url + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class TestStoredBombsAreNeverInflated:
    def test_metadata_of_a_stored_bomb_is_read_without_inflating_its_pixels(
        self, hospitals: Hospitals
    ) -> None:
        a = hospitals.a
        path = f"/dicomweb/studies/{hospitals.study_uid}/series/{hospitals.series_uid}/instances"
        response = requests.get(f"{a.url}{path}/{hospitals.bomb_uid}/metadata", headers=a.auth)
        assert response.status_code == 200, response.text
        (document,) = response.json()
        assert document["00080018"]["Value"] == [hospitals.bomb_uid]
        assert "BulkDataURI" in document["7FE00010"]
        assert peak_rss(a) < PEAK_RSS_LIMIT
        assert len(a.get_json(f"/dicomweb/studies/{hospitals.study_uid}/instances")) == 3
        assert_serving(a)

    def test_c_get_of_a_stored_bomb_sends_nothing_in_bounded_memory(
        self, hospitals: Hospitals, tmp_path: Path
    ) -> None:
        a = hospitals.a
        result = dcmtk(
            "getscu", "-S", *_aet(a), "-od", str(tmp_path),
            "-k", "QueryRetrieveLevel=IMAGE",
            "-k", f"StudyInstanceUID={hospitals.study_uid}",
            "-k", f"SeriesInstanceUID={hospitals.series_uid}",
            "-k", f"SOPInstanceUID={hospitals.bomb_uid}",
        )  # fmt: skip
        assert list(tmp_path.iterdir()) == [], result.stdout + result.stderr
        assert peak_rss(a) < PEAK_RSS_LIMIT
        assert dcmtk("echoscu", *_aet(a)).returncode == 0
        log = a.log_path.read_text()
        assert "C-GET from 'BOMBER' at 127.0.0.1 refused: a stored instance cannot be read" in log
        assert "Traceback" not in log

    def test_preview_of_a_stored_bomb_is_refused_in_bounded_memory(
        self, hospitals: Hospitals
    ) -> None:
        a = hospitals.a
        status, body = _patient_get(a, hospitals.wallet, "/patient/studies")
        assert status == 200, body
        (study,) = json.loads(body)["studies"]
        # The middle image of the series is the bomb (instance number 2 of 3).
        path = f"/patient/studies/{study['ref']}/series/0/preview"
        status, body = _patient_get(a, hospitals.wallet, path)
        assert status == 400 and b"inflates more than 100 times" in body
        assert peak_rss(a) < PEAK_RSS_LIMIT
        assert_serving(a)

    def test_grantee_refuses_a_bomb_among_a_transferred_study_in_bounded_memory(
        self, hospitals: Hospitals
    ) -> None:
        a, b = hospitals.a, hospitals.b

        async def grant() -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:
                return await hospitals.wallet.grant(session, a.url, b.origin, None, 3600)

        token = asyncio.run(grant())
        fetched = b.cli("fetch", token["url"], check=False, timeout=180)
        assert fetched.returncode == 1
        assert "inflates more than 100 times" in fetched.stderr
        assert peak_rss(b) < PEAK_RSS_LIMIT
        db = sqlite3.connect(f"file:{b.data_dir / 'index.sqlite'}?mode=ro", uri=True)
        try:
            held = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
        finally:
            db.close()
        assert hospitals.bomb_uid not in held
        assert largest_object(b) < 1024 * 1024  # only the plain instances, if any
        assert_serving(b)


# -- the inflating reader, against pydicom's own reading of honest files -----------------


def _deflated_copy(name: str, directory: Path) -> Path:
    """A pydicom test file re-written deflated (nested sequences and all)."""
    ds = pydicom.dcmread(str(get_testdata_file(name)))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = directory / f"{name}.deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


class TestInflatingReader:
    LIMITS = InflateLimits(max_bytes=1024**3, max_ratio=100.0)

    @pytest.mark.parametrize("name", ["image_dfl.dcm", "rtplan.dcm", "CT_small.dcm"])
    def test_a_deflated_file_reads_as_pydicom_reads_it_whole(
        self, name: str, tmp_path: Path
    ) -> None:
        path = (
            Path(str(get_testdata_file(name)))
            if name == "image_dfl.dcm"
            else _deflated_copy(name, tmp_path)
        )
        expected = pydicom.dcmread(path)
        assert read_dataset(path, self.LIMITS) == expected
        header = read_dataset(path, self.LIMITS, defer_size=1024, stop_before_pixels=True)
        assert "PixelData" not in header
        assert header.SOPInstanceUID == expected.SOPInstanceUID

    def test_a_deflated_stream_cut_short_is_refused(self, tmp_path: Path) -> None:
        path = _deflated_copy("CT_small.dcm", tmp_path)
        path.write_bytes(path.read_bytes()[:-64])
        with pytest.raises(BadInput, match="truncated"):
            read_dataset(path, self.LIMITS)
