"""Radiology reports as a RIS sends them: FHIR R4 DiagnosticReport and HL7 v2 ORU^R01.

Both parse to one ``ReportSubmission`` (the study it concerns, the patient it names, the
report's identifier and status, its title and date, and its document: a PDF or text),
which node.services.reports turns into a DICOM Encapsulated PDF in the study's series
for reports. Every parser here fails closed with BadInput (or PayloadTooLarge) and one
sentence naming what is wrong; none reads more than the bytes it was given, which the
caller bounds. Pure: no I/O, no clock (a report without a date is dated by the caller).

HL7 v2 (ER7) fields read (docs/reports.md § HL7 v2):

- ``MSH-9`` must be ``ORU^R01``; one ``OBR`` per message;
- ``PID-3`` the patient identifier (first component of each repetition);
- ``ZDS-1`` the Study Instance UID (IHE Radiology's segment), else ``OBR-3`` (filler
  order number) first component as the study's Accession Number;
- ``OBR-3`` (else ``OBR-2``) the report's identifier, ``OBR-25`` its status (P, F, C),
  ``OBR-4`` second component its title, ``OBR-7`` its date;
- ``OBX`` of type ``ED`` (``^application^pdf^Base64^<data>``) the PDF, else the ``TX``/``FT``
  OBX values as the report's text, one line per value.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from node.core.uids import is_uid
from node.errors import BadInput, PayloadTooLarge

PDF = "application/pdf"
TEXT = "text/plain"
FHIR_JSON = "application/fhir+json"
HL7_V2 = "x-application/hl7-v2+er7"
# What every PDF starts with (ISO 32000-1 § 7.5.2), perhaps after a little junk that
# readers tolerate; a report's PDF must start with it.
PDF_MAGIC = b"%PDF-"
# A text report is rendered to PDF page by page: this bounds that work.
MAX_TEXT_BYTES = 256 * 1024
# Identifiers, names and titles are short in every RIS; longer ones are refused.
MAX_IDENTIFIER_CHARS = 256
MAX_TITLE_CHARS = 200
_DICOM_UID_SYSTEM = "urn:dicom:uid"
_DATE_TIME = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})(?:T?(\d{2}):?(\d{2})(?::?(\d{2}))?)?")


class ReportStatus(StrEnum):
    """The report's status (FHIR DiagnosticReport.status; HL7 v2 OBR-25 P, F, C)."""

    PRELIMINARY = "preliminary"
    FINAL = "final"
    AMENDED = "amended"
    CORRECTED = "corrected"

    @property
    def verified(self) -> bool:
        """Signed off by its author (DICOM VerificationFlag VERIFIED)."""
        return self is not ReportStatus.PRELIMINARY


_HL7_STATUS = {"P": ReportStatus.PRELIMINARY, "F": ReportStatus.FINAL, "C": ReportStatus.CORRECTED}


@dataclass(frozen=True)
class ReportDocument:
    """A report's content: PDF bytes, or UTF-8 text that the node renders to PDF."""

    media_type: str  # PDF or TEXT
    content: bytes


@dataclass(frozen=True)
class ReportSubmission:
    """What a RIS says about one report, before the node checks it against its store."""

    identifier: str
    status: ReportStatus
    patient_id: str
    study_uid: str | None
    accession_number: str | None
    title: str
    document: ReportDocument
    date: str | None = None  # DICOM DA, YYYYMMDD
    time: str | None = None  # DICOM TM, HHMMSS


def check_pdf_magic(data: bytes) -> None:
    """BadInput unless ``data`` starts as a PDF does."""
    if not data.startswith(PDF_MAGIC):
        raise BadInput("the document is not a PDF (it does not start with %PDF-)")


def check_document(document: ReportDocument, max_document_bytes: int) -> None:
    """The bounds every report's content keeps, whichever way it came: PayloadTooLarge
    over the limit, BadInput for a PDF that does not start as one or text that is not
    UTF-8. (node.services.reports also parses a PDF before it is stored.)"""
    if not document.content:
        raise BadInput("the report's document is empty")
    if document.media_type == PDF:
        if len(document.content) > max_document_bytes:
            raise PayloadTooLarge(f"the PDF is over the limit of {max_document_bytes} bytes")
        check_pdf_magic(document.content)
        return
    if len(document.content) > MAX_TEXT_BYTES:
        raise PayloadTooLarge(f"the report's text is over the limit of {MAX_TEXT_BYTES} bytes")
    try:
        document.content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput("the report's text is not UTF-8") from exc


