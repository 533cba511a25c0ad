"""The DIMSE gateway, driven by DCMTK's tools and pynetdicom against a real node process."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import DimseCaller, load_config
from node.edges.dimse import DimseGateway
from node.samples import SyntheticStudy, make_ct_study
from node.services.dimse_query import Model, find
from node.services.dimse_transport import c_store_response_command_set, received_part10
from node.services.ingest import import_files
from node.services.runtime import open_runtime
from node.store.instances import SqliteInstanceStore
from tests.support.nodes import NodeProcess, free_port, init_node, wait_until

SCU = "TESTSCU"
MAX_INSTANCE_BYTES = 2_000_000
RECEIVER = "RECEIVER"
# DCMTK only disables Nagle's algorithm when told to; without it every response waits
# for a delayed ACK.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout, check=False
    )


def peer(node: NodeProcess) -> list[str]:
    return ["-aet", SCU, "-aec", "IMAGESHARE", "127.0.0.1", str(node.dimse_port)]


def wait_for_dimse(node: NodeProcess) -> None:
    """DIMSE answers C-ECHO (it has started when /healthz answers 200)."""
    wait_until(lambda: dcmtk("echoscu", *peer(node)).returncode == 0, message="DIMSE to listen")


def indexed_sop_uids(node: NodeProcess, study_uid: str) -> set[str]:
    rows = node.query_index(
        "SELECT sop_instance_uid FROM instances WHERE study_instance_uid = ?", (study_uid,)
    )
    return {r[0] for r in rows}


def instance_count(node: NodeProcess) -> int:
    return int(node.query_index("SELECT COUNT(*) FROM instances")[0][0])


def object_files(node: NodeProcess) -> set[str]:
    return node.stored_digests()


def assert_same_datasets(received: list[Path], study: SyntheticStudy) -> None:
    """Every received file holds exactly one of the study's sent datasets, and all are there."""
    sent = {pydicom.dcmread(p).SOPInstanceUID: p for p in study.files}
    got = {}
    for path in received:
        ds = pydicom.dcmread(path)
        got[ds.SOPInstanceUID] = ds
    assert set(got) == set(sent)
    for uid, path in sent.items():
        original = pydicom.dcmread(path)
        assert got[uid] == original  # every element, pixel data included
        assert got[uid].PixelData == original.PixelData


@pytest.fixture(scope="module")
def move_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, move_port: int) -> Iterator[NodeProcess]:
    """One node for the module: callers on an allow-list, the test's SCU a configured
    query/retrieve caller from loopback, one C-MOVE destination."""
    made = init_node(tmp_path_factory.mktemp("dimse"), "dimse.example/imageshare")
    made.append_config(
        f'allowed_calling_aes = ["{SCU}"]\n\n'
        f'[[dimse.callers]]\nae_title = "{SCU}"\nhost = "127.0.0.1"\n\n'
        f'[[dimse.destinations]]\nae_title = "{RECEIVER}"\nhost = "127.0.0.1"\nport = {move_port}'
        f"\n\n[store]\nmax_instance_bytes = {MAX_INSTANCE_BYTES}"
    )
    made.start()
    wait_for_dimse(made)
    yield made
    made.stop()


