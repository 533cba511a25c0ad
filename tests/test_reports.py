"""Reports: a RIS posts FHIR DiagnosticReports and HL7 v2 ORU^R01 messages to the node,
which keeps them as DICOM Encapsulated PDF in the study; they travel with the study.

Custodian A holds Jane's CT study; grantee B is its roster peer. The RIS posts reports to
A's admin API; the tests read them back as every client would: QIDO-RS and WADO-RS,
DCMTK's ``dcm2pdf``, a transfer to B, a share link's DICOMweb root and its download.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fpdf import FPDF
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.base64url import b64url_encode
from node.core.consent import GrantFields, link_grantee, sign_grant
from node.core.reports import (
    ReportStatus,
    parse_fhir_report,
    parse_hl7_report,
)
from node.core.shlink import ACCESS_CREDENTIAL, encrypt_file
from node.errors import BadInput, PayloadTooLarge
from node.samples import SyntheticStudy, make_ct_study
from node.services.reports import ENCAPSULATED_PDF, series_uid_for
from node.services.wallet import Wallet
from tests.support.browser import chromium_session
from tests.support.nodes import (
    NodeProcess,
    free_port,
    init_node,
    peer_each_other,
    run_cli,
    wait_until,
)
from tests.support.web_wallet import (
    PASSPHRASE,
    restore_wallet,
    share_in_web_wallet,
    wait_for_screen,
)
from tests.test_forward import PACS, StoreScp
from tests.test_share_links import (
    decode_link,
    entries_of,
    http,
    in_session,
    link_root,
    open_manifest,
    own_entries,
)
from tests.test_viewer import require_ohif, signed_in

DICOM_JSON = "application/dicom+json"
HL7 = "x-application/hl7-v2+er7"
MAX_DOCUMENT_BYTES = 300_000


def make_pdf(text: str) -> bytes:
    """A real one-page PDF (fpdf2), as a RIS would export."""
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def diagnostic_report(
    study_uid: str | None,
    patient_id: str,
    *,
    identifier: str = "RPT-1",
    status: str = "final",
    pdf: bytes | None = None,
    text: str | None = None,
) -> dict[str, Any]:
    forms = []
    if pdf is not None:
        forms.append({"contentType": "application/pdf", "data": base64.b64encode(pdf).decode()})
    if text is not None:
        forms.append(
            {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}
        )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": status,
        "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": identifier}],
        "code": {"text": "CT chest report"},
        "subject": {"identifier": {"value": patient_id}},
        "issued": "2026-11-30T10:15:00Z",
        "presentedForm": forms,
    }
    if study_uid is not None:
        report["imagingStudy"] = [
            {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}}
        ]
    return report


def obr_segment(fields: dict[int, str]) -> str:
    """An OBR segment with the given fields (by their HL7 number), the others empty."""
    return "|".join(["OBR", "1", *(fields.get(n, "") for n in range(2, 26))])


def oru_message(patient_id: str, accession: str, text_lines: list[str], status: str = "F") -> bytes:
    segments = [
        "MSH|^~\\&|RIS|HOSP|IMAGESHARE|HOSP|20261130101500||ORU^R01|MSG0001|P|2.5.1",
        f"PID|1||{patient_id}^^^HOSP^MR||Doe^Jane||19700101|F",
        obr_segment(
            {3: f"{accession}^RIS", 4: "CTCHEST^CT chest^L", 7: "20261130101000", 25: status}
        ),
        *[f"OBX|{i + 1}|TX|REPORT||{line}||||||{status}" for i, line in enumerate(text_lines)],
    ]
    return "\r".join(segments).encode()


def request(
    node: NodeProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str = "application/fhir+json",
    auth: bool = True,
    accept: str | None = None,
) -> tuple[int, bytes]:
    headers = {**(node.auth if auth else {}), "Content-Type": content_type}
    if accept:
        headers["Accept"] = accept
    req = urllib.request.Request(f"{node.url}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_report(node: NodeProcess, report: dict[str, Any], query: str = "") -> tuple[int, Any]:
    status, body = request(node, "POST", f"/admin/api/reports{query}", json.dumps(report).encode())
    return status, json.loads(body)


def listing(node: NodeProcess, study_uid: str) -> list[dict[str, Any]]:
    status, body = request(node, "GET", f"/admin/api/reports?study={study_uid}")
    assert status == 200, body
    return list(json.loads(body)["reports"])


def qido_instances(node: NodeProcess, study_uid: str) -> list[dict[str, Any]]:
    status, body = request(
        node, "GET", f"/dicomweb/studies/{study_uid}/instances", accept=DICOM_JSON
    )
    assert status == 200, body
    return list(json.loads(body))


def dcm2pdf(part10: bytes, work: Path) -> bytes:
    """The PDF inside an Encapsulated PDF instance, as DCMTK extracts it."""
    source, target = work / "report.dcm", work / "report.pdf"
    source.write_bytes(part10)
    subprocess.run(["dcm2pdf", str(source), str(target)], check=True, capture_output=True)
    return target.read_bytes()


def get_first_part(node: NodeProcess, url: str, accept: str) -> bytes:
    """The first part of a multipart/related answer, as a DICOMweb client reads it."""
    req = urllib.request.Request(url, headers={**node.auth, "Accept": accept})
    with urllib.request.urlopen(req, timeout=60) as response:
        body, content_type = response.read(), response.headers["Content-Type"]
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    part = body.split(b"--" + boundary)[1]
    return part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")


def wado_instance(node: NodeProcess, study_uid: str, sop_uid: str, series_uid: str) -> bytes:
    path = f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
    return get_first_part(node, node.url + path, 'multipart/related; type="application/dicom"')


@dataclass
class Site:
    base: Path
    a: NodeProcess
    b: NodeProcess
    study: SyntheticStudy
    wallet: Wallet
    pacs: StoreScp


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("reports")
    a = init_node(base, "a.example/imageshare", "a")
    b = init_node(base, "b.example/imageshare", "b")
    peer_each_other(a, b)
    a.append_config(f"\n[reports]\nmax_document_bytes = {MAX_DOCUMENT_BYTES}\n")
    # A's PACS, where everything arriving is forwarded (a returned opinion once accepted).
    pacs = StoreScp(free_port(), base / "pacs")
    a.append_config(
        f'\n[forward]\nae_title = "{PACS}"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
        "initial_backoff = 0.3\n"
    )
    try:
        pacs.start()
        a.start()
        b.start()
        study = make_ct_study(base / "study", series=1, slices=2, rows=32, columns=32)
        a.cli("import", str(base / "study"))
        wallet = Wallet.create(base / "wallet", None)
        a.cli(
            "enroll",
            "--patient-id",
            study.patient_id,
            f"--key={wallet.key_for(a.origin).public_key_text}",
        )
        yield Site(base, a, b, study, wallet, pacs)
    finally:
        a.stop()
        b.stop()
        pacs.stop()


class TestReportFormats:
    def test_a_fhir_report_names_its_study_patient_identifier_status_and_pdf(self) -> None:
        pdf = make_pdf("Impression: normal.")
        body = json.dumps(diagnostic_report("1.2.3", "MRN-9", status="amended", pdf=pdf)).encode()
        report = parse_fhir_report(body, MAX_DOCUMENT_BYTES)
        assert (report.study_uid, report.patient_id) == ("1.2.3", "MRN-9")
        assert report.identifier == "urn:oid:1.2.3.4.5|RPT-1"
        assert report.status is ReportStatus.AMENDED
        assert report.document.content == pdf and report.title == "CT chest report"
        assert (report.date, report.time) == ("20261130", "101500")

    def test_an_oru_report_names_patient_accession_status_and_text_with_escapes(self) -> None:
        message = oru_message("MRN-9", "ACC-7", ["Lungs clear \\T\\ no effusion.", "Done."], "P")
        report = parse_hl7_report(message, MAX_DOCUMENT_BYTES)
        assert (report.patient_id, report.accession_number, report.study_uid) == (
            "MRN-9",
            "ACC-7",
            None,
        )
        assert report.status is ReportStatus.PRELIMINARY and report.title == "CT chest"
        assert report.document.content == b"Lungs clear & no effusion.\nDone."

    def test_an_oru_with_an_ed_pdf_and_a_zds_study_uid(self) -> None:
        pdf = make_pdf("From HL7.")
        message = (
            oru_message("MRN-9", "ACC-7", [])
            + (
                "\rZDS|1.2.840.99^RIS^Application^DICOM"
                f"\rOBX|1|ED|PDF||^application^pdf^Base64^{base64.b64encode(pdf).decode()}||||||F"
            ).encode()
        )
        report = parse_hl7_report(message, MAX_DOCUMENT_BYTES)
        assert report.study_uid == "1.2.840.99" and report.accession_number is None
        assert report.document.content == pdf

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b"MSH|^~\\&|RIS", "MSH"),
            (b"PID|1||x", "MSH"),
            (b"MSH|^~\\&|RIS|H|I|H|2026||ADT^A01|1|P|2.5\rPID|1||X", "ORU^R01"),
            (b"MSH|^~\\&|RIS|H|I|H|2026||ORU^R01|1|P|2.5\rPID|1||X", "PID and an OBR"),
            (
                b"MSH|^~\\&|RIS|H|I|H|2026||ORU^R01|1|P|2.5\rPID|1||X\rOBR|1||A|||||||||||||||||||||Z",
                "OBR-25",
            ),
            (b"MSH|^~\\&|R\xff|H", "UTF-8"),
            (b"MSH|^^^^|RIS", "separators"),
        ],
    )
    def test_hl7_that_does_not_parse_is_refused_with_its_reason(
        self, body: bytes, reason: str
    ) -> None:
        with pytest.raises(BadInput, match=re.escape(reason)):
            parse_hl7_report(body, MAX_DOCUMENT_BYTES)

    def test_an_oversize_document_is_refused_before_it_is_decoded(self) -> None:
        big = {"contentType": "application/pdf", "data": "A" * (MAX_DOCUMENT_BYTES * 2)}
        report = diagnostic_report("1.2.3", "M") | {"presentedForm": [big]}
        with pytest.raises(PayloadTooLarge):
            parse_fhir_report(json.dumps(report).encode(), MAX_DOCUMENT_BYTES)

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=400), st.text(max_size=200))
    def test_any_input_is_a_report_or_a_clear_refusal(self, data: bytes, text: str) -> None:
        for body in (
            data,
            text.encode(),
            b"MSH|^~\\&|" + data,
            json.dumps({"resourceType": "DiagnosticReport", "status": text}).encode(),
        ):
            for parse in (parse_fhir_report, parse_hl7_report):
                with contextlib.suppress(BadInput, PayloadTooLarge):
                    parse(body, MAX_DOCUMENT_BYTES)


class TestReportsInTheStore:
    def test_a_fhir_report_is_an_encapsulated_pdf_that_dicomweb_and_dcm2pdf_give_back_intact(
        self, site: Site, tmp_path: Path
    ) -> None:
        study_uid = site.study.study_uid
        findings = [f"Finding {n}: segment {n * 7 % 13} unremarkable." for n in range(120)]
        pdf = make_pdf("CT chest. Impression: no acute findings.\n" + "\n".join(findings))
        status, stored = post_report(
            site.a, diagnostic_report(study_uid, site.study.patient_id, pdf=pdf)
        )
        assert status == 201, stored
        assert stored["series_uid"] == series_uid_for(study_uid, "reports")
        (found,) = [
            i
            for i in qido_instances(site.a, study_uid)
            if i["00080016"]["Value"] == [ENCAPSULATED_PDF]
        ]
        sop_uid = found["00080018"]["Value"][0]
        assert sop_uid == stored["sop_instance_uid"]
        part10 = wado_instance(site.a, study_uid, sop_uid, stored["series_uid"])
        assert dcm2pdf(part10, tmp_path) == pdf
        ds = pydicom.dcmread(io.BytesIO(part10))
        assert (ds.PatientID, ds.PatientName, ds.AccessionNumber) == (
            site.study.patient_id,
            site.study.patient_name,
            "ACC-1",
        )
        assert (ds.Modality, ds.VerificationFlag, ds.HL7InstanceIdentifier) == (
            "DOC",
            "VERIFIED",
            "urn:oid:1.2.3.4.5|RPT-1",
        )
        # The metadata's BulkDataURI gives the document (what OHIF's dicom-pdf viewport reads).
        status, body = request(
            site.a,
            "GET",
            f"/dicomweb/studies/{study_uid}/series/{stored['series_uid']}/instances/{sop_uid}/metadata",
            accept=DICOM_JSON,
        )
        assert status == 200
        uri = json.loads(body)[0]["00420011"]["BulkDataURI"]
        bulk = get_first_part(site.a, uri, 'multipart/related; type="application/octet-stream"')
        assert bulk == pdf + b"\0" * (len(pdf) % 2)  # OB values are padded to even length
        # Posting the same report again stores nothing new.
        again, answer = post_report(
            site.a, diagnostic_report(study_uid, site.study.patient_id, pdf=pdf)
        )
        assert again == 200 and answer["outcome"] == "duplicate"

    def test_an_hl7_text_report_found_by_accession_is_rendered_to_a_pdf(
        self, site: Site, tmp_path: Path
    ) -> None:
        message = oru_message(
            site.study.patient_id, "ACC-1", ["Findings: clear lungs.", "No effusion."]
        )
        status, body = request(site.a, "POST", "/admin/api/reports", message, HL7)
        assert status == 201, body
        stored = json.loads(body)
        assert stored["study_uid"] == site.study.study_uid and stored["status"] == "final"
        part10 = wado_instance(
            site.a, site.study.study_uid, stored["sop_instance_uid"], stored["series_uid"]
        )
        rendered = dcm2pdf(part10, tmp_path)
        assert rendered.startswith(b"%PDF-")
        from pypdf import PdfReader

        text = PdfReader(io.BytesIO(rendered)).pages[0].extract_text()
        assert "Findings: clear lungs." in text and "No effusion." in text

    def test_an_amended_report_supersedes_the_preliminary_in_listings_and_both_are_kept(
        self, site: Site
    ) -> None:
        study_uid, patient_id = site.study.study_uid, site.study.patient_id
        versions = [
            ("preliminary", "Prelim: nodule?"),
            ("final", "Final: 4 mm nodule."),
            ("amended", "Amended: 5 mm nodule."),
        ]
        first, final, amended = (
            post_report(
                site.a,
                diagnostic_report(study_uid, patient_id, identifier="RPT-9", status=s, text=t),
            )[1]
            for s, t in versions
        )
        assert final["supersedes"] == first["sop_instance_uid"]
        assert amended["supersedes"] == final["sop_instance_uid"]
        (report,) = [r for r in listing(site.a, study_uid) if r["identifier"].endswith("RPT-9")]
        assert report["sop_instance_uid"] == amended["sop_instance_uid"]
        assert report["status"] == "amended"
        assert [v["sop_instance_uid"] for v in report["superseded"]] == [
            final["sop_instance_uid"],
            first["sop_instance_uid"],
        ]
        assert [v["status"] for v in report["superseded"]] == ["final", "preliminary"]
        held = {i["00080018"]["Value"][0] for i in qido_instances(site.a, study_uid)}
        assert {
            first["sop_instance_uid"],
            final["sop_instance_uid"],
            amended["sop_instance_uid"],
        } <= held
        # A preliminary version cannot come after a verified one.
        status, refused = post_report(
            site.a,
            diagnostic_report(
                study_uid, patient_id, identifier="RPT-9", status="preliminary", text="Oops"
            ),
        )
        assert status == 409 and "preliminary" in refused["error"]

    def test_bad_reports_are_refused_with_a_reason_and_nothing_is_stored(self, site: Site) -> None:
        study_uid, patient_id = site.study.study_uid, site.study.patient_id
        before = len(qido_instances(site.a, study_uid))
        not_pdf = diagnostic_report(study_uid, patient_id, pdf=b"GIF89a not a pdf")
        broken_pdf = diagnostic_report(study_uid, patient_id, pdf=b"%PDF-1.7\n garbage, no xref")
        oversize = diagnostic_report(
            study_uid, patient_id, pdf=b"%PDF-" + b"x" * MAX_DOCUMENT_BYTES
        )
        other_study = diagnostic_report("1.2.826.0.1.99", patient_id, text="x")
        other_patient = diagnostic_report(study_uid, "MRN-OTHER", text="x")
        cases: list[tuple[bytes, str, str, int, str]] = [
            (json.dumps(not_pdf).encode(), "application/fhir+json", "", 400, "not a PDF"),
            (json.dumps(broken_pdf).encode(), "application/fhir+json", "", 400, "readable PDF"),
            (json.dumps(oversize).encode(), "application/fhir+json", "", 413, "limit"),
            (json.dumps(other_study).encode(), "application/fhir+json", "", 404, "study"),
            (json.dumps(other_patient).encode(), "application/fhir+json", "", 400, "patient ID"),
            (
                json.dumps(diagnostic_report(study_uid, patient_id, text="x")).encode(),
                "application/fhir+json",
                "?study=1.2.826.0.1.98",
                400,
                "another study",
            ),
            (b"{not json", "application/fhir+json", "", 400, "not JSON"),
            (b"MSH|^~\\&|RIS|H|I|H|2026||ORU^R01|1|P|2.5\rgarbage", HL7, "", 400, "segment"),
            (oru_message(patient_id, "ACC-NONE", ["x"]), HL7, "", 404, "accession"),
            (oru_message("MRN-OTHER", "ACC-1", ["x"]), HL7, "", 400, "patient ID"),
            (b"%PDF-1.7", "application/pdf", "", 400, "FHIR DiagnosticReport"),
        ]
        for body, content_type, query, expected, reason in cases:
            status, answer = request(
                site.a, "POST", f"/admin/api/reports{query}", body, content_type
            )
            assert status == expected, (reason, answer)
            assert reason in json.loads(answer)["error"], answer
        # Without the admin token nothing is even read.
        status, _ = request(site.a, "POST", "/admin/api/reports", b"{}", auth=False)
        assert status == 401
        assert len(qido_instances(site.a, study_uid)) == before
        assert site.a.get_json("/healthz", auth=False)["status"] == "ok"


class TestReportsTravel:
    """A report is an instance of its study: every way the study leaves carries it."""

    def test_a_grantee_fetching_the_study_gets_the_report_byte_identical(
        self, site: Site, tmp_path: Path
    ) -> None:
        study_uid = site.study.study_uid
        pdf = make_pdf("Report that travels.")
        status, stored = post_report(
            site.a,
            diagnostic_report(study_uid, site.study.patient_id, identifier="RPT-T", pdf=pdf),
        )
        assert status == 201, stored
        grant = in_session(lambda s: site.wallet.grant(s, site.a.url, site.b.origin, None, 3600))
        fetched = json.loads(site.b.cli("fetch", grant["token"], "--json").stdout)
        assert fetched["instances"] == len(qido_instances(site.a, study_uid))
        part10 = wado_instance(site.b, study_uid, stored["sop_instance_uid"], stored["series_uid"])
        assert dcm2pdf(part10, tmp_path) == pdf
        # The grantee lists the study's reports as the custodian does.
        assert listing(site.b, study_uid) == listing(site.a, study_uid)

    def test_a_share_link_lists_and_downloads_the_reports(self, site: Site) -> None:
        study_uid = site.study.study_uid
        made = in_session(lambda s: site.wallet.share(s, site.a.url, None, 3600))
        root = link_root(open_manifest(decode_link(made["shlink"])))
        held = qido_instances(site.a, study_uid)
        reports = {
            i["00080018"]["Value"][0] for i in held if i["00080016"]["Value"] == [ENCAPSULATED_PDF]
        }
        status, answer, _ = http(
            "GET", f"{root}/studies/{study_uid}/instances", headers={"Accept": DICOM_JSON}
        )
        assert status == 200
        assert reports <= {i["00080018"]["Value"][0] for i in json.loads(answer)}
        # The link's listing shows each report as it stands, the custodian's own listing.
        status, body, _ = http("GET", root.removesuffix("/dicomweb") + "/reports")
        assert status == 200
        (linked,) = json.loads(body)["studies"]
        assert linked == {"study_uid": study_uid, "reports": listing(site.a, study_uid)}
        assert len({r["identifier"] for r in linked["reports"]}) == len(linked["reports"])
        status, body, _ = http("GET", root.removesuffix("/dicomweb") + "/download")
        assert status == 200, body[:200]
        with zipfile.ZipFile(io.BytesIO(body)) as media:
            files = [n for n in media.namelist() if n.startswith("PT")]
            in_media = {
                pydicom.dcmread(io.BytesIO(media.read(n)), stop_before_pixels=True).SOPInstanceUID
                for n in files
            }
        assert reports <= in_media and len(files) == len(held)


def opinion_body(study_uid: str, **fields: Any) -> dict[str, Any]:
    return {
        "study_uid": study_uid,
        "author": "Dr Ada Second",
        "role": "Consultant radiologist",
        **fields,
    }


def opinions(node: NodeProcess) -> list[dict[str, Any]]:
    status, body = request(node, "GET", "/admin/api/opinions")
    assert status == 200
    found: list[dict[str, Any]] = json.loads(body)["opinions"]
    return found


def patient_reports(site: Site) -> list[dict[str, Any]]:
    async def read(session: Any) -> list[dict[str, Any]]:
        custodian = await site.wallet.custodian(session, site.a.url)
        (study,) = await site.wallet.studies(session, site.a.url)
        answer = await site.wallet.signed(
            session, custodian, "GET", f"/patient/studies/{study['ref']}/reports"
        )
        return list(answer["reports"])

    return in_session(read)


class TestSecondOpinions:
    def test_a_link_returns_an_opinion_held_from_pacs_until_staff_accept_it(
        self, site: Site
    ) -> None:
        study_uid, patient_id = site.study.study_uid, site.study.patient_id
        made = in_session(lambda s: site.wallet.share(s, site.a.url, None, 3600, opinions=True))
        base = link_root(open_manifest(decode_link(made["shlink"]))).removesuffix("/dicomweb")
        pdf = make_pdf("Second look: no fracture seen.")
        document = base64.b64encode(pdf).decode()
        # Refusals first: nothing is stored for any of them.
        before = opinions(site.a)
        refusals = [
            (opinion_body(study_uid, pdf=document, text="both"), 400),
            (opinion_body(study_uid, pdf=base64.b64encode(b"not a pdf").decode()), 400),
            (opinion_body(study_uid, pdf=base64.b64encode(b"%PDF-1.4 broken").decode()), 400),
            (opinion_body(study_uid, author="A^B", text="caret"), 400),
            (opinion_body(study_uid, author="", text="anonymous"), 400),
            (opinion_body("1.2.826.0.1.3680043.2.1125.99", text="other study"), 403),
            ({"author": "x"}, 400),
        ]
        for body, expected in refusals:
            status, answer, _ = http("POST", f"{base}/opinions", body)
            assert status == expected, (body, answer)
            assert "error" in json.loads(answer)
        status, _, _ = http("POST", f"{base}/opinions", "[")
        assert status == 400
        assert opinions(site.a) == before
        # A link made without the permission may read, never return an opinion.
        plain = in_session(lambda s: site.wallet.share(s, site.a.url, None, 3600))
        plain_base = link_root(open_manifest(decode_link(plain["shlink"]))).removesuffix(
            "/dicomweb"
        )
        status, _, _ = http("POST", f"{plain_base}/opinions", opinion_body(study_uid, pdf=document))
        assert status == 403
        assert opinions(site.a) == before

        status, answer, _ = http("POST", f"{base}/opinions", opinion_body(study_uid, pdf=document))
        assert status == 201, answer
        stored = json.loads(answer)
        sop_uid = stored["sop_instance_uid"]
        assert stored["series_uid"] == series_uid_for(study_uid, "opinions")
        # Sent again, it is the same opinion, stored and recorded once.
        status, again, _ = http("POST", f"{base}/opinions", opinion_body(study_uid, pdf=document))
        assert status == 200 and json.loads(again)["sop_instance_uid"] == sop_uid
        # An Encapsulated PDF of the study in its own series, the name kept in the instance.
        part10 = wado_instance(site.a, study_uid, sop_uid, stored["series_uid"])
        instance = pydicom.dcmread(io.BytesIO(part10))
        assert instance.SOPClassUID == ENCAPSULATED_PDF
        assert instance.PatientID == patient_id
        assert str(instance.ContentCreatorName) == "Dr Ada Second"
        assert "Consultant radiologist" in instance.DocumentTitle
        (site.base / "opinion").mkdir()
        assert dcm2pdf(part10, site.base / "opinion") == pdf
        # The ledger has one contribution naming the link, the study and the digest.
        (entry,) = entries_of(site.a, made["link_id"], "contribution")
        assert entry["digest"] == hashlib.sha256(part10).digest()
        access = entries_of(site.a, made["link_id"], "access")[0]  # the manifest read
        assert entry["study"] == access["study"]
        raw = b"".join(
            repr(e.fields).encode() for e in own_entries(site.a) if e.kind == "contribution"
        )
        assert b"Ada" not in raw and study_uid.encode() not in raw
        # The patient's own log names it, by the link.
        text = run_cli(
            "patient",
            "log",
            site.a.url,
            site.b.url,
            "--wallet",
            str(site.base / "wallet"),
            check=False,
        ).stdout
        assert "returned an opinion (study " in text, text
        # The patient sees it as a new opinion until they open it.
        (mine,) = [r for r in patient_reports(site) if r["sop_instance_uid"] == sop_uid]
        assert mine["contribution"] is True and mine["new"] is True
        assert mine["author"] == "Dr Ada Second"
        assert "no fracture seen" in mine["text"]
        # Staff see it held; PACS gets a later report but not the opinion.
        (held,) = [o for o in opinions(site.a) if o["sop_instance_uid"] == sop_uid]
        assert held["accepted"] is None and held["author"] == "Dr Ada Second"
        status, later = post_report(
            site.a,
            diagnostic_report(
                study_uid, patient_id, identifier="RPT-AFTER-OPINION", text="Later report."
            ),
        )
        assert status == 201
        wait_until(
            lambda: later["sop_instance_uid"] in site.pacs.received(),
            message="the later report to reach PACS",
        )
        assert sop_uid not in site.pacs.received()
        status, _ = request(site.a, "POST", f"/admin/api/opinions/{sop_uid}/accept")
        assert status == 200
        (accepted,) = [o for o in opinions(site.a) if o["sop_instance_uid"] == sop_uid]
        assert accepted["accepted"] is not None
        wait_until(
            lambda: sop_uid in site.pacs.received(), message="the accepted opinion to reach PACS"
        )
        status, _ = request(site.a, "POST", "/admin/api/opinions/1.2.3/accept")
        assert status == 404

    def test_a_link_claiming_the_opinions_permission_its_signed_grant_lacks_is_refused(
        self, site: Site
    ) -> None:
        """The permission is the patient's signed word: a link submitted with
        ``"opinions": true`` beside a grant without it (a version 1 grant) is refused,
        and nothing is recorded."""
        key = site.wallet.key_for(site.a.origin)
        now = int(time.time())
        fields = GrantFields(
            key.public_key,
            site.a.origin,
            link_grantee(hashlib.sha256(b"a link that claims too much").digest()),
            None,
            now,
            now + 3600,
            bytes(16),
        )
        token = sign_grant(fields, key.sign)
        credential = encrypt_file(bytes(32), ACCESS_CREDENTIAL, b"{}")
        body = {
            "grant": b64url_encode(token),
            "manifest": b64url_encode(hashlib.sha256(b"a manifest id").digest()),
            "passcode": None,
            "files": [{"contentType": ACCESS_CREDENTIAL, "embedded": credential}],
            "opinions": True,
        }

        async def submit(session: Any) -> str:
            custodian = await site.wallet.custodian(session, site.a.url)
            try:
                await site.wallet.signed(
                    session, custodian, "POST", "/patient/links", json.dumps(body).encode()
                )
            except BadInput as refused:
                return str(refused)
            raise AssertionError("the custodian kept a link its grant does not allow")

        assert "signed grant" in in_session(submit)
        assert not [e for e in own_entries(site.a) if e.fields.get("token") == token]


class TestReportsInTheWallet:
    def test_the_wallet_and_the_dashboard_show_each_report_as_it_stands(self, site: Site) -> None:
        study_uid, patient_id = site.study.study_uid, site.study.patient_id
        versions = [
            ("preliminary", "Wallet prelim: query fracture."),
            ("amended", "Wallet amended: no fracture."),
        ]
        first, amended = (
            post_report(
                site.a,
                diagnostic_report(study_uid, patient_id, identifier="RPT-W", status=s, text=t),
            )[1]
            for s, t in versions
        )
        with chromium_session("reports-wallet", viewport=(390, 844)) as browser:
            page = browser.new_page()
            restore_wallet(page, site.a.url, site.base / "wallet" / "seed.json", PASSPHRASE)
            page.click('#tabs button[data-screen="studies"]')
            wait_for_screen(page, "studies")
            card = f'.reports .report[data-sop="{amended["sop_instance_uid"]}"]'
            page.wait_for_selector(card)
            page.shot("wallet-reports")
            text = str(page.text_content(card))
            assert "Amended" in text and "Wallet amended: no fracture." in text
            assert "Replaces: Preliminary" in text
            # The superseded version is history, not a report of its own.
            assert page.query_selector(f'.report[data-sop="{first["sop_instance_uid"]}"]') is None
            # Readable on a phone: nothing wider than the screen, text at least 14 px.
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            style = f"getComputedStyle(document.querySelector('{card} .report-text'))"
            size = page.evaluate(f"parseFloat({style}.fontSize)")
            assert size >= 14
            with page.expect_popup() as popup:
                page.click(f"{card} .report-open")
            assert popup.value.url.startswith("blob:")
            # Staff see the same report as it stands on the dashboard.
            dashboard = signed_in(browser, site.a)
            dashboard.goto(f"{site.a.url}/admin")
            dashboard.click(f'#studies tr[data-study="{study_uid}"] td')
            row = f'#reports tr[data-sop="{amended["sop_instance_uid"]}"]'
            dashboard.wait_for_selector(row)
            assert dashboard.get_attribute(row, "data-status") == "amended"
            assert "preliminary" in str(dashboard.text_content(row))
            assert (
                dashboard.query_selector(f'#reports tr[data-sop="{first["sop_instance_uid"]}"]')
                is None
            )

    def test_a_doctor_reads_the_study_on_a_link_and_returns_a_pdf_the_wallet_proves_new(
        self, site: Site
    ) -> None:
        """The patient's web wallet makes the link (its grant signed with the opinions
        permission); the doctor views the study from the share page and returns a PDF
        through its form; the wallet's activity shows the opinion as new, proven in A's
        log under B's cosignature; the dashboard holds it for acceptance."""
        pdf = make_pdf("Opinion from the page: agree, no fracture.")
        (site.base / "page-opinion.pdf").write_bytes(pdf)
        (site.base / "not-a-pdf.pdf").write_bytes(b"GIF89a not a pdf at all")
        seed = site.base / "wallet" / "seed.json"
        (study,) = in_session(lambda s: site.wallet.studies(s, site.a.url))
        with chromium_session("reports-opinion", viewport=(390, 844)) as browser:
            page = browser.new_page()  # the patient's phone
            url, token_id = share_in_web_wallet(
                page, site.a.url, seed, study["ref"], "Dr Page", "1618", opinions=True
            )
            doctor = browser.new_page()
            doctor.goto(url)
            doctor.fill("#passcode", "1618")
            doctor.click("#passcode-button")
            doctor.wait_for_selector("#opinion-form:not([hidden])")
            # The doctor reads the study through the link before answering.
            viewer = browser.new_page()
            viewer.goto(str(doctor.eval_on_selector("#study-list li a", "a => a.href")))
            viewer.wait_for_ink("the viewer to draw the shared study")
            viewer.close()
            doctor.fill("#opinion-author", "Dr Page Second")
            doctor.fill("#opinion-role", "Radiologist")
            # A file that is not a PDF is refused with the custodian's reason.
            before = opinions(site.a)
            doctor.set_input_files("#opinion-pdf", str(site.base / "not-a-pdf.pdf"))
            doctor.click("#opinion-send")
            doctor.wait_for_selector('#opinion-result[data-status="400"]')
            assert "Not sent: " in str(doctor.text_content("#opinion-result"))
            assert "PDF" in str(doctor.text_content("#opinion-result"))
            assert opinions(site.a) == before
            doctor.set_input_files("#opinion-pdf", str(site.base / "page-opinion.pdf"))
            doctor.click("#opinion-send")
            doctor.wait_for_selector('#opinion-result[data-status="201"]')
            doctor.shot("doctor-sent-the-opinion")
            (sent,) = [o for o in opinions(site.a) if o["author"] == "Dr Page Second"]
            sop_uid = sent["sop_instance_uid"]
            assert sent["accepted"] is None

            # The patient's activity: the contribution, proven, with the opinion, new.
            event = page.locator(f'li.event[data-kind="contribution"]:has([data-sop="{sop_uid}"])')

            def proven_in_the_activity() -> bool:
                page.click('#tabs button[data-screen="activity"]')
                wait_for_screen(page, "activity")
                return event.count() == 1 and event.get_attribute("data-proven") == "true"

            wait_until(proven_in_the_activity, timeout=30, message="a proven contribution")
            page.shot("wallet-activity-new-opinion")
            text = str(event.text_content())
            assert event.get_attribute("data-new") == "true"
            assert "returned an opinion" in text and "New opinion" in text
            assert "Proven: entry " in text and "witnessed by b.example" in text
            assert "From Dr Page Second (as they stated it)" in text
            assert "agree, no fracture." in text
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            with page.expect_popup() as popup:
                event.locator(".report-open").click()
            assert popup.value.url.startswith("blob:")
            event.locator(".report-new").wait_for(state="detached")
            # Staff see it held from PACS and accept it on the dashboard.
            dashboard = signed_in(browser, site.a)
            dashboard.goto(f"{site.a.url}/admin")
            row = f'#opinions tr[data-sop="{sop_uid}"]'
            dashboard.wait_for_selector(f'{row}[data-state="held"]')
            assert "Dr Page Second (as stated)" in str(dashboard.text_content(row))
            dashboard.click(f"{row} button.accept")
            dashboard.wait_for_selector(f'{row}[data-state="accepted"]')
        # The wallet's proof is the log's: one contribution naming the link, digest the file's.
        (entry,) = entries_of(site.a, token_id, "contribution")
        assert entry["digest"].hex() == sent["digest"]
        # Opened in the wallet: no longer new (read outside the browser's event loop).
        (seen,) = [r for r in patient_reports(site) if r["sop_instance_uid"] == sop_uid]
        assert seen["new"] is False
        # The link's permission is in the grant the phone signed: the auditor finds it.
        audit = run_cli("audit", site.a.url, site.b.url, "--json", check=False)
        violations = json.loads(audit.stdout)["violations"]
        assert not [v for v in violations if v["rule"] == "contribution_without_permission"]


