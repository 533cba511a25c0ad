"""The DICOM JSON model (PS3.18 Annex F): attribute values and datasets as JSON objects.

Pure conversion, no I/O: tag keys are 8 upper-case hex digits, every attribute carries
its "vr", values go in "Value" (PN as {"Alphabetic": ...}), and large binary values are
replaced by a "BulkDataURI" that the caller names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
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
    return str(value)


def attribute(tag: int, value: Any = None, vr: str | None = None) -> dict[str, Any]:
    """One attribute: {"vr": ..., "Value": [...]}; None or "" gives an empty attribute.

    A list or tuple value is multi-valued; VR defaults to the dictionary's.
    """
    vr = vr or vr_of(tag)
    values = list(value) if isinstance(value, list | tuple) else [value]
    values = [v for v in values if v is not None and v != ""]
    element: dict[str, Any] = {"vr": vr}
    if values:
        element["Value"] = [_json_value(vr, v) for v in values]
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


def _inline_element(element: DataElement) -> dict[str, Any]:
    # Nested binary values are inlined: only top-level attributes get a BulkDataURI.
    return element.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=2**62)


def dataset_to_json(
    ds: Dataset,
    bulk_data_uri: Callable[[int], str],
    pixel_data_vr: str | None = None,
) -> dict[str, Any]:
    """A read dataset as a DICOM JSON object (file meta excluded).

    Top-level binary values larger than BULK_THRESHOLD, and values the reader left on
    disk (deferred), are given as ``{"BulkDataURI": bulk_data_uri(tag)}``. When the
    dataset was read without its pixel data, ``pixel_data_vr`` adds a PixelData
    attribute that refers to it. A value that cannot be decoded is given empty.
    """
    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        if tag.group == 0x0002:
            continue
        raw = ds.get_item(tag)
        vr = _raw_vr(ds, tag)
        deferred = isinstance(raw, RawDataElement) and raw.value is None and raw.length > 0
        large = (
            vr in BULK_VRS
            and isinstance(raw, RawDataElement)
            and raw.length not in (0, 0xFFFFFFFF)
            and raw.length > BULK_THRESHOLD
        )
        if (deferred and vr in BULK_VRS) or large:
            out[tag_key(tag)] = {"vr": vr, "BulkDataURI": bulk_data_uri(int(tag))}
            continue
        try:
            element = ds[tag]
            if element.VR in BULK_VRS and element.value and len(element.value) > BULK_THRESHOLD:
                out[tag_key(tag)] = {"vr": element.VR, "BulkDataURI": bulk_data_uri(int(tag))}
                continue
            out[tag_key(tag)] = _inline_element(element)
        except Exception:  # one undecodable stored value must not hide the whole instance
            out[tag_key(tag)] = {"vr": vr}
    if pixel_data_vr is not None and tag_key(0x7FE00010) not in out:
        out[tag_key(0x7FE00010)] = {"vr": pixel_data_vr, "BulkDataURI": bulk_data_uri(0x7FE00010)}
    return out


def encode(document: Any) -> bytes:
    """Compact UTF-8 JSON bytes for a response body."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = [
    "BULK_THRESHOLD",
    "MEDIA_TYPE",
    "PIXEL_DATA_TAGS",
    "attribute",
    "dataset_from_keywords",
    "dataset_to_json",
    "encode",
    "keyword_of",
    "parse_tag",
    "tag_key",
    "vr_of",
]