@pytest.fixture(scope="module")
def stored_study(node: NodeProcess, tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    """A 2 x 3 study sent into the node with storescu."""
    study = make_ct_study(tmp_path_factory.mktemp("sent"), series=2, slices=3)
    result = dcmtk("storescu", *peer(node), "+sd", str(study.files[0].parent))
    assert result.returncode == 0, result.stderr
    return study


class TestVerification:
    def test_echoscu_succeeds(self, node: NodeProcess) -> None:
        result = dcmtk("echoscu", *peer(node))
        assert result.returncode == 0, result.stderr


class TestCallingAeAllowList:
    def test_unknown_calling_ae_is_rejected_and_logged(self, node: NodeProcess) -> None:
        result = dcmtk(
            "echoscu", "-aet", "INTRUDER", "-aec", "IMAGESHARE", "127.0.0.1", str(node.dimse_port)
        )
        assert result.returncode != 0
        assert "Rejected" in result.stderr or "rejected" in result.stderr
        wait_until(
            lambda: (
                "'INTRUDER'" in node.log_path.read_text()
                and "not on the allow-list" in node.log_path.read_text()
            ),
            timeout=5,
            message="the rejection in the node's log",
        )


class TestStorage:
    def test_storescu_directory_is_indexed_and_stored_unchanged(
        self, node: NodeProcess, stored_study: SyntheticStudy, tmp_path: Path
    ) -> None:
        assert indexed_sop_uids(node, stored_study.study_uid) == set(stored_study.sop_uids)
        rows = node.query_index(
            "SELECT digest FROM instances WHERE study_instance_uid = ?",
            (stored_study.study_uid,),
        )
        stored = []
        for (digest,) in rows:
            copy = tmp_path / f"{digest}.dcm"
            copy.write_bytes(node.stored_object(digest) or b"")
            stored.append(copy)
        assert_same_datasets(stored, stored_study)

    @pytest.mark.parametrize("sop_instance_uid", ["1.2.3", "1.2.34"])  # padded, and not
    def test_a_received_data_set_is_stored_as_pynetdicom_encodes_it(
        self, sop_instance_uid: str
    ) -> None:
        request = C_STORE()
        request.AffectedSOPClassUID = CTImageStorage
        request.AffectedSOPInstanceUID = sop_instance_uid
        request.DataSet = BytesIO(b"the data set's bytes, as received")
        context = build_context(CTImageStorage, ImplicitVRLittleEndian)
        context.context_id = 1
        # An event of no association: encoded_dataset() reads only the request and context.
        entry = {"request": request, "context": context.as_tuple}
        event = Event(None, evt.EVT_C_STORE, entry)  # type: ignore[arg-type]
        assert received_part10(request, ImplicitVRLittleEndian) == event.encoded_dataset()

    @pytest.mark.parametrize(
        ("status", "sop_instance_uid"), [(0x0000, "1.2.3"), (0xB007, "1.2.34"), (0xA900, "1.2")]
    )
    def test_a_c_store_response_is_sent_as_pynetdicom_encodes_it(
        self, status: int, sop_instance_uid: str
    ) -> None:
        response = C_STORE()
        response.MessageIDBeingRespondedTo = 7
        response.AffectedSOPClassUID = CTImageStorage
        response.AffectedSOPInstanceUID = sop_instance_uid
        response.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(response)
        [pdata] = message.encode_msg(1, 16384)
        assert pdata.presentation_data_value_list == [
            (1, b"\x03" + (c_store_response_command_set(response) or b""))
        ]
        response.ErrorComment = "data set does not match"  # type: ignore[assignment]
        assert c_store_response_command_set(response) is None  # left to pynetdicom

    def test_resending_a_study_is_idempotent(
        self, node: NodeProcess, stored_study: SyntheticStudy
    ) -> None:
        before = instance_count(node)
        result = dcmtk("storescu", *peer(node), str(stored_study.files[0]))
        assert result.returncode == 0, result.stderr
        assert instance_count(node) == before

    def test_dataset_missing_study_uid_fails_and_stores_nothing(self, node: NodeProcess) -> None:
        ds = _ct_dataset()
        del ds.StudyInstanceUID
        before_rows, before_files = instance_count(node), object_files(node)
        status = _send_with_pynetdicom(node, ds)
        assert status.Status == 0xC000
        assert "StudyInstanceUID" in status.ErrorComment
        assert instance_count(node) == before_rows
        assert object_files(node) == before_files
        assert list((node.data_dir / "tmp").iterdir()) == []

    def test_garbage_dataset_fails_and_stores_nothing(
        self, node: NodeProcess, tmp_path: Path
    ) -> None:
        # A valid file meta header followed by bytes that are no DICOM data set at all.
        path = tmp_path / "garbage.dcm"
        path.write_bytes(_part10_header() + b"\x08\x00\x18\x00UI\xff\x7fjunk" * 8)
        before_rows, before_files = instance_count(node), object_files(node)
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
        try:
            status = _send_with_pynetdicom(node, path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        assert status.Status in (0xC000, 0xA900)
        assert status.ErrorComment
        assert instance_count(node) == before_rows
        assert object_files(node) == before_files
        assert dcmtk("echoscu", *peer(node)).returncode == 0  # the node keeps serving

    def test_instance_over_the_size_limit_is_refused_and_stores_nothing(
        self, node: NodeProcess
    ) -> None:
        ds = _ct_dataset()
        ds.BitsAllocated = 8
        ds.PixelData = b"\0" * (MAX_INSTANCE_BYTES + 1000)
        before_rows = instance_count(node)
        status = _send_with_pynetdicom(node, ds)
        assert status.Status == 0xA700  # out of resources: over the limit after receipt
        assert "limit" in status.ErrorComment
        ds.PixelData = b"\0" * (MAX_INSTANCE_BYTES * 2)
        # Far over the limit: the node stops receiving and aborts the association.
        assert _send_with_pynetdicom(node, ds) == Dataset()
        assert instance_count(node) == before_rows
        assert "a message is over" in node.log_path.read_text()
        assert dcmtk("echoscu", *peer(node)).returncode == 0

    def test_a_data_set_that_is_not_the_instance_its_request_names_is_refused_unstored(
        self, node: NodeProcess
    ) -> None:
        ds = _ct_dataset()
        before_rows = instance_count(node)
        ae = AE(ae_title=SCU)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="IMAGESHARE")
        assert assoc.is_established
        try:
            other_instance = _send_c_store_naming(assoc, ds, ds.SOPClassUID, generate_uid())
            other_class = _send_c_store_naming(
                assoc, ds, "1.2.840.10008.5.1.4.1.1.4", ds.SOPInstanceUID
            )
            assert (other_instance.Status, other_class.Status) == (0xA900, 0xA900)
            assert "Affected" in other_instance.ErrorComment
            assert instance_count(node) == before_rows
            matching = _send_c_store_naming(assoc, ds, ds.SOPClassUID, ds.SOPInstanceUID)
            assert matching.Status == 0x0000
        finally:
            assoc.release()
        assert instance_count(node) == before_rows + 1

    def test_association_aborted_mid_instance_keeps_only_complete_instances(
        self, node: NodeProcess, tmp_path: Path
    ) -> None:
        study = make_ct_study(tmp_path / "abort", series=1, slices=4, rows=128, columns=128)
        datasets = [pydicom.dcmread(p) for p in study.files]
        ae = AE(ae_title=SCU)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="IMAGESHARE")
        assert assoc.is_established
        for ds in datasets[:3]:
            assert assoc.send_c_store(ds).Status == 0x0000
        _send_first_half_of_c_store(assoc, datasets[3])
        assoc.abort()
        assert dcmtk("echoscu", *peer(node)).returncode == 0  # the abort has been handled
        assert indexed_sop_uids(node, study.study_uid) == set(study.sop_uids[:3])
        wait_until(
            lambda: list((node.data_dir / "tmp").iterdir()) == [],
            timeout=5,
            message="no partial file left",
        )

    def test_pdu_claiming_more_than_the_maximum_is_refused_before_its_body_is_read(
        self, node: NodeProcess
    ) -> None:
        # An A-ASSOCIATE-RQ header claiming 4 GiB - 1: without a bound the node would
        # keep reading (and holding) whatever follows. It closes the connection at once.
        with socket.create_connection(("127.0.0.1", node.dimse_port), timeout=10) as sock:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
            closed_at = time.monotonic() + 10
            while time.monotonic() < closed_at:
                try:
                    if sock.recv(4096) == b"":
                        break
                except ConnectionResetError:
                    break
            else:
                pytest.fail("the node kept the connection open")
        assert "over the node's maximum" in node.log_path.read_text()
        assert dcmtk("echoscu", *peer(node)).returncode == 0  # the node keeps serving


