"""Pixel data between transfer syntaxes, one frame at a time, with pydicom's codecs.

Decoding uses pydicom's pixel decoders with the pylibjpeg plugins (libjpeg: JPEG and
JPEG-LS; openjpeg: JPEG 2000; rle: RLE Lossless); encoding uses pydicom's encoders for
the lossless targets only (RLE Lossless and JPEG 2000 Lossless), so the node never makes
a lossy copy on its own. Everything here works on one frame: memory is bounded by the
largest decoded frame, never by the instance.

Which (media type, transfer syntax) a client gets is decided once, in ``choose``, for
frames and for whole instances alike (PS3.18 8.7.3): a transfer syntax named by the
client is honoured where a codec exists; "*" leaves the choice to the node, which sends
what it stores except Implicit VR Little Endian, never sent on the wire (PS3.18 8.6.2.1).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from node.errors import NotAcceptable

OCTET_STREAM = "application/octet-stream"
DICOM = "application/dicom"
EXPLICIT_LE = str(ExplicitVRLittleEndian)

# The media type of a frame in each compressed transfer syntax (PS3.18 Table 8.7.3-5).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}
# The transfer syntax a media type stands for when the client names none (PS3.18 Table
# 8.7.3-5 and 8.7.3-2: octet-stream and application/dicom default to Explicit VR LE).
DEFAULT_SYNTAX = {
    OCTET_STREAM: EXPLICIT_LE,
    DICOM: EXPLICIT_LE,
    "image/dicom-rle": "1.2.840.10008.1.2.5",
    "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201",
}
# Lossless targets the node encodes to (besides native Explicit VR Little Endian).
_ENCODED_TARGETS = (str(RLELossless), str(JPEG2000Lossless))
# Native syntaxes whose pixel bytes are already Explicit VR Little Endian's.
_LITTLE_ENDIAN_NATIVE = frozenset(
    {str(ImplicitVRLittleEndian), EXPLICIT_LE, str(DeflatedExplicitVRLittleEndian)}
)
_ITEM = 0xE000FFFE  # (FFFE,E000) as one little-endian 32-bit word
_SEQUENCE_DELIMITER = 0xE0DDFFFE


class TranscodingFailed(NotAcceptable):
    """A codec could not decode or encode a stored frame (a damaged or exotic file): the
    client may still ask for the stored transfer syntax."""


@dataclass(frozen=True)
class Wish:
    """One media type a client accepts and the transfer syntax it names with it:
    None for the media type's default, "*" for whatever the node holds."""

    media_type: str
    transfer_syntax: str | None


@dataclass(frozen=True)
class Choice:
    """What is sent: the media type of each part and the transfer syntax of its bytes."""

    media_type: str
    transfer_syntax: str
    transcode: bool  # False: the stored bytes as they are
    # The client named no transfer syntax: an instance whose frames fail to decode may
    # still be sent as stored.
    may_fall_back: bool = False


