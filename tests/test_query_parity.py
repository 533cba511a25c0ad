"""One query engine: QIDO-RS and C-FIND give the same answer to every matching case.

Every case runs through both front ends called directly (``parse_qido`` and
``dimse_query.find`` over an in-process store) and through a real node: QIDO-RS over
HTTP and C-FIND with DCMTK's ``findscu``. The four rows that used to differ
(undated studies in a date range, a time of lower precision, a fractional second at a
range's bound, letter case in a description) are among the cases.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from node.errors import BadInput, PayloadTooLarge
from node.samples import make_ct_study
from node.services.dimse_query import Model, find
from node.services.ingest import import_files
from node.store import queries
from node.store.attributes import Level
from node.store.instances import SqliteInstanceStore
from node.store.queries import parse_qido
from tests.support.nodes import NodeProcess, init_node

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

# name -> attributes written into every instance of the study (one series per modality).
STUDIES: dict[str, dict[str, Any]] = {
    "morning": {
        "StudyDate": "20191231",
        "StudyTime": "083000",
        "StudyDescription": "chest CT",
        "PatientName": "Doe^Jane",
        "PatientID": "P-1",
        "PatientBirthDate": "19700101",
        "PatientSex": "F",
        "AccessionNumber": "A-1",
        "ReferringPhysicianName": "House^Gregory",
        "StudyID": "7",
        "SeriesDescription": "Axial",
        "SeriesDate": "20191231",
        "SeriesTime": "0831",
        "BodyPartExamined": "CHEST",
        "modalities": ["CT"],
    },
    "one_pm": {
        "StudyDate": "20200101",
        "StudyTime": "130000",
        "StudyDescription": "Chest CT",
        "PatientName": "DOE^JOHN",
        "PatientID": "P-2",
        "PatientBirthDate": "19800101",
        "PatientSex": "M",
        "AccessionNumber": "A[1]",
        "SeriesDescription": "axial",
        "SeriesDate": "20200101",
        "SeriesTime": "1301",
        "BodyPartExamined": "chest",
        "modalities": ["MR", "PT"],
    },
    "one_pm_and_a_half_second": {
        "PatientBirthDate": "19900101",
        "StudyDate": "20200102",
        "StudyTime": "130059.5",
        "StudyDescription": "CHEST PA",
        "PatientName": "Smith^Anna",
        "PatientID": "Q-3",
        "modalities": ["CT"],
    },
    "half_past_one": {
        "PatientBirthDate": "19600101",
        "StudyDate": "20200615",
        "StudyTime": "1330",
        "StudyDescription": "chest x-ray",
        "PatientName": "Smyth^Ann",
        "PatientID": "Q-4",
        "modalities": ["CR"],
    },
    "afternoon": {
        "PatientBirthDate": "",
        "StudyDate": "20210301",
        "StudyTime": "140000",
        "StudyDescription": "Abdomen",
        "PatientName": "MÜLLER^JÖRG",
        "PatientID": "Q-5",
        "modalities": ["CT"],
    },
    "undated": {
        "PatientBirthDate": "19500101",
        "StudyDate": "",
        "StudyTime": "",
        "StudyDescription": "Head",
        "PatientName": "Roe^Richard",
        "PatientID": "Q-6",
        "modalities": ["MR"],
    },
}
EVERY = frozenset(STUDIES)


@dataclass(frozen=True)
class Case:
    level: Level
    keyword: str
    values: tuple[str, ...]  # several: a list (UIDs, modalities)
    expected: frozenset[str]  # the studies of the matching studies, series or instances

    def __str__(self) -> str:
        return f"{self.level.name.lower()}:{self.keyword}={'|'.join(self.values)}"


def case(keyword: str, value: str | tuple[str, ...], *expected: str) -> Case:
    return case_at(Level.STUDY, keyword, value, *expected)


def case_at(level: Level, keyword: str, value: str | tuple[str, ...], *expected: str) -> Case:
    values = value if isinstance(value, tuple) else (value,)
    return Case(level, keyword, values, frozenset(expected))


# The rows that used to differ between C-FIND and QIDO-RS, each with its one answer.
CHANGED_ROWS = [
    # PS3.4 C.2.2.2.5.1: "-Y" matches dates up to Y; an undated study has no such date.
    case("StudyDate", "-20200101", "morning", "one_pm"),
    # A TM value stands for its precision: 13 is 13:00:00 to 13:59:59.999999.
    case("StudyTime", "13", "one_pm", "one_pm_and_a_half_second", "half_past_one"),
    # ... so the bound 130059 includes every fraction of that second.
    case("StudyTime", "-130059", "morning", "one_pm", "one_pm_and_a_half_second"),
    # PS3.4 C.2.2.2.4: wildcard matching is case-sensitive except for PN.
    case("StudyDescription", "chest*", "morning", "half_past_one"),
]
CASES = [
    *CHANGED_ROWS,
    case("StudyDate", "20200101", "one_pm"),
    case("StudyDate", "20200101-20200615", "one_pm", "one_pm_and_a_half_second", "half_past_one"),
    case("StudyDate", "20200616-", "afternoon"),
    case("StudyDate", "*", *EVERY),
    case("StudyTime", "1300-1330", "one_pm", "one_pm_and_a_half_second", "half_past_one"),
    case("StudyTime", "1330-", "half_past_one", "afternoon"),
    case("StudyTime", "130059.5", "one_pm_and_a_half_second"),
    case("StudyTime", "0830", "morning"),
    case("StudyDescription", "Chest CT", "one_pm"),
    case("StudyDescription", "chest ct"),
    case("StudyDescription", "*CT", "morning", "one_pm"),
    case("StudyDescription", "CHEST???", "one_pm_and_a_half_second"),
    case("PatientName", "doe*", "morning", "one_pm"),
    case("PatientName", "*^J*", "morning", "one_pm", "afternoon"),
    case("PatientName", "sm?th^ann*", "one_pm_and_a_half_second", "half_past_one"),
    case("PatientName", "müller^jörg", "afternoon"),
    case("PatientName", "Doe"),
    case("ReferringPhysicianName", "house*", "morning"),
    case("PatientID", "P-1", "morning"),
    case("PatientID", "p-1"),
    case("PatientID", "P-?", "morning", "one_pm"),
    case("PatientID", "*", *EVERY),
    case("PatientID", "P%"),
    case("PatientBirthDate", "-19751231", "morning", "half_past_one", "undated"),
    case("PatientSex", "M", "one_pm"),
    case("AccessionNumber", "A[1]", "one_pm"),
    case("AccessionNumber", "A[*", "one_pm"),
    case("StudyID", "7", "morning"),
    case("ModalitiesInStudy", "PT", "one_pm"),
    case("ModalitiesInStudy", ("CR", "PT"), "one_pm", "half_past_one"),
    case(
        "ModalitiesInStudy",
        "C?",
        *("morning", "one_pm_and_a_half_second", "half_past_one", "afternoon"),
    ),
    case_at(Level.SERIES, "Modality", "PT", "one_pm"),
    case_at(Level.SERIES, "Modality", ("MR", "CR"), "one_pm", "half_past_one", "undated"),
    case_at(Level.SERIES, "Modality", "c?"),
    case_at(Level.SERIES, "SeriesNumber", "2", "one_pm"),
    case_at(Level.SERIES, "SeriesDescription", "axial", "one_pm"),
    case_at(Level.SERIES, "SeriesDescription", "Ax*", "morning"),
    case_at(Level.SERIES, "BodyPartExamined", "CHEST", "morning"),
    case_at(Level.SERIES, "SeriesDate", "-20200101", "morning", "one_pm"),
    case_at(Level.SERIES, "SeriesTime", "13", "one_pm"),
    case_at(Level.SERIES, "PatientID", "P-?", "morning", "one_pm"),
    case_at(Level.INSTANCE, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2", *EVERY),
    case_at(Level.INSTANCE, "InstanceNumber", "1", *EVERY),
    case_at(Level.INSTANCE, "InstanceNumber", "2"),
    case_at(Level.INSTANCE, "Rows", "8", *EVERY),
    case_at(
        Level.INSTANCE, "StudyTime", "13", "one_pm", "one_pm_and_a_half_second", "half_past_one"
    ),
]
# C-FIND calls the instance level IMAGE.
CFIND_LEVELS = {Level.STUDY: "STUDY", Level.SERIES: "SERIES", Level.INSTANCE: "IMAGE"}
QIDO_PATHS = {Level.STUDY: "/studies", Level.SERIES: "/series", Level.INSTANCE: "/instances"}


def write_corpus(directory: Path) -> dict[str, str]:
    """The studies of STUDIES as files under ``directory``; returns name -> study UID."""
    uids = {}
    for n, (name, attributes) in enumerate(STUDIES.items()):
        modalities = attributes["modalities"]
        study = make_ct_study(
            directory / name, series=len(modalities), slices=1, rows=8, columns=8, seed=n + 1
        )
        for path in study.files:
            ds = pydicom.dcmread(path)
            for keyword, value in attributes.items():
                if keyword != "modalities":
                    setattr(ds, keyword, value)
            ds.Modality = modalities[int(ds.SeriesNumber) - 1]
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.save_as(path)
        uids[name] = study.study_uid
    return uids


@dataclass
class Corpus:
    uids: dict[str, str]
    store: SqliteInstanceStore
    node: NodeProcess
    out: Path
    runs: Iterator[int] = field(default_factory=itertools.count)

    def names(self, study_uids: list[str]) -> frozenset[str]:
        by_uid = {uid: name for name, uid in self.uids.items()}
        return frozenset(by_uid[uid] for uid in study_uids)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    base = tmp_path_factory.mktemp("parity")
    uids = write_corpus(base / "in")
    files = sorted((base / "in").rglob("*.dcm"))
    store = SqliteInstanceStore(base / "direct")
    import_files(store, files)
    node = init_node(base / "node", "parity.example/imageshare")
    allow_findscu(node)
    node.cli("import", str(base / "in"))
    node.start()
    try:
        yield Corpus(uids, store, node, base / "out")
    finally:
        node.stop()
        store.close()


# -- the four ways to ask -------------------------------------------------------------------


def qido_direct(corpus: Corpus, c: Case) -> frozenset[str]:
    query = parse_qido(c.level, [(c.keyword, ",".join(c.values))])
    return corpus.names([r["StudyInstanceUID"] for r in corpus.store.search(query).rows])


def cfind_direct(corpus: Corpus, c: Case) -> frozenset[str]:
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.QueryRetrieveLevel = CFIND_LEVELS[c.level]
    identifier.StudyInstanceUID = ""
    setattr(identifier, c.keyword, list(c.values) if len(c.values) > 1 else c.values[0])
    found = find(corpus.store, identifier, Model.STUDY_ROOT)
    return corpus.names([r.StudyInstanceUID for r in found])


def qido_http(corpus: Corpus, c: Case) -> frozenset[str]:
    response = requests.get(
        corpus.node.url + "/dicomweb" + QIDO_PATHS[c.level],
        params={c.keyword: ",".join(c.values)},
        headers=corpus.node.auth,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return corpus.names([r["0020000D"]["Value"][0] for r in response.json()])


FINDSCU_AE = "FINDSCU"


def allow_findscu(node: NodeProcess) -> None:
    """Make this test's findscu a configured query/retrieve caller of ``node``."""
    node.append_config(f'[[dimse.callers]]\nae_title = "{FINDSCU_AE}"\nhost = "127.0.0.1"\n')