class TestFind:
    def _find(self, node: NodeProcess, out: Path, model: str, *keys: str) -> list[Dataset]:
        out.mkdir()
        key_args = [a for k in keys for a in ("-k", k)]
        result = dcmtk("findscu", model, *peer(node), "-X", "-od", str(out), *key_args)
        assert result.returncode == 0, result.stderr
        return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]

    def test_study_level_returns_the_study(
        self, node: NodeProcess, stored_study: SyntheticStudy, tmp_path: Path
    ) -> None:
        responses = self._find(
            node,
            tmp_path / "find",
            "-S",
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={stored_study.study_uid}",
            "PatientName",
            "PatientID",
            "StudyDate",
            "AccessionNumber",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
            "InstitutionName",
        )
        assert len(responses) == 1
        study = responses[0]
        assert study.StudyInstanceUID == stored_study.study_uid
        assert str(study.PatientName) == stored_study.patient_name
        assert study.PatientID == stored_study.patient_id
        assert study.StudyDate == "20260101"
        assert study.AccessionNumber == "ACC-1"
        assert study.ModalitiesInStudy == "CT"
        assert int(study.NumberOfStudyRelatedSeries) == 2
        assert int(study.NumberOfStudyRelatedInstances) == 6
        assert "InstitutionName" in study and not study.InstitutionName  # not indexed: empty

    def test_series_level_lists_each_series(
        self, node: NodeProcess, stored_study: SyntheticStudy, tmp_path: Path
    ) -> None:
        responses = self._find(
            node,
            tmp_path / "find",
            "-S",
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={stored_study.study_uid}",
            "SeriesInstanceUID",
            "Modality",
            "SeriesNumber",
            "NumberOfSeriesRelatedInstances",
        )
        assert {r.SeriesInstanceUID for r in responses} == set(stored_study.series_uids)
        assert sorted(int(r.SeriesNumber) for r in responses) == [1, 2]
        assert all(r.Modality == "CT" for r in responses)
        assert all(int(r.NumberOfSeriesRelatedInstances) == 3 for r in responses)

    def test_patient_root_image_level_lists_instances(
        self, node: NodeProcess, stored_study: SyntheticStudy, tmp_path: Path
    ) -> None:
        responses = self._find(
            node,
            tmp_path / "find",
            "-P",
            "QueryRetrieveLevel=IMAGE",
            f"PatientID={stored_study.patient_id}",
            f"StudyInstanceUID={stored_study.study_uid}",
            f"SeriesInstanceUID={stored_study.series_uids[0]}",
            "SOPInstanceUID",
            "InstanceNumber",
        )
        assert {r.SOPInstanceUID for r in responses} == set(stored_study.sop_uids[:3])
        assert sorted(int(r.InstanceNumber) for r in responses) == [1, 2, 3]

    def test_unknown_level_fails_with_a_reason(self, node: NodeProcess) -> None:
        ae = AE(ae_title=SCU)
        ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="IMAGESHARE")
        query = Dataset()
        query.QueryRetrieveLevel = "FRAME"
        query.PatientID = ""
        statuses = [
            s for s, _ in assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind)
        ]
        assoc.release()
        assert statuses[-1].Status == 0xA900
        assert "FRAME" in statuses[-1].ErrorComment