@dataclass(frozen=True)
class PixelDescription:
    """The Image Pixel attributes a codec needs to read or write one frame."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int

    @classmethod
    def of(cls, ds: Dataset) -> PixelDescription:
        """The description read from a dataset; raises NotAcceptable if it is incomplete."""
        try:
            bits_allocated = int(ds.BitsAllocated)
            return cls(
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
                bits_allocated=bits_allocated,
                bits_stored=int(ds.get("BitsStored") or bits_allocated),
                pixel_representation=int(ds.get("PixelRepresentation") or 0),
                photometric_interpretation=str(
                    ds.get("PhotometricInterpretation") or "MONOCHROME2"
                ),
                planar_configuration=int(ds.get("PlanarConfiguration") or 0),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise NotAcceptable("the instance's image pixel attributes are incomplete") from exc

    @property
    def frame_length(self) -> int:
        """Bytes of one native frame (byte-aligned frames only)."""
        return self.rows * self.columns * self.samples_per_pixel * self.bits_allocated // 8

    def options(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "columns": self.columns,
            "samples_per_pixel": self.samples_per_pixel,
            "bits_allocated": self.bits_allocated,
            "bits_stored": self.bits_stored,
            "pixel_representation": self.pixel_representation,
            "photometric_interpretation": self.photometric_interpretation,
            "planar_configuration": self.planar_configuration,
            "number_of_frames": 1,
            "pixel_keyword": "PixelData",
        }


def native_label(transfer_syntax: str) -> str:
    """The transfer syntax naming a stored native frame's bytes: implicit, explicit and
    deflated Little Endian files hold the same pixel bytes, labelled Explicit VR LE."""
    return EXPLICIT_LE if transfer_syntax in _LITTLE_ENDIAN_NATIVE else transfer_syntax


def can_decode(transfer_syntax: str) -> bool:
    """Whether frames stored in ``transfer_syntax`` can be had as native pixels."""
    if transfer_syntax in _LITTLE_ENDIAN_NATIVE or transfer_syntax == ExplicitVRBigEndian:
        return True
    try:
        return bool(get_decoder(UID(transfer_syntax)).is_available)
    except NotImplementedError:
        return False


def can_encode(transfer_syntax: str) -> bool:
    """Whether the node writes frames in ``transfer_syntax`` (lossless targets only)."""
    if transfer_syntax == EXPLICIT_LE:
        return True
    return transfer_syntax in _ENCODED_TARGETS and bool(
        get_encoder(UID(transfer_syntax)).is_available
    )


def choose(wishes: Sequence[Wish], stored: str, stored_media: str, instance: bool) -> Choice:
    """The first of the client's wishes the node can serve for bytes held in ``stored``.

    ``stored_media`` is the media type of those bytes as they are (application/dicom for
    an instance, the frame media type for frames). Raises NotAcceptable, with the reason
    the last refused wish gave, when none can be served.
    """
    reason = f"these are available as {stored_media}; transfer-syntax={stored}"
    for wish in wishes:
        media = wish.media_type
        if "*" in media:
            if type_matches(media, stored_media):
                return _as_held(stored_media, stored, instance)
            continue
        # An instance is application/dicom; a frame is octet-stream or an image type.
        wrong_kind = media != DICOM if instance else (media == DICOM or media not in DEFAULT_SYNTAX)
        if wrong_kind:
            continue
        wanted = wish.transfer_syntax or DEFAULT_SYNTAX[media]
        if wanted == "*":
            if media in (stored_media, OCTET_STREAM):
                return _as_held(media, stored, instance)
            continue
        if not instance and media != OCTET_STREAM and FRAME_MEDIA_TYPES.get(wanted) != media:
            reason = f"{media} cannot carry transfer syntax {wanted}"
            continue
        if wanted == stored:
            if instance and wanted == ImplicitVRLittleEndian:
                reason = "Implicit VR Little Endian is not sent over DICOMweb (PS3.18 8.6.2.1)"
                continue
            return Choice(media, wanted, False)
        if not can_decode(stored):
            if instance and wish.transfer_syntax is None:
                return Choice(media, stored, False)  # no codec: the default falls back
            reason = f"no codec here decodes transfer syntax {stored}"
            continue
        if not can_encode(wanted):
            reason = f"the node does not encode transfer syntax {wanted}"
            continue
        return Choice(media, wanted, True, instance and wish.transfer_syntax is None)
    raise NotAcceptable(reason)


def type_matches(media_range: str, media_type: str) -> bool:
    """Whether a range like "image/*" or "*/*" covers a concrete media type."""
    if media_range in ("*/*", "*", media_type):
        return True
    major, _, minor = media_range.partition("/")
    return minor == "*" and media_type.startswith(major + "/")


def _as_held(media: str, stored: str, instance: bool) -> Choice:
    if instance and stored == ImplicitVRLittleEndian:
        return Choice(media, EXPLICIT_LE, True)  # never Implicit VR on the wire (8.6.2.1)
    return Choice(media, stored, False)


def to_wishes(ranges: Sequence[tuple[str, dict[str, str]]], default_part: str) -> list[Wish]:
    """Wishes from Accept media ranges (type, parameters), most preferred first.

    multipart/related names its part type in ``type`` (``default_part`` when absent);
    ranges such as */* and multipart/* accept whatever the node holds.
    """
    wishes = []
    for media_type, params in ranges:
        if media_type == "multipart/related":
            part = params.get("type", default_part).lower()
            wishes.append(Wish(part, params.get("transfer-syntax")))
        elif type_matches(media_type, "multipart/related"):
            wishes.append(Wish("*/*", "*"))
    return wishes


# -- one frame -------------------------------------------------------------------------


