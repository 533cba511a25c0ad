"""DICOMweb over the store: search, retrieve (files, metadata, frames, bulk data) and store.

Everything that touches disk or SQLite runs in worker threads so the event loop keeps
serving; everything large is streamed chunk by chunk (a study is never whole in memory).
HTTP framing and content negotiation stay in the HTTP edge.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import logging
import struct
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO, Any, cast

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
)

from node.core import dicom_json
from node.errors import BadInput, ImageShareError, NotAcceptable, NotFound, PayloadTooLarge
from node.services import transcoding
from node.services.transcoding import (
    DICOM,
    OCTET_STREAM,
    Choice,
    PixelDescription,
    Wish,
)
from node.store.instances import (
    CHUNK,
    IngestResult,
    InstanceRecord,
    Outcome,
    StagedInstance,
)
from node.store.protocols import InstanceStore
from node.store.queries import Query

log = logging.getLogger(__name__)

# Values above this stay on disk while a header is read for metadata.
_METADATA_DEFER_SIZE = 64 * 1024

# Failure Reason codes of the Storage Service (PS3.4 Annex B), as STOW-RS reports them.
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_STUDY_MISMATCH = 0xA900
# Duplicate SOP Instance (PS3.7 C.4.2): the UID is held with other content.
FAILURE_DUPLICATE_SOP_INSTANCE = 0x0111


@dataclass(frozen=True)
class OutgoingPart:
    """One part of a multipart response: media type, size when known, and its bytes.

    A part of unknown size is read whole to learn its length (a frame), unless it is
    ``streamed`` (a transcoded instance): then it goes out without a Content-Length.
    """

    content_type: str
    size: int | None
    body: Callable[[], AsyncIterator[bytes]]
    streamed: bool = False


@dataclass(frozen=True)
class FrameSet:
    """Frames of one instance, ready to send: their media type and transfer syntax."""

    media_type: str
    transfer_syntax: str
    parts: list[OutgoingPart]


@dataclass(frozen=True)
class UploadPart:
    """One part of an upload as the HTTP edge hands it over."""

    content_type: str
    read_chunk: Callable[[int], Coroutine[Any, Any, bytes]]
    content_location: str = ""  # how an application/dicom+json dataset names this part


@dataclass
class StowReport:
    """The outcome of one STOW-RS request: per-instance successes and failures."""

    stored: list[IngestResult] = field(default_factory=list)
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)  # class, uid, code, why

    @property
    def status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def part_refused(self, exc: PayloadTooLarge | BadInput) -> None:
        """Report a part that cannot be stored: too large is out of resources (A700),
        anything else not understood (C000)."""
        too_large = isinstance(exc, PayloadTooLarge)
        code = FAILURE_OUT_OF_RESOURCES if too_large else FAILURE_CANNOT_UNDERSTAND
        self.failed.append(("", "", code, str(exc)))

    def study_url(self, base_url: str) -> str | None:
        """The study every stored instance belongs to, when they belong to one."""
        studies = {r.study_instance_uid for r in self.stored}
        return f"{base_url}/studies/{studies.pop()}" if len(studies) == 1 else None

    def as_json(self, base_url: str) -> dict[str, Any]:
        """The response dataset (PS3.18 10.5.3): RetrieveURL, Referenced and Failed SOPs."""
        out: dict[str, Any] = {}
        if study_url := self.study_url(base_url):
            out["00081190"] = dicom_json.attribute(0x00081190, study_url, "UR")
        if self.failed:
            out["00081198"] = {
                "vr": "SQ",
                "Value": [
                    {
                        **_referenced(sop_class, sop_uid),
                        "00081197": dicom_json.attribute(0x00081197, code, "US"),
                        # The reason in words, for people reading the response.
                        "00000902": dicom_json.attribute(0x00000902, why, "LO"),
                    }
                    for sop_class, sop_uid, code, why in self.failed
                ],
            }
        if self.stored:
            out["00081199"] = {
                "vr": "SQ",
                "Value": [
                    {
                        **_referenced(r.sop_class_uid, r.sop_instance_uid),
                        "00081190": dicom_json.attribute(
                            0x00081190, base_url + _instance_path(r), "UR"
                        ),
                    }
                    for r in self.stored
                ],
            }
        return dict(sorted(out.items()))


def _referenced(sop_class: str, sop_uid: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if sop_class:
        out["00081150"] = dicom_json.attribute(0x00081150, sop_class, "UI")
    if sop_uid:
        out["00081155"] = dicom_json.attribute(0x00081155, sop_uid, "UI")
    return out


def _instance_path(r: IngestResult | InstanceRecord) -> str:
    return (
        f"/studies/{r.study_instance_uid}/series/{r.series_instance_uid}"
        f"/instances/{r.sop_instance_uid}"
    )


@dataclass(frozen=True)
class _PixelLayout:
    transfer_syntax: UID
    value_offset: int
    value_length: int | None  # None: encapsulated (undefined length)
    frame_length: int
    number_of_frames: int
    extended_offsets: tuple[bytes, bytes] | None


class _BlockingPartReader(io.RawIOBase):
    """A blocking file-like view of an uploaded part, read by a worker thread.

    Each read asks the event loop for one chunk and waits for it, so the worker copies
    the part to disk without it ever being whole in memory. ``abort`` (from the loop)
    wakes a waiting worker with an error, so an abandoned upload never strands a thread.
    """

    def __init__(self, part: UploadPart, loop: asyncio.AbstractEventLoop) -> None:
        self._part = part
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[bytes] | None = None
        self.aborted = False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        wanted = size if size is not None and size > 0 else CHUNK
        with self._lock:
            if self.aborted:
                raise ConnectionAbortedError("the upload was abandoned")
            pending = asyncio.run_coroutine_threadsafe(self._part.read_chunk(wanted), self._loop)
            self._pending = pending
        return pending.result()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._pending is not None:
                self._pending.cancel()


class DicomWebService:
    """The DICOMweb operations of one node."""

    def __init__(self, store: InstanceStore) -> None:
        self.store = store

    # -- QIDO-RS -----------------------------------------------------------------------

    async def search(self, query: Query, base_url: str) -> tuple[list[dict[str, Any]], bool]:
        """DICOM JSON results of a parsed QIDO-RS query (with RetrieveURL), and whether
        the answer was cut at MAX_RESULTS."""
        found = await self.store.off_loop(self.store.search, query)
        results = []
        for row in found.rows:
            document = dicom_json.dataset_from_keywords(row)
            url = f"{base_url}/studies/{row['StudyInstanceUID']}"
            if "SeriesInstanceUID" in row:
                url += f"/series/{row['SeriesInstanceUID']}"
            if "SOPInstanceUID" in row:
                url += f"/instances/{row['SOPInstanceUID']}"
            document["00081190"] = dicom_json.attribute(0x00081190, url, "UR")
            # The index holds Unicode text, and the JSON model is UTF-8 (PS3.18 F.2).
            document["00080005"] = dicom_json.attribute(0x00080005, "ISO_IR 192", "CS")
            results.append(dict(sorted(document.items())))
        return results, found.truncated

    # -- WADO-RS -----------------------------------------------------------------------

    async def records(
        self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[InstanceRecord]:
        """The stored instances addressed by a WADO-RS path; raises NotFound."""
        return await self.store.off_loop(self.store.instances, study_uid, series_uid, sop_uid)

    async def check_files(self, records: list[InstanceRecord]) -> None:
        """Raise before a response starts if a stored file is missing or has changed size."""

        def check() -> None:
            for record in records:
                try:
                    size = record.path.stat().st_size
                except FileNotFoundError:
                    size = -1
                if size != record.size:
                    log.error("stored file %s is missing or damaged", record.path.name)
                    raise ImageShareError("a stored instance file is missing or damaged")

        await asyncio.to_thread(check)

    def file_part(self, record: InstanceRecord) -> OutgoingPart:
        """An instance's stored bytes, unchanged, as an application/dicom part."""
        media = f"{DICOM}; transfer-syntax={record.transfer_syntax_uid}"
        return OutgoingPart(media, record.size, lambda: _file_range(record.path, 0, record.size))

    async def instance_parts(
        self, records: list[InstanceRecord], wishes: list[Wish]
    ) -> list[OutgoingPart]:
        """One application/dicom part per instance in the transfer syntax the client asks
        for (stored bytes where they already are, else transcoded frame by frame).

        Raises NotAcceptable when an instance cannot be had as asked, before anything is
        sent; an instance whose frames turn out undecodable is sent as stored when the
        client named no transfer syntax.
        """
        parts = []
        for record in records:
            choice = transcoding.choose(wishes, record.transfer_syntax_uid, DICOM, instance=True)
            if not choice.transcode:
                parts.append(self.file_part(record))
                continue
            try:
                parts.append(await asyncio.to_thread(self._transcoded_part, record, choice))
            except NotAcceptable:  # TranscodingFailed too
                if not choice.may_fall_back:
                    raise
                parts.append(self.file_part(record))
        return parts

    def _transcoded_part(self, record: InstanceRecord, choice: Choice) -> OutgoingPart:
        """Plan an instance in another transfer syntax: its new header now (the first
        frame is decoded to learn the pixel layout it comes out in), its frames later."""
        target = choice.transfer_syntax
        try:
            frames = _StoredFrames.open(self.store, record)
        except NotFound:
            # No pixel data, or frames that are not byte-aligned (1-bit): the dataset is
            # re-encoded whole, its pixel bytes kept as they are.
            ds = self.store.read_dataset(record)
            if "PixelData" in ds and target != transcoding.EXPLICIT_LE:
                raise NotAcceptable(f"this instance is not encoded in {target}") from None
            head = transcoding.file_header(ds, transcoding.EXPLICIT_LE, None, _big_endian(record))
            label = f"{DICOM}; transfer-syntax={transcoding.EXPLICIT_LE}"
            return OutgoingPart(label, len(head), lambda: _single(head))
        decoded = frames.pixels
        if frames.number_of_frames and (
            frames.stored != transcoding.EXPLICIT_LE or target != transcoding.EXPLICIT_LE
        ):
            # The first frame is converted now, so that a codec refusing this image is
            # a 406 before the answer starts rather than a cut connection.
            native, decoded = transcoding.decode_frame(frames.read(1), frames.stored, frames.pixels)
            transcoding.encode_frame(native, target, decoded)
        head = transcoding.file_header(frames.header, target, decoded, _big_endian(record))
        media = f"{DICOM}; transfer-syntax={target}"
        count = frames.number_of_frames
        if target == transcoding.EXPLICIT_LE:
            length = count * decoded.frame_length
            head += transcoding.native_pixel_header(length, decoded.bits_allocated)
            size = len(head) + length + length % 2
            body = partial(_iterate, _native_file_chunks, head, frames, count)
            return OutgoingPart(media, size, body)
        head += transcoding.encapsulated_header()
        body = partial(_iterate, _encapsulated_file_chunks, head, frames, target, count)
        return OutgoingPart(media, None, body, streamed=True)

    async def metadata(self, records: list[InstanceRecord], base_url: str) -> AsyncIterator[bytes]:
        """A JSON array of every instance's attributes, one encoded instance at a time.

        The first chunk already holds the first instance, so that an error shows before
        anything is sent.
        """
        for index, record in enumerate(records):
            document = await asyncio.to_thread(self._instance_metadata, record, base_url)
            yield (b"," if index else b"[") + dicom_json.encode(document)
        yield b"]"

    async def instance_metadata(self, record: InstanceRecord, base_url: str) -> dict[str, Any]:
        """One instance's attributes in the JSON model, read in a worker thread."""
        return await asyncio.to_thread(self._instance_metadata, record, base_url)

    def _instance_metadata(self, record: InstanceRecord, base_url: str) -> dict[str, Any]:
        ds, pixels_at = self.store.read_to_pixels(record, _METADATA_DEFER_SIZE)
        prefix = f"{base_url}{_instance_path(record)}/bulk/"
        pixel_vr = None
        if "PixelData" not in ds:
            pixel_vr = _stored_pixel_vr(record, pixels_at, ds)
        document = dicom_json.dataset_to_json(ds, lambda path: prefix + path, pixel_vr)
        document["00083002"] = dicom_json.attribute(0x00083002, record.transfer_syntax_uid, "UI")
        return dict(sorted(document.items()))

    async def frames(
        self, record: InstanceRecord, numbers: list[int], wishes: list[Wish]
    ) -> FrameSet:
        """The requested frames (1-based) of an instance in the first media type and
        transfer syntax of ``wishes`` that can be served: as stored, or decoded (and
        encoded again) one frame at a time.

        Raises NotFound when the instance has no pixel data or a frame number is out of
        range, NotAcceptable when no wish can be served.
        """
        frames = await asyncio.to_thread(_StoredFrames.open, self.store, record)
        for number in numbers:
            if not 1 <= number <= frames.number_of_frames:
                raise NotFound(f"frame {number} is out of range 1-{frames.number_of_frames}")
        choice = transcoding.choose(wishes, frames.stored, frames.stored_media, instance=False)
        parts = [frames.part(n, choice) for n in numbers]
        if choice.transcode:
            # The first frame is converted now: a frame no codec reads is a 406 before the
            # answer starts; the others are converted as they are sent.
            first = await asyncio.to_thread(frames.converted, numbers[0], choice.transfer_syntax)
            parts[0] = replace(parts[0], size=len(first), body=partial(_single, first))
        return FrameSet(choice.media_type, choice.transfer_syntax, parts)

    async def bulk(
        self, record: InstanceRecord, location: tuple[int, ...], wishes: list[Wish]
    ) -> FrameSet:
        """One bulk value of an instance, where a metadata BulkDataURI put it (a tag, or
        a path through sequence items). Native pixel data that needs no transcoding is
        one part; otherwise pixel data comes frame by frame."""
        if location == (0x7FE00010,):
            frames = await asyncio.to_thread(_StoredFrames.open, self.store, record)
            layout = frames.layout
            whole = frames.inflated is not None or (
                layout is not None and layout.value_length is not None
            )
            if whole:
                choice = transcoding.choose(
                    wishes, frames.stored, frames.stored_media, instance=False
                )
                if not choice.transcode:
                    return FrameSet(OCTET_STREAM, frames.stored, [frames.whole_value()])
            return await self.frames(record, list(range(1, frames.number_of_frames + 1)), wishes)
        value = await asyncio.to_thread(self._bulk_value, record, location)
        part = OutgoingPart(OCTET_STREAM, len(value), lambda: _single(value))
        return FrameSet(OCTET_STREAM, "", [part])

    # -- STOW-RS -----------------------------------------------------------------------

    async def store_upload(
        self, parts: AsyncIterator[UploadPart], study_uid: str | None
    ) -> StowReport:
        """Stage every part, then commit them all in one durable step.

        A part that is not acceptable DICOM, is over the instance limit, or belongs to
        another study than ``study_uid`` is reported as failed; the rest are stored. Any
        error about the request as a whole (malformed body, body over the limit, client
        gone) discards every staged part and is raised: nothing is half-stored.
        """
        loop = asyncio.get_running_loop()
        report = StowReport()
        staged: list[StagedInstance] = []
        try:
            async for part in parts:
                if part.content_type not in ("application/dicom", ""):
                    report.failed.append(
                        ("", "", FAILURE_CANNOT_UNDERSTAND, "part is not application/dicom")
                    )
                    continue
                reader = _BlockingPartReader(part, loop)
                try:
                    item = await asyncio.to_thread(self._stage, reader)
                except asyncio.CancelledError:
                    reader.abort()
                    raise
                except PayloadTooLarge as exc:
                    if type(exc) is not PayloadTooLarge:
                        raise  # the whole body is over its limit
                    report.part_refused(exc)
                    continue
                except BadInput as exc:
                    report.part_refused(exc)
                    continue
                await self._admit(item, study_uid, report, staged)
            await self._commit(staged, report)
        except BaseException:
            await self.store.off_loop(self.store.discard, staged)
            raise
        return report

    async def store_json_upload(
        self, parts: AsyncIterator[UploadPart], study_uid: str | None
    ) -> StowReport:
        """STOW-RS of datasets in the JSON model (PS3.18 10.5.1.2.2): parts of type
        application/dicom+json hold arrays of datasets, whose BulkDataURIs name the other
        parts by their Content-Location. Each dataset becomes an Explicit VR Little Endian
        file, checked, staged and committed like an uploaded one.

        Bulk parts wait in temporary files (each at most the instance limit); metadata
        parts are held in memory up to _MAX_JSON_BYTES. Raises as ``store_upload``.
        """
        report = StowReport()
        staged: list[StagedInstance] = []
        documents: list[Any] = []
        bulk: dict[str, tuple[str, IO[bytes]]] = {}
        try:
            async for part in parts:
                if part.content_type == dicom_json.MEDIA_TYPE:
                    documents.extend(await _read_json_datasets(part))
                else:
                    bulk[part.content_location] = (
                        part.content_type,
                        await self._spool(part),
                    )
            for document in documents:
                try:
                    data = await asyncio.to_thread(_file_from_json, document, bulk)
                    item = await self.store.off_loop(self.store.stage_bytes, data)
                except (PayloadTooLarge, BadInput) as exc:
                    report.part_refused(exc)
                    continue
                await self._admit(item, study_uid, report, staged)
            await self._commit(staged, report)
        except BaseException:
            await self.store.off_loop(self.store.discard, staged)
            raise
        finally:
            for _, spooled in bulk.values():
                spooled.close()
        return report

    async def _spool(self, part: UploadPart) -> IO[bytes]:
        """A bulk part in a temporary file (in memory while small); raises
        PayloadTooLarge past the instance limit."""
        spooled = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed by store_json_upload
            max_size=CHUNK, mode="w+b", dir=str(self.store.tmp_dir)
        )
        size = 0
        try:
            while chunk := await part.read_chunk(CHUNK):
                size += len(chunk)
                if size > self.store.max_instance_bytes:
                    raise _BulkTooLarge(
                        f"a bulk data part is over the limit of {self.store.max_instance_bytes}"
                        " bytes"
                    )
                await asyncio.to_thread(spooled.write, bytes(chunk))
        except BaseException:
            spooled.close()
            raise
        return cast(IO[bytes], spooled)

    async def _admit(
        self,
        item: StagedInstance,
        study_uid: str | None,
        report: StowReport,
        staged: list[StagedInstance],
    ) -> None:
        """Keep a staged instance for the commit, or report it as of another study."""
        header = item.header
        if study_uid is not None and header.study_instance_uid != study_uid:
            await self.store.off_loop(self.store.discard, [item])
            report.failed.append(
                (
                    header.sop_class_uid,
                    header.sop_instance_uid,
                    FAILURE_STUDY_MISMATCH,
                    "the instance belongs to another study than the request's",
                )
            )
            return
        staged.append(item)

    async def _commit(self, staged: list[StagedInstance], report: StowReport) -> None:
        """Commit every staged instance in one durable step; an instance whose UID is held
        with other content is reported as failed."""
        results = await self.store.off_loop(self.store.commit, staged, "stow")
        for result in results:
            if await asyncio.to_thread(self._conflicts_with_stored, result):
                report.failed.append(
                    (
                        result.sop_class_uid,
                        result.sop_instance_uid,
                        FAILURE_DUPLICATE_SOP_INSTANCE,
                        "an instance with this SOP Instance UID and other content is"
                        " already stored; it was kept and this one not stored",
                    )
                )
            else:
                report.stored.append(result)

    def _conflicts_with_stored(self, result: IngestResult) -> bool:
        """Whether an instance reported as already held differs from the stored one (a
        re-send of the same bytes is a success: STOW-RS stays idempotent)."""
        if result.outcome is not Outcome.DUPLICATE:
            return False
        try:
            [held] = self.store.instances(
                result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid
            )
        except NotFound:  # held under another study or series
            return True
        return held.digest != result.digest

    def _bulk_value(self, record: InstanceRecord, location: tuple[int, ...]) -> bytes:
        # A deflated stream cannot be re-read for a deferred value, nor can a value inside
        # a sequence: those are read at once.
        deflated = record.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
        ds: Dataset = self.store.read_dataset(
            record,
            defer_size=None if deflated or len(location) > 1 else _METADATA_DEFER_SIZE,
            stop_before_pixels=True,
        )
        for index in range(1, len(location), 2):  # down through sequence items
            items = ds[location[index - 1]].value if location[index - 1] in ds else None
            if not isinstance(items, DicomSequence) or not 0 <= location[index] < len(items):
                raise NotFound("the instance has no such attribute")
            ds = items[location[index]]
        tag = location[-1]
        if tag not in ds:
            raise NotFound("the instance has no such attribute")
        value = ds[tag].value
        if isinstance(value, str):
            return value.encode()
        if not isinstance(value, bytes | bytearray):
            raise NotFound("that attribute is not bulk data")
        return bytes(value)

    def _stage(self, reader: _BlockingPartReader) -> StagedInstance:
        item = self.store.stage(cast(IO[bytes], reader))
        if reader.aborted:  # the request was cancelled while the header was being checked
            self.store.discard([item])
            raise ConnectionAbortedError("the upload was abandoned")
        return item