class TestFindMatching:
    """Matching rules, over an in-process store (no network needed)."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[SqliteInstanceStore]:
        store = SqliteInstanceStore(tmp_path / "data")
        for n, (pid, name, date) in enumerate(
            [("P1", "Doe^Jane", "20250105"), ("P2", "Roe^Richard", "20260310")]
        ):
            study = make_ct_study(
                tmp_path / f"s{n}",
                series=1,
                slices=2,
                patient_id=pid,
                patient_name=name,
                study_date=date,
            )
            import_files(store, study.files)
        yield store
        store.close()

    def _study_query(self, **keys: object) -> Dataset:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientName = ""
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        return query

    def test_name_wildcard_is_case_insensitive(self, store: SqliteInstanceStore) -> None:
        found = list(find(store, self._study_query(PatientName="doe*"), Model.STUDY_ROOT))
        assert [str(r.PatientName) for r in found] == ["Doe^Jane"]

    def test_date_range(self, store: SqliteInstanceStore) -> None:
        query = self._study_query(StudyDate="20260101-")
        assert [r.StudyDate for r in find(store, query, Model.STUDY_ROOT)] == ["20260310"]
        query = self._study_query(StudyDate="-20251231")
        assert [r.StudyDate for r in find(store, query, Model.STUDY_ROOT)] == ["20250105"]

    def test_universal_match_returns_all(self, store: SqliteInstanceStore) -> None:
        assert len(list(find(store, self._study_query(PatientID="*"), Model.STUDY_ROOT))) == 2

    def test_patient_level_groups_studies(self, store: SqliteInstanceStore) -> None:
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "P2"
        query.NumberOfPatientRelatedInstances = ""
        (patient,) = find(store, query, Model.PATIENT_ROOT)
        assert patient.PatientID == "P2"
        assert int(patient.NumberOfPatientRelatedInstances) == 2


class TestRetrieve:
    def test_getscu_retrieves_the_study(
        self, node: NodeProcess, stored_study: SyntheticStudy, tmp_path: Path
    ) -> None:
        out = tmp_path / "got"
        out.mkdir()
        result = dcmtk(
            "getscu",
            "-S",
            *peer(node),
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={stored_study.study_uid}",
        )
        assert result.returncode == 0, result.stderr
        assert_same_datasets(list(out.iterdir()), stored_study)

    def test_movescu_sends_the_study_to_a_configured_destination(
        self, node: NodeProcess, stored_study: SyntheticStudy, tmp_path: Path, move_port: int
    ) -> None:
        out = tmp_path / "moved"
        out.mkdir()
        receiver = subprocess.Popen(
            ["storescp", "-aet", RECEIVER, "-od", str(out), str(move_port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(
                lambda: (
                    dcmtk("echoscu", "-aec", RECEIVER, "127.0.0.1", str(move_port)).returncode == 0
                ),
                message="storescp",
            )
            result = dcmtk(
                "movescu",
                "-S",
                *peer(node),
                "-aem",
                RECEIVER,
                "-k",
                "QueryRetrieveLevel=SERIES",
                "-k",
                f"StudyInstanceUID={stored_study.study_uid}",
                "-k",
                f"SeriesInstanceUID={stored_study.series_uids[1]}",
            )
            assert result.returncode == 0, result.stderr
        finally:
            receiver.terminate()
            receiver.wait(10)
        received = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
        assert received == set(stored_study.sop_uids[3:])
        assert_same_datasets(
            [p for p in out.iterdir()],
            SyntheticStudy(stored_study.study_uid, "", "", files=stored_study.files[3:]),
        )

    def test_move_to_unknown_destination_fails_with_a801(
        self, node: NodeProcess, stored_study: SyntheticStudy
    ) -> None:
        ae = AE(ae_title=SCU)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="IMAGESHARE")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = stored_study.study_uid
        responses = list(
            assoc.send_c_move(query, "NOWHERE", StudyRootQueryRetrieveInformationModelMove)
        )
        assoc.release()
        assert responses[-1][0].Status == 0xA801


class TestSopClassPolicy:
    PRIVATE_CLASS = UID("1.2.826.0.1.3680043.8.498.99.1")

    def _private_dataset(self) -> Dataset:
        ds = _ct_dataset()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = self.PRIVATE_CLASS
        return ds

    def _associate(self, port: int) -> Any:
        ae = AE(ae_title=SCU)
        ae.add_requested_context(self.PRIVATE_CLASS, ExplicitVRLittleEndian)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE")
        assert assoc.is_established
        return assoc

    def test_unknown_storage_class_is_stored_by_default(self, node: NodeProcess) -> None:
        ds = self._private_dataset()
        assoc = self._associate(node.dimse_port)
        try:
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        assert indexed_sop_uids(node, ds.StudyInstanceUID) == {ds.SOPInstanceUID}

    def test_refusing_unknown_classes_keeps_known_ones_and_c_get(
        self, tmp_path: Path, stored_study: SyntheticStudy
    ) -> None:
        made = init_node(tmp_path, "strict.example/imageshare")
        config = load_config(made.config)
        config.dimse.refuse_unknown_sop_classes = True
        config.dimse.callers = [DimseCaller(SCU, "127.0.0.1")]
        runtime = open_runtime(config)
        gateway = DimseGateway(runtime)
        asyncio.run(gateway.start())
        try:
            assoc = self._associate(made.dimse_port)
            try:
                accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
                assert accepted == {CTImageStorage}
                for path in stored_study.files:
                    assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
            finally:
                assoc.release()
            out = tmp_path / "got"
            out.mkdir()
            study_key = f"StudyInstanceUID={stored_study.study_uid}"
            result = dcmtk(
                "getscu", "-S", *peer(made), "-od", str(out),
                "-k", "QueryRetrieveLevel=STUDY", "-k", study_key,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert_same_datasets(list(out.iterdir()), stored_study)
        finally:
            asyncio.run(gateway.stop())
            runtime.close()
            _config.UNRESTRICTED_STORAGE_SERVICE = False


class TestLatency:
    def test_getscu_of_many_instances_has_no_delayed_ack_stall(
        self, node: NodeProcess, tmp_path: Path
    ) -> None:
        # Without TCP_NODELAY on the node's sockets each C-STORE sub-operation waits for
        # the peer's delayed ACK (~40 ms): 150 instances would take over 6 s, not ~0.5 s.
        study = make_ct_study(tmp_path / "many", series=1, slices=150, rows=32, columns=32)
        node.cli("import", str(tmp_path / "many"))
        out = tmp_path / "got"
        out.mkdir()
        started = time.monotonic()
        result = dcmtk(
            "getscu", "-S", *peer(node), "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
        )  # fmt: skip
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert len(list(out.iterdir())) == 150
        assert elapsed < 5.0, f"getscu of 150 instances took {elapsed:.1f} s"


# -- helpers -------------------------------------------------------------------------------


def _ct_dataset() -> Dataset:
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "MRN-BAD"
    ds.Modality = "CT"
    return ds


def _encoded_body(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buffer, ds)
    return buffer.getvalue()


def _part10_header() -> bytes:
    """Preamble, DICM and a valid file meta group for a CT instance."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    buffer.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


