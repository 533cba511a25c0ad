"""Studies as IHE PDI media in a ZIP: the CD, digital.

Layout (IHE RAD TF PDI; DICOM PS3.10 and PS3.12 file IDs): ``DICOMDIR`` at the root,
made with pydicom's ``FileSet``, every instance under its File ID
``PTnnnnnn/STnnnnnn/SEnnnnnn/IMnnnnnn`` (components of at most 8 upper-case letters and
digits, no extension), the file byte for byte as stored, and ``README.TXT`` and
``INDEX.HTM`` beside them.

The DICOMDIR is planned first from the instances' headers (their pixel data is never
read for it), so an unknown study or a damaged file is refused before the first byte is
sent; then the ZIP is streamed: entries stored without compression (the DICOM files are
mostly pixels, and PDI readers expect them as is), each written as it is read from the
store a chunk at a time, with data descriptors since the stream is not seekable, and
ZIP64 records where sizes or offsets need them (zipfile decides). Memory stays at one
chunk plus the planned DICOMDIR, whatever the size of the studies.
"""

from __future__ import annotations

import asyncio
import html
import io
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from node import __version__
from node.errors import ImageShareError, NotFound
from node.services.dicomweb import DicomWebService
from node.store.instances import CHUNK, InstanceRecord
from node.store.protocols import InstanceStore

DICOMDIR = "DICOMDIR"
README = "README.TXT"
INDEX = "INDEX.HTM"
FILE_SET_ID = "IMAGESHARE"
MEDIA_TYPE = "application/zip"
# A directory record that needs a value the instance lacks gets a placeholder (the
# instance itself is never changed); this many tries per instance before giving up.
_MAX_PLACEHOLDERS = 8
_PLACEHOLDERS_BY_VR = {
    "DA": "19000101",
    "TM": "000000",
    "IS": "1",
    "CS": "UNKNOWN",
    "LO": "UNKNOWN",
    "SH": "UNKNOWN",
    "PN": "UNKNOWN",
}
_MISSING_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")


@dataclass
class StudySummary:
    """What README.TXT and INDEX.HTM say about one study on the media."""

    date: str
    description: str
    modalities: list[str] = field(default_factory=list)
    series: int = 0
    instances: int = 0


@dataclass
class PdiMedia:
    """Planned media: the DICOMDIR and, in order, each entry name and its stored instance."""

    dicomdir: bytes
    files: list[tuple[str, InstanceRecord]]
    studies: list[StudySummary] = field(default_factory=list)

    @property
    def records(self) -> list[InstanceRecord]:
        return [record for _, record in self.files]

    @property
    def instance_bytes(self) -> int:
        return sum(record.size for record in self.records)


async def plan_pdi_media(store: InstanceStore, study_uids: list[str]) -> PdiMedia:
    """Plan the media of ``study_uids``: their instances, File IDs and DICOMDIR.

    Raises NotFound for an unknown study and ImageShareError for a stored file that is
    missing, damaged, or cannot be listed in a DICOMDIR.
    """
    records = await asyncio.to_thread(_study_records, store, study_uids)
    await DicomWebService(store).check_files(records)
    return await asyncio.to_thread(_plan, store, records)


async def pdi_zip(store: InstanceStore, study_uids: list[str]) -> AsyncIterator[bytes]:
    """The ZIP of ``study_uids`` as PDI media, chunk by chunk.

    Everything that can be refused is refused on the first ``anext`` (as
    ``plan_pdi_media``), before any byte of the ZIP is produced.
    """
    media = await plan_pdi_media(store, study_uids)
    async for chunk in stream_pdi_zip(store, media):
        yield chunk


async def stream_pdi_zip(store: InstanceStore, media: PdiMedia) -> AsyncIterator[bytes]:
    """The ZIP bytes of planned ``media``, each instance streamed from the store."""
    sink = _ZipSink()
    now = time.gmtime()
    stamp = (now.tm_year, now.tm_mon, now.tm_mday, now.tm_hour, now.tm_min, now.tm_sec)
    archive = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED)
    try:
        archive.writestr(_entry(README, stamp), _readme(media))
        archive.writestr(_entry(INDEX, stamp), _index(media))
        archive.writestr(_entry(DICOMDIR, stamp), media.dicomdir)
        yield sink.take()
        for name, record in media.files:
            info = _entry(name, stamp)
            info.file_size = record.size
            stored = await asyncio.to_thread(open, record.path, "rb")
            try:
                with archive.open(info, "w") as entry:
                    while chunk := await asyncio.to_thread(stored.read, CHUNK):
                        entry.write(chunk)
                        yield sink.take()
            finally:
                stored.close()  # closed now even when the download is abandoned
            yield sink.take()
        archive.close()
        yield sink.take()
    finally:
        if archive.fp is not None:  # abandoned mid-way: nothing more is written
            archive.fp = None


