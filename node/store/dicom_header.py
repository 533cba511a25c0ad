"""Reading and checking DICOM Part 10 files, received or stored.

This is where outside DICOM input is judged: a file is accepted only if it is Part 10
(preamble and "DICM"), parses to the end without running past its last byte, and names
its SOP class and its study, series and instance UIDs. A file already in memory (a
C-STORE's data set) is judged from its bytes, exactly as the same file on disk.

It is also the one place a file in Deflated Explicit VR Little Endian is inflated, for
ingest and for every later read alike (``read_dataset``). pydicom would inflate the whole
dataset into memory in one call, so a small file could take gigabytes (a deflate bomb);
here it is inflated as a stream, at most ``InflateLimits.max_bytes`` in all and at most
``max_ratio`` times its compressed size, and the end-of-file and length checks run on the
inflated stream.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
import zlib
from collections.abc import Mapping, MutableSequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pydicom
import pydicom.config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_preamble
from pydicom.filereader import read_dataset as read_raw_dataset
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian as DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
from pydicom.valuerep import AMBIGUOUS_VR, VR

from node.core.uids import is_uid
from node.errors import BadInput, PayloadTooLarge
from node.store.attributes import INDEXED, Attribute

# Received files are judged by the checks below; pydicom's own warnings about odd
# values would only flood the log.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\..*")

# Values larger than this are not loaded while checking a file: pixel data stays on disk.
_DEFER_SIZE = 64 * 1024
_UNDEFINED_LENGTH = 0xFFFFFFFF

# The first bytes a deflated dataset inflates to are not held to the ratio limit, so that
# small, very compressible datasets (a blank image inflates ~1000 times) are accepted.
RATIO_FREE_BYTES = 16 * 1024 * 1024
# Compressed bytes read, and inflated bytes produced, per step of the inflater.
_INFLATE_STEP = 64 * 1024
# How far back pydicom may seek in an inflated stream (it steps back a few bytes at most).
_REWIND_WINDOW = 1024 * 1024
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# Most reads pydicom may make of one file, two or three per element it parses: millions
# of tiny elements (a few MB, deflated or not) would take gigabytes as pydicom objects.
# Large real files (enhanced multi-frame, structure sets) need well under a tenth of it.
MAX_READS = 600_000


def _one_more_read(reads: int) -> int:
    """Count a read of a file being parsed; BadInput past MAX_READS."""
    if reads >= MAX_READS:
        raise BadInput("the DICOM file has too many elements")
    return reads + 1


class _ReadCountedFile(io.BufferedReader):
    """A file opened for pydicom, which may read it at most MAX_READS times (a buffered
    reader still, so that pydicom reopens it by name for a deferred value)."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "r"))
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads = _one_more_read(self.reads)
        return super().read(size)