def decode_frame(
    frame: bytes, transfer_syntax: str, pixels: PixelDescription
) -> tuple[bytes, PixelDescription]:
    """One stored frame as native little-endian pixel bytes, and how they are laid out
    (colour frames come out as pixel-interleaved RGB).

    Raises NotAcceptable for 1-bit frames and TranscodingFailed when the codec fails.
    """
    if pixels.bits_allocated % 8:
        raise NotAcceptable("frames of 1-bit images are not decoded")
    if transfer_syntax in _LITTLE_ENDIAN_NATIVE:
        return frame, pixels
    options = pixels.options()
    source: bytes = frame
    if UID(transfer_syntax).is_encapsulated:
        source = _encapsulated([frame])
    else:
        options["transfer_syntax_uid"] = UID(transfer_syntax)
    try:
        array, meta = get_decoder(UID(transfer_syntax)).as_array(source, **options)
    except Exception as exc:  # the codecs raise many kinds; any is a frame we cannot read
        raise TranscodingFailed(f"a stored frame cannot be decoded: {_first_line(exc)}") from exc
    native = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    decoded = replace(
        pixels,
        photometric_interpretation=str(meta.get("photometric_interpretation"))
        or pixels.photometric_interpretation,
        planar_configuration=0,
    )
    return native, decoded


def encode_frame(native: bytes, target: str, pixels: PixelDescription) -> bytes:
    """Native little-endian frame bytes encoded in a lossless ``target`` syntax."""
    if target == EXPLICIT_LE:
        return native
    options = pixels.options()
    del options["pixel_keyword"]
    if target == JPEG2000Lossless:
        options["use_mct"] = False  # keeps the photometric interpretation as it is
    try:
        return bytes(get_encoder(UID(target)).encode(native, **options))
    except Exception as exc:  # as in decode_frame: the codec's own error is the reason
        raise TranscodingFailed(
            f"a frame cannot be encoded in {target}: {_first_line(exc)}"
        ) from exc


# -- the Part 10 file around transcoded frames ------------------------------------------


def file_header(
    ds: Dataset, target: str, pixels: PixelDescription | None, big_endian: bool
) -> bytes:
    """A Part 10 file re-encoded in ``target`` (the dataset always in explicit VR little
    endian): up to its pixel data, with the pixel attributes the frames now have, or
    whole (pixel data kept as it is) when ``pixels`` is None."""
    out = Dataset()
    for element in ds:
        if element.tag.group == 0x0002 or (pixels is not None and element.tag >= 0x7FE00008):
            continue
        if big_endian and element.VR == "OW" and isinstance(element.value, bytes):
            element.value = _swap_words(element.value)
        out.add(element)
    if pixels is not None:
        out.PhotometricInterpretation = pixels.photometric_interpretation
        if pixels.samples_per_pixel > 1:
            out.PlanarConfiguration = pixels.planar_configuration
    meta = FileMetaDataset()
    for element in ds.file_meta:
        meta.add(element)
    meta.TransferSyntaxUID = UID(target)
    out.file_meta = meta
    buffer = io.BytesIO()
    dcmwrite(buffer, out, enforce_file_format=True)
    return buffer.getvalue()


def native_pixel_header(length: int, bits_allocated: int) -> bytes:
    """The explicit VR little-endian element header of a native PixelData value."""
    vr = b"OW" if bits_allocated > 8 else b"OB"
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, length + (length % 2))


def encapsulated_header() -> bytes:
    """PixelData of undefined length and an empty Basic Offset Table (PS3.5 A.4)."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + struct.pack(
        "<II", _ITEM, 0
    )


def encapsulated_item(frame: bytes) -> bytes:
    """One frame as one fragment item, padded to even length."""
    padded = frame + b"\x00" * (len(frame) % 2)
    return struct.pack("<II", _ITEM, len(padded)) + padded


def encapsulated_end() -> bytes:
    return struct.pack("<II", _SEQUENCE_DELIMITER, 0)


def _encapsulated(frames: Sequence[bytes]) -> bytes:
    return (
        struct.pack("<II", _ITEM, 0)
        + b"".join(encapsulated_item(f) for f in frames)
        + encapsulated_end()
    )


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _swap_words(value: bytes) -> bytes:
    if len(value) % 2:
        return value
    swapped = bytearray(value)
    swapped[0::2], swapped[1::2] = value[1::2], value[0::2]
    return bytes(swapped)
