"""pydicom's test files copied into a test's directory, ready to import; small CT data sets
to send by C-STORE."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def copy_pydicom_samples(names: tuple[str, ...], directory: Path) -> dict[str, Path]:
    """Copy each of pydicom's test files ``names`` into ``directory``: name -> copy."""
    directory.mkdir(parents=True, exist_ok=True)
    copies = {}
    for name in names:
        source = get_testdata_file(name)
        assert isinstance(source, str), f"pydicom has no test file {name}"
        copies[name] = directory / name
        shutil.copyfile(source, copies[name])
    return copies


def ct_dataset(patient_id: str, pixel_data: bytes) -> Dataset:
    """A minimal CT Image Storage data set with a fresh SOP Instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.BitsAllocated = 16
    ds.PixelData = pixel_data
    return ds