class _ReadCountedBytes(io.BytesIO):
    """A file already in memory, read by pydicom as ``_ReadCountedFile`` is (a BytesIO of
    ``bytes`` shares them: nothing is copied)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads = _one_more_read(self.reads)
        return super().read(size)


@dataclass(frozen=True)
class InflateLimits:
    """How far a deflated dataset may inflate: at most ``max_bytes`` (the instance size
    limit), and past ``RATIO_FREE_BYTES`` at most ``max_ratio`` times its compressed size."""

    max_bytes: int
    max_ratio: float

    def check(self, inflated: int, compressed: int, what: str = "the deflated dataset") -> None:
        """Raise PayloadTooLarge once ``inflated`` bytes from ``compressed`` are too many."""
        if inflated > self.max_bytes:
            raise PayloadTooLarge(f"{what} inflates past the limit of {self.max_bytes} bytes")
        if inflated > RATIO_FREE_BYTES and inflated > self.max_ratio * compressed:
            raise PayloadTooLarge(f"{what} inflates more than {self.max_ratio:g} times its size")


class _InflatingReader(io.RawIOBase):
    """A deflated dataset as a readable, forward-seekable stream, inflated step by step.

    Only the last ``_REWIND_WINDOW`` bytes are kept for pydicom's small steps back; a
    seek forward (past a deferred value) inflates and drops what it skips. Every step is
    checked against the limits, so a bomb is refused before much of it is inflated.
    """

    def __init__(self, source: IO[bytes], compressed_size: int, limits: InflateLimits) -> None:
        self._source = source
        self._compressed_size = compressed_size
        self._limits = limits
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._kept = bytearray()  # inflated bytes from offset _kept_start on
        self._kept_start = 0
        self._position = 0
        self.inflated = 0  # bytes inflated so far
        self.reads = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def _inflate_step(self) -> bool:
        """Inflate one more step into ``_kept``; False at the end of the deflated data."""
        if self._inflater.eof:
            return False
        compressed = self._inflater.unconsumed_tail or self._source.read(_INFLATE_STEP)
        if not compressed:
            raise BadInput("truncated DICOM file: the deflated data ends early")
        try:
            piece = self._inflater.decompress(compressed, _INFLATE_STEP)
        except zlib.error as exc:
            raise BadInput(f"unreadable deflated DICOM data: {exc}") from exc
        self.inflated += len(piece)
        self._limits.check(self.inflated, self._compressed_size)
        self._kept += piece
        return True

    def _drop_before(self, offset: int) -> None:
        """Forget the inflated bytes before ``offset``: they will not be read again."""
        drop = min(offset - self._kept_start, len(self._kept))
        if drop > 0:
            del self._kept[:drop]
            self._kept_start += drop

    def _fill_to(self, offset: int, keep_from: int) -> None:
        """Inflate until ``offset`` is reached or the data ends, keeping only the bytes
        from ``keep_from`` on (a long skip holds no more than one window)."""
        while self._kept_start + len(self._kept) < offset and self._inflate_step():
            self._drop_before(keep_from)

    def read(self, size: int | None = -1) -> bytes:
        self.reads = _one_more_read(self.reads)
        if size is None or size < 0:
            size = self._limits.max_bytes + 1  # the limits end it first
        self._fill_to(self._position + size, self._position - _REWIND_WINDOW)
        start = self._position - self._kept_start
        data = bytes(self._kept[start : start + size]) if start >= 0 else b""
        self._position += len(data)
        self._drop_before(self._position - _REWIND_WINDOW)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: 0, io.SEEK_CUR: self._position}.get(whence)
        if target is None:
            raise BadInput("a deflated dataset cannot be read from its end")
        target += offset
        if target < self._kept_start:
            raise BadInput("unreadable deflated DICOM data: it would be read twice")
        self._fill_to(target, target - _REWIND_WINDOW)
        self._position = target
        return target

    def inflated_length(self) -> int:
        """Inflate what is left (within the limits) and return the whole inflated length."""
        while self._inflate_step():
            self._kept.clear()
            self._kept_start = self.inflated
        return self.inflated


@dataclass(frozen=True)
class _ReadFile:
    dataset: FileDataset
    # Where reading ended: the end of the stream the dataset's offsets refer to (inflated,
    # for a deflated file), or, read up to its pixel data, the offset of that element.
    end: int
    # Where pydicom stopped reading (past ``end`` after a skip past it). Before ``end``, it
    # gave up silently: an undefined-length value whose delimiter never came, say.
    stopped: int


def _read(
    f: _ReadCountedFile | _ReadCountedBytes,
    size: int,
    limits: InflateLimits,
    defer_size: int | None,
    stop_before_pixels: bool,
) -> _ReadFile:
    """Read the file ``f`` (``size`` bytes) with pydicom, inflating a deflated dataset as
    a bounded stream."""
    with f:
        preamble = read_preamble(f, False)
        # pydicom's one call that reads the file meta and leaves the file at the dataset.
        meta = _read_file_meta_info(f)
        syntax = meta.get("TransferSyntaxUID")
        if syntax != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            read = _read_after_meta(f, size, preamble, meta, defer_size, stop_before_pixels)
            if read is not None:
                return read
            f.seek(0)
            plain = pydicom.dcmread(f, defer_size=defer_size, stop_before_pixels=stop_before_pixels)
            # pydicom leaves the file at the pixel data element when it stops before it.
            end = f.tell() if stop_before_pixels else size
            return _ReadFile(plain, end, f.tell())
        reader = _InflatingReader(f, size - f.tell(), limits)
        stop = (lambda tag, vr, length: tag in _PIXEL_DATA_TAGS) if stop_before_pixels else None
        raw = read_raw_dataset(
            reader,  # type: ignore[arg-type]  # a binary stream, as pydicom needs
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=stop,
            defer_size=defer_size,
        )
        stopped = reader.tell()
        end = stopped if stop_before_pixels else reader.inflated_length()
    # No file name: a deferred value cannot be read back from the compressed file.
    return _ReadFile(_file_dataset(None, raw, preamble, meta, False, True), end, stopped)


def _file_dataset(
    f: Any, raw: Dataset, preamble: bytes | None, meta: Any, implicit: bool, little: bool
) -> FileDataset:
    """The FileDataset pydicom's ``read_partial`` makes of what it read."""
    dataset = FileDataset(f, raw, preamble, meta, implicit, little)
    dataset.set_original_encoding(implicit, little, raw._character_set)
    return dataset


