"""The instance store and its QIDO queries, in process: staging, commits, refusals, search."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.errors import BadInput, PayloadTooLarge
from node.samples import SyntheticStudy, make_ct_study
from node.store import queries
from node.store.attributes import Level
from node.store.instances import InstanceStore, Outcome
from node.store.queries import parse_qido, run_query


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InstanceStore]:
    opened = InstanceStore(tmp_path / "node", max_instance_bytes=256 * 1024)
    yield opened
    opened.close()


@pytest.fixture
def study(tmp_path: Path) -> SyntheticStudy:
    return make_ct_study(tmp_path / "study", series=2, slices=2, rows=16, columns=16)


def commit_files(store: InstanceStore, files: list[Path]) -> list[Outcome]:
    staged = [store.stage(io.BytesIO(path.read_bytes())) for path in files]
    return [result.outcome for result in store.commit(staged)]


class TestStagingAndCommit:
    def test_committed_instance_is_indexed_under_its_digest(
        self, store: InstanceStore, study: SyntheticStudy
    ) -> None:
        assert commit_files(store, study.files) == [Outcome.STORED] * 4
        record = store.instance(study.sop_uids[0])
        data = study.files[0].read_bytes()
        assert record.digest == hashlib.sha256(data).hexdigest()
        assert record.path.read_bytes() == data
        assert store.counts()["instances"] == 4
        assert list(store.tmp_dir.iterdir()) == []

    def test_recommitting_reports_duplicates_and_keeps_one_copy(
        self, store: InstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        assert commit_files(store, study.files) == [Outcome.DUPLICATE] * 4
        assert store.counts()["instances"] == 4
        assert list(store.tmp_dir.iterdir()) == []

    def test_bad_input_is_refused_without_leftovers(
        self, store: InstanceStore, study: SyntheticStudy
    ) -> None:
        data = study.files[0].read_bytes()
        for bad in (b"not dicom" * 50, data[: len(data) // 2]):
            with pytest.raises(BadInput):
                store.stage(io.BytesIO(bad))
        with pytest.raises(PayloadTooLarge):
            store.stage(io.BytesIO(data + b"\0" * 300 * 1024))
        assert list(store.tmp_dir.iterdir()) == []
        assert store.counts()["instances"] == 0

    def test_staged_but_uncommitted_files_vanish_on_reopen(
        self, tmp_path: Path, study: SyntheticStudy
    ) -> None:
        first = InstanceStore(tmp_path / "node")
        first.stage(io.BytesIO(study.files[0].read_bytes()))
        first.close()
        reopened = InstanceStore(tmp_path / "node")
        try:
            assert list(reopened.tmp_dir.iterdir()) == []
            assert reopened.counts()["instances"] == 0
        finally:
            reopened.close()


class TestQueries:
    def test_study_query_counts_series_and_instances(
        self, store: InstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        [row] = run_query(store.reader, parse_qido(Level.STUDY, [])).rows
        assert row["StudyInstanceUID"] == study.study_uid
        assert row["NumberOfStudyRelatedSeries"] == 2
        assert row["NumberOfStudyRelatedInstances"] == 4
        assert row["ModalitiesInStudy"] == ["CT"]

    def test_instance_query_scoped_by_series(
        self, store: InstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        query = parse_qido(
            Level.INSTANCE, [], study_uid=study.study_uid, series_uid=study.series_uids[1]
        )
        rows = run_query(store.reader, query).rows
        assert [r["SOPInstanceUID"] for r in rows] == study.sop_uids[2:]
        assert rows[0]["SeriesInstanceUID"] == study.series_uids[1]

    @pytest.mark.parametrize(
        "params",
        [
            [("PatientID", "a"), ("PatientID", "b")],
            [("StudyDate", "2026")],
            [("limit", "ten")],
            [("SeriesInstanceUID", "1.2")],
            [("includefield", "NotAKeyword")],
            [("00100020x", "1")],
        ],
    )
    def test_malformed_queries_are_refused(self, params: list[tuple[str, str]]) -> None:
        with pytest.raises(BadInput):
            parse_qido(Level.STUDY, params)

    def test_wildcards_are_not_sql_patterns(
        self, store: InstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        for value in ("MRN%", "MRN_0001", "[M]RN-0001"):
            query = parse_qido(Level.STUDY, [("PatientID", value)])
            assert run_query(store.reader, query).rows == []
        query = parse_qido(Level.STUDY, [("PatientID", "MRN-000?")])
        assert len(run_query(store.reader, query).rows) == 1

    def test_answers_are_capped_and_say_so(
        self, store: InstanceStore, study: SyntheticStudy, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        commit_files(store, study.files)
        monkeypatch.setattr(queries, "MAX_RESULTS", 3)
        capped = run_query(store.reader, parse_qido(Level.INSTANCE, []))
        assert (len(capped.rows), capped.truncated) == (3, True)
        asked = run_query(store.reader, parse_qido(Level.INSTANCE, [("limit", "2")]))
        assert (len(asked.rows), asked.truncated) == (2, False)
        rest = run_query(store.reader, parse_qido(Level.INSTANCE, [("offset", "3")]))
        assert (len(rest.rows), rest.truncated) == (1, False)
