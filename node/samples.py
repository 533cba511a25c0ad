"""Synthetic CT studies written as real Part 10 files: sample data for the demo, the
benchmarks and the tests (no PHI of anyone real; random, patterned or anatomical pixels)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.phantom import RESCALE_INTERCEPT, CTPhantom


@dataclass
class SyntheticStudy:
    study_uid: str
    patient_id: str
    patient_name: str
    files: list[Path] = field(default_factory=list)
    series_uids: list[str] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)


def make_ct_study(
    directory: Path,
    series: int = 2,
    slices: int = 3,
    rows: int = 64,
    columns: int = 64,
    patient_id: str = "MRN-0001",
    patient_name: str = "Doe^Jane",
    birth_date: str = "19700101",
    study_date: str = "20260101",
    accession: str = "ACC-1",
    seed: int = 0,
    phantom: bool = False,
) -> SyntheticStudy:
    """Write a CT study: ``series`` x ``slices`` 16-bit instances of rows x columns.

    Pixels are random noise (``seed`` 0) or a pattern of the seed, unless ``phantom``:
    then each series is the anatomical phantom (node.phantom) from chest to abdomen, with
    its own noise, which viewers show as CT and codecs compress as they would real CT.
    """
    directory.mkdir(parents=True, exist_ok=True)
    study = SyntheticStudy(generate_uid(), patient_id, patient_name)
    pixel_bytes = rows * columns * 2
    rng = os.urandom if seed == 0 else None
    spacing = 0.7
    for s in range(series):
        body = CTPhantom(rows, columns, seed=seed * 1000 + s) if phantom else None
        if body is not None:
            spacing = body.pixel_spacing_mm
        series_uid = generate_uid()
        study.series_uids.append(series_uid)
        for i in range(slices):
            sop_uid = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study.study_uid
            ds.SeriesInstanceUID = series_uid
            ds.PatientID = patient_id
            ds.PatientName = patient_name
            ds.PatientBirthDate = birth_date
            ds.PatientSex = "F"
            ds.StudyDate = study_date
            ds.StudyTime = "120000"
            ds.AccessionNumber = accession
            ds.StudyID = "1"
            ds.StudyDescription = "CT CHEST"
            ds.ReferringPhysicianName = "Ref^Doc"
            ds.Modality = "CT"
            ds.SeriesNumber = s + 1
            ds.SeriesDescription = f"Series {s + 1}"
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [0, 0, float(i)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
            ds.SliceThickness = 1.0
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = rows
            ds.Columns = columns
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            ds.RescaleIntercept = RESCALE_INTERCEPT
            ds.RescaleSlope = 1
            ds.WindowCenter = 40
            ds.WindowWidth = 400
            if body is not None:
                position = i / max(slices - 1, 1)
                ds.PixelData = body.slice_stored(position).astype("<u2").tobytes()
            elif rng is not None:
                ds.PixelData = rng(pixel_bytes)
            else:
                ds.PixelData = bytes((seed + i + s) % 256 for _ in range(16)) * (pixel_bytes // 16)
            path = directory / f"s{s + 1:02d}_i{i + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            study.files.append(path)
            study.sop_uids.append(sop_uid)
    return study