class _ZipSink(io.RawIOBase):
    """An unseekable file that zipfile writes to; the stream takes what was written."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._buffer += data
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return False

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _entry(name: str, stamp: tuple[int, int, int, int, int, int]) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=stamp)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


# -- planning (blocking; runs in a worker thread) ----------------------------------------


def _study_records(store: InstanceStore, study_uids: list[str]) -> list[InstanceRecord]:
    if not study_uids:
        raise NotFound("no study to put on the media")
    records: list[InstanceRecord] = []
    for study_uid in dict.fromkeys(study_uids):
        records.extend(store.instances(study_uid))
    return records


def _plan(store: InstanceStore, records: list[InstanceRecord]) -> PdiMedia:
    by_uid = {record.sop_instance_uid: record for record in records}
    file_set = FileSet()
    file_set.ID = FILE_SET_ID
    summaries: dict[str, StudySummary] = {}
    series_seen: set[str] = set()
    for position, record in enumerate(records, start=1):
        header = store.read_dataset(record, defer_size=1024, stop_before_pixels=True)
        _add_to_file_set(file_set, header, position)
        _summarise(summaries, series_seen, record, header)
    with tempfile.TemporaryDirectory(dir=store.tmp_dir) as scratch:
        # FileSet writes the DICOMDIR beside copies of the (pixel-less) headers it was
        # given; only the DICOMDIR is kept, the instances come from the store.
        root = Path(scratch) / "media"
        file_set.write(root)
        dicomdir = (root / DICOMDIR).read_bytes()
        files = [(Path(i.FileID).as_posix(), by_uid[i.SOPInstanceUID]) for i in file_set]
        shutil.rmtree(root, ignore_errors=True)
    order = {uid: index for index, uid in enumerate(by_uid)}
    files.sort(key=lambda item: order[item[1].sop_instance_uid])
    return PdiMedia(dicomdir, files, list(summaries.values()))


def _record_source(header: Dataset) -> Dataset:
    """What FileSet needs of an instance to make its directory records: the file meta and
    the public attributes of known VR (FileSet writes it, so a private or unknown-VR
    element read from an implicit VR file would only make that write fail)."""
    source = Dataset()
    source.file_meta = header.file_meta
    for tag in list(header.keys()):
        raw = header.get_item(tag, keep_deferred=True)
        # A value left on disk (an Encapsulated PDF's document) is never a record's: it
        # is not read back, the more so as the header was read from a path.
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            continue
        element = header[tag]
        if not element.tag.is_private and element.VR not in (None, "UN"):
            source.add(element)
    return source


def _add_to_file_set(file_set: FileSet, header: Dataset, position: int) -> None:
    """Add one instance's header, filling what its directory record needs but lacks."""
    header = _record_source(header)
    for _ in range(_MAX_PLACEHOLDERS):
        try:
            file_set.add(header)
            return
        except (TypeError, AttributeError) as exc:  # pydicom cannot write what it read
            raise ImageShareError(f"an instance cannot be listed in the DICOMDIR: {exc}") from exc
        except ValueError as exc:
            if not _fill_placeholder(header, str(exc), position):
                raise ImageShareError(
                    f"an instance cannot be listed in the DICOMDIR: {exc}"
                ) from exc
    raise ImageShareError("an instance lacks too many attributes to list in the DICOMDIR")


def _fill_placeholder(header: Dataset, message: str, position: int) -> bool:
    """Give the attribute pydicom's record creator named as missing a placeholder value."""
    match = _MISSING_TAG.search(message)
    if match is None:
        return False
    tag = int(match.group(1) + match.group(2), 16)
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return False
    value = str(position) if keyword_for_tag(tag) == "InstanceNumber" else None
    value = value or _PLACEHOLDERS_BY_VR.get(vr)
    if value is None:
        return False
    header.add_new(tag, vr, value)
    return True


def _summarise(
    summaries: dict[str, StudySummary],
    series_seen: set[str],
    record: InstanceRecord,
    header: Dataset,
) -> None:
    study = summaries.setdefault(
        record.study_instance_uid,
        StudySummary(str(header.get("StudyDate") or ""), str(header.get("StudyDescription") or "")),
    )
    modality = str(header.get("Modality") or "")
    if modality and modality not in study.modalities:
        study.modalities.append(modality)
    if record.series_instance_uid not in series_seen:
        series_seen.add(record.series_instance_uid)
        study.series += 1
    study.instances += 1


def _study_lines(media: PdiMedia) -> Iterator[tuple[str, str, str, int, int]]:
    for study in media.studies:
        date = study.date
        if len(date) == 8 and date.isdigit():
            date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
        yield date, study.description, "/".join(study.modalities), study.series, study.instances


def _readme(media: PdiMedia) -> str:
    lines = [
        "Medical images (DICOM), laid out as IHE Portable Data for Imaging (PDI) media.",
        "",
        "Open the DICOMDIR file with any DICOM viewer, or import this folder into a",
        "hospital's PACS. Every image file is the original, unchanged, as the hospital",
        "stored it. INDEX.HTM lists the studies.",
        "",
    ]
    for date, description, modalities, series, instances in _study_lines(media):
        lines.append(
            f"Study {date or '(no date)'} {modalities} {description}".rstrip()
            + f": {series} series, {instances} images"
        )
    lines += ["", f"Written by ImageShare {__version__}."]
    return "\r\n".join(lines) + "\r\n"


def _index(media: PdiMedia) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(date)}</td><td>{html.escape(modalities)}</td>"
        f"<td>{html.escape(description)}</td><td>{series}</td><td>{instances}</td></tr>"
        for date, description, modalities, series, instances in _study_lines(media)
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>Medical images</title></head><body><h1>Medical images</h1>"
        "<p>DICOM images on IHE PDI media: open <code>DICOMDIR</code> with a DICOM viewer."
        " The image files are the originals, unchanged.</p>"
        "<table><tr><th>Date</th><th>Modality</th><th>Description</th><th>Series</th>"
        f"<th>Images</th></tr>{rows}</table></body></html>"
    )