def _read_after_meta(
    f: _ReadCountedFile | _ReadCountedBytes,
    size: int,
    preamble: bytes | None,
    meta: Any,
    defer_size: int | None,
    stop_before_pixels: bool,
) -> _ReadFile | None:
    """The rest of the file read as pydicom's ``dcmread`` reads it after the file meta, so
    that the meta is not read a second time (0.15 ms a file); None (and the file where it
    was) where pydicom would do more than read the dataset: no transfer syntax to go by,
    a private one, a command set, nothing after the meta, a read that ends early."""
    syntax = meta.get("TransferSyntaxUID")
    if syntax is None or syntax in pydicom.uid.PrivateTransferSyntaxes:
        return None
    start = f.tell()
    head = f.read(8)  # an element's tag and length at least
    f.seek(start)
    if len(head) < 8 or head[:2] == b"\0\0":  # little or nothing left; a command set
        return None
    implicit = syntax == pydicom.uid.ImplicitVRLittleEndian
    little = syntax != pydicom.uid.ExplicitVRBigEndian
    try:
        raw = read_raw_dataset(
            f,
            implicit,
            little,
            stop_when=_at_pixel_data if stop_before_pixels else None,
            defer_size=defer_size,
        )
    except EOFError:
        f.seek(start)
        return None
    # pydicom leaves the file at the pixel data element when it stops before it.
    end = f.tell() if stop_before_pixels else size
    return _ReadFile(_file_dataset(f, raw, preamble, meta, implicit, little), end, f.tell())


def _opened(source: Path | bytes) -> tuple[_ReadCountedFile | _ReadCountedBytes, int]:
    """A file to read (on disk, or already in memory) and its size in bytes."""
    if isinstance(source, bytes):
        return _ReadCountedBytes(source), len(source)
    f = _ReadCountedFile(source)
    return f, os.fstat(f.fileno()).st_size