# The most bytes of application/dicom+json metadata one STOW-RS request may hold.
_MAX_JSON_BYTES = 64 * 1024 * 1024


class _BulkTooLarge(PayloadTooLarge):
    """A bulk data part of a JSON store is over the instance limit: the request fails."""


async def _read_json_datasets(part: UploadPart) -> list[Any]:
    """The datasets of one application/dicom+json part; raises BadInput when it is not a
    JSON array of objects, _BulkTooLarge past _MAX_JSON_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(CHUNK):
        size += len(chunk)
        if size > _MAX_JSON_BYTES:
            raise _BulkTooLarge(f"a metadata part is over the limit of {_MAX_JSON_BYTES} bytes")
        chunks.append(chunk)
    try:
        documents = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise BadInput("an application/dicom+json part is not valid JSON") from exc
    if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
        raise BadInput("an application/dicom+json part must be an array of datasets")
    return documents


def _file_from_json(document: dict[str, Any], bulk: dict[str, tuple[str, IO[bytes]]]) -> bytes:
    """A Part 10 file in Explicit VR Little Endian from one dataset in the JSON model,
    its BulkDataURIs read from the bulk parts; raises BadInput when it cannot be made."""

    def bulk_value(tag: str, vr: str, uri: str) -> bytes:
        if uri not in bulk:
            raise BadInput(f"BulkDataURI {uri[:200]!r} names no part of the request")
        media, spooled = bulk[uri]
        if media not in (OCTET_STREAM, ""):
            raise BadInput(f"bulk data of type {media} is not accepted; send native pixels")
        spooled.seek(0)
        return spooled.read()

    dataset_json = {k: v for k, v in document.items() if not str(k).startswith("0002")}
    try:
        ds = Dataset.from_json(dataset_json, bulk_data_uri_handler=bulk_value)
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta = meta
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    except BadInput:
        raise
    except Exception as exc:  # pydicom raises many kinds for a dataset it cannot make
        raise BadInput(f"the dataset cannot be made into DICOM: {exc}"[:300]) from exc
    return buffer.getvalue()


def _stored_pixel_vr(record: InstanceRecord, pixels_at: int, ds: Dataset) -> str | None:
    """The VR of the PixelData element as the file stores it (None: it has none).

    Explicit VR files say it in the element; implicit VR native data is OW and
    encapsulated data OB (PS3.5 A.1, A.4); a deflated file's is read from the inflated
    stream's rule, as BitsAllocated gives it.
    """
    if "Rows" not in ds:
        return None
    ts = UID(record.transfer_syntax_uid)
    bits_rule = "OW" if int(ds.get("BitsAllocated") or 8) > 8 else "OB"
    if ts == DeflatedExplicitVRLittleEndian:
        return bits_rule
    with open(record.path, "rb") as f:
        f.seek(pixels_at)
        head = f.read(6)
    if len(head) < 6:
        return None
    if ts.is_implicit_VR:
        return "OB" if ts.is_encapsulated else "OW"
    vr = head[4:6].decode("ascii", "replace")
    return vr if vr in ("OB", "OW") else bits_rule


def _big_endian(record: InstanceRecord) -> bool:
    return record.transfer_syntax_uid == ExplicitVRBigEndian


@dataclass(frozen=True)
class _StoredFrames:
    """An instance's frames as stored: where they are, what they are, how to read one.

    Opened in a worker thread. A deflated file is inflated once (within the store's
    limits) and its frames cut from the inflated value; other files are read a frame at
    a time.
    """

    record: InstanceRecord
    header: Dataset  # the dataset up to its pixel data
    stored: str  # transfer syntax of the frame bytes as held (native LE: Explicit VR LE)
    pixels: PixelDescription
    number_of_frames: int
    layout: _PixelLayout | None  # None: deflated, cut from ``inflated``
    inflated: bytes | None = None

    @classmethod
    def open(cls, store: InstanceStore, record: InstanceRecord) -> _StoredFrames:
        """Raises NotFound when the instance has no pixel data or its frames are not
        byte-aligned, NotAcceptable when its pixel attributes are incomplete."""
        if record.transfer_syntax_uid != DeflatedExplicitVRLittleEndian:
            header, layout = _pixel_layout(store, record)
            stored = str(layout.transfer_syntax)
            if layout.value_length is not None:
                stored = transcoding.native_label(stored)
            pixels = PixelDescription.of(header)
            return cls(record, header, stored, pixels, layout.number_of_frames, layout)
        ds = store.read_dataset(record)
        value = ds.get("PixelData")
        if not isinstance(value, bytes) or not value:
            raise NotFound("the instance has no pixel data")
        pixels = PixelDescription.of(ds)
        if not pixels.frame_length or pixels.bits_allocated % 8:
            raise NotFound("the instance's frames are not byte-aligned and cannot be served alone")
        count = min(_frame_count(ds), len(value) // pixels.frame_length)
        del ds.PixelData
        return cls(record, ds, transcoding.EXPLICIT_LE, pixels, count, None, value)

    @property
    def stored_media(self) -> str:
        """The media type of a frame as held (PS3.18 Table 8.7.3-5)."""
        return transcoding.FRAME_MEDIA_TYPES.get(self.stored, OCTET_STREAM)

    def read(self, number: int) -> bytes:
        """Frame ``number`` (1-based) as stored; blocking."""
        if self.inflated is not None:
            length = self.pixels.frame_length
            return self.inflated[(number - 1) * length : number * length]
        assert self.layout is not None
        layout = self.layout
        with open(self.record.path, "rb") as f:
            if layout.value_length is not None:
                f.seek(layout.value_offset + (number - 1) * layout.frame_length)
                return f.read(layout.frame_length)
            f.seek(layout.value_offset)
            try:
                return get_frame(
                    f,
                    number - 1,
                    number_of_frames=layout.number_of_frames,
                    extended_offsets=layout.extended_offsets,
                )
            except (ValueError, KeyError, IndexError, struct.error) as exc:
                raise ImageShareError(f"frame {number} cannot be read: {exc}") from exc

    def converted(self, number: int, target: str) -> bytes:
        """Frame ``number`` decoded and, for a compressed ``target``, encoded again."""
        native, decoded = transcoding.decode_frame(self.read(number), self.stored, self.pixels)
        return transcoding.encode_frame(native, target, decoded)

    def part(self, number: int, choice: Choice) -> OutgoingPart:
        """Frame ``number`` as one part of the chosen media type and transfer syntax."""
        media = f"{choice.media_type}; transfer-syntax={choice.transfer_syntax}"
        layout = self.layout
        if choice.transcode:
            target = choice.transfer_syntax
            return OutgoingPart(
                media, None, partial(_in_thread, partial(self.converted, number, target))
            )
        if layout is not None and layout.value_length is not None:
            offset = layout.value_offset + (number - 1) * layout.frame_length
            length = layout.frame_length
            path = self.record.path
            return OutgoingPart(media, length, lambda: _file_range(path, offset, length))
        return OutgoingPart(media, None, partial(_in_thread, partial(self.read, number)))

    def whole_value(self) -> OutgoingPart:
        """The native PixelData value as stored, one part."""
        media = f"{OCTET_STREAM}; transfer-syntax={self.stored}"
        if self.inflated is not None:
            value = self.inflated
            return OutgoingPart(media, len(value), lambda: _single(value))
        assert self.layout is not None and self.layout.value_length is not None
        offset, length = self.layout.value_offset, self.layout.value_length
        return OutgoingPart(media, length, lambda: _file_range(self.record.path, offset, length))


def _frame_count(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def _native_file_chunks(head: bytes, frames: _StoredFrames, count: int) -> Iterator[bytes]:
    """A Part 10 file in Explicit VR Little Endian: header, then each frame decoded."""
    yield head
    total = 0
    for number in range(1, count + 1):
        frame = frames.converted(number, transcoding.EXPLICIT_LE)
        total += len(frame)
        yield frame
    if total % 2:
        yield b"\x00"


def _encapsulated_file_chunks(
    head: bytes, frames: _StoredFrames, target: str, count: int
) -> Iterator[bytes]:
    """A Part 10 file in a compressed syntax: header, then one fragment per frame."""
    yield head
    for number in range(1, count + 1):
        yield transcoding.encapsulated_item(frames.converted(number, target))
    yield transcoding.encapsulated_end()


async def _iterate(produce: Callable[..., Iterator[bytes]], *args: Any) -> AsyncIterator[bytes]:
    """A blocking chunk generator driven from worker threads, one chunk per hop."""
    chunks = produce(*args)
    done = object()
    while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
        yield cast(bytes, chunk)


async def _in_thread(read: Callable[[], bytes]) -> AsyncIterator[bytes]:
    yield await asyncio.to_thread(read)


# -- blocking helpers (run in worker threads) --------------------------------------------


async def _file_range(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    """``length`` bytes of a file from ``offset``, read in worker threads a chunk at a time."""

    def open_and_read() -> tuple[IO[bytes], bytes]:
        # One thread hop opens the file and reads its first chunk (often the whole instance).
        f = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        try:
            f.seek(offset)
            return f, f.read(min(CHUNK, length))
        except BaseException:
            f.close()
            raise

    f, chunk = await asyncio.to_thread(open_and_read)
    try:
        remaining = length
        while chunk:
            remaining -= len(chunk)
            yield chunk
            if remaining <= 0:
                return
            chunk = await asyncio.to_thread(f.read, min(CHUNK, remaining))
    finally:
        f.close()


async def _single(value: bytes) -> AsyncIterator[bytes]:
    yield value


_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"}
_LONG_LENGTH_VRS |= {b"UR", b"UT", b"UV"}


def _pixel_layout(store: InstanceStore, record: InstanceRecord) -> tuple[Dataset, _PixelLayout]:
    """An instance's dataset up to its pixel data, where the pixel data value lies in
    its file, and how it splits in frames.

    Raises NotFound when the instance has no pixel data; not for deflated files.
    """
    path = record.path
    ds, start = store.read_to_pixels(record, _METADATA_DEFER_SIZE)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if ts == DeflatedExplicitVRLittleEndian:  # the index and the file disagree
        raise ImageShareError("a stored instance file is damaged")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 0)
    frames = _frame_count(ds)
    frame_bits = rows * columns * samples * bits
    with open(path, "rb") as f:
        f.seek(start)
        head = f.read(8)
    endian = "<" if ts.is_little_endian else ">"
    if len(head) < 8 or struct.unpack(endian + "HH", head[:4]) != (0x7FE0, 0x0010):
        raise NotFound("the instance has no pixel data")
    if ts.is_implicit_VR:
        (length,) = struct.unpack(endian + "I", head[4:8])
        value_offset = start + 8
    elif head[4:6] in _LONG_LENGTH_VRS:
        with open(path, "rb") as f:
            f.seek(start + 8)
            (length,) = struct.unpack(endian + "I", f.read(4))
        value_offset = start + 12
    else:
        (length,) = struct.unpack(endian + "H", head[6:8])
        value_offset = start + 8
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    if length == 0xFFFFFFFF:
        return ds, _PixelLayout(ts, value_offset, None, 0, frames, extended)
    if not frame_bits or frame_bits % 8:
        raise NotFound("the instance's frames are not byte-aligned and cannot be served alone")
    frame_length = frame_bits // 8
    frames = min(frames, length // frame_length)
    return ds, _PixelLayout(ts, value_offset, length, frame_length, frames, None)
