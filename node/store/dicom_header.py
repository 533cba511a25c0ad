"""Reading and checking the header of a received DICOM Part 10 file.

This is where outside DICOM input is judged: a file is accepted only if it is Part 10
(preamble and "DICM"), parses to the end without running past its last byte, and names
its SOP class and its study, series and instance UIDs.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian as DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN

from node.errors import BadInput
from node.store.attributes import INDEXED, Attribute

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
    """The attributes the index keeps about one instance, by index column: one value for
    each indexed attribute of node/store/attributes.py."""

    values: Mapping[str, str | int | None]

    @property
    def sop_instance_uid(self) -> str:
        return str(self.values["sop_instance_uid"])

    @property
    def sop_class_uid(self) -> str:
        return str(self.values["sop_class_uid"])

    @property
    def series_instance_uid(self) -> str:
        return str(self.values["series_instance_uid"])

    @property
    def study_instance_uid(self) -> str:
        return str(self.values["study_instance_uid"])

    @property
    def transfer_syntax_uid(self) -> str:
        return str(self.values["transfer_syntax_uid"])


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


def _indexed_value(ds: Dataset, attribute: Attribute, transfer_syntax: str) -> str | int | None:
    if attribute.keyword == "AvailableTransferSyntaxUID":
        return transfer_syntax  # the file meta's, which the dataset itself does not hold
    if attribute.integer:
        return _integer(ds, attribute.keyword)
    return _text(ds, attribute.keyword)


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
            {str(a.column): _indexed_value(ds, a, transfer_syntax) for a in INDEXED}
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
