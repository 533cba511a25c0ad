"""QIDO-RS against a real node holding several generated patients, dates and modalities."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from node.core.dicom_json import attribute
from node.samples import SyntheticStudy, make_ct_study
from tests.support.nodes import NodeProcess, init_node


def make_study(
    directory: Path, modalities: list[str], slices: int = 2, **kwargs: Any
) -> SyntheticStudy:
    """A study with one series per modality, BodyPartExamined CHEST, SeriesDate = StudyDate,
    performed from StudyDate 10:15, in the time zone +0100."""
    study = make_ct_study(
        directory, series=len(modalities), slices=slices, rows=8, columns=8, **kwargs
    )
    for path in study.files:
        ds = pydicom.dcmread(path)
        ds.Modality = modalities[int(ds.SeriesNumber) - 1]
        ds.BodyPartExamined = "CHEST"
        ds.SeriesDate = ds.StudyDate
        ds.TimezoneOffsetFromUTC = "+0100"
        ds.PerformedProcedureStepStartDate = ds.StudyDate
        ds.PerformedProcedureStepStartTime = "101500"
        ds.save_as(path)
    return study


class Corpus:
    def __init__(self, node: NodeProcess, studies: dict[str, SyntheticStudy]) -> None:
        self.node = node
        self.studies = studies
        self.client = DICOMwebClient(url=node.url + "/dicomweb", headers=node.auth)

    def query(self, path: str, params: Any = None) -> requests.Response:
        return requests.get(
            self.node.url + "/dicomweb" + path, params=params, headers=self.node.auth, timeout=10
        )

    def found(self, path: str, params: Any = None) -> list[dict[str, Any]]:
        response = self.query(path, params)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/dicom+json"
        return list(response.json())

    def study_names(self, params: Any) -> list[str]:
        """Names of the matching studies, in the answer's order."""
        by_uid = {s.study_uid: name for name, s in self.studies.items()}
        return [by_uid[r["0020000D"]["Value"][0]] for r in self.found("/studies", params)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    base = tmp_path_factory.mktemp("qido")
    node = init_node(base, "qido.example/imageshare")
    studies = {
        "A": make_study(base / "in" / "A", ["CT", "CT"], study_date="20260105", accession="A-1"),
        "B": make_study(base / "in" / "B", ["MR"], study_date="20260215", accession="B-1"),
        "C": make_study(
            base / "in" / "C",
            ["CT", "PT"],
            patient_id="MRN-2",
            patient_name="Smith^John",
            study_date="20251231",
            accession="C-1",
        ),
        "D": make_study(
            base / "in" / "D",
            ["MR"],
            slices=1,
            patient_id="MRN-3",
            patient_name="Smyth^Anna",
            study_date="20260120",
            accession="ACC[1]",
        ),
    }
    node.cli("import", str(base / "in"))
    node.start()
    try:
        yield Corpus(node, studies)
    finally:
        node.stop()


class TestStudyMatching:
    def test_patient_id_matches_exactly(self, corpus: Corpus) -> None:
        assert corpus.study_names({"PatientID": "MRN-0001"}) == ["A", "B"]
        assert corpus.study_names({"PatientID": "MRN"}) == []

    def test_patient_id_by_tag(self, corpus: Corpus) -> None:
        assert corpus.study_names({"00100020": "MRN-2"}) == ["C"]

    def test_patient_name_wildcards_ignore_case(self, corpus: Corpus) -> None:
        assert corpus.study_names({"PatientName": "Sm*"}) == ["C", "D"]
        assert corpus.study_names({"PatientName": "sm?th^*"}) == ["C", "D"]
        assert corpus.study_names({"PatientName": "SMITH^JOHN"}) == ["C"]
        assert corpus.study_names({"PatientName": "Smith"}) == []
        assert corpus.study_names({"PatientName": "*^Jane"}) == ["A", "B"]

    def test_descriptions_match_case_sensitively(self, corpus: Corpus) -> None:
        # PS3.4 C.2.2.2.4: only person names match in any letter case (as in C-FIND).
        assert corpus.study_names({"StudyDescription": "CT*"}) == ["C", "A", "D", "B"]
        assert corpus.study_names({"StudyDescription": "ct*"}) == []

    def test_study_date_ranges(self, corpus: Corpus) -> None:
        assert corpus.study_names({"StudyDate": "20260101-20260131"}) == ["A", "D"]
        assert corpus.study_names({"StudyDate": "-20251231"}) == ["C"]
        assert corpus.study_names({"StudyDate": "20260201-"}) == ["B"]
        assert corpus.study_names({"StudyDate": "20260105"}) == ["A"]

    def test_malformed_date_is_refused(self, corpus: Corpus) -> None:
        for value in ("2026-01", "20260101-2026", "-", "yesterday"):
            response = corpus.query("/studies", {"StudyDate": value})
            assert response.status_code == 400, value
            assert "StudyDate" in response.json()["error"]

    def test_modalities_in_study_match_any_series(self, corpus: Corpus) -> None:
        assert corpus.study_names({"ModalitiesInStudy": "MR"}) == ["D", "B"]
        assert corpus.study_names({"ModalitiesInStudy": "PT"}) == ["C"]
        assert corpus.study_names({"ModalitiesInStudy": "PT,MR"}) == ["C", "D", "B"]

    def test_accession_number_is_literal_except_wildcards(self, corpus: Corpus) -> None:
        assert corpus.study_names({"AccessionNumber": "ACC[1]"}) == ["D"]
        assert corpus.study_names({"AccessionNumber": "ACC[*"}) == ["D"]
        assert corpus.study_names({"AccessionNumber": "?-1"}) == ["C", "A", "B"]

    def test_study_uid_lists_comma_separated_and_repeated(self, corpus: Corpus) -> None:
        a, c, d = (corpus.studies[n].study_uid for n in "ACD")
        assert corpus.study_names({"StudyInstanceUID": f"{a},{d}"}) == ["A", "D"]
        assert corpus.study_names([("StudyInstanceUID", a), ("StudyInstanceUID", c)]) == ["C", "A"]

    def test_filters_combine(self, corpus: Corpus) -> None:
        params = {"PatientID": "MRN-0001", "ModalitiesInStudy": "CT", "StudyDate": "2026-"}
        assert corpus.query("/studies", params).status_code == 400
        params["StudyDate"] = "20260101-"
        assert corpus.study_names(params) == ["A"]

    def test_empty_value_matches_everything(self, corpus: Corpus) -> None:
        assert corpus.study_names({"PatientID": ""}) == ["C", "A", "D", "B"]

    def test_fuzzymatching_is_accepted(self, corpus: Corpus) -> None:
        assert corpus.study_names({"fuzzymatching": "true", "PatientID": "MRN-2"}) == ["C"]

    def test_fuzzymatching_gets_the_warning_that_matching_was_literal(self, corpus: Corpus) -> None:
        # PS3.18 8.3.4.2: names match in any letter case, but no fuzzy matching is done.
        asked = corpus.query("/studies", {"fuzzymatching": "true", "PatientName": "smith*"})
        assert asked.status_code == 200 and len(asked.json()) == 1
        assert "Only literal matching has been performed" in asked.headers["Warning"]
        assert "Warning" not in corpus.query("/studies", {"fuzzymatching": "false"}).headers
        assert corpus.query("/studies", {"fuzzymatching": "yes"}).status_code == 400

    def test_unknown_or_unmatchable_keys_are_ignored_with_a_warning_naming_them(
        self, corpus: Corpus
    ) -> None:
        ignored = ["NoSuchThing", "SOPInstanceUID", "NumberOfStudyRelatedSeries", "00101010"]
        response = corpus.query("/studies", {name: "2" for name in ignored})
        assert response.status_code == 200
        assert len(response.json()) == 4
        warning = response.headers["Warning"]
        assert warning.startswith("299 ") and "were ignored" in warning
        assert all(name in warning for name in ignored)
        assert "Warning" not in corpus.query("/studies", {"PatientID": "MRN-2"}).headers

    def test_the_accept_parameter_replaces_the_accept_header_and_is_no_search_key(
        self, corpus: Corpus
    ) -> None:
        # PS3.18 8.3.3.1: a browser link cannot set headers, so the query says it.
        xml = 'multipart/related; type="application/dicom+xml"'
        response = requests.get(
            corpus.node.url + "/dicomweb/studies",
            params={"accept": xml, "PatientID": "MRN-2"},
            headers={**corpus.node.auth, "Accept": "application/dicom+json"},
            timeout=10,
        )
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("multipart/related")
        assert response.content.count(b"<NativeDicomModel") == 1
        assert "Warning" not in response.headers  # accept was no ignored search key
        as_json = corpus.query("/studies", {"accept": "application/dicom+json"})
        assert len(as_json.json()) == 4 and "Warning" not in as_json.headers
        assert corpus.query("/studies", {"accept": "text/html"}).status_code == 406

    def test_a_charset_other_than_utf8_is_refused_and_utf8_is_answered(
        self, corpus: Corpus
    ) -> None:
        # PS3.18 8.3.3.2: a charset the server does not support is a 400; answers are UTF-8.
        for utf8 in ("UTF-8", "iso-8859-1, utf-8;q=0.5", '"ISO_IR 192"'):
            answered = corpus.query("/studies", {"charset": utf8, "PatientID": "MRN-2"})
            assert answered.status_code == 200 and "Warning" not in answered.headers, utf8
        refused = corpus.query("/studies", {"charset": "ISO-8859-1"})
        assert refused.status_code == 400 and "charset" in refused.json()["error"]

    def test_malformed_values_are_still_refused(self, corpus: Corpus) -> None:
        assert corpus.query("/studies", {"StudyInstanceUID": "not-a-uid"}).status_code == 400
        assert corpus.query("/studies", {"StudyDate": "2026"}).status_code == 400


class TestStudyAttributes:
    def test_timezone_offset_is_returned_with_the_study(self, corpus: Corpus) -> None:
        [a] = corpus.found("/studies", {"StudyInstanceUID": corpus.studies["A"].study_uid})
        assert a["00080201"] == {"vr": "SH", "Value": ["+0100"]}

    def test_performed_procedure_step_start_is_returned_and_matched(self, corpus: Corpus) -> None:
        study_uid = corpus.studies["B"].study_uid
        [series] = corpus.found(f"/studies/{study_uid}/series")
        assert series["00400244"] == {"vr": "DA", "Value": ["20260215"]}
        assert series["00400245"] == {"vr": "TM", "Value": ["101500"]}
        path = f"/studies/{study_uid}/series"
        assert len(corpus.found(path, {"PerformedProcedureStepStartTime": "10-11"})) == 1
        assert corpus.found(path, {"PerformedProcedureStepStartTime": "11-"}) == []

    def test_counts_and_modalities(self, corpus: Corpus) -> None:
        [a] = corpus.found("/studies", {"StudyInstanceUID": corpus.studies["A"].study_uid})
        assert a["00201206"] == {"vr": "IS", "Value": [2]}
        assert a["00201208"] == {"vr": "IS", "Value": [4]}
        assert a["00080061"] == {"vr": "CS", "Value": ["CT"]}
        [c] = corpus.found("/studies", {"PatientID": "MRN-2"})
        assert c["00080061"]["Value"] == ["CT", "PT"]

    def test_attributes_a_viewer_needs(self, corpus: Corpus) -> None:
        [a] = corpus.found("/studies", {"StudyInstanceUID": corpus.studies["A"].study_uid})
        assert a["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
        assert a["00080020"] == {"vr": "DA", "Value": ["20260105"]}
        assert a["00081030"]["Value"] == ["CT CHEST"]
        assert a["00080056"] == {"vr": "CS", "Value": ["ONLINE"]}
        assert a["00081190"]["Value"][0].endswith(
            f"/dicomweb/studies/{corpus.studies['A'].study_uid}"
        )
        assert all(len(key) == 8 and key.upper() == key for key in a)

    def test_dicomweb_client_search_with_fields_and_paging(self, corpus: Corpus) -> None:
        results = corpus.client.search_for_studies(
            search_filters={"PatientName": "Doe*"},
            fields=["StudyDescription", "IssuerOfPatientID"],
            fuzzymatching=True,
            limit=1,
            offset=1,
        )
        assert [r["0020000D"]["Value"][0] for r in results] == [corpus.studies["B"].study_uid]
        assert "00100021" in results[0]


class TestSeriesAndInstances:
    def test_series_of_a_study(self, corpus: Corpus) -> None:
        study = corpus.studies["C"]
        series = corpus.client.search_for_series(study_instance_uid=study.study_uid)
        assert [s["0020000E"]["Value"][0] for s in series] == study.series_uids
        assert [s["00080060"]["Value"][0] for s in series] == ["CT", "PT"]
        assert all(s["00201209"]["Value"] == [2] for s in series)

    def test_series_across_studies_match_study_attributes(self, corpus: Corpus) -> None:
        found = corpus.found("/series", {"PatientID": "MRN-0001"})
        assert len(found) == 3
        assert [s["0020000E"]["Value"][0] for s in corpus.found("/series", {"Modality": "PT"})] == [
            corpus.studies["C"].series_uids[1]
        ]
        assert len(corpus.found("/series", {"Modality": "MR,PT"})) == 3

    def test_instances_by_every_path(self, corpus: Corpus) -> None:
        study = corpus.studies["A"]
        series_uid = study.series_uids[1]
        in_series = corpus.client.search_for_instances(study.study_uid, series_uid)
        assert [i["00080018"]["Value"][0] for i in in_series] == study.sop_uids[2:]
        assert len(corpus.found(f"/studies/{study.study_uid}/instances")) == 4
        everywhere = corpus.found("/instances")
        assert len(everywhere) == sum(len(s.sop_uids) for s in corpus.studies.values())

    def test_instance_uid_lists_and_numbers(self, corpus: Corpus) -> None:
        study = corpus.studies["A"]
        uids = study.sop_uids[0] + "\\" + study.sop_uids[3]
        found = corpus.found("/instances", {"SOPInstanceUID": uids})
        assert {i["00080018"]["Value"][0] for i in found} == {study.sop_uids[0], study.sop_uids[3]}
        first = found[0]
        assert first["0020000D"]["Value"] == [study.study_uid]
        assert first["00280010"] == {"vr": "US", "Value": [8]}
        numbered = corpus.found(f"/studies/{study.study_uid}/instances", {"InstanceNumber": "2"})
        assert len(numbered) == 2

    def test_unknown_study_gives_an_empty_answer(self, corpus: Corpus) -> None:
        assert corpus.found("/studies/1.2.3/series") == []


class TestIncludefield:
    def series_of(self, corpus: Corpus, params: Any) -> dict[str, Any]:
        study = corpus.studies["B"]
        [series] = corpus.found(f"/studies/{study.study_uid}/series", params)
        return series

    def test_optional_attributes_are_left_out_by_default(self, corpus: Corpus) -> None:
        series = self.series_of(corpus, {})
        assert "00180015" not in series and "00080021" not in series

    def test_includefield_by_keyword_and_tag(self, corpus: Corpus) -> None:
        assert self.series_of(corpus, {"includefield": "BodyPartExamined"})["00180015"] == {
            "vr": "CS",
            "Value": ["CHEST"],
        }
        assert "00180015" in self.series_of(corpus, {"includefield": "00180015"})

    def test_includefield_repeated_and_comma_separated(self, corpus: Corpus) -> None:
        repeated = [("includefield", "BodyPartExamined"), ("includefield", "SeriesDate")]
        for params in (repeated, {"includefield": "BodyPartExamined,SeriesDate"}):
            series = self.series_of(corpus, params)
            assert "00180015" in series
            assert series["00080021"]["Value"] == ["20260215"]

    def test_includefield_all(self, corpus: Corpus) -> None:
        series = self.series_of(corpus, {"includefield": "all"})
        assert {"00180015", "00080021", "00080031", "00100021"} <= set(series)

    def test_unknown_includefield_is_refused(self, corpus: Corpus) -> None:
        assert corpus.query("/studies", {"includefield": "NoSuchKeyword"}).status_code == 400


class TestPaging:
    def test_limit_and_offset_walk_a_stable_order(self, corpus: Corpus) -> None:
        everything = corpus.study_names({})
        assert everything == ["C", "A", "D", "B"]
        assert corpus.study_names({"limit": "2"}) == ["C", "A"]
        assert corpus.study_names({"limit": "2", "offset": "2"}) == ["D", "B"]
        assert corpus.study_names({"offset": "3"}) == ["B"]
        assert corpus.study_names({"offset": "10"}) == []

    def test_a_limit_that_cuts_the_answer_says_so(self, corpus: Corpus) -> None:
        # PS3.18 8.3.4.4: more results than the limit are announced in a Warning.
        cut = corpus.query("/studies", {"limit": "2"})
        assert "There are additional results that can be requested" in cut.headers["Warning"]
        for whole in ({"limit": "4"}, {"limit": "2", "offset": "2"}, {}):
            assert "Warning" not in corpus.query("/studies", whole).headers, whole

    def test_an_ignored_key_with_control_characters_is_echoed_safely_not_cut(
        self, corpus: Corpus
    ) -> None:
        # The ignored keys are named in a Warning: a key holding what a header cannot
        # carry (a control character, a quote) must not cut the answer off.
        answer = corpus.query("/studies", {'\x1fBad"Key\\': "x", "limit": "1"})
        assert answer.status_code == 200 and len(answer.json()) == 1
        ignored = [w for w in answer.headers["Warning"].split(", 299") if "ignored" in w]
        assert ignored and '?Bad?Key?"' in ignored[0]

    def test_malformed_paging_is_refused(self, corpus: Corpus) -> None:
        for params in ({"limit": "-1"}, {"offset": "x"}, {"limit": "1.5"}, {"limit": "²"}):
            assert corpus.query("/studies", params).status_code == 400


class TestXml:
    def test_search_in_xml_is_one_native_dicom_model_part_per_result(self, corpus: Corpus) -> None:
        response = requests.get(
            corpus.node.url + "/dicomweb/studies",
            params={"limit": "2"},
            headers={
                **corpus.node.auth,
                "Accept": 'multipart/related; type="application/dicom+xml"',
            },
            timeout=10,
        )
        assert response.status_code == 200
        content_type = response.headers["Content-Type"]
        assert content_type.startswith('multipart/related; type="application/dicom+xml"')
        assert "additional results" in response.headers["Warning"]
        boundary = content_type.split("boundary=")[1].encode()
        parts = response.content.split(b"--" + boundary)[1:-1]
        roots = [ElementTree.fromstring(p.partition(b"\r\n\r\n")[2]) for p in parts]
        uids = [r.findtext("DicomAttribute[@tag='0020000D']/Value") for r in roots]
        as_json = corpus.found("/studies", {"limit": "2"})
        assert uids == [r["0020000D"]["Value"][0] for r in as_json]


class TestJsonModel:
    def test_person_name_component_groups(self) -> None:
        value = attribute(0x00100010, "Yamada^Tarou=山田^太郎=やまだ^たろう")
        assert value == {
            "vr": "PN",
            "Value": [
                {
                    "Alphabetic": "Yamada^Tarou",
                    "Ideographic": "山田^太郎",
                    "Phonetic": "やまだ^たろう",
                }
            ],
        }

    def test_numbers_are_json_numbers_and_empty_values_have_no_value(self) -> None:
        assert attribute(0x00201208, "12") == {"vr": "IS", "Value": [12]}
        assert attribute(0x00280030, ["0.5", "0.75"]) == {"vr": "DS", "Value": [0.5, 0.75]}
        assert attribute(0x00100020, "") == {"vr": "LO"}

    def test_empty_values_inside_a_multi_valued_attribute_are_null(self) -> None:
        # PS3.18 F.2.5: an empty value among others is null, not "" nor left out.
        assert attribute(0x00080008, ["ORIGINAL", "", "AXIAL"]) == {
            "vr": "CS",
            "Value": ["ORIGINAL", None, "AXIAL"],
        }
        assert attribute(0x00280030, ["0.5", ""]) == {"vr": "DS", "Value": [0.5, None]}
        assert attribute(0x00080008, ["", ""]) == {"vr": "CS"}
