"""WADO-RS against a real node: instances byte for byte, metadata, frames, bulk data, auth, CORS."""

from __future__ import annotations

import hashlib
import io
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from node.samples import SyntheticStudy, make_ct_study
from tests.support.memory import peak_rss_bytes
from tests.support.nodes import NodeProcess, init_node

# The origin of a browser viewer served from elsewhere, configured in [http] cors_origins.
VIEWER = "http://viewer.example:3000"
DICOM_ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SAMPLE_FILES = (
    "rtdose.dcm",
    "SC_rgb_rle_2frame.dcm",
    "JPEG2000.dcm",
    "CT_small.dcm",
    "MR_small_bigendian.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "image_dfl.dcm",
    "JPEG-lossy.dcm",
    "SC_rgb_small_odd.dcm",  # 8-bit pixels stored as OW
    "693_J2KI.dcm",  # group length elements on disk
)
# A CT made for the JSON model's corner cases: empty values among others, binary values
# inside a sequence, large and small.
JSON_MODEL = "json_model.dcm"
WAVEFORM = bytes(range(256)) * 16
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# Stored in Implicit VR, big endian, deflated, JPEG 2000, RLE and JPEG baseline (YBR).
NEEDING_TRANSCODING = (
    "rtdose.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
)


def dicom_accept(transfer_syntax: str | None) -> str:
    accept = 'multipart/related; type="application/dicom"'
    return accept if transfer_syntax is None else f"{accept}; transfer-syntax={transfer_syntax}"


def native_bytes(ds: pydicom.Dataset) -> bytes:
    """The decoded pixels of a dataset as little-endian bytes, pixel-interleaved."""
    array = ds.pixel_array
    return bytes(array.astype(array.dtype.newbyteorder("<")).tobytes())


