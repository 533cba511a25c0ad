"""Decoded frames over WADO-RS, ours beside Orthanc: JPEG baseline and JPEG 2000 lossless.

The workload is one multi-frame instance per syntax, 512x512 frames of a synthetic,
smooth phantom (a viewer's case: compressed on disk, decoded for a client without codecs):
JPEG baseline 8-bit (encoded by DCMTK's dcmcjpeg) and JPEG 2000 lossless 16-bit (encoded
by pydicom's openjpeg plugin). Both servers hold the same files; a client on loopback asks
for every frame, one request each, as `multipart/related; type="application/octet-stream"`
(Explicit VR Little Endian: decoded by the server), and the figure is frames per second.

Run alone: python -m scripts.benchmarks.codecs [--quick]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from scripts.benchmarks.common import BenchContext, Row
from tests.support.nodes import init_node
from tests.support.orthanc import OrthancServer

SIZE = 512
FRAMES, QUICK_FRAMES = 16, 4
RUNS = 3
OCTET_STREAM = 'multipart/related; type="application/octet-stream"'
NOTES = [
    "Decoded frames: one instance per syntax of 512x512 frames of a smooth synthetic"
    " phantom; each frame is asked for alone (as a viewer does) with"
    ' `Accept: multipart/related; type="application/octet-stream"`, which both servers'
    " answer with the frame decoded to Explicit VR Little Endian. The node decodes with"
    " pydicom's pylibjpeg plugins (libjpeg, openjpeg) in a worker thread per request;"
    " Orthanc with its GDCM plugin (Debian's orthanc-gdcm; without it Orthanc decodes no"
    " JPEG 2000). The figure is the median of a few passes over every frame.",
]


def phantom(frame: int, bits: int) -> np.ndarray:
    """A smooth test image: a gradient, a disc that moves with the frame, a little noise."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rng = np.random.default_rng(frame)
    disc = ((x - 150 - 4 * frame) ** 2 + (y - 256) ** 2) < 90**2
    image = (x + y) / (2 * SIZE) * 0.6 + disc * 0.3 + rng.normal(0, 0.01, (SIZE, SIZE))
    top = 255 if bits == 8 else 4095
    return np.clip(image * top, 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def _dataset(syntax: str, bits: int, frames: list[bytes] | None, count: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BENCH-CODECS", "Bench^Codecs", "OT"
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (
        bits,
        8 if bits == 8 else 12,
        (7 if bits == 8 else 11),
    )
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = count
    if frames is None:  # native
        ds.PixelData = b"".join(phantom(n, bits).tobytes() for n in range(count))
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    else:
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
    return ds


def write_instances(directory: Path, count: int) -> dict[str, Dataset]:
    """One multi-frame instance per measured syntax, written into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    native = directory.parent / "native-8bit.dcm"
    _dataset(ExplicitVRLittleEndian, 8, None, count).save_as(native, enforce_file_format=True)
    jpeg_path = directory / "JPEG-baseline.dcm"
    subprocess.run(["dcmcjpeg", "+eb", str(native), str(jpeg_path)], check=True)
    encoder = get_encoder(JPEG2000Lossless)
    options: dict[str, Any] = {
        "rows": SIZE,
        "columns": SIZE,
        "samples_per_pixel": 1,
        "bits_allocated": 16,
        "bits_stored": 16,
        "pixel_representation": 0,
        "photometric_interpretation": "MONOCHROME2",
        "number_of_frames": 1,
    }
    j2k = [encoder.encode(phantom(n, 16).tobytes(), **options) for n in range(count)]
    j2k_ds = _dataset(JPEG2000Lossless, 16, j2k, count)
    j2k_ds.save_as(directory / "JPEG-2000-lossless.dcm", enforce_file_format=True)
    jpeg_ds = dcmread(jpeg_path, stop_before_pixels=True)
    assert jpeg_ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    return {"JPEG baseline": jpeg_ds, "JPEG 2000 lossless": j2k_ds}


def frames_per_second(base: str, ds: Dataset, headers: dict[str, str], count: int) -> float:
    """Frames decoded per second: every frame asked for alone, median of RUNS passes."""
    path = (
        f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/"
    )
    expected = SIZE * SIZE * int(ds.BitsAllocated) // 8
    accept = {**headers, "Accept": OCTET_STREAM}
    with requests.Session() as session:
        session.get(path + "1", headers=accept, timeout=60).raise_for_status()  # warm up
        rates = []
        for _ in range(RUNS):
            started = time.perf_counter()
            for number in range(1, count + 1):
                response = session.get(path + str(number), headers=accept, timeout=60)
                response.raise_for_status()
                if len(response.content) < expected:
                    raise RuntimeError(f"frame {number} came back shorter than decoded")
            rates.append(count / (time.perf_counter() - started))
    return round(statistics.median(rates), 1)


def run(ctx: BenchContext) -> list[Row]:
    """Decoded frames per second for each syntax, ours and Orthanc's."""
    count = QUICK_FRAMES if ctx.quick else FRAMES
    work = ctx.workdir / "codecs"
    instances = write_instances(work / "files", count)
    orthanc = OrthancServer(work, "orthanc", gdcm=True)
    node = init_node(work, "bench-codecs.example/imageshare", "node")
    rows = []
    try:
        node.cli("import", str(work / "files"))
        node.start()
        orthanc.start()
        for path in sorted((work / "files").iterdir()):
            orthanc.request("POST", "/instances", path.read_bytes())
        for name, ds in instances.items():
            ours = frames_per_second(node.url + "/dicomweb", ds, node.auth, count)
            theirs = frames_per_second(orthanc.dicomweb_url, ds, {}, count)
            rows.append(
                Row(
                    f"WADO-RS frames decoded from {name} ({SIZE}x{SIZE},"
                    f" {int(ds.BitsAllocated)}-bit), frames/s",
                    ours,
                    theirs,
                    target=">= Orthanc",
                    met=ours >= theirs,
                    command="GET .../frames/N (Accept multipart/related;"
                    " type=application/octet-stream)",
                )
            )
    finally:
        orthanc.stop()
        node.stop()
    return rows


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
