"""The instance store and its QIDO queries, in process: staging, commits, refusals, search."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.errors import BadInput, PayloadTooLarge
from node.samples import SyntheticStudy, make_ct_study
from node.store import queries
from node.store.attributes import Level
from node.store.instances import Outcome, SqliteInstanceStore
from node.store.protocols import InstanceStore
from node.store.queries import parse_qido
from tests.support import faults


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteInstanceStore]:
    opened = SqliteInstanceStore(tmp_path / "node", max_instance_bytes=256 * 1024)
    yield opened
    opened.close()


@pytest.fixture
def study(tmp_path: Path) -> SyntheticStudy:
    return make_ct_study(tmp_path / "study", series=2, slices=2, rows=16, columns=16)


def commit_files(store: SqliteInstanceStore, files: list[Path]) -> list[Outcome]:
    staged = [store.stage(io.BytesIO(path.read_bytes())) for path in files]
    return [result.outcome for result in store.commit(staged)]


class TestStagingAndCommit:
    def test_committed_instance_is_indexed_under_its_digest(
        self, store: SqliteInstanceStore, study: SyntheticStudy
    ) -> None:
        assert commit_files(store, study.files) == [Outcome.STORED] * 4
        record = store.instance(study.sop_uids[0])
        data = study.files[0].read_bytes()
        assert record.digest == hashlib.sha256(data).hexdigest()
        assert record.path.read_bytes() == data
        assert store.counts()["instances"] == 4
        assert list(store.tmp_dir.iterdir()) == []

    def test_recommitting_reports_duplicates_and_keeps_one_copy(
        self, store: SqliteInstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        assert commit_files(store, study.files) == [Outcome.DUPLICATE] * 4
        assert store.counts()["instances"] == 4
        assert list(store.tmp_dir.iterdir()) == []

    def test_bad_input_is_refused_without_leftovers(
        self, store: SqliteInstanceStore, study: SyntheticStudy
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
        first = SqliteInstanceStore(tmp_path / "node")
        first.stage(io.BytesIO(study.files[0].read_bytes()))
        first.close()
        reopened = SqliteInstanceStore(tmp_path / "node")
        try:
            assert list(reopened.tmp_dir.iterdir()) == []
            assert reopened.counts()["instances"] == 0
        finally:
            reopened.close()


class TestUnconfirmedAtStartUp:
    """A commit indexes an instance while its file's fsync runs; a stop in between leaves
    it named in ``unconfirmed``, settled when the store next opens."""

    def test_a_commit_returns_with_nothing_left_unconfirmed(
        self, store: SqliteInstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files[:1])  # one instance: its own fsync
        commit_files(store, study.files[1:])  # a batch: one file-system sync
        assert faults.store_problems(store.data_dir) == []

    def test_a_damaged_unconfirmed_instance_loses_its_row_and_file_with_an_error_logged(
        self, tmp_path: Path, study: SyntheticStudy, caplog: pytest.LogCaptureFixture
    ) -> None:
        data_dir = tmp_path / "node"
        first = SqliteInstanceStore(data_dir)
        commit_files(first, study.files)
        first.close()
        lost, kept, old = study.sop_uids[0], study.sop_uids[1], study.sop_uids[2]
        lost_file = faults.leave_unconfirmed(data_dir, lost, damage=True)
        faults.leave_unconfirmed(data_dir, kept, damage=False)
        # A confirmed row whose file went bad later is no start-up's business.
        old_digest = faults.indexed_digests(data_dir)[old]
        old_file = data_dir / "objects" / old_digest[:2] / f"{old_digest}.dcm"
        old_file.write_bytes(b"damaged after it was durable")

        reopened = SqliteInstanceStore(data_dir)
        try:
            assert not reopened.has_instance(lost)
            assert not lost_file.exists()
            assert reopened.has_instance(kept) and reopened.has_instance(old)
            assert reopened.instance(kept).path.read_bytes() == study.files[1].read_bytes()
            assert [r.message for r in caplog.records if lost in r.message] == [
                f"instance {lost} was indexed but its file {lost_file.name} is missing or"
                " damaged (the node stopped before it was durable, so it was never"
                " acknowledged): its index row is removed"
            ]
            assert faults.store_problems(data_dir) == [
                f"{old}: its file does not match its index row"
            ]
            # Sent again, the lost instance is stored again.
            assert commit_files(reopened, study.files[:1]) == [Outcome.STORED]
        finally:
            reopened.close()

    def test_a_study_whose_only_instance_is_lost_leaves_no_study_or_series_row(
        self, tmp_path: Path, study: SyntheticStudy
    ) -> None:
        data_dir = tmp_path / "node"
        first = SqliteInstanceStore(data_dir)
        commit_files(first, study.files[:1])
        first.close()
        faults.leave_unconfirmed(data_dir, study.sop_uids[0], damage=True).unlink()
        reopened = SqliteInstanceStore(data_dir)
        try:
            assert reopened.counts() == {"studies": 0, "series": 0, "instances": 0, "bytes": 0}
        finally:
            reopened.close()

    def test_arrivals_stop_before_the_first_unconfirmed_instance(
        self, store: SqliteInstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        faults.leave_unconfirmed(store.data_dir, study.sop_uids[2], damage=False)
        assert [a.sop_instance_uid for a in store.arrivals_after(0, 10)] == study.sop_uids[:2]


class TestQueries:
    def test_study_query_counts_series_and_instances(
        self, store: SqliteInstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        [row] = store.search(parse_qido(Level.STUDY, [])).rows
        assert row["StudyInstanceUID"] == study.study_uid
        assert row["NumberOfStudyRelatedSeries"] == 2
        assert row["NumberOfStudyRelatedInstances"] == 4
        assert row["ModalitiesInStudy"] == ["CT"]

    def test_instance_query_scoped_by_series(
        self, store: SqliteInstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        query = parse_qido(
            Level.INSTANCE, [], study_uid=study.study_uid, series_uid=study.series_uids[1]
        )
        rows = store.search(query).rows
        assert [r["SOPInstanceUID"] for r in rows] == study.sop_uids[2:]
        assert rows[0]["SeriesInstanceUID"] == study.series_uids[1]

    @pytest.mark.parametrize(
        "params",
        [
            [("PatientID", "a"), ("PatientID", "b")],
            [("StudyDate", "2026")],
            [("limit", "ten")],
            [("includefield", "NotAKeyword")],
        ],
    )
    def test_malformed_queries_are_refused(self, params: list[tuple[str, str]]) -> None:
        with pytest.raises(BadInput):
            parse_qido(Level.STUDY, params)

    @pytest.mark.parametrize(
        ("params", "ignored"),
        [
            ([("SeriesInstanceUID", "1.2")], ["SeriesInstanceUID"]),  # not a study-level key
            ([("00100020x", "1")], ["00100020x"]),  # names no attribute
        ],
    )
    def test_keys_a_study_search_cannot_match_are_ignored_by_name(
        self, params: list[tuple[str, str]], ignored: list[str]
    ) -> None:
        # PS3.18 8.3.4.1 lets the server ignore them; QIDO-RS names them in a Warning.
        assert parse_qido(Level.STUDY, params).ignored == ignored

    def test_wildcards_are_not_sql_patterns(
        self, store: SqliteInstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        for value in ("MRN%", "MRN_0001", "[M]RN-0001"):
            query = parse_qido(Level.STUDY, [("PatientID", value)])
            assert store.search(query).rows == []
        query = parse_qido(Level.STUDY, [("PatientID", "MRN-000?")])
        assert len(store.search(query).rows) == 1

    def test_answers_are_capped_and_say_so(
        self, store: SqliteInstanceStore, study: SyntheticStudy, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        commit_files(store, study.files)
        monkeypatch.setattr(queries, "MAX_RESULTS", 3)
        capped = store.search(parse_qido(Level.INSTANCE, []))
        assert (len(capped.rows), capped.truncated) == (3, True)
        # A limit that leaves matches out says so too (PS3.18 8.3.4.4).
        asked = store.search(parse_qido(Level.INSTANCE, [("limit", "2")]))
        assert (len(asked.rows), asked.truncated) == (2, True)
        rest = store.search(parse_qido(Level.INSTANCE, [("offset", "3")]))
        assert (len(rest.rows), rest.truncated) == (1, False)


class TestIndexReads:
    """The store's named reads, which services use instead of SQL."""

    def test_the_sqlite_store_is_the_protocol_services_see(
        self, store: SqliteInstanceStore
    ) -> None:
        assert isinstance(store, InstanceStore)

    def test_studies_of_patient_by_date_leaving_out_a_source_by_exact_prefix(
        self, store: SqliteInstanceStore, tmp_path: Path
    ) -> None:
        dates = ("20260301", "20250101", "20260101")
        studies = [
            make_ct_study(tmp_path / d, series=1, slices=1, rows=8, columns=8, study_date=d)
            for d in dates
        ]
        for study in studies:
            commit_files(store, study.files)
        later, earlier, middle = (s.study_uid for s in studies)
        store.set_study_source(later, "fetched from a.example under token 00")
        store.set_study_source(middle, "fetchedXfrom b.example")  # not the prefix
        assert store.studies_of_patient("MRN-0001") == [earlier, middle, later]
        assert store.studies_of_patient("MRN-0001", "fetched from ") == [earlier, middle]
        # The prefix is text, not a pattern: '_' does not stand for any character.
        assert store.studies_of_patient("MRN-0001", "fetched_from") == [earlier, middle, later]
        assert store.studies_of_patient("MRN-0002") == []

    def test_patient_ids_are_distinct_and_skip_studies_without_one(
        self, store: SqliteInstanceStore, tmp_path: Path
    ) -> None:
        for name, patient in (("a", "MRN-1"), ("b", "MRN-1"), ("c", "MRN-2"), ("d", "")):
            study = make_ct_study(tmp_path / name, 1, 1, 8, 8, patient_id=patient)
            commit_files(store, study.files)
        assert sorted(store.patient_ids()) == ["MRN-1", "MRN-2"]
        assert len(store.study_uids()) == 4

    def test_series_of_study_and_instance_count(
        self, store: SqliteInstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        series = store.series_of_study(study.study_uid)
        assert [s.series_instance_uid for s in series] == study.series_uids
        assert {s.modality for s in series} == {"CT"}
        assert store.instance_count(study.study_uid) == 4
        assert store.series_of_study("1.2.3") == []
        assert store.instance_count("1.2.3") == 0

    def test_studies_with_digests_across_pieces_of_a_long_list(
        self, store: SqliteInstanceStore, study: SyntheticStudy, tmp_path: Path
    ) -> None:
        other = make_ct_study(tmp_path / "other", series=1, slices=1, rows=8, columns=8)
        commit_files(store, study.files + other.files)
        mine = store.instances(study.study_uid)[0].digest
        theirs = store.instances(other.study_uid)[0].digest
        unknown = [f"{n:064x}" for n in range(1200)]
        digests = [mine, *unknown[:600], mine, theirs, *unknown[600:]]
        assert store.studies_with_digests(digests) == [study.study_uid, other.study_uid]
        assert store.digests_present(digests) == {mine, theirs}
        assert store.studies_with_digests(unknown) == []

    def test_arrivals_after_follow_the_indexing_order_from_a_position(
        self, store: SqliteInstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)
        arrivals = store.arrivals_after(0, 10)
        assert [a.sop_instance_uid for a in arrivals] == study.sop_uids
        assert {a.study_instance_uid for a in arrivals} == {study.study_uid}
        rest = store.arrivals_after(arrivals[1].position, 2)
        assert [a.sop_instance_uid for a in rest] == study.sop_uids[2:4]
        assert store.arrivals_after(arrivals[-1].position, 10) == []

    def test_off_loop_runs_the_call_in_a_worker_thread(
        self, store: SqliteInstanceStore, study: SyntheticStudy
    ) -> None:
        commit_files(store, study.files)

        async def from_the_loop() -> tuple[int, dict[str, int]]:
            return await store.off_loop(threading.get_ident), await store.off_loop(store.counts)

        worker, counts = asyncio.run(from_the_loop())
        assert worker != threading.get_ident()
        assert counts["instances"] == 4