def findscu(node: NodeProcess, out: Path, *keys: str, level: str = "STUDY") -> list[Dataset]:
    """C-FIND (Study Root) with DCMTK's findscu; the response identifiers."""
    out.mkdir(parents=True)
    fixed = [f"QueryRetrieveLevel={level}", "StudyInstanceUID", "SpecificCharacterSet=ISO_IR 192"]
    key_args = [a for k in (*fixed, *keys) for a in ("-k", k)]
    peer = ["-aet", FINDSCU_AE, "-aec", "IMAGESHARE", "127.0.0.1", str(node.dimse_port)]
    result = subprocess.run(
        ["findscu", "-S", *peer, "-X", "-od", str(out), *key_args],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def cfind_findscu(corpus: Corpus, c: Case) -> frozenset[str]:
    out = corpus.out / f"find-{next(corpus.runs)}"
    values = "\\".join(c.values)  # DCMTK reads a backslash as the value separator
    found = findscu(corpus.node, out, f"{c.keyword}={values}", level=CFIND_LEVELS[c.level])
    return corpus.names([r.StudyInstanceUID for r in found])


FRONT_ENDS: dict[str, Callable[[Corpus, Case], frozenset[str]]] = {
    "qido": qido_direct,
    "c-find": cfind_direct,
    "qido over http": qido_http,
    "findscu": cfind_findscu,
}


class TestParity:
    @pytest.mark.parametrize("front_end", list(FRONT_ENDS))
    @pytest.mark.parametrize("c", CASES, ids=str)
    def test_every_front_end_finds_the_same_studies(
        self, corpus: Corpus, c: Case, front_end: str
    ) -> None:
        assert FRONT_ENDS[front_end](corpus, c) == c.expected

    @pytest.mark.parametrize("front_end", list(FRONT_ENDS))
    def test_every_front_end_matches_a_list_of_study_uids(
        self, corpus: Corpus, front_end: str
    ) -> None:
        wanted = ("morning", "afternoon")
        uids = tuple(corpus.uids[name] for name in wanted)
        for level in (Level.STUDY, Level.INSTANCE):
            c = Case(level, "StudyInstanceUID", uids, frozenset(wanted))
            assert FRONT_ENDS[front_end](corpus, c) == c.expected


class TestOneRuleForValues:
    """Values are checked once, so both front ends refuse the same malformed ones."""

    @pytest.mark.parametrize(
        ("keyword", "value"),
        [
            ("StudyDate", "2020-01-01"),
            ("StudyDate", "yesterday"),
            ("StudyDate", "-"),
            ("StudyDate", "٢٠٢٠٠١٠١"),  # digits, but not ASCII ones
            ("StudyTime", "1pm"),
            ("StudyTime", "130"),
            ("StudyInstanceUID", "not-a-uid"),
        ],
    )
    def test_malformed_values_are_refused_by_both_front_ends(
        self, corpus: Corpus, keyword: str, value: str
    ) -> None:
        with pytest.raises(BadInput, match=keyword):
            parse_qido(Level.STUDY, [(keyword, value)])
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        setattr(identifier, keyword, value)
        with pytest.raises(BadInput, match=keyword):
            list(find(corpus.store, identifier, Model.STUDY_ROOT))

    def test_an_unmatchable_key_is_ignored_by_qido_rs_but_refused_by_c_find(
        self, corpus: Corpus
    ) -> None:
        # PS3.18 lets QIDO-RS ignore a key it cannot match (saying so in a Warning);
        # C-FIND has no such answer, so the query is refused there.
        query = parse_qido(Level.STUDY, [("NumberOfStudyRelatedSeries", "2")])
        assert query.ignored == ["NumberOfStudyRelatedSeries"] and not query.filters
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.NumberOfStudyRelatedSeries = "2"
        with pytest.raises(BadInput, match="NumberOfStudyRelatedSeries"):
            list(find(corpus.store, identifier, Model.STUDY_ROOT))

    def test_c_find_with_a_malformed_date_fails_with_a900_and_the_node_keeps_answering(
        self, corpus: Corpus
    ) -> None:
        ae = AE(ae_title=FINDSCU_AE)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", corpus.node.dimse_port, ae_title="IMAGESHARE")
        assert assoc.is_established
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyDate = "2020-01-01"
            answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        finally:
            assoc.release()
        assert [status.Status for status, _ in answers] == [0xA900]
        assert "StudyDate" in answers[0][0].ErrorComment
        found = findscu(corpus.node, corpus.out / "after-refusal", "PatientID=P-1")
        assert [r.StudyInstanceUID for r in found] == [corpus.uids["morning"]]


class TestOneCap:
    def test_c_find_beyond_the_cap_is_refused_as_out_of_resources(
        self, corpus: Corpus, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(queries, "MAX_RESULTS", len(STUDIES) - 1)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ""
        with pytest.raises(PayloadTooLarge):
            list(find(corpus.store, identifier, Model.STUDY_ROOT))
        monkeypatch.setattr(queries, "MAX_RESULTS", len(STUDIES))
        assert len(list(find(corpus.store, identifier, Model.STUDY_ROOT))) == len(STUDIES)


def add_bare_studies(node: NodeProcess, count: int) -> None:
    """Index rows for ``count`` studies without files (enough for study-level queries)."""
    with sqlite3.connect(node.data_dir / "index.sqlite") as conn:
        conn.executemany(
            "INSERT INTO studies (study_instance_uid, patient_id, study_date, source)"
            " VALUES (?, 'BULK', '20200101', 'local')",
            [(f"1.2.3.{n}",) for n in range(count)],
        )


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node whose index holds one study more than an answer may hold."""
    base = tmp_path_factory.mktemp("crowded")
    study = make_ct_study(base / "in", series=1, slices=1, rows=8, columns=8)
    node = init_node(base / "node", "crowded.example/imageshare")
    allow_findscu(node)
    node.cli("import", str(study.files[0].parent))
    add_bare_studies(node, queries.MAX_RESULTS)
    node.start()
    yield node
    node.stop()


class TestOneCapOnARealNode:
    def test_c_find_over_the_cap_fails_with_a700_while_qido_pages(
        self, crowded: NodeProcess
    ) -> None:
        ae = AE(ae_title=FINDSCU_AE)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", crowded.dimse_port, ae_title="IMAGESHARE")
        assert assoc.is_established
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
            query.PatientID = "BULK"
            query.StudyInstanceUID = "1.2.3.7"
            narrowed = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        finally:
            assoc.release()
        assert [status.Status for status, _ in answers] == [0xA700]
        assert "narrow the query" in answers[0][0].ErrorComment
        assert [status.Status for status, _ in narrowed] == [0xFF00, 0x0000]
        response = requests.get(crowded.url + "/dicomweb/studies", headers=crowded.auth, timeout=60)
        assert response.status_code == 200
        assert len(response.json()) == queries.MAX_RESULTS
        assert "additional results" in response.headers["Warning"]


class TestStudyList:
    """The dashboard's study search runs on the same engine."""

    def studies(self, corpus: Corpus, q: str) -> frozenset[str]:
        listed = corpus.node.get_json(f"/admin/api/studies?q={requests.utils.quote(q)}")
        assert listed["total"] == len(listed["studies"])
        return corpus.names([s["study_instance_uid"] for s in listed["studies"]])

    def test_words_match_in_any_case_anywhere_in_the_searched_attributes(
        self, corpus: Corpus
    ) -> None:
        assert self.studies(corpus, "CHEST") == {
            "morning",
            "one_pm",
            "one_pm_and_a_half_second",
            "half_past_one",
        }
        assert self.studies(corpus, "chest doe") == {"morning", "one_pm"}
        assert self.studies(corpus, "müller") == {"afternoon"}
        assert self.studies(corpus, "2020061") == {"half_past_one"}

    def test_sql_pattern_characters_are_literal(self, corpus: Corpus) -> None:
        assert self.studies(corpus, "%") == frozenset()
        assert self.studies(corpus, "A_1") == frozenset()
        assert self.studies(corpus, "A[1]") == {"one_pm"}

    def test_each_study_comes_with_its_counts_size_and_origin(self, corpus: Corpus) -> None:
        listed = corpus.node.get_json("/admin/api/studies?q=P-2")
        [study] = listed["studies"]
        assert study["modalities"] == "MR,PT"
        assert (study["series"], study["instances"], study["source"]) == (2, 2, "local")
        assert study["bytes"] > 0 and study["created_at"] > 0


def test_the_node_keeps_serving_after_refusals(corpus: Corpus) -> None:
    for value in ("2020-01-01", "-", "x" * 5000):
        response = requests.get(
            corpus.node.url + "/dicomweb/studies",
            params={"StudyDate": value},
            headers=corpus.node.auth,
            timeout=10,
        )
        assert response.status_code == 400
    assert qido_http(corpus, CASES[0]) == CASES[0].expected