# Chromium's built-in PDF viewer (an extension of the browser, not a site).
PDF_VIEWER = "chrome-extension://mhjfbmdgcfjbbpaeojofohoefgiehjai/"


def white_share(png: bytes) -> float:
    """The share of near-white pixels in a screenshot: a PDF page on screen."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L")
    histogram = image.histogram()
    return sum(histogram[230:]) / (image.width * image.height)


class TestReportsInOhif:
    def test_ohif_lists_the_report_series_and_its_pdf_viewport_draws_the_pdf_as_posted(
        self, site: Site
    ) -> None:
        """OHIF's study browser lists the series for reports as a document (no image),
        and opening it puts the PDF, as the RIS posted it, in OHIF's PDF viewport."""
        require_ohif()
        study_uid = site.study.study_uid
        pdf = make_pdf("Report for the viewer.\n" + "\n".join(f"Line {n}" for n in range(80)))
        status, stored = post_report(
            site.a,
            diagnostic_report(study_uid, site.study.patient_id, identifier="RPT-O", pdf=pdf),
        )
        assert status == 201, stored
        with chromium_session("reports-ohif") as session:
            page = signed_in(session, site.a)
            documents: list[Any] = []
            document_path = f"{stored['sop_instance_uid']}/bulk/00420011"
            page.on(
                "response",
                lambda response: (
                    documents.append(response) if document_path in response.url else None
                ),
            )
            # A user who has seen OHIF's first-visit tour (its overlay takes every click).
            page.add_init_script(
                "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))"
            )
            page.goto(
                f"{site.a.url}/viewer/viewer?StudyInstanceUIDs={study_uid}", wait_until="commit"
            )
            # Listed in the study browser as a document series: Modality DOC, no image.
            thumbnail = page.wait_for_selector(
                '[data-cy="study-browser-thumbnail-no-image"][data-series="9901"]',
                timeout=60_000,
            )
            listed = str(thumbnail.text_content())
            assert "DOC" in listed and "Reports" in listed, listed
            page.shot("ohif-study-browser")
            thumbnail.dblclick()
            shown = page.wait_for_selector('object[type="application/pdf"]', timeout=60_000)
            assert str(shown.get_attribute("data")).startswith("blob:")
            # Drawn: Chromium's PDF viewer took the object and shows its white page (the
            # viewport shows a line of text on black when the page's CSP blocks it).
            wait_until(
                lambda: white_share(shown.screenshot()) > 0.3,
                timeout=30,
                message="OHIF's PDF viewport to draw the report's page",
            )
            page.shot("ohif-report")
            assert any(f.url.startswith(PDF_VIEWER) for f in page.frames)
            # What it drew came through /dicomweb, answered 200 with the bytes as posted.
            (bulk,) = [r for r in documents if r.ok]
            assert bulk.status == 200 and pdf in bulk.body()
            # Nothing from another origin; the browser's own PDF viewer and its chrome://
            # resources are no request out.
            outside = page.foreign_requests(site.a.url)
            assert [u for u in outside if not u.startswith((PDF_VIEWER, "chrome://"))] == []