def _send_with_pynetdicom(node: NodeProcess, dataset: Dataset | Path) -> Dataset:
    """Send one instance; the C-STORE response status (empty if the node aborted)."""
    ae = AE(ae_title=SCU)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="IMAGESHARE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(dataset)
    finally:
        if assoc.is_established:
            assoc.release()


def _send_c_store_naming(assoc: Any, ds: Dataset, sop_class: str, sop_instance: str) -> Any:
    """A C-STORE of ``ds`` whose request names the given Affected SOP Class and Instance
    UIDs (pynetdicom's send_c_store takes them from the data set); the response status."""
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    request.DataSet = BytesIO(_encoded_body(ds))
    # As send_c_store does: pause the association's reactor so the response comes here.
    assoc._reactor_checkpoint.clear()
    wait_until(lambda: assoc._is_paused, timeout=10)
    try:
        assoc.dimse.send_msg(request, assoc.accepted_contexts[0].context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert response is not None
    return response  # the C-STORE response primitive: Status, ErrorComment


def _send_first_half_of_c_store(assoc: object, ds: Dataset) -> None:
    """Send the command and about half of the data set's PDUs, then stop: a cut-off instance."""
    request = C_STORE()
    request.MessageID = 99
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(_encoded_body(ds))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id  # type: ignore[attr-defined]
    fragments = list(message.encode_msg(context_id, 4096))
    assert len(fragments) > 4
    for fragment in fragments[: len(fragments) // 2]:
        assoc.dul.send_pdu(fragment)  # type: ignore[attr-defined]
