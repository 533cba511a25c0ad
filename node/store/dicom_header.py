"""Reading and checking the header of a received DICOM Part 10 file.

This is where outside DICOM input is judged: a file is accepted only if it is Part 10
(preamble and "DICM"), parses to the end without running past its last byte, and names
its SOP class and its study, series and instance UIDs.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian as DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN

from node.errors import BadInput

# Received files are judged by the checks below; pydicom's own warnings about odd
# values would only flood the log.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\..*")

# Values larger than this are not loaded while checking a file: pixel data stays on disk.
_DEFER_SIZE = 64 * 1024
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes the index keeps about one instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    issuer_of_patient_id: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    series_date: str = ""
    series_time: str = ""
    body_part_examined: str = ""
    performed_procedure_step_start_date: str = ""
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None
    bits_allocated: int | None = None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _integer(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _last_value_end(ds: Dataset) -> int:
    """Byte offset just past the last top-level value read from the file."""
    end = 0
    for elem in ds._dict.values():
        if isinstance(elem, RawDataElement) and elem.length != _UNDEFINED_LENGTH:
            end = max(end, elem.value_tell + elem.length)
    return end


def parse_header(path: Path) -> InstanceHeader:
    """Check a DICOM Part 10 file and read its indexed attributes.

    Raises BadInput with the reason when the file is not DICOM, is truncated, or lacks
    a required UID.
    """
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
    except InvalidDicomError as exc:
        raise BadInput("not a DICOM Part 10 file (no DICM preamble)") from exc
    except (EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BadInput(f"unreadable DICOM file: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on garbage; all mean "bad file"
        raise BadInput(f"unreadable DICOM file: {type(exc).__name__}") from exc
    deflated = ds.file_meta.get("TransferSyntaxUID") == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    # Offsets in a deflated file refer to the inflated stream, so only the rest are checked.
    if not deflated and _last_value_end(ds) > os.path.getsize(path):
        raise BadInput("truncated DICOM file: a value runs past the end of the file")
    meta = ds.file_meta
    transfer_syntax = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    if not transfer_syntax:
        raise BadInput("DICOM file has no transfer syntax in its file meta information")
    try:
        header = InstanceHeader(
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            transfer_syntax_uid=transfer_syntax,
            patient_id=_text(ds, "PatientID"),
            patient_name=_text(ds, "PatientName"),
            patient_birth_date=_text(ds, "PatientBirthDate"),
            patient_sex=_text(ds, "PatientSex"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            accession_number=_text(ds, "AccessionNumber"),
            study_id=_text(ds, "StudyID"),
            study_description=_text(ds, "StudyDescription"),
            referring_physician_name=_text(ds, "ReferringPhysicianName"),
            modality=_text(ds, "Modality"),
            series_number=_integer(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            series_date=_text(ds, "SeriesDate"),
            series_time=_text(ds, "SeriesTime"),
            body_part_examined=_text(ds, "BodyPartExamined"),
            performed_procedure_step_start_date=_text(ds, "PerformedProcedureStepStartDate"),
            instance_number=_integer(ds, "InstanceNumber"),
            rows=_integer(ds, "Rows"),
            columns=_integer(ds, "Columns"),
            number_of_frames=_integer(ds, "NumberOfFrames"),
            bits_allocated=_integer(ds, "BitsAllocated"),
        )
    except Exception as exc:  # a value that cannot be decoded is bad input, not a crash
        raise BadInput(f"unreadable DICOM attribute: {exc}") from exc
    for keyword, value in (
        ("SOPInstanceUID", header.sop_instance_uid),
        ("SOPClassUID", header.sop_class_uid),
        ("SeriesInstanceUID", header.series_instance_uid),
        ("StudyInstanceUID", header.study_instance_uid),
    ):
        if not value:
            raise BadInput(f"DICOM file has no {keyword}")
        # Not str.isdigit: it also accepts other scripts' digits, such as "³" or "٣".
        if len(value) > 64 or not all(c in "0123456789." for c in value):
            raise BadInput(f"DICOM file has an invalid {keyword}")
    return header