def _judged(
    source: Path | bytes, limits: InflateLimits, defer_size: int | None, stop_before_pixels: bool
) -> _ReadFile:
    """``_read``, with every failure turned into BadInput or PayloadTooLarge."""
    try:
        return _read(*_opened(source), limits, defer_size, stop_before_pixels)
    except (BadInput, PayloadTooLarge, FileNotFoundError):
        raise
    except InvalidDicomError as exc:
        raise BadInput("not a DICOM Part 10 file (no DICM preamble)") from exc
    except (EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BadInput(f"unreadable DICOM file: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on garbage; all mean "bad file"
        raise BadInput(f"unreadable DICOM file: {type(exc).__name__}") from exc


def read_dataset(
    path: Path,
    limits: InflateLimits,
    defer_size: int | None = None,
    stop_before_pixels: bool = False,
) -> FileDataset:
    """A DICOM file as a pydicom dataset, a deflated one inflated within ``limits``.

    The one way the node opens a DICOM file it holds. Raises BadInput for a file that
    cannot be read, PayloadTooLarge for one that inflates past the limits, and
    FileNotFoundError if it is missing.
    """
    return _judged(path, limits, defer_size, stop_before_pixels).dataset


def read_to_pixels(path: Path, limits: InflateLimits, defer_size: int) -> tuple[FileDataset, int]:
    """A DICOM file read up to its pixel data, and the offset of the pixel data element
    (the file's end if it has none; an offset in the inflated stream if deflated).

    Raises as ``read_dataset``.
    """
    read = _judged(path, limits, defer_size, stop_before_pixels=True)
    return read.dataset, read.end


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


# Indexed attributes whose raw element is converted here, by tag, as Dataset.__getitem__
# would convert it; the others (a sequence, a VR to correct) are left to pydicom's Dataset.
_PLAIN_TAGS = {
    a.keyword: BaseTag(tag)
    for a in INDEXED
    if (tag := tag_for_keyword(a.keyword)) is not None
    and dictionary_VR(tag) not in AMBIGUOUS_VR | {VR.SQ}
}
# The patient's, study's and series' values repeat in every instance of a series: an index
# value converted from a raw value of at most this many bytes is remembered, by those
# bytes and what their conversion depends on, in a table of at most so many entries.
_REMEMBERED_VALUE_BYTES = 256
_REMEMBERED_VALUES = 4096
_remembered: dict[tuple[Any, ...], Any] = {}
_UNKNOWN = object()


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip()


def _integer(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _index_value(attribute: Attribute, value: Any) -> str | int | None:
    return _integer(value) if attribute.integer else _text(value)


def _converted(
    ds: Dataset, attribute: Attribute, encoding: str | MutableSequence[str]
) -> str | int | None:
    """The index value of ``attribute``, from what ``ds.get`` would answer, but without
    pydicom's Dataset around the conversion (it would look up the character set again for
    every element)."""
    keyword = attribute.keyword
    tag = _PLAIN_TAGS.get(keyword)
    elem = ds._dict.get(tag) if tag is not None else None
    if not isinstance(elem, RawDataElement) or tag is None:
        return _index_value(attribute, ds.get(keyword))
    if elem.value is None and elem.length not in (0, _UNDEFINED_LENGTH):
        # Deferred: no indexed attribute is that long in a real file (no short-length VR
        # can be), and a file read from memory has no file to read it back from.
        raise BadInput(f"DICOM file has a {keyword} of {elem.length} bytes: too long")
    if (
        elem.VR not in (None, dictionary_VR(tag))
        or elem.length == _UNDEFINED_LENGTH
        or elem.length > _REMEMBERED_VALUE_BYTES
    ):
        return _index_value(attribute, ds.get(keyword))
    key = (tag, elem.VR, elem.length, elem.value, elem.is_little_endian, str(encoding))
    value = _remembered.get(key, _UNKNOWN)
    if value is _UNKNOWN:
        value = _index_value(attribute, convert_raw_data_element(elem, encoding=encoding).value)
        if len(_remembered) >= _REMEMBERED_VALUES:
            _remembered.clear()
        _remembered[key] = value
    return value


def _indexed_values(ds: Dataset, transfer_syntax: str) -> dict[str, str | int | None]:
    """Every indexed attribute's value, by index column."""
    encoding = ds.original_character_set or ds._character_set
    values: dict[str, str | int | None] = {}
    for attribute in INDEXED:
        if attribute.keyword == "AvailableTransferSyntaxUID":
            value: str | int | None = transfer_syntax  # the file meta's, not the dataset's
        else:
            value = _converted(ds, attribute, encoding)
        values[str(attribute.column)] = value
    return values


def _last_value_end(ds: Dataset) -> int:
    """Byte offset just past the last top-level value read from the file."""
    end = 0
    for elem in ds._dict.values():
        if isinstance(elem, RawDataElement) and elem.length != _UNDEFINED_LENGTH:
            end = max(end, elem.value_tell + elem.length)
    return end


def parse_header(source: Path | bytes, limits: InflateLimits) -> InstanceHeader:
    """Check a DICOM Part 10 file, on disk or already in memory, and read its indexed
    attributes.

    Raises BadInput with the reason when the file is not DICOM, is truncated, or lacks
    a required UID, and PayloadTooLarge when a deflated file inflates past ``limits``.
    """
    try:
        read = _judged(source, limits, _DEFER_SIZE, stop_before_pixels=False)
    except FileNotFoundError as exc:
        raise BadInput(f"unreadable DICOM file: {exc}") from exc
    ds = read.dataset
    # For a deflated file, offsets and the end are those of the inflated stream.
    if _last_value_end(ds) > read.end:
        raise BadInput("truncated DICOM file: a value runs past the end of the file")
    if read.stopped < read.end:
        raise BadInput("truncated DICOM file: a value's delimiter is missing")
    meta = ds.file_meta
    transfer_syntax = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    if not transfer_syntax:
        raise BadInput("DICOM file has no transfer syntax in its file meta information")
    try:
        header = InstanceHeader(_indexed_values(ds, transfer_syntax))
    except BadInput:
        raise
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
        if not is_uid(value):
            raise BadInput(f"DICOM file has an invalid {keyword}")
    return header