def decode_base64(data: str, max_bytes: int, what: str) -> bytes:
    """Strict standard base64 (whitespace allowed), at most ``max_bytes`` decoded."""
    compact = "".join(data.split())
    if len(compact) // 4 * 3 > max_bytes + 2:
        raise PayloadTooLarge(f"{what} is over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"{what} is not valid base64") from exc


def _date_and_time(value: str, what: str) -> tuple[str, str | None]:
    """DICOM DA and TM from an ISO 8601 (FHIR) or HL7 DTM date and time, as written
    (no time zone arithmetic: the RIS's local time, as the study's own dates are)."""
    match = _DATE_TIME.match(value.strip())
    if match is None:
        raise BadInput(f"{what} is not a date and time")
    year, month, day, hour, minute, second = match.groups()
    date = f"{year}{month}{day}"
    if hour is None:
        return date, None
    return date, f"{hour}{minute}{second or '00'}"


def _text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{what} must be a non-empty string")
    if len(value) > limit or any(ord(c) < 0x20 for c in value):
        raise BadInput(f"{what} must be one line of at most {limit} characters")
    return value.strip()


# -- FHIR R4 DiagnosticReport ---------------------------------------------------------------


def parse_fhir_report(body: bytes, max_document_bytes: int) -> ReportSubmission:
    """A FHIR R4 DiagnosticReport (JSON) as a submission.

    Read: ``status``; ``identifier[0]`` (``system|value``, or the value alone);
    ``subject.identifier.value`` (the patient ID); the study from ``imagingStudy[]``'s
    identifier ``urn:dicom:uid`` / ``urn:oid:<UID>``; ``code`` (text or first coding's
    display) as the title; ``issued`` or ``effectiveDateTime`` as the date;
    ``presentedForm[]``: the first ``application/pdf`` attachment's ``data``, else the first
    ``text/plain`` one's, else ``conclusion`` as text. Raises BadInput naming the field.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadInput("the DiagnosticReport is not JSON") from exc
    if not isinstance(document, dict) or document.get("resourceType") != "DiagnosticReport":
        raise BadInput('the body is not a FHIR DiagnosticReport ("resourceType")')
    status_text = document.get("status")
    try:
        status = ReportStatus(str(status_text))
    except ValueError:
        allowed = ", ".join(s.value for s in ReportStatus)
        raise BadInput(f"DiagnosticReport.status must be one of {allowed}") from None
    return ReportSubmission(
        identifier=_fhir_identifier(document.get("identifier")),
        status=status,
        patient_id=_fhir_patient_id(document.get("subject")),
        study_uid=_fhir_study_uid(document.get("imagingStudy")),
        accession_number=None,
        title=_fhir_title(document.get("code")),
        document=_fhir_document(document, max_document_bytes),
        **_fhir_date(document),
    )


def _fhir_identifier(identifiers: object) -> str:
    if not isinstance(identifiers, list) or not identifiers or not isinstance(identifiers[0], dict):
        raise BadInput("DiagnosticReport.identifier is needed: an amendment is matched by it")
    first = identifiers[0]
    value = _text(first.get("value"), "DiagnosticReport.identifier[0].value", MAX_IDENTIFIER_CHARS)
    system = first.get("system")
    if system is None:
        return value
    return f"{_text(system, 'DiagnosticReport.identifier[0].system', MAX_IDENTIFIER_CHARS)}|{value}"


def _fhir_patient_id(subject: object) -> str:
    identifier = subject.get("identifier") if isinstance(subject, dict) else None
    value = identifier.get("value") if isinstance(identifier, dict) else None
    return _text(value, "DiagnosticReport.subject.identifier.value (the patient ID)", 64)


def _fhir_study_uid(references: object) -> str | None:
    if references is None:
        return None
    if not isinstance(references, list):
        raise BadInput("DiagnosticReport.imagingStudy must be a list of references")
    uids: set[str] = set()
    for reference in references:
        identifier = reference.get("identifier") if isinstance(reference, dict) else None
        if not isinstance(identifier, dict) or identifier.get("system") != _DICOM_UID_SYSTEM:
            continue
        value = identifier.get("value")
        uid = value.removeprefix("urn:oid:") if isinstance(value, str) else None
        if not is_uid(uid):
            raise BadInput("an imagingStudy identifier is not urn:oid:<Study Instance UID>")
        uids.add(uid)
    if len(uids) > 1:
        raise BadInput("the DiagnosticReport names several studies; send one report per study")
    return uids.pop() if uids else None


def _fhir_title(code: object) -> str:
    if isinstance(code, dict):
        if isinstance(code.get("text"), str) and code["text"].strip():
            return _text(code["text"], "DiagnosticReport.code.text", MAX_TITLE_CHARS)
        codings = code.get("coding")
        if isinstance(codings, list) and codings and isinstance(codings[0], dict):
            display = codings[0].get("display")
            if isinstance(display, str) and display.strip():
                return _text(display, "DiagnosticReport.code.coding[0].display", MAX_TITLE_CHARS)
    return "Report"


def _fhir_date(document: dict[str, Any]) -> dict[str, str | None]:
    for key in ("issued", "effectiveDateTime"):
        if isinstance(document.get(key), str):
            date, time = _date_and_time(document[key], f"DiagnosticReport.{key}")
            return {"date": date, "time": time}
    return {}


def _fhir_document(document: dict[str, Any], max_document_bytes: int) -> ReportDocument:
    forms = document.get("presentedForm", [])
    if not isinstance(forms, list) or not all(isinstance(f, dict) for f in forms):
        raise BadInput("DiagnosticReport.presentedForm must be a list of attachments")
    for media_type in (PDF, TEXT):
        for form in forms:
            content_type = str(form.get("contentType", "")).split(";")[0].strip().lower()
            if content_type != media_type:
                continue
            if "data" not in form:
                raise BadInput("a presentedForm must carry its data (a url is not fetched)")
            if not isinstance(form["data"], str):
                raise BadInput("presentedForm.data must be base64 text")
            limit = max_document_bytes if media_type == PDF else MAX_TEXT_BYTES
            found = ReportDocument(media_type, decode_base64(form["data"], limit, "the document"))
            check_document(found, max_document_bytes)
            return found
    if forms:
        raise BadInput("presentedForm holds neither application/pdf nor text/plain")
    conclusion = document.get("conclusion")
    if isinstance(conclusion, str) and conclusion.strip():
        found = ReportDocument(TEXT, conclusion.encode())
        check_document(found, max_document_bytes)
        return found
    raise BadInput("the DiagnosticReport has no presentedForm (PDF or text) and no conclusion")


# -- HL7 v2 ORU^R01 ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Er7:
    """An ER7 message split into segments and fields, with its separators."""

    segments: list[list[str]]
    component: str
    repetition: str
    escape: str
    subcomponent: str
    field: str

    def all(self, name: str) -> list[list[str]]:
        return [s for s in self.segments if s[0] == name]

    def one(self, name: str) -> list[str] | None:
        found = self.all(name)
        if len(found) > 1:
            raise BadInput(f"the HL7 message has several {name} segments; send one report each")
        return found[0] if found else None

    def unescape(self, text: str) -> str:
        """Text with its HL7 escape sequences (\\F\\, \\S\\, \\T\\, \\R\\, \\E\\, \\.br\\,
        \\Xhh\\) resolved; formatting commands are dropped."""
        if self.escape not in text:
            return text
        out: list[str] = []
        parts = text.split(self.escape)
        out.append(parts[0])
        for index in range(1, len(parts), 2):
            sequence = parts[index]
            plain = {
                "F": self.field,
                "S": self.component,
                "T": self.subcomponent,
                "R": self.repetition,
                "E": self.escape,
                ".br": "\n",
            }
            if sequence in plain:
                out.append(plain[sequence])
            elif sequence.startswith("X") and re.fullmatch(r"X(?:[0-9A-Fa-f]{2})+", sequence):
                out.append(bytes.fromhex(sequence[1:]).decode("latin-1"))
            if index + 1 < len(parts):
                out.append(parts[index + 1])
        return "".join(out)


def _split_er7(body: bytes) -> _Er7:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput("the HL7 message is not UTF-8 text") from exc
    lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        raise BadInput("the HL7 message does not start with an MSH segment")
    field = lines[0][3]
    encoding = lines[0][4:8]
    separators = [field, *encoding]
    if len(set(separators)) != 5 or any(c.isalnum() or c.isspace() for c in separators):
        raise BadInput("the HL7 message's MSH separators are not valid")
    component, repetition, escape, subcomponent = encoding[0], encoding[1], encoding[2], encoding[3]
    segments = []
    for line in lines:
        fields = line.split(field)
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", fields[0]):
            raise BadInput("the HL7 message has a line that is no segment")
        if fields[0] == "MSH":  # MSH-1 is the separator itself: keep field numbers aligned
            fields = ["MSH", field, *fields[1:]]
        segments.append(fields)
    return _Er7(segments, component, repetition, escape, subcomponent, field)


def _field(segment: list[str] | None, number: int) -> str:
    if segment is None or number >= len(segment):
        return ""
    return segment[number]


def parse_hl7_report(body: bytes, max_document_bytes: int) -> ReportSubmission:
    """An HL7 v2 ORU^R01 message (ER7) as a submission (the fields in the module's
    docstring). Raises BadInput naming the segment or field that does not parse."""
    message = _split_er7(body)
    c = message.component
    msh = message.segments[0]
    message_type = _field(msh, 9).split(c)
    if message_type[:2] != ["ORU", "R01"]:
        raise BadInput("the HL7 message is not an ORU^R01 (MSH-9)")
    pid = message.one("PID")
    obr = message.one("OBR")
    if pid is None or obr is None:
        raise BadInput("an ORU^R01 needs a PID and an OBR segment")
    patient_ids = [r.split(c)[0] for r in _field(pid, 3).split(message.repetition)]
    patient_ids = [p for p in patient_ids if p]
    if not patient_ids:
        raise BadInput("PID-3 (the patient identifier) is empty")
    identifier = _field(obr, 3) or _field(obr, 2)
    if not identifier.strip(c):
        raise BadInput("OBR-3 (or OBR-2) must identify the report")
    status_code = _field(obr, 25)
    if status_code not in _HL7_STATUS:
        raise BadInput("OBR-25 (result status) must be P, F or C")
    zds = message.one("ZDS")
    study_uid = _field(zds, 1).split(c)[0] or None
    if study_uid is not None and not is_uid(study_uid):
        raise BadInput("ZDS-1 is not a Study Instance UID")
    accession = None if study_uid else identifier.split(c)[0]
    title_parts = _field(obr, 4).split(c)
    title = message.unescape(title_parts[1] if len(title_parts) > 1 else title_parts[0])
    when = _field(obr, 7)
    date, time = _date_and_time(when, "OBR-7") if when else (None, None)
    return ReportSubmission(
        identifier=_text(message.unescape(identifier), "OBR-3", MAX_IDENTIFIER_CHARS),
        status=_HL7_STATUS[status_code],
        patient_id=_text(message.unescape(patient_ids[0]), "PID-3", 64),
        study_uid=study_uid,
        accession_number=_text(message.unescape(accession), "OBR-3", 64) if accession else None,
        title=_text(title, "OBR-4", MAX_TITLE_CHARS) if title.strip() else "Report",
        document=_hl7_document(message, max_document_bytes),
        date=date,
        time=time,
    )


def _hl7_document(message: _Er7, max_document_bytes: int) -> ReportDocument:
    lines: list[str] = []
    for obx in message.all("OBX"):
        value_type = _field(obx, 2)
        if value_type == "ED":
            parts = _field(obx, 5).split(message.component)
            if len(parts) < 5 or parts[2].lower() != "pdf" or parts[3].lower() != "base64":
                raise BadInput("an OBX of type ED must be ^application^pdf^Base64^<data>")
            pdf = decode_base64(parts[4], max_document_bytes, "the OBX PDF")
            document = ReportDocument(PDF, pdf)
            check_document(document, max_document_bytes)
            return document
        if value_type in ("TX", "FT", "ST"):
            lines.extend(message.unescape(v) for v in _field(obx, 5).split(message.repetition))
    if not lines:
        raise BadInput("the ORU^R01 has no OBX with the report (ED PDF, or TX/FT text)")
    document = ReportDocument(TEXT, "\n".join(lines).encode())
    check_document(document, max_document_bytes)
    return document


# -- a second opinion returned through a share link -------------------------------------------

# A name or a role as its author states it: one line, short enough for a DICOM PN group.
MAX_AUTHOR_CHARS = 64


@dataclass(frozen=True)
class OpinionSubmission:
    """What a link's holder returns: an opinion on one study of the link, as a PDF or
    text, with their name and role as they state them (not verified by anyone)."""

    study_uid: str
    author: str
    role: str
    document: ReportDocument


def parse_opinion(body: bytes, max_document_bytes: int) -> OpinionSubmission:
    """A returned opinion: JSON ``{"study_uid", "author", "role", "pdf": base64}`` or
    with ``"text"`` in place of ``pdf`` (exactly one of them). Raises BadInput naming the
    field, PayloadTooLarge for a document over its bound."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadInput("an opinion is JSON {study_uid, author, role, pdf or text}") from exc
    if not isinstance(document, dict):
        raise BadInput("an opinion is JSON {study_uid, author, role, pdf or text}")
    study_uid = document.get("study_uid")
    if not isinstance(study_uid, str) or not is_uid(study_uid):
        raise BadInput("study_uid must be a Study Instance UID")
    author = _text(document.get("author"), "author", MAX_AUTHOR_CHARS)
    role = _text(document.get("role"), "role", MAX_AUTHOR_CHARS)
    if any(c in author for c in "^=\\"):
        raise BadInput("author must not hold ^, = or \\ (DICOM name separators)")
    pdf, text = document.get("pdf"), document.get("text")
    if (pdf is None) == (text is None):
        raise BadInput("an opinion carries exactly one of pdf (base64) and text")
    if pdf is not None:
        if not isinstance(pdf, str):
            raise BadInput("pdf must be base64 text")
        found = ReportDocument(PDF, decode_base64(pdf, max_document_bytes, "the PDF"))
    else:
        if not isinstance(text, str):
            raise BadInput("text must be a string")
        found = ReportDocument(TEXT, text.encode())
    check_document(found, max_document_bytes)
    return OpinionSubmission(study_uid, author, role, found)
