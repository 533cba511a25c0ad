"""Reports in the store: a RIS's report kept as a DICOM Encapsulated PDF in its study.

A report posted to the node (node.core.reports parses FHIR DiagnosticReport and HL7 v2
ORU^R01) becomes one Encapsulated PDF instance in the study's **series for reports**
(one per study, its UID derived from the study's), with the study's patient and study
attributes copied from an instance the node holds, and the report's identifier and status
kept in standard attributes (docs/reports.md § Mapping):

- identifier → HL7 Instance Identifier (0040,E001);
- status → Verification Flag (0040,A493) UNVERIFIED (preliminary) or VERIFIED,
  Completion Flag (0040,A491) PARTIAL or COMPLETE, and the status word itself
  (preliminary, final, amended, corrected) as Completion Flag Description (0040,A492);
- a later report with the same identifier → Predecessor Documents Sequence (0040,A360)
  naming the instance it supersedes.

Nothing is deleted: an amendment is a new instance, and listings (``study_reports``)
show the newest version of each report with the older ones as its history; QIDO and
WADO serve every instance. A report goes through the store's one ingest path (staged,
fsynced, indexed), so it travels with the study in transfers, links and downloads, and
the forwarder sends it to PACS like any arrival.

Text reports are rendered to PDF (fpdf2) rather than kept as a Basic Text SR: a PDF is
what the wallet, the dashboard and OHIF's dicom-pdf viewport all show as it is, and one
format for every report keeps one code path.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from node import __version__
from node.core.reports import (
    PDF,
    OpinionSubmission,
    ReportDocument,
    ReportStatus,
    ReportSubmission,
)
from node.errors import BadInput, Conflict, ImageShareError, NotFound
from node.store.attributes import ATTRIBUTES, Level
from node.store.instances import InstanceRecord, Outcome
from node.store.opinions import OpinionState, OpinionStore
from node.store.protocols import InstanceStore
from node.store.queries import Query, checked_filter

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
# Structured reports a modality or a RIS may send, listed beside the PDFs.
SR_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    }
)
REPORT_CLASSES = frozenset({ENCAPSULATED_PDF}) | SR_CLASSES
REPORT_STATUSES = frozenset(s.value for s in ReportStatus)
REPORTS_SERIES_NUMBER = 9901
REPORTS_SERIES_DESCRIPTION = "Reports"
# Opinions returned through share links: a series of their own in the study.
OPINIONS_SERIES_NUMBER = 9902
OPINIONS_SERIES_DESCRIPTION = "Opinions"
OPINION_TITLE = "Second opinion"
# LOINC 18748-4 "Diagnostic imaging study": the document's concept name.
_REPORT_CONCEPT = ("18748-4", "LN", "Diagnostic imaging study")
# The study-level attributes a report copies from the study's own instances.
_COPIED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
# What the wallet shows of a report's text (the PDF itself is one tap away).
MAX_READING_PAGES = 10
MAX_READING_CHARS = 20_000
_HEADER_DEFER = 1024  # the document itself stays on disk while a report is listed


def series_uid_for(study_uid: str, purpose: str) -> str:
    """The UID of a study's series for ``purpose`` ("reports", "opinions"): the same at
    every node, so a report made anywhere joins the study's one series for it."""
    digest = hashlib.sha256(f"imageshare/{purpose}-series/v1\n{study_uid}".encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def instance_uid_for(
    study_uid: str, series_uid: str, identifier: str, status: str, content: bytes
) -> str:
    """A report instance's UID from what it says: posting the same report twice stores it
    once (the second is a duplicate)."""
    hasher = hashlib.sha256(b"imageshare/report-instance/v1\n")
    for part in (study_uid, series_uid, identifier, status):
        hasher.update(part.encode() + b"\n")
    hasher.update(hashlib.sha256(content).digest())
    return f"2.25.{int.from_bytes(hasher.digest()[:16], 'big')}"


@dataclass(frozen=True)
class ReportVersion:
    """One stored report instance, as listings show it."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    title: str
    identifier: str
    status: str  # preliminary, final, amended, corrected
    date: str
    time: str
    predecessors: tuple[str, ...]
    size: int

    def as_json(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "media_type": PDF if self.sop_class_uid == ENCAPSULATED_PDF else "application/dicom",
            "title": self.title,
            "identifier": self.identifier,
            "status": self.status,
            "date": self.date,
            "time": self.time,
            "size": self.size,
        }


@dataclass
class StudyReport:
    """A report as it stands (its newest version) and the versions it superseded."""

    current: ReportVersion
    history: list[ReportVersion] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            **self.current.as_json(),
            "superseded": [v.as_json() for v in self.history],
        }


@dataclass(frozen=True)
class StoredReport:
    """The answer to a posted report."""

    outcome: Outcome
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    status: str
    supersedes: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "status": self.status,
            "supersedes": self.supersedes,
        }


class ReportService:
    """Stores reports, one at a time (an amendment must see the version it supersedes)."""

    def __init__(
        self, store: InstanceStore, max_document_bytes: int, opinions: OpinionStore
    ) -> None:
        self.store = store
        self.max_document_bytes = max_document_bytes
        self.opinions = opinions
        self._lock = threading.Lock()

    def close(self) -> None:
        self.opinions.close()

    def submit(self, submission: ReportSubmission, now: float | None = None) -> StoredReport:
        """Check a report against the store and keep it; blocking.

        Raises NotFound (a study this node does not hold), BadInput (a patient ID that is
        not the study's, a document that is no readable PDF, text that cannot be
        rendered), Conflict (a preliminary report after a verified one, an accession
        number that names several studies). Nothing is stored unless it all passes.
        """
        study_uid = self._study_of(submission)
        study = self.store.study_row(study_uid)
        if (study.get("patient_id") or "") != submission.patient_id:
            raise BadInput("the report's patient ID is not the study's")
        pdf = document_pdf(submission.document, submission.title)
        series_uid = series_uid_for(study_uid, "reports")
        with self._lock:
            versions = self._versions(study_uid, series_uid)
            current = _current_of(versions, submission.identifier)
            if (
                current is not None
                and current.status != "preliminary"
                and not submission.status.verified
            ):
                raise Conflict("a preliminary report cannot supersede a verified one")
            sop_uid = instance_uid_for(
                study_uid,
                series_uid,
                submission.identifier,
                submission.status.value,
                submission.document.content,
            )
            if current is not None and current.sop_instance_uid == sop_uid:
                current = None  # the same report again: a duplicate, not its own successor
            dataset = self._dataset(
                study_uid, submission, series_uid, sop_uid, len(versions) + 1, pdf, current, now
            )
            staged = self.store.stage_bytes(encode_part10(dataset))
            result = self.store.commit([staged])[0]
        return StoredReport(
            result.outcome,
            study_uid,
            series_uid,
            sop_uid,
            submission.status.value,
            current.sop_instance_uid if current is not None else None,
        )

    def _dataset(
        self,
        study_uid: str,
        submission: ReportSubmission,
        series_uid: str,
        sop_uid: str,
        instance_number: int,
        pdf: bytes,
        predecessor: ReportVersion | None,
        now: float | None,
        series: tuple[int, str] = (REPORTS_SERIES_NUMBER, REPORTS_SERIES_DESCRIPTION),
    ) -> FileDataset:
        return build_report_dataset(
            template=self._template(study_uid),
            series_uid=series_uid,
            sop_uid=sop_uid,
            instance_number=instance_number,
            submission=submission,
            pdf=pdf,
            predecessor=predecessor,
            now=now if now is not None else time.time(),
            series_number=series[0],
            series_description=series[1],
        )

    def submit_opinion(
        self, opinion: OpinionSubmission, link: str, now: float | None = None
    ) -> tuple[StoredReport, bytes]:
        """Keep an opinion returned through the link whose grantee is ``link``, held from
        PACS until staff accept it; blocking. Returns the stored instance and the
        SHA-256 of its Part 10 bytes (what the ``contribution`` entry records).

        The caller has checked that the link may return opinions on the study. Raises
        BadInput (a PDF that does not parse, text the PDF's font cannot show).
        """
        study_uid = opinion.study_uid
        now = now if now is not None else time.time()
        title = f"{OPINION_TITLE} ({opinion.role})"
        pdf = document_pdf(opinion.document, title)
        series_uid = series_uid_for(study_uid, "opinions")
        submission = ReportSubmission(
            identifier=link,
            status=ReportStatus.FINAL,
            patient_id="",
            study_uid=study_uid,
            accession_number=None,
            title=title,
            document=opinion.document,
        )
        with self._lock:
            versions = self._versions(study_uid, series_uid)
            sop_uid = instance_uid_for(
                study_uid, series_uid, link, "opinion", opinion.document.content
            )
            dataset = self._dataset(
                study_uid,
                submission,
                series_uid,
                sop_uid,
                len(versions) + 1,
                pdf,
                None,
                now,
                (OPINIONS_SERIES_NUMBER, OPINIONS_SERIES_DESCRIPTION),
            )
            # Kept in the instance as stated, never in the ledger.
            dataset.ContentCreatorName = opinion.author
            encoded = encode_part10(dataset)
            self.opinions.hold(sop_uid, study_uid, now)  # before the forwarder can see it
            staged = self.store.stage_bytes(encoded)
            result = self.store.commit([staged])[0]
        stored = StoredReport(result.outcome, study_uid, series_uid, sop_uid, "final", None)
        return stored, hashlib.sha256(encoded).digest()

    def opinion_listing(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """The returned opinions (of one study, if named), newest first, each with its
        state (``accepted``, ``seen``: unix times or null) and what its header says."""
        answer = []
        for state in self.opinions.states(study_uid):
            try:
                (record,) = self.store.instances(
                    state.study_instance_uid, sop_instance_uid=state.sop_instance_uid
                )
            except NotFound:
                continue  # held before a commit that did not happen
            ds = self.store.read_dataset(record, defer_size=_HEADER_DEFER, stop_before_pixels=True)
            answer.append(
                version_of(ds, record).as_json()
                | _opinion_fields(ds, record, state)
                | {"study_uid": state.study_instance_uid}
            )
        return answer

    def _study_of(self, submission: ReportSubmission) -> str:
        if submission.study_uid is not None:
            return submission.study_uid
        accession = submission.accession_number
        if accession is None:
            raise BadInput(
                "the report names no study (a Study Instance UID or an accession number)"
            )
        if any(c in accession for c in "*?\\"):
            raise BadInput("the accession number holds a wildcard or a backslash")
        by_keyword = {a.keyword: a for a in ATTRIBUTES}
        found = checked_filter(by_keyword["AccessionNumber"], [accession])
        query = Query(
            Level.STUDY,
            [found] if found is not None else [],
            [by_keyword["StudyInstanceUID"]],
            limit=2,
        )
        rows = self.store.search(query).rows
        if not rows:
            raise NotFound("no study on this node has that accession number")
        if len(rows) > 1:
            raise Conflict("several studies on this node have that accession number")
        return str(rows[0]["StudyInstanceUID"])

    def _template(self, study_uid: str) -> Dataset:
        """An instance of the study that is not a report: the source of its attributes."""
        records = self.store.instances(study_uid)
        chosen = next((r for r in records if r.sop_class_uid not in REPORT_CLASSES), records[0])
        return self.store.read_dataset(chosen, defer_size=_HEADER_DEFER, stop_before_pixels=True)

    def _versions(self, study_uid: str, series_uid: str) -> list[ReportVersion]:
        try:
            records = self.store.instances(study_uid, series_uid)
        except NotFound:
            return []
        return [self._version(r) for r in records]

    def _version(self, record: InstanceRecord) -> ReportVersion:
        ds = self.store.read_dataset(record, defer_size=_HEADER_DEFER, stop_before_pixels=True)
        return version_of(ds, record)

    def study_reports(self, study_uid: str) -> list[StudyReport]:
        """Every report of a study (PDFs and SRs in any series), newest version of each
        first in the study's order, each with the versions it superseded; blocking.
        Raises NotFound for a study this node does not hold."""
        records = [r for r in self.store.instances(study_uid) if r.sop_class_uid in REPORT_CLASSES]
        versions = [self._version(r) for r in records]
        return arrange_versions(versions)

    def document(self, study_uid: str, sop_uid: str) -> bytes:
        """The PDF of one of the study's Encapsulated PDF reports, as it was posted;
        blocking. Raises NotFound for any other instance."""
        (record,) = self._report_records(study_uid, sop_uid)
        ds = self.store.read_dataset(record, stop_before_pixels=True)
        document = bytes(ds.get("EncapsulatedDocument", b""))
        length = ds.get("EncapsulatedDocumentLength")
        return document[: int(length)] if length is not None else document

    def _report_records(self, study_uid: str, sop_uid: str) -> list[InstanceRecord]:
        records = self.store.instances(study_uid, sop_instance_uid=sop_uid)
        if records[0].sop_class_uid != ENCAPSULATED_PDF:
            raise NotFound("no such report in that study")
        return records

    def reading(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's reports as they stand, each with its text for reading on a phone
        (``study_reports`` plus ``text``; an opinion returned through a link also has
        ``contribution``, ``author`` and ``new`` until the patient opens it); blocking."""
        answer = []
        states = {s.sop_instance_uid: s for s in self.opinions.states(study_uid)}
        for report in self.study_reports(study_uid):
            entry = report.as_json()
            state = states.get(report.current.sop_instance_uid)
            if state is not None:
                (record,) = self.store.instances(study_uid, sop_instance_uid=state.sop_instance_uid)
                ds = self.store.read_dataset(
                    record, defer_size=_HEADER_DEFER, stop_before_pixels=True
                )
                entry |= _opinion_fields(ds, record, state)
            if report.current.sop_class_uid == ENCAPSULATED_PDF:
                pdf = self.document(study_uid, report.current.sop_instance_uid)
                entry["text"] = pdf_text(pdf)
            answer.append(entry)
        return answer


def _opinion_fields(ds: Dataset, record: InstanceRecord, state: OpinionState) -> dict[str, Any]:
    return {
        "contribution": True,
        "author": str(ds.get("ContentCreatorName", "") or ""),
        "accepted": state.accepted,
        "new": state.seen is None,
        # The SHA-256 of the stored file, as its ``contribution`` entry records it: how a
        # wallet finds the entry that proves this opinion in the log.
        "digest": record.digest,
    }


def pdf_text(pdf: bytes) -> str:
    """The text of a stored PDF's first pages, at most MAX_READING_CHARS ("" when it has
    none that can be extracted, e.g. a scanned page)."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(pdf))
        pages = [page.extract_text() for page in reader.pages[:MAX_READING_PAGES]]
    # As in check_pdf_parses: any failure of a hostile PDF means no text to show.
    except Exception:
        return ""
    return "\n".join(pages).strip()[:MAX_READING_CHARS]


def version_of(ds: Dataset, record: InstanceRecord) -> ReportVersion:
    """A stored report's listing fields, read from its header."""
    predecessors: list[str] = []
    for study in ds.get("PredecessorDocumentsSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for item in series.get("ReferencedSOPSequence", []):
                predecessors.append(str(item.get("ReferencedSOPInstanceUID", "")))
    verified = str(ds.get("VerificationFlag", "")) == "VERIFIED"
    status = "final" if verified else "preliminary"
    stated = str(ds.get("CompletionFlagDescription", "") or "")
    if stated in REPORT_STATUSES and (stated == "preliminary") != verified:
        status = stated  # the status as the RIS stated it (amended, corrected)
    if "VerificationFlag" not in ds and record.sop_class_uid != ENCAPSULATED_PDF:
        status = "final" if str(ds.get("CompletionFlag", "")) == "COMPLETE" else "preliminary"
    title = str(ds.get("DocumentTitle", "") or "")
    if not title and "ConceptNameCodeSequence" in ds and ds.ConceptNameCodeSequence:
        title = str(ds.ConceptNameCodeSequence[0].get("CodeMeaning", ""))
    return ReportVersion(
        sop_instance_uid=record.sop_instance_uid,
        series_instance_uid=record.series_instance_uid,
        sop_class_uid=record.sop_class_uid,
        title=title or "Report",
        identifier=str(ds.get("HL7InstanceIdentifier", "") or ""),
        status=status,
        date=str(ds.get("ContentDate", "") or ""),
        time=str(ds.get("ContentTime", "") or ""),
        predecessors=tuple(p for p in predecessors if p),
        size=record.size,
    )


def arrange_versions(versions: Sequence[ReportVersion]) -> list[StudyReport]:
    """Reports as they stand: a version that a later one names as its predecessor is
    that one's history (transitively), never listed on its own."""
    by_uid = {v.sop_instance_uid: v for v in versions}
    superseded_by: dict[str, str] = {}
    for version in versions:
        for predecessor in version.predecessors:
            if predecessor in by_uid and predecessor != version.sop_instance_uid:
                superseded_by.setdefault(predecessor, version.sop_instance_uid)
    reports: list[StudyReport] = []
    for version in versions:
        if version.sop_instance_uid in superseded_by:
            continue
        report = StudyReport(version)
        seen = {version.sop_instance_uid}
        frontier = list(version.predecessors)
        while frontier:
            uid = frontier.pop(0)
            if uid in seen or uid not in by_uid:
                continue
            seen.add(uid)
            report.history.append(by_uid[uid])
            frontier.extend(by_uid[uid].predecessors)
        reports.append(report)
    reports.sort(key=lambda r: (r.current.date, r.current.time), reverse=True)
    return reports


def _current_of(versions: Sequence[ReportVersion], identifier: str) -> ReportVersion | None:
    """The newest stored version of the report with that identifier, if any."""
    for report in arrange_versions(versions):
        if report.current.identifier == identifier:
            return report.current
    return None


# -- documents ---------------------------------------------------------------------------


def document_pdf(document: ReportDocument, title: str) -> bytes:
    """The report's PDF: a posted PDF once it parses, or its text rendered to one.

    Raises BadInput for a PDF that does not parse, or text the PDF's font cannot show.
    """
    if document.media_type == PDF:
        check_pdf_parses(document.content)
        return document.content
    return render_text_pdf(title, document.content.decode("utf-8"))


def check_pdf_parses(data: bytes) -> None:
    """BadInput unless pypdf reads the PDF's structure and finds at least one page."""
    from pypdf import PdfReader

    try:
        pages = len(PdfReader(io.BytesIO(data), strict=True).pages)
    # pypdf raises many types on hostile input (its own errors, but also KeyError,
    # ValueError, RecursionError...): each means the same, not a readable PDF.
    except Exception as exc:
        raise BadInput("the document is not a readable PDF") from exc
    if pages < 1:
        raise BadInput("the PDF has no page")


def render_text_pdf(title: str, text: str) -> bytes:
    """A plain A4 PDF of a text report (Helvetica: Latin-1 text; anything else is
    refused rather than shown wrong)."""
    from fpdf import FPDF
    from fpdf.errors import FPDFUnicodeEncodingException

    pdf = FPDF(format="A4")
    pdf.set_creator(f"ImageShare {__version__}")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    try:
        pdf.set_font("Helvetica", style="B", size=14)
        pdf.multi_cell(0, 8, title)
        pdf.ln(4)
        pdf.set_font("Helvetica", size=11)
        pdf.multi_cell(0, 5.5, text)
        return bytes(pdf.output())
    except FPDFUnicodeEncodingException as exc:
        raise BadInput(
            "the report's text holds characters outside Latin-1; send it as a PDF"
        ) from exc


# -- the DICOM instance ----------------------------------------------------------------------


def build_report_dataset(
    *,
    template: Dataset,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    submission: ReportSubmission,
    pdf: bytes,
    predecessor: ReportVersion | None,
    now: float,
    series_number: int = REPORTS_SERIES_NUMBER,
    series_description: str = REPORTS_SERIES_DESCRIPTION,
) -> FileDataset:
    """An Encapsulated PDF instance of the template's study holding ``pdf``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_PDF)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in _COPIED:
        if keyword in template:
            value = template.data_element(keyword)
            if value is not None:
                setattr(ds, keyword, str(value.value) if value.VR == "PN" else value.value)
    stamp = time.gmtime(now)
    created_date, created_time = time.strftime("%Y%m%d", stamp), time.strftime("%H%M%S", stamp)
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = created_date, created_time
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.ConversionType = "WSD"
    ds.Manufacturer = "ImageShare"
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = instance_number
    ds.ContentDate = submission.date or created_date
    ds.ContentTime = submission.time or (created_time if submission.date is None else "")
    ds.AcquisitionDateTime = f"{ds.ContentDate}{ds.ContentTime}"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = submission.title
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = _REPORT_CONCEPT
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    ds.VerificationFlag = "VERIFIED" if submission.status.verified else "UNVERIFIED"
    ds.CompletionFlag = "COMPLETE" if submission.status.verified else "PARTIAL"
    ds.CompletionFlagDescription = submission.status.value
    ds.HL7InstanceIdentifier = submission.identifier
    if predecessor is not None:
        ds.PredecessorDocumentsSequence = DicomSequence([_reference(ds, predecessor)])
    ds.MIMETypeOfEncapsulatedDocument = PDF
    # OB values are padded to an even length; the length attribute keeps the PDF's own.
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds


def _reference(ds: Dataset, version: ReportVersion) -> Dataset:
    sop = Dataset()
    sop.ReferencedSOPClassUID = version.sop_class_uid
    sop.ReferencedSOPInstanceUID = version.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = version.series_instance_uid
    series.ReferencedSOPSequence = DicomSequence([sop])
    study = Dataset()
    study.StudyInstanceUID = ds.StudyInstanceUID
    study.ReferencedSeriesSequence = DicomSequence([series])
    return study


def encode_part10(ds: FileDataset) -> bytes:
    """The dataset as DICOM Part 10 bytes."""
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError) as exc:  # a copied value pydicom cannot write
        raise ImageShareError(f"the report instance could not be encoded: {exc}") from exc
    return buffer.getvalue()
