"""The DICOM JSON model (PS3.18 Annex F): attribute values and datasets as JSON objects.

Pure conversion, no I/O: tag keys are 8 upper-case hex digits, every attribute carries
its "vr", values go in "Value" (PN as {"Alphabetic": ...}), and large binary values are
replaced by a "BulkDataURI" that the caller names.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

MEDIA_TYPE = "application/dicom+json"

# Binary VRs whose large values become BulkDataURIs instead of inline base64.
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# Values up to this size stay inline; larger binary values are referenced by URI.
BULK_THRESHOLD = 1024
_INT_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


def tag_key(tag: int) -> str:
    """The JSON key of a tag: 8 upper-case hex digits."""
    return f"{int(tag):08X}"


def parse_tag(text: str) -> int | None:
    """A tag from a keyword ("PatientID") or 8 hex digits ("00100020"); None if neither."""
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        return int(text, 16)
    tag = tag_for_keyword(text)
    return int(tag) if tag is not None else None


def keyword_of(tag: int) -> str:
    """The DICOM keyword of a tag, or its 8 hex digits when the dictionary has none."""
    return keyword_for_tag(tag) or tag_key(tag)


def vr_of(tag: int) -> str:
    """The dictionary VR of a tag ("UN" when unknown or ambiguous)."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr if len(vr) == 2 else "UN"


def _json_value(vr: str, value: Any) -> Any:
    """One value in the JSON model; None (JSON null) for an empty one (F.2.5)."""
    if value is None or value == "":
        return None
    if vr == "PN":
        # Component groups are separated by "=": alphabetic, ideographic, phonetic.
        groups = str(value).split("=")[:3]
        names = ("Alphabetic", "Ideographic", "Phonetic")
        return {name: group for name, group in zip(names, groups, strict=False) if group}
    if vr in _INT_VRS:
        return int(value)
    if vr in _FLOAT_VRS:
        number = float(value)
        return int(number) if number.is_integer() else number
    if vr == "AT":
        return tag_key(int(value))
    return str(value)


def attribute(tag: int, value: Any = None, vr: str | None = None) -> dict[str, Any]:
    """One attribute: {"vr": ..., "Value": [...]}; None or "" gives an empty attribute.

    A list or tuple value is multi-valued; an empty value inside it is null (F.2.5).
    VR defaults to the dictionary's.
    """
    vr = vr or vr_of(tag)
    values = [_json_value(vr, v) for v in (value if isinstance(value, list | tuple) else [value])]
    element: dict[str, Any] = {"vr": vr}
    if any(v is not None for v in values):
        element["Value"] = values
    return element


def dataset_from_keywords(values: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON dataset from keyword -> value pairs, in tag order.

    Raises KeyError for a keyword that is not in the DICOM dictionary (a programming error).
    """
    items = []
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(f"unknown DICOM keyword {keyword}")
        items.append((int(tag), attribute(int(tag), value)))
    return {tag_key(t): element for t, element in sorted(items)}


def _raw_vr(ds: Dataset, tag: BaseTag) -> str:
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    return str(vr) if vr else vr_of(tag)


def dataset_to_json(
    ds: Dataset,
    bulk_data_uri: Callable[[str], str],
    pixel_data_vr: str | None = None,
) -> dict[str, Any]:
    """A read dataset as a DICOM JSON object (file meta and group lengths excluded).

    Binary values larger than BULK_THRESHOLD, and values the reader left on disk
    (deferred), are given as ``{"BulkDataURI": bulk_data_uri(path)}``, at the top level
    and inside sequences alike; ``path`` is ``bulk_path`` of where the value is. When
    the dataset was read without its pixel data, ``pixel_data_vr`` adds a PixelData
    attribute that refers to it. A value that cannot be decoded is given empty.
    """
    out = _dataset_json(ds, (), bulk_data_uri)
    if pixel_data_vr is not None and tag_key(0x7FE00010) not in out:
        out[tag_key(0x7FE00010)] = {
            "vr": pixel_data_vr,
            "BulkDataURI": bulk_data_uri(bulk_path((0x7FE00010,))),
        }
    return out


def bulk_path(location: tuple[int, ...]) -> str:
    """Where a value is, for a BulkDataURI: its tag, after the sequence tags and 0-based
    item numbers that lead to it ("7FE00010", "54000100/0/54001010")."""
    return "/".join(
        tag_key(part) if index % 2 == 0 else str(part) for index, part in enumerate(location)
    )


def parse_bulk_path(text: str) -> tuple[int, ...] | None:
    """The location ``bulk_path`` wrote, or None when the text is not one."""
    pieces = text.split("/")
    if len(pieces) % 2 == 0 or len(pieces) > 17:
        return None
    location: list[int] = []
    for index, piece in enumerate(pieces):
        if index % 2 == 0:
            if len(piece) != 8 or not all(c in "0123456789abcdefABCDEF" for c in piece):
                return None
            location.append(int(piece, 16))
        else:
            if not piece.isascii() or not piece.isdigit() or len(piece) > 6:
                return None
            location.append(int(piece))
    return tuple(location)


def _dataset_json(
    ds: Dataset, location: tuple[int, ...], bulk_data_uri: Callable[[str], str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        if tag.group == 0x0002 or tag.element == 0:  # F.2.2: no group lengths
            continue
        raw = ds.get_item(tag)
        vr = _raw_vr(ds, tag)
        here = (*location, int(tag))
        if vr in BULK_VRS and isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF:
            deferred = raw.value is None and raw.length > 0
            if deferred or raw.length > BULK_THRESHOLD:
                out[tag_key(tag)] = {"vr": vr, "BulkDataURI": bulk_data_uri(bulk_path(here))}
                continue
        try:
            out[tag_key(tag)] = _element_json(ds[tag], here, bulk_data_uri)
        except Exception:  # one undecodable stored value must not hide the whole instance
            out[tag_key(tag)] = {"vr": vr}
    return out


def _element_json(
    element: DataElement, location: tuple[int, ...], bulk_data_uri: Callable[[str], str]
) -> dict[str, Any]:
    vr = str(element.VR) if len(str(element.VR)) == 2 else vr_of(element.tag)
    value = element.value
    if vr == "SQ":
        items = [
            _dataset_json(item, (*location, index), bulk_data_uri)
            for index, item in enumerate(value or [])
        ]
        return {"vr": vr, "Value": items} if items else {"vr": vr}
    if vr in BULK_VRS:
        if not value:
            return {"vr": vr}
        if len(value) > BULK_THRESHOLD:
            return {"vr": vr, "BulkDataURI": bulk_data_uri(bulk_path(location))}
        return {"vr": vr, "InlineBinary": base64.b64encode(bytes(value)).decode()}
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    return attribute(int(element.tag), values, vr)


def encode(document: Any) -> bytes:
    """Compact UTF-8 JSON bytes for a response body."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = [
    "BULK_THRESHOLD",
    "MEDIA_TYPE",
    "PIXEL_DATA_TAGS",
    "attribute",
    "bulk_path",
    "dataset_from_keywords",
    "dataset_to_json",
    "encode",
    "keyword_of",
    "parse_bulk_path",
    "parse_tag",
    "tag_key",
    "vr_of",
]