def split_multipart(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related response body: (headers, content)."""
    content_type = response.headers["Content-Type"]
    assert content_type.startswith("multipart/related")
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    body = response.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    parts = []
    for raw in body.split(b"--" + boundary)[1:-1]:
        head, _, content = raw[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert content.endswith(b"\r\n")
        parts.append((headers, content[:-2]))
    return parts


class Corpus:
    def __init__(self, node: NodeProcess, study: SyntheticStudy, samples: dict[str, Path]) -> None:
        self.node = node
        self.study = study
        self.samples = samples
        self.client = DICOMwebClient(url=node.url + "/dicomweb", headers=node.auth)

    def get(
        self,
        path: str,
        accept: str | None = None,
        auth: bool = True,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        headers = {**(self.node.auth if auth else {}), **(headers or {})}
        if accept is not None:
            headers["Accept"] = accept
        return requests.get(self.node.url + "/dicomweb" + path, headers=headers, timeout=30)

    def sample(self, name: str) -> pydicom.Dataset:
        return pydicom.dcmread(self.samples[name])

    def sample_path(self, name: str) -> str:
        ds = self.sample(name)
        return (
            f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )


def write_json_model_instance(path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    assert isinstance(source, str)
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "", "AXIAL"]
    ds.PixelSpacing = ["0.5", ""]
    large, small = Dataset(), Dataset()
    large.add_new(0x54001010, "OW", WAVEFORM)
    small.add_new(0x54001010, "OW", b"\x01\x02\x03\x04")
    ds.WaveformSequence = [large, small]
    ds.save_as(path, enforce_file_format=True)


# A long RLE multi-frame instance whose decoded pixels (80 MB) dwarf the node's memory.
LONG_RLE = "long_rle.dcm"
LONG_FRAMES, LONG_SIZE = 160, 512


def write_long_rle_instance(path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    assert isinstance(source, str)
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = LONG_SIZE
    ds.NumberOfFrames = LONG_FRAMES
    y, x = np.mgrid[0:LONG_SIZE, 0:LONG_SIZE]
    encoder = get_encoder(RLELossless)
    options: dict[str, Any] = {
        "rows": LONG_SIZE,
        "columns": LONG_SIZE,
        "samples_per_pixel": 1,
        "bits_allocated": 16,
        "bits_stored": 16,
        "pixel_representation": 1,
        "photometric_interpretation": "MONOCHROME2",
        "number_of_frames": 1,
    }
    frames = [
        encoder.encode(((x + y + 7 * n) % 2000).astype("<i2").tobytes(), **options)
        for n in range(LONG_FRAMES)
    ]
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.BitsStored, ds.HighBit = 16, 15
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.save_as(path, enforce_file_format=True)


# JPEG 2000 and JPEG baseline instances whose frames are damaged: a codestream header
# followed by noise.
DAMAGED = {"damaged_j2k.dcm": "JPEG2000.dcm", "damaged_jpeg.dcm": "SC_rgb_jpeg_dcmtk.dcm"}


# Two frames: the first sound, the second damaged.
HALF_DAMAGED = "half_damaged_j2k.dcm"


def write_damaged_instance(path: Path, source_name: str, keep_first: bool = False) -> None:
    source = get_testdata_file(source_name)
    assert isinstance(source, str)
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    noise = bytes((i * 151 + 7) % 256 for i in range(len(frame)))
    damaged = frame[:40] + noise[40:]
    ds.PixelData = encapsulate([frame, damaged] if keep_first else [damaged])
    ds.NumberOfFrames = 2 if keep_first else 1
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    base = tmp_path_factory.mktemp("wado")
    node = init_node(base, "wado.example/imageshare")
    node.config.write_text(
        node.config.read_text().replace("[http]\n", f'[http]\ncors_origins = ["{VIEWER}"]\n')
    )
    study = make_ct_study(base / "in" / "ct", series=2, slices=3, rows=32, columns=32)
    samples = {}
    for name in SAMPLE_FILES:
        samples[name] = base / "in" / "samples" / name
        samples[name].parent.mkdir(parents=True, exist_ok=True)
        source = get_testdata_file(name)
        assert isinstance(source, str), name
        shutil.copyfile(source, samples[name])
    samples[JSON_MODEL] = base / "in" / "samples" / JSON_MODEL
    write_json_model_instance(samples[JSON_MODEL])
    samples[LONG_RLE] = base / "in" / "samples" / LONG_RLE
    for name, source_name in DAMAGED.items():
        samples[name] = base / "in" / "samples" / name
        write_damaged_instance(samples[name], source_name)
    samples[HALF_DAMAGED] = base / "in" / "samples" / HALF_DAMAGED
    write_damaged_instance(samples[HALF_DAMAGED], "JPEG2000.dcm", keep_first=True)
    write_long_rle_instance(samples[LONG_RLE])
    node.cli("import", str(base / "in"))
    node.start()
    try:
        yield Corpus(node, study, samples)
    finally:
        node.stop()


class TestRetrieveInstances:
    def test_study_retrieve_returns_every_stored_file_byte_for_byte(self, corpus: Corpus) -> None:
        response = corpus.get(f"/studies/{corpus.study.study_uid}", DICOM_ANY_SYNTAX)
        assert response.status_code == 200
        assert int(response.headers["Content-Length"]) == len(response.content)
        sent = {hashlib.sha256(body).hexdigest() for _, body in split_multipart(response)}
        stored = {hashlib.sha256(p.read_bytes()).hexdigest() for p in corpus.study.files}
        assert sent == stored

    def test_series_retrieve_returns_only_that_series(self, corpus: Corpus) -> None:
        series_uid = corpus.study.series_uids[1]
        datasets = corpus.client.retrieve_series(corpus.study.study_uid, series_uid)
        assert len(datasets) == 3
        assert {ds.SeriesInstanceUID for ds in datasets} == {series_uid}

    def test_instance_retrieve_through_dicomweb_client(self, corpus: Corpus) -> None:
        study = corpus.study
        ds = corpus.client.retrieve_instance(
            study.study_uid, study.series_uids[0], study.sop_uids[0]
        )
        assert ds.SOPInstanceUID == study.sop_uids[0]
        assert ds.PixelData == pydicom.dcmread(study.files[0]).PixelData

    def test_instance_part_names_its_stored_transfer_syntax(self, corpus: Corpus) -> None:
        response = corpus.get(corpus.sample_path("JPEG2000.dcm"), DICOM_ANY_SYNTAX)
        [(headers, body)] = split_multipart(response)
        assert "transfer-syntax=1.2.840.10008.1.2.4.91" in headers["Content-Type"]
        assert body == corpus.samples["JPEG2000.dcm"].read_bytes()

    def test_stored_transfer_syntax_requested_explicitly_is_served(self, corpus: Corpus) -> None:
        response = corpus.get(
            corpus.sample_path("JPEG2000.dcm"), dicom_accept("1.2.840.10008.1.2.4.91")
        )
        [(_, body)] = split_multipart(response)
        assert body == corpus.samples["JPEG2000.dcm"].read_bytes()

    def test_implicit_vr_is_never_sent_even_when_asked_for(self, corpus: Corpus) -> None:
        # PS3.18 8.6.2.1: Implicit VR Little Endian is not a DICOMweb transfer syntax.
        response = corpus.get(corpus.sample_path("rtdose.dcm"), dicom_accept("1.2.840.10008.1.2"))
        assert response.status_code == 406
        assert "8.6.2.1" in response.json()["error"]

    def test_lossy_target_is_not_acceptable_since_the_node_encodes_lossless_only(
        self, corpus: Corpus
    ) -> None:
        response = corpus.get(
            f"/studies/{corpus.study.study_uid}", dicom_accept("1.2.840.10008.1.2.4.50")
        )
        assert response.status_code == 406
        assert "1.2.840.10008.1.2.4.50" in response.json()["error"]

    @pytest.mark.parametrize("name", NEEDING_TRANSCODING)
    def test_default_retrieve_is_explicit_vr_little_endian_with_the_same_pixels(
        self, corpus: Corpus, name: str
    ) -> None:
        response = corpus.get(corpus.sample_path(name), dicom_accept(None))
        [(headers, body)] = split_multipart(response)
        assert headers["Content-Type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
        sent = pydicom.dcmread(io.BytesIO(body))
        assert sent.file_meta.TransferSyntaxUID == EXPLICIT_LE
        stored = corpus.sample(name)
        assert sent.SOPInstanceUID == stored.SOPInstanceUID
        assert native_bytes(sent) == native_bytes(stored)

    def test_any_transfer_syntax_keeps_compressed_files_and_never_sends_implicit_vr(
        self, corpus: Corpus
    ) -> None:
        [(headers, _)] = split_multipart(
            corpus.get(corpus.sample_path("rtdose.dcm"), DICOM_ANY_SYNTAX)
        )
        assert headers["Content-Type"].endswith(f"transfer-syntax={EXPLICIT_LE}")
        [(_, body)] = split_multipart(
            corpus.get(corpus.sample_path("SC_rgb_rle_2frame.dcm"), DICOM_ANY_SYNTAX)
        )
        assert body == corpus.samples["SC_rgb_rle_2frame.dcm"].read_bytes()

    @pytest.mark.parametrize("target", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"])
    @pytest.mark.parametrize(
        "name", ["CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_bigendian.dcm"]
    )
    def test_lossless_targets_are_encoded_without_changing_a_pixel(
        self, corpus: Corpus, name: str, target: str
    ) -> None:
        response = corpus.get(corpus.sample_path(name), dicom_accept(target))
        [(headers, body)] = split_multipart(response)
        assert headers["Content-Type"] == f"application/dicom; transfer-syntax={target}"
        assert "Content-Length" not in headers  # streamed frame by frame
        sent = pydicom.dcmread(io.BytesIO(body))
        assert sent.file_meta.TransferSyntaxUID == target
        assert native_bytes(sent) == native_bytes(corpus.sample(name))

    def test_target_the_codec_refuses_is_not_acceptable_before_anything_is_sent(
        self, corpus: Corpus
    ) -> None:
        # openjpeg encodes at most 24 bits a sample; this dose grid has 32.
        response = corpus.get(
            corpus.sample_path("rtdose.dcm"), dicom_accept("1.2.840.10008.1.2.4.90")
        )
        assert response.status_code == 406
        assert "cannot be encoded" in response.json()["error"]

    def test_transcoding_holds_one_frame_at_a_time_not_the_instance(self, corpus: Corpus) -> None:
        # 160 frames of 512x512 16-bit decode to 80 MB; the node streams them frame by frame.
        pid = corpus.node.process.pid if corpus.node.process else 0
        before = peak_rss_bytes(pid) or 0
        url = corpus.node.url + "/dicomweb" + corpus.sample_path(LONG_RLE)
        headers = {**corpus.node.auth, "Accept": dicom_accept(EXPLICIT_LE)}
        with requests.get(url, headers=headers, stream=True, timeout=120) as response:
            assert response.status_code == 200
            received = sum(len(c) for c in response.iter_content(1024 * 1024))
        assert received > LONG_FRAMES * LONG_SIZE * LONG_SIZE * 2
        grown = (peak_rss_bytes(pid) or 0) - before
        assert grown < 40 * 1024 * 1024, f"peak memory grew by {grown / 1024**2:.0f} MB"

    @pytest.mark.parametrize("name", sorted(DAMAGED))
    def test_damaged_frames_fail_closed_and_the_node_keeps_serving(
        self, corpus: Corpus, name: str
    ) -> None:
        path = corpus.sample_path(name)
        decoded = corpus.get(
            path + "/frames/1", 'multipart/related; type="application/octet-stream"'
        )
        assert decoded.status_code == 406
        assert "cannot be decoded" in decoded.json()["error"]
        assert corpus.get(path, dicom_accept(EXPLICIT_LE)).status_code == 406
        [(_, body)] = split_multipart(corpus.get(path, dicom_accept(None)))
        assert body == corpus.samples[name].read_bytes()  # the default falls back
        assert requests.get(corpus.node.url + "/healthz", timeout=10).status_code == 200

    def test_a_frame_failing_after_the_answer_started_cuts_the_connection(
        self, corpus: Corpus
    ) -> None:
        # Frame 1 decodes, so the answer starts; frame 2 does not: the client must see a
        # broken answer (never an error response inside the body), and the node goes on.
        path = "/dicomweb" + corpus.sample_path(HALF_DAMAGED) + "/frames/1,2"
        host, port = corpus.node.url.removeprefix("http://").split(":")
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: {corpus.node.auth['Authorization']}\r\n"
            'Accept: multipart/related; type="application/octet-stream"\r\n\r\n'
        )
        answer = b""
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(request.encode())
            while chunk := connection.recv(65536):  # until the node closes it
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.count(b"HTTP/1.1 ") == 1  # no error answer inside the body
        assert not answer.endswith(b"0\r\n\r\n")  # and no clean end either
        assert requests.get(corpus.node.url + "/healthz", timeout=10).status_code == 200

    def test_undecodable_instance_is_sent_as_stored_unless_a_syntax_was_named(
        self, corpus: Corpus
    ) -> None:
        # No codec here reads this JPEG extended file: the default falls back to it as
        # stored; a client that names Explicit VR Little Endian is told why it cannot.
        path = corpus.sample_path("JPEG-lossy.dcm")
        [(headers, body)] = split_multipart(corpus.get(path, dicom_accept(None)))
        assert headers["Content-Type"].endswith("transfer-syntax=1.2.840.10008.1.2.4.51")
        assert body == corpus.samples["JPEG-lossy.dcm"].read_bytes()
        refused = corpus.get(path, dicom_accept(EXPLICIT_LE))
        assert refused.status_code == 406
        assert "decoded" in refused.json()["error"]

    def test_dicomweb_client_retrieves_with_an_explicit_transfer_syntax(
        self, corpus: Corpus
    ) -> None:
        stored = corpus.sample("JPEG2000.dcm")
        ds = corpus.client.retrieve_instance(
            stored.StudyInstanceUID,
            stored.SeriesInstanceUID,
            stored.SOPInstanceUID,
            media_types=(("application/dicom", EXPLICIT_LE),),
        )
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert native_bytes(ds) == native_bytes(stored)

    def test_dicomweb_client_retrieves_a_series_encoded_in_a_lossless_syntax(
        self, corpus: Corpus
    ) -> None:
        rle = "1.2.840.10008.1.2.5"
        stored = corpus.sample("CT_small.dcm")
        sent = corpus.client.retrieve_series(
            stored.StudyInstanceUID,
            stored.SeriesInstanceUID,
            media_types=(("application/dicom", rle),),
        )
        assert sent and all(ds.file_meta.TransferSyntaxUID == rle for ds in sent)
        [ds] = [ds for ds in sent if ds.SOPInstanceUID == stored.SOPInstanceUID]
        assert native_bytes(ds) == native_bytes(stored)

    def test_json_only_accept_is_not_acceptable_for_instances(self, corpus: Corpus) -> None:
        response = corpus.get(f"/studies/{corpus.study.study_uid}", "application/dicom+json")
        assert response.status_code == 406

    def test_unknown_study_is_not_found(self, corpus: Corpus) -> None:
        assert corpus.get("/studies/1.2.3.4", DICOM_ANY_SYNTAX).status_code == 404

    def test_malformed_uid_in_path_is_not_found(self, corpus: Corpus) -> None:
        assert corpus.get("/studies/not-a-uid").status_code == 404


class TestMetadata:
    def test_metadata_holds_no_group_lengths_at_any_depth(self, corpus: Corpus) -> None:
        # PS3.18 F.2.2: group length attributes (gggg,0000) are not in the JSON model.
        stored = pydicom.dcmread(corpus.samples["693_J2KI.dcm"], stop_before_pixels=True)
        assert 0x00080000 in stored  # pydicom keeps them when it reads, never when it writes
        [metadata] = corpus.get(corpus.sample_path("693_J2KI.dcm") + "/metadata").json()

        def keys(dataset: dict[str, Any]) -> list[str]:
            nested = [
                k
                for element in dataset.values()
                if element["vr"] == "SQ"
                for item in element.get("Value", [])
                for k in keys(item)
            ]
            return [*dataset, *nested]

        found = keys(metadata)
        assert "00080018" in found
        assert not [k for k in found if k.endswith("0000")]

    def test_empty_values_among_others_are_null(self, corpus: Corpus) -> None:
        [metadata] = corpus.get(corpus.sample_path(JSON_MODEL) + "/metadata").json()
        assert metadata["00080008"] == {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]}
        assert metadata["00280030"] == {"vr": "DS", "Value": [0.5, None]}

    def test_large_binary_values_inside_sequences_are_bulk_data_that_is_served(
        self, corpus: Corpus
    ) -> None:
        [metadata] = corpus.get(corpus.sample_path(JSON_MODEL) + "/metadata").json()
        large, small = metadata["54000100"]["Value"]
        assert small["54001010"] == {"vr": "OW", "InlineBinary": "AQIDBA=="}
        uri = large["54001010"]["BulkDataURI"]
        assert uri.endswith("/bulk/54000100/0/54001010")
        [value] = list(corpus.client.retrieve_bulkdata(uri))
        assert value == WAVEFORM
        missing = uri.replace("/54000100/0/", "/54000100/5/")
        assert requests.get(missing, headers=corpus.node.auth, timeout=10).status_code == 404

    @pytest.mark.parametrize("name", SAMPLE_FILES)
    def test_pixel_data_vr_is_the_one_the_file_stores(self, corpus: Corpus, name: str) -> None:
        [metadata] = corpus.get(corpus.sample_path(name) + "/metadata").json()
        stored = pydicom.dcmread(corpus.samples[name], defer_size=64)
        expected = stored.get_item("PixelData").VR
        if stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2":
            expected = "OW"  # implicit VR native pixel data is OW (PS3.5 A.1)
        if stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99":
            expected = "OB"  # 8-bit, as the inflated data's element says
        assert metadata["7FE00010"]["vr"] == expected

    def test_json_answers_are_gzipped_when_the_client_accepts_it(self, corpus: Corpus) -> None:
        for path in (f"/studies/{corpus.study.study_uid}/metadata", "/studies"):
            zipped = corpus.get(path, headers={"Accept-Encoding": "gzip"})
            assert zipped.headers["Content-Encoding"] == "gzip", path
            assert zipped.json()  # requests inflates it
            plain = corpus.get(path, headers={"Accept-Encoding": "identity"})
            assert "Content-Encoding" not in plain.headers, path
            assert plain.json() == zipped.json()

    def test_study_metadata_lists_every_instance_with_bulk_data_uris(self, corpus: Corpus) -> None:
        study = corpus.study
        metadata = corpus.client.retrieve_study_metadata(study.study_uid)
        assert {m["00080018"]["Value"][0] for m in metadata} == set(study.sop_uids)
        first = metadata[0]
        assert first["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
        assert first["00280010"] == {"vr": "US", "Value": [32]}
        assert first["7FE00010"]["vr"] == "OW"
        assert first["7FE00010"]["BulkDataURI"].startswith(corpus.node.url + "/dicomweb/studies/")
        assert "Value" not in first["7FE00010"] and "InlineBinary" not in first["7FE00010"]

    def test_pixel_data_bulk_uri_returns_the_pixel_bytes(self, corpus: Corpus) -> None:
        study = corpus.study
        metadata = corpus.client.retrieve_instance_metadata(
            study.study_uid, study.series_uids[0], study.sop_uids[0]
        )
        uri = metadata["7FE00010"]["BulkDataURI"]
        [pixels] = list(corpus.client.retrieve_bulkdata(uri))
        assert pixels == pydicom.dcmread(study.files[0]).PixelData

    @pytest.mark.parametrize("name", SAMPLE_FILES)
    def test_metadata_of_every_transfer_syntax_names_it(self, corpus: Corpus, name: str) -> None:
        response = corpus.get(corpus.sample_path(name) + "/metadata")
        [metadata] = response.json()
        stored = corpus.sample(name)
        assert metadata["00083002"]["Value"] == [stored.file_meta.TransferSyntaxUID]
        assert metadata["00080018"]["Value"] == [stored.SOPInstanceUID]
        assert "BulkDataURI" in metadata["7FE00010"]

    def test_deflated_pixel_data_bulk_uri_returns_the_inflated_pixels(self, corpus: Corpus) -> None:
        response = corpus.get(corpus.sample_path("image_dfl.dcm") + "/metadata")
        uri = response.json()[0]["7FE00010"]["BulkDataURI"]
        [pixels] = list(corpus.client.retrieve_bulkdata(uri))
        assert pixels == corpus.sample("image_dfl.dcm").PixelData

    def test_encapsulated_pixel_data_bulk_uri_returns_its_frames(self, corpus: Corpus) -> None:
        response = corpus.get(corpus.sample_path("SC_rgb_rle_2frame.dcm") + "/metadata")
        uri = response.json()[0]["7FE00010"]["BulkDataURI"]
        accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
        bulk = requests.get(uri, headers={**corpus.node.auth, "Accept": accept}, timeout=10)
        frames = [body for _, body in split_multipart(bulk)]
        expected = generate_frames(
            corpus.sample("SC_rgb_rle_2frame.dcm").PixelData, number_of_frames=2
        )
        assert frames == list(expected)

    def test_series_metadata_is_dicom_json(self, corpus: Corpus) -> None:
        study = corpus.study
        response = corpus.get(f"/studies/{study.study_uid}/series/{study.series_uids[0]}/metadata")
        assert response.headers["Content-Type"] == "application/dicom+json"
        assert len(response.json()) == 3

    def test_metadata_in_xml_is_the_native_dicom_model_of_the_json(self, corpus: Corpus) -> None:
        # PS3.18 8.7.3.2 and PS3.19 A.1: one application/dicom+xml part per instance.
        path = corpus.sample_path(JSON_MODEL) + "/metadata"
        response = corpus.get(path, 'multipart/related; type="application/dicom+xml"')
        assert response.headers["Content-Type"].startswith(
            'multipart/related; type="application/dicom+xml"'
        )
        [(headers, body)] = split_multipart(response)
        assert headers["Content-Type"] == "application/dicom+xml"
        root = ElementTree.fromstring(body)
        assert root.tag == "NativeDicomModel"
        [as_json] = corpus.get(path).json()
        assert [a.get("tag") for a in root.findall("DicomAttribute")] == list(as_json)
        name = root.find("DicomAttribute[@keyword='PatientName']/PersonName/Alphabetic")
        assert name is not None and name.findtext("FamilyName") == "CompressedSamples"
        values = root.findall("DicomAttribute[@tag='00080008']/Value")
        assert [(v.get("number"), v.text) for v in values] == [
            ("1", "ORIGINAL"),
            ("2", None),
            ("3", "AXIAL"),
        ]
        bulk = root.find("DicomAttribute[@tag='7FE00010']/BulkData")
        assert bulk is not None and bulk.get("uri") == as_json["7FE00010"]["BulkDataURI"]
        item = root.find("DicomAttribute[@tag='54000100']/Item[@number='2']")
        assert item is not None and item.findtext("DicomAttribute/InlineBinary") == "AQIDBA=="

    def test_study_series_and_instance_bulkdata_are_not_offered(self, corpus: Corpus) -> None:
        # docs/dicomweb.md: bulk data is reached through each BulkDataURI instead.
        instance = corpus.sample_path("CT_small.dcm")
        series = instance.rsplit("/instances/", 1)[0]
        for path in (series.split("/series/")[0], series, instance):
            response = corpus.get(path + "/bulkdata", "multipart/related")
            assert response.status_code == 404 and "error" in response.json(), path

    def test_the_accept_parameter_replaces_the_accept_header_for_metadata(
        self, corpus: Corpus
    ) -> None:
        path = f"/studies/{corpus.study.study_uid}/metadata"
        response = corpus.get(path + "?accept=application/dicom%2Bjson", "text/html")
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/dicom+json"
        assert corpus.get(path + "?charset=ISO-8859-1").status_code == 400

    def test_metadata_in_another_format_is_not_acceptable(self, corpus: Corpus) -> None:
        response = corpus.get(f"/studies/{corpus.study.study_uid}/metadata", "text/html")
        assert response.status_code == 406


class TestFrames:
    def test_native_frames_come_back_as_stored_pixels(self, corpus: Corpus) -> None:
        ds = corpus.sample("rtdose.dcm")
        frame_length = ds.Rows * ds.Columns * ds.BitsAllocated // 8
        frames = corpus.client.retrieve_instance_frames(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [2, 15]
        )
        assert frames == [
            ds.PixelData[frame_length : 2 * frame_length],
            ds.PixelData[14 * frame_length : 15 * frame_length],
        ]

    def test_native_frame_with_octet_stream_accept_is_labelled(self, corpus: Corpus) -> None:
        response = corpus.get(
            corpus.sample_path("CT_small.dcm") + "/frames/1",
            'multipart/related; type="application/octet-stream"',
        )
        [(headers, body)] = split_multipart(response)
        assert headers["Content-Type"] == (
            "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
        )
        assert body == corpus.sample("CT_small.dcm").PixelData

    def test_the_accept_parameter_replaces_the_accept_header_for_frames(
        self, corpus: Corpus
    ) -> None:
        # PS3.18 8.3.3.1: the query parameter wins over the header (here one that alone
        # would be 406).
        accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
        response = requests.get(
            corpus.node.url
            + "/dicomweb"
            + corpus.sample_path("SC_rgb_rle_2frame.dcm")
            + "/frames/1",
            params={"accept": accept},
            headers={**corpus.node.auth, "Accept": "application/dicom+json"},
            timeout=30,
        )
        assert response.status_code == 200
        [(headers, _)] = split_multipart(response)
        assert (
            headers["Content-Type"]
            == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.5"
        )

    def test_big_endian_frame_is_labelled_with_its_byte_order(self, corpus: Corpus) -> None:
        response = corpus.get(
            corpus.sample_path("MR_small_bigendian.dcm") + "/frames/1",
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
        )
        [(headers, body)] = split_multipart(response)
        assert headers["Content-Type"].endswith("transfer-syntax=1.2.840.10008.1.2.2")
        assert body == corpus.sample("MR_small_bigendian.dcm").PixelData

    def test_encapsulated_frames_come_back_as_stored_fragments(self, corpus: Corpus) -> None:
        ds = corpus.sample("SC_rgb_rle_2frame.dcm")
        expected = list(generate_frames(ds.PixelData, number_of_frames=2))
        response = corpus.get(
            corpus.sample_path("SC_rgb_rle_2frame.dcm") + "/frames/2,1",
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
        )
        parts = split_multipart(response)
        assert [body for _, body in parts] == [expected[1], expected[0]]
        assert parts[0][0]["Content-Type"] == (
            "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.5"
        )

    def test_compressed_frame_in_its_own_media_type(self, corpus: Corpus) -> None:
        ds = corpus.sample("JPEG2000.dcm")
        [frame] = corpus.client.retrieve_instance_frames(
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            [1],
            media_types=(("image/jp2", "1.2.840.10008.1.2.4.91"),),
        )
        assert frame == next(generate_frames(ds.PixelData, number_of_frames=1))

    @pytest.mark.parametrize(
        "name", ["JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm"]
    )
    def test_octet_stream_frames_are_decoded_to_explicit_little_endian(
        self, corpus: Corpus, name: str
    ) -> None:
        response = corpus.get(
            corpus.sample_path(name) + "/frames/1",
            'multipart/related; type="application/octet-stream"',
        )
        [(headers, body)] = split_multipart(response)
        assert headers["Content-Type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
        assert body == native_bytes(corpus.sample(name))

    def test_dicomweb_client_gets_decoded_frames_of_a_compressed_instance(
        self, corpus: Corpus
    ) -> None:
        ds = corpus.sample("SC_rgb_rle_2frame.dcm")
        frames = corpus.client.retrieve_instance_frames(
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            [2, 1],
            media_types=(("application/octet-stream", EXPLICIT_LE),),
        )
        decoded = native_bytes(ds)
        half = len(decoded) // 2
        assert frames == [decoded[half:], decoded[:half]]

    def test_native_frame_is_encoded_in_the_media_type_asked_for(self, corpus: Corpus) -> None:
        ds = corpus.sample("CT_small.dcm")
        [frame] = corpus.client.retrieve_instance_frames(
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            [1],
            media_types=(("image/jp2", "1.2.840.10008.1.2.4.90"),),
        )
        options: dict[str, Any] = {
            "rows": ds.Rows,
            "columns": ds.Columns,
            "samples_per_pixel": 1,
            "bits_allocated": 16,
            "bits_stored": ds.BitsStored,
            "pixel_representation": ds.PixelRepresentation,
            "photometric_interpretation": "MONOCHROME2",
            "number_of_frames": 1,
        }
        array, _ = get_decoder(JPEG2000Lossless).as_array(encapsulate([frame]), **options)
        assert bytes(array.astype("<i2").tobytes()) == ds.PixelData

    def test_frame_in_a_syntax_the_node_cannot_make_is_not_acceptable(self, corpus: Corpus) -> None:
        response = corpus.get(
            corpus.sample_path("CT_small.dcm") + "/frames/1",
            'multipart/related; type="image/jpeg"',
        )
        assert response.status_code == 406
        assert "1.2.840.10008.1.2.4.50" in response.json()["error"]

    def test_frame_out_of_range_is_not_found(self, corpus: Corpus) -> None:
        assert corpus.get(corpus.sample_path("CT_small.dcm") + "/frames/2").status_code == 404

    def test_malformed_frame_list_is_bad_request(self, corpus: Corpus) -> None:
        for frames in ("a", "0", "1,,2"):
            response = corpus.get(corpus.sample_path("CT_small.dcm") + f"/frames/{frames}")
            assert response.status_code == 400, frames


class TestCapabilities:
    def test_options_on_the_service_root_describes_every_resource_in_wadl(
        self, corpus: Corpus
    ) -> None:
        # PS3.18 8.9: Retrieve Capabilities, an OPTIONS on the service's root.
        for root in ("/dicomweb", "/dicomweb/"):
            response = requests.options(
                corpus.node.url + root, headers=corpus.node.auth, timeout=10
            )
            assert response.status_code == 200
            assert response.headers["Content-Type"].startswith("application/vnd.sun.wadl+xml")
        namespace = {"w": "http://wadl.dev.java.net/2009/02"}
        document = ElementTree.fromstring(response.content)
        resources = {
            r.get("path"): r for r in document.findall("w:resources/w:resource", namespace)
        }
        assert {"studies", "studies/{study}", "studies/{study}/metadata"} <= set(resources)
        frames = resources["studies/{study}/series/{series}/instances/{instance}/frames/{frames}"]
        media_types = {m.get("mediaType") for m in frames.findall(".//w:representation", namespace)}
        assert 'multipart/related; type="application/octet-stream"' in media_types
        methods = {m.get("name") for m in resources["studies"].findall("w:method", namespace)}
        assert methods == {"GET", "POST"}

    def test_capabilities_need_the_admin_token(self, corpus: Corpus) -> None:
        response = requests.options(corpus.node.url + "/dicomweb", timeout=10)
        assert response.status_code == 401


class TestAccessControl:
    def test_missing_or_wrong_admin_token_is_refused(self, corpus: Corpus) -> None:
        path = f"/studies/{corpus.study.study_uid}/metadata"
        assert corpus.get(path, auth=False).status_code == 401
        response = requests.get(
            corpus.node.url + "/dicomweb" + path,
            headers={"Authorization": "Bearer wrong"},
            timeout=10,
        )
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")

    def test_cors_preflight_from_a_viewer_is_answered(self, corpus: Corpus) -> None:
        response = requests.options(
            corpus.node.url + f"/dicomweb/studies/{corpus.study.study_uid}/metadata",
            headers={
                "Origin": VIEWER,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization, accept",
            },
            timeout=10,
        )
        assert response.status_code == 204
        assert response.headers["Access-Control-Allow-Origin"] == VIEWER
        allowed = response.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed and "accept" in allowed

    def test_cross_origin_reads_carry_cors_headers_even_when_streamed(self, corpus: Corpus) -> None:
        study = corpus.study
        headers = {**corpus.node.auth, "Origin": VIEWER}
        for path in (
            "/studies",
            f"/studies/{study.study_uid}",
            f"/studies/{study.study_uid}/metadata",
            f"/studies/{study.study_uid}/series/{study.series_uids[0]}"
            f"/instances/{study.sop_uids[0]}/frames/1",
            "/studies/1.2.3/metadata",
        ):
            response = requests.get(
                corpus.node.url + "/dicomweb" + path, headers=headers, timeout=10
            )
            assert response.status_code in (200, 404), path
            origin = response.headers.get("Access-Control-Allow-Origin")
            assert origin == VIEWER, path
            assert "Warning" in response.headers["Access-Control-Expose-Headers"]
