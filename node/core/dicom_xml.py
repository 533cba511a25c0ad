"""The Native DICOM Model (PS3.19 A.1) in XML, written from the DICOM JSON model.

Pure conversion, no I/O: a dataset already in the JSON model (node/core/dicom_json.py,
which holds every rule of what is included and what becomes a BulkDataURI) is written as
one ``NativeDicomModel`` document, so that the JSON and XML answers never disagree.
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape, quoteattr

from node.core.dicom_json import keyword_of

MEDIA_TYPE = "application/dicom+xml"
_PERSON_NAME_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'


def encode(document: dict[str, Any]) -> bytes:
    """One dataset in the JSON model as a UTF-8 NativeDicomModel document."""
    return (
        _DECLARATION
        + '<NativeDicomModel xml:space="preserve">'
        + _dataset(document)
        + "</NativeDicomModel>\n"
    ).encode()


def _dataset(document: dict[str, Any]) -> str:
    return "".join(_attribute(key, element) for key, element in document.items())


def _attribute(key: str, element: dict[str, Any]) -> str:
    vr = str(element.get("vr", "UN"))
    keyword = keyword_of(int(key, 16))
    opening = f"<DicomAttribute tag={quoteattr(key)} vr={quoteattr(vr)}"
    if keyword != key:
        opening += f" keyword={quoteattr(keyword)}"
    if "BulkDataURI" in element:
        inner = f"<BulkData uri={quoteattr(str(element['BulkDataURI']))}/>"
    elif "InlineBinary" in element:
        inner = f"<InlineBinary>{escape(str(element['InlineBinary']))}</InlineBinary>"
    elif vr == "SQ":
        inner = "".join(
            f'<Item number="{n}">{_dataset(item)}</Item>'
            for n, item in enumerate(element.get("Value", []), start=1)
        )
    elif vr == "PN":
        inner = "".join(
            _person_name(n, value) for n, value in enumerate(element.get("Value", []), start=1)
        )
    else:
        inner = "".join(
            _value(n, value) for n, value in enumerate(element.get("Value", []), start=1)
        )
    return f"{opening}>{inner}</DicomAttribute>"


def _value(number: int, value: Any) -> str:
    if value is None:  # an empty value among others
        return f'<Value number="{number}"/>'
    return f'<Value number="{number}">{escape(str(value))}</Value>'


def _person_name(number: int, value: dict[str, str] | None) -> str:
    groups = ""
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        text = (value or {}).get(group)
        if not text:
            continue
        components = "".join(
            f"<{name}>{escape(part)}</{name}>"
            for name, part in zip(_PERSON_NAME_COMPONENTS, text.split("^"), strict=False)
            if part
        )
        groups += f"<{group}>{components}</{group}>"
    return f'<PersonName number="{number}">{groups}</PersonName>'
