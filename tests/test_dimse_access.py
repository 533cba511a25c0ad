"""Who may query and retrieve over DIMSE: attacks with DCMTK's tools on a real node process.

Only configured callers, each bound to its address, may C-FIND, C-GET and C-MOVE; an
unconfigured AE and a configured title from another address get nothing; every
operation is in the node's log at INFO with the calling AE, its address and counts.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from node.config import DimseCaller, DimseConfig, load_config
from node.edges.dimse import known_caller
from node.errors import ConfigError
from node.samples import SyntheticStudy, make_ct_study
from tests.support.nodes import NodeProcess, free_port, init_node, wait_until
from tests.test_dimse import DCMTK_ENV, dcmtk

VIEWER = "VIEWER"  # a configured caller on 127.0.0.1, the address DCMTK's tools call from
FAR_VIEWER = "FAR_VIEWER"  # a configured caller on 127.0.0.2
MODALITY = "CT_SCANNER"  # a configured caller that may only store
RECEIVER = "RECEIVER"  # the configured C-MOVE destination


def called(node: NodeProcess, calling_ae: str) -> list[str]:
    return ["-aet", calling_ae, "-aec", "IMAGESHARE", "127.0.0.1", str(node.dimse_port)]


def study_keys(study: SyntheticStudy) -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}"]


def log_has(node: NodeProcess, text: str) -> bool:
    return text in node.log_path.read_text()


def wait_for_log(node: NodeProcess, text: str) -> None:
    wait_until(lambda: log_has(node, text), timeout=10, message=f"{text!r} in the node's log")


@pytest.fixture(scope="module")
def move_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, move_port: int) -> Iterator[NodeProcess]:
    """The default store policy, three configured callers and one C-MOVE destination."""
    made = init_node(tmp_path_factory.mktemp("access"), "access.example/imageshare")
    made.append_config(
        f'[[dimse.callers]]\nae_title = "{VIEWER}"\nhost = "127.0.0.1"\n\n'
        f'[[dimse.callers]]\nae_title = "{FAR_VIEWER}"\nhost = "127.0.0.2"\n\n'
        f'[[dimse.callers]]\nae_title = "{MODALITY}"\nhost = "127.0.0.1"\n'
        "query_retrieve = false\n\n"
        f'[[dimse.destinations]]\nae_title = "{RECEIVER}"\nhost = "127.0.0.1"\nport = {move_port}'
    )
    made.start()
    wait_until(
        lambda: dcmtk("echoscu", *called(made, VIEWER)).returncode == 0, message="DIMSE to listen"
    )
    yield made
    made.stop()


@pytest.fixture(scope="module")
def study(node: NodeProcess, tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    """A 2 x 3 study, pushed by an AE the node has never heard of (the default allows it)."""
    made = make_ct_study(tmp_path_factory.mktemp("study"), series=2, slices=3)
    result = dcmtk("storescu", *called(node, "ANY_MODALITY"), "+sd", str(made.files[0].parent))
    assert result.returncode == 0, result.stderr
    return made


@contextmanager
def storescp(port: int, out: Path) -> Iterator[Path]:
    """A DCMTK storescp as the C-MOVE destination, receiving into ``out``."""
    out.mkdir()
    receiver = subprocess.Popen(
        ["storescp", "-aet", RECEIVER, "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: dcmtk("echoscu", "-aec", RECEIVER, "127.0.0.1", str(port)).returncode == 0,
            message="storescp",
        )
        yield out
    finally:
        receiver.terminate()
        receiver.wait(10)


def findscu(node: NodeProcess, calling_ae: str, study: SyntheticStudy, out: Path) -> int:
    """Run a Study Root C-FIND for the study; its exit status (responses land in ``out``)."""
    out.mkdir()
    keys = [*study_keys(study), "-k", "PatientName"]
    result = dcmtk("findscu", "-S", *called(node, calling_ae), "-X", "-od", str(out), *keys)
    return result.returncode


def getscu(node: NodeProcess, calling_ae: str, study: SyntheticStudy, out: Path) -> int:
    out.mkdir()
    result = dcmtk("getscu", "-S", *called(node, calling_ae), "-od", str(out), *study_keys(study))
    return result.returncode


def movescu(node: NodeProcess, calling_ae: str, study: SyntheticStudy, destination: str) -> int:
    moving = ["movescu", "-S", *called(node, calling_ae), "-aem", destination]
    return dcmtk(*moving, *study_keys(study)).returncode


class TestUnconfiguredAe:
    def test_find_is_refused_and_logged(
        self, node: NodeProcess, study: SyntheticStudy, tmp_path: Path
    ) -> None:
        assert findscu(node, "INTRUDER", study, tmp_path / "find") != 0
        assert list((tmp_path / "find").iterdir()) == []
        wait_for_log(
            node,
            "query/retrieve from 'INTRUDER' at 127.0.0.1 refused:"
            " not a configured caller at this address",
        )

    def test_get_is_refused_and_sends_nothing(
        self, node: NodeProcess, study: SyntheticStudy, tmp_path: Path
    ) -> None:
        assert getscu(node, "INTRUDER", study, tmp_path / "got") != 0
        assert list((tmp_path / "got").iterdir()) == []
        assert not log_has(node, "C-GET from 'INTRUDER'")

    def test_move_to_a_configured_destination_is_refused_and_sends_nothing(
        self, node: NodeProcess, study: SyntheticStudy, tmp_path: Path, move_port: int
    ) -> None:
        with storescp(move_port, tmp_path / "moved") as out:
            assert movescu(node, "INTRUDER", study, RECEIVER) != 0
        assert list(out.iterdir()) == []
        assert not log_has(node, "C-MOVE from 'INTRUDER'")

    def test_store_is_still_accepted_by_default(
        self, node: NodeProcess, study: SyntheticStudy
    ) -> None:
        # The study fixture was pushed by an unconfigured AE: store_from_any_ae = true.
        with sqlite3.connect(node.data_dir / "index.sqlite") as conn:
            rows = conn.execute(
                "SELECT sop_instance_uid FROM instances WHERE study_instance_uid = ?",
                (study.study_uid,),
            )
            assert {r[0] for r in rows} == set(study.sop_uids)


class TestSpoofedTitle:
    def test_configured_title_from_another_address_is_refused(
        self, node: NodeProcess, study: SyntheticStudy, tmp_path: Path
    ) -> None:
        # FAR_VIEWER is bound to 127.0.0.2; DCMTK's tools call from 127.0.0.1.
        assert getscu(node, FAR_VIEWER, study, tmp_path / "got") != 0
        assert list((tmp_path / "got").iterdir()) == []
        assert findscu(node, FAR_VIEWER, study, tmp_path / "find") != 0
        wait_for_log(
            node,
            f"query/retrieve from '{FAR_VIEWER}' at 127.0.0.1 refused:"
            " not a configured caller at this address",
        )

    def test_configured_title_from_its_own_address_is_answered(
        self, node: NodeProcess, study: SyntheticStudy
    ) -> None:
        ae = AE(ae_title=FAR_VIEWER)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate(
            "127.0.0.1", node.dimse_port, ae_title="IMAGESHARE", bind_address=("127.0.0.2", 0)
        )
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study.study_uid
        try:
            answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        finally:
            assoc.release()
        matched = [a.StudyInstanceUID for s, a in answers if a is not None and s.Status == 0xFF00]
        assert matched == [study.study_uid]
        wait_for_log(
            node, f"C-FIND from '{FAR_VIEWER}' at 127.0.0.2: STUDY level, 1 match(es) in 1 study"
        )


class TestStoreOnlyCaller:
    def test_a_store_only_caller_may_not_query(
        self, node: NodeProcess, study: SyntheticStudy, tmp_path: Path
    ) -> None:
        assert findscu(node, MODALITY, study, tmp_path / "find") != 0
        assert list((tmp_path / "find").iterdir()) == []
        wait_for_log(node, f"query/retrieve from '{MODALITY}' at 127.0.0.1 refused: it may only")
        result = dcmtk("storescu", *called(node, MODALITY), str(study.files[0]))
        assert result.returncode == 0, result.stderr


class TestConfiguredCaller:
    def test_find_is_answered_and_logged_without_patient_data(
        self, node: NodeProcess, study: SyntheticStudy, tmp_path: Path
    ) -> None:
        assert findscu(node, VIEWER, study, tmp_path / "find") == 0
        responses = [pydicom.dcmread(p) for p in (tmp_path / "find").glob("rsp*.dcm")]
        assert [r.StudyInstanceUID for r in responses] == [study.study_uid]
        wait_for_log(
            node, f"INFO node.edges.dimse: C-FIND from '{VIEWER}' at 127.0.0.1: STUDY level,"
            " 1 match(es) in 1 study(ies)",
        )  # fmt: skip
        self.assert_no_patient_data_in_dimse_lines(node, study)

    def test_get_is_served_and_logged(
        self, node: NodeProcess, study: SyntheticStudy, tmp_path: Path
    ) -> None:
        assert getscu(node, VIEWER, study, tmp_path / "got") == 0
        received = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "got").iterdir()}
        assert received == set(study.sop_uids)
        wait_for_log(
            node,
            f"INFO node.edges.dimse: C-GET from '{VIEWER}' at 127.0.0.1:"
            " sending 6 instance(s) of 1 study(ies)",
        )
        wait_for_log(
            node,
            f"C-GET from '{VIEWER}' at 127.0.0.1: finished: 6 completed, 0 warning, 0 failed",
        )
        self.assert_no_patient_data_in_dimse_lines(node, study)

    def test_a_retrieve_that_matches_nothing_is_logged_too(
        self, node: NodeProcess, tmp_path: Path
    ) -> None:
        nothing = SyntheticStudy("1.2.826.0.1.3680043.8.498.404", "", "")
        assert getscu(node, VIEWER, nothing, tmp_path / "got") == 0
        assert list((tmp_path / "got").iterdir()) == []
        wait_for_log(
            node, f"C-GET from '{VIEWER}' at 127.0.0.1: sending 0 instance(s) of 0 study(ies)"
        )

    def test_move_to_a_configured_destination_is_served_and_logged(
        self, node: NodeProcess, study: SyntheticStudy, tmp_path: Path, move_port: int
    ) -> None:
        with storescp(move_port, tmp_path / "moved") as out:
            assert movescu(node, VIEWER, study, RECEIVER) == 0
        assert {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()} == set(study.sop_uids)
        wait_for_log(
            node,
            f"INFO node.edges.dimse: C-MOVE from '{VIEWER}' at 127.0.0.1: sending 6 instance(s)"
            f" of 1 study(ies) to '{RECEIVER}' at 127.0.0.1:{move_port}",
        )
        wait_for_log(
            node,
            f"C-MOVE from '{VIEWER}' at 127.0.0.1: finished: 6 completed, 0 warning, 0 failed",
        )
        self.assert_no_patient_data_in_dimse_lines(node, study)

    def test_move_to_an_unconfigured_destination_is_refused_and_logged(
        self, node: NodeProcess, study: SyntheticStudy
    ) -> None:
        assert movescu(node, VIEWER, study, "ELSEWHERE") != 0
        wait_for_log(
            node, f"C-MOVE from '{VIEWER}' at 127.0.0.1 to unknown destination 'ELSEWHERE' refused"
        )

    @staticmethod
    def assert_no_patient_data_in_dimse_lines(node: NodeProcess, study: SyntheticStudy) -> None:
        lines = [
            line for line in node.log_path.read_text().splitlines() if "node.edges.dimse" in line
        ]
        phi = [study.patient_id, study.patient_name, study.study_uid, *study.series_uids]
        assert lines
        assert [line for line in lines if any(value in line for value in phi)] == []


class TestStoreFromConfiguredCallersOnly:
    def test_unconfigured_ae_is_rejected_and_a_configured_one_stores(self, tmp_path: Path) -> None:
        made = init_node(tmp_path, "closed.example/imageshare")
        made.append_config(
            f'store_from_any_ae = false\n\n[[dimse.callers]]\nae_title = "{MODALITY}"\n'
            'host = "127.0.0.1"\nquery_retrieve = false'
        )
        study = make_ct_study(tmp_path / "study", series=1, slices=2)
        made.start()
        try:
            wait_until(
                lambda: dcmtk("echoscu", *called(made, MODALITY)).returncode == 0,
                message="DIMSE to listen",
            )
            refused = dcmtk("storescu", *called(made, "ANY_MODALITY"), str(study.files[0]))
            assert refused.returncode != 0
            assert "reject" in refused.stderr.lower()
            wait_for_log(
                made,
                "DIMSE association from 'ANY_MODALITY' at 127.0.0.1 rejected: not a configured"
                " caller at this address",
            )
            stored = dcmtk("storescu", *called(made, MODALITY), str(study.files[0]))
            assert stored.returncode == 0, stored.stderr
            assert dcmtk("echoscu", *called(made, MODALITY)).returncode == 0  # still serving
        finally:
            made.stop()


class TestCallerConfiguration:
    def _load(self, tmp_path: Path, dimse: str) -> None:
        path = tmp_path / "node.toml"
        path.write_text(f'origin = "cfg.example/imageshare"\n\n[dimse]\n{dimse}\n')
        load_config(path)

    def test_a_caller_bound_to_a_host_name_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="IP address"):
            self._load(tmp_path, '[[dimse.callers]]\nae_title = "PACS"\nhost = "pacs.example"')

    def test_a_caller_the_title_allow_list_would_reject_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="allowed_calling_aes"):
            self._load(
                tmp_path,
                'allowed_calling_aes = ["CT"]\n[[dimse.callers]]\nae_title = "PACS"\n'
                'host = "10.0.0.5"',
            )


class TestCallerIdentity:
    CONFIG = DimseConfig(callers=[DimseCaller("PACS", "10.0.0.5")])

    def test_title_and_address_together_name_a_caller(self) -> None:
        assert known_caller(self.CONFIG, "PACS", "10.0.0.5") == self.CONFIG.callers[0]
        assert known_caller(self.CONFIG, "PACS  ", "10.0.0.5") is not None  # AE titles pad

    def test_the_title_from_another_address_or_another_title_is_nobody(self) -> None:
        assert known_caller(self.CONFIG, "PACS", "10.0.0.6") is None
        assert known_caller(self.CONFIG, "PACS2", "10.0.0.5") is None
        assert known_caller(self.CONFIG, "PACS", "not an address") is None

    def test_an_ipv4_mapped_peer_on_a_dual_stack_socket_is_its_ipv4_address(self) -> None:
        assert known_caller(self.CONFIG, "PACS", "::ffff:10.0.0.5") is not None
        assert known_caller(self.CONFIG, "PACS", "::ffff:10.0.0.6") is None
