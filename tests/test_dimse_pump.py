"""One thread per storage association (node/services/dimse_pump.py), against real peers:
DCMTK's tools and pynetdicom requestors talking to a pynetdicom server set up as the node's."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from node.samples import make_ct_study
from node.services import dimse_pump
from node.services.dimse_transport import LOW_LATENCY_HANDLERS
from tests.support.nodes import free_port, wait_until
from tests.support.samples import ct_dataset

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class Scp:
    """A Storage SCP as the node runs one, recording which thread did what."""

    def __init__(self, network_timeout: float = 60.0) -> None:
        self.port = free_port()
        self.stored: list[str] = []
        self.pumped_in_handler: list[bool] = []
        self.data_threads: set[str] = set()  # threads that read P-DATA PDUs
        self.aborted = threading.Event()
        self.released = threading.Event()
        ae = AE("PUMPSCP")
        ae.network_timeout = network_timeout
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        handlers: list[Any] = [
            *LOW_LATENCY_HANDLERS,
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_DATA_RECV, self.on_data),
            (evt.EVT_ABORTED, lambda _: self.aborted.set()),
            (evt.EVT_RELEASED, lambda _: self.released.set()),
        ]
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the running server
        self.server = server

    def on_store(self, event: Any) -> int:
        self.pumped_in_handler.append(dimse_pump._pump(event.assoc.dul).active)
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        self.pumped_in_handler.append(dimse_pump._pump(event.assoc.dul).active)
        yield 0x0000, None

    def on_data(self, event: Any) -> None:
        if event.data[:1] == b"\x04":  # P-DATA-TF
            self.data_threads.add(
                "association" if threading.current_thread() is event.assoc else "DUL"
            )

    def associations(self) -> list[Association]:
        return list(self.server.active_associations)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp() -> Iterator[Scp]:
    server = Scp()
    yield server
    server.stop()


def _requestor(scp: Scp, *contexts: str) -> Association:
    ae = AE("PUMPSCU")
    for context in contexts:
        ae.add_requested_context(context, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", scp.port, ae_title="PUMPSCP", evt_handlers=LOW_LATENCY_HANDLERS
    )
    assert assoc.is_established
    return assoc


def _dataset() -> Dataset:
    return ct_dataset("PUMP", b"\0" * 200_000)  # several PDUs at pynetdicom's default 16 KiB


def test_pynetdicom_is_the_version_the_single_thread_reactor_was_written_for() -> None:
    assert dimse_pump.INSTALLED


def test_another_pynetdicom_version_is_not_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    unpatched = object()
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    monkeypatch.setattr(Association, "_run_reactor", unpatched)
    assert dimse_pump.install() is False
    assert Association._run_reactor is unpatched  # pynetdicom's own reactor is kept


def test_storescu_of_many_instances_then_echoscu_are_served_by_the_association_thread(
    scp: Scp, tmp_path: Path
) -> None:
    study = make_ct_study(tmp_path, series=1, slices=60, rows=64, columns=64)
    stored = subprocess.run(
        ["storescu", "-aec", "PUMPSCP", "127.0.0.1", str(scp.port), "+sd", str(tmp_path)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=60, check=False,
    )  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    assert sorted(scp.stored) == sorted(study.sop_uids)
    assert all(scp.pumped_in_handler)
    assert scp.data_threads == {"association"}  # the DUL thread read no P-DATA
    echo = subprocess.run(
        ["echoscu", "-aec", "PUMPSCP", "127.0.0.1", str(scp.port)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=30, check=False,
    )  # fmt: skip
    assert echo.returncode == 0, echo.stderr
    wait_until(lambda: scp.associations() == [], timeout=5, message="associations to end")


def test_release_ends_a_storage_association_and_its_threads(scp: Scp) -> None:
    assoc = _requestor(scp, CTImageStorage, Verification)
    for _ in range(5):
        assert assoc.send_c_store(_dataset()).Status == 0x0000
    assert assoc.send_c_echo().Status == 0x0000
    (served,) = scp.associations()
    assoc.release()
    assert assoc.is_released
    served.join(5)
    served.dul.join(5)
    assert not served.is_alive() and not served.dul.is_alive()
    assert scp.released.is_set()


def test_association_with_query_retrieve_contexts_keeps_two_threads(scp: Scp) -> None:
    assoc = _requestor(scp, CTImageStorage, StudyRootQueryRetrieveInformationModelFind)
    try:
        assert assoc.send_c_store(_dataset()).Status == 0x0000
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        assert responses[-1][0].Status == 0x0000
    finally:
        assoc.release()
    assert scp.pumped_in_handler == [False, False]
    assert scp.data_threads == {"DUL"}


def test_association_idle_past_the_network_timeout_is_aborted() -> None:
    scp = Scp(network_timeout=0.5)
    try:
        assoc = _requestor(scp, CTImageStorage)
        assert assoc.send_c_store(_dataset()).Status == 0x0000
        wait_until(lambda: scp.aborted.is_set(), timeout=10, message="the idle abort")
        wait_until(lambda: assoc.is_aborted, timeout=10, message="the requestor to see it")
        wait_until(lambda: scp.associations() == [], timeout=5, message="the association to end")
    finally:
        scp.stop()


def test_peer_abort_in_the_middle_of_an_instance_ends_the_association(scp: Scp) -> None:
    assoc = _requestor(scp, CTImageStorage)
    assert assoc.send_c_store(_dataset()).Status == 0x0000
    ds = _dataset()
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(b"\x10\x00\x20\x00LO\x04\x00PUMP" + b"\0" * 200_000)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    assert context_id is not None
    fragments = list(message.encode_msg(context_id, 16_384))
    for fragment in fragments[: len(fragments) // 2]:
        assoc.dul.send_pdu(fragment)
    assoc.abort()
    wait_until(lambda: scp.aborted.is_set(), timeout=5, message="the peer's abort")
    wait_until(lambda: scp.associations() == [], timeout=5, message="the association to end")
    assert len(scp.stored) == 1


def test_local_abort_from_another_thread_ends_a_waiting_storage_association(scp: Scp) -> None:
    # As DimseGateway.stop does at shutdown: abort without waiting, then join.
    assoc = _requestor(scp, CTImageStorage)
    assert assoc.send_c_store(_dataset()).Status == 0x0000
    (served,) = scp.associations()
    served.abort(block=False)
    served.join(5)
    assert not served.is_alive()
    served.dul.join(5)
    assert not served.dul.is_alive()
    wait_until(lambda: assoc.is_aborted, timeout=5, message="the requestor to see the abort")


def test_abort_from_a_handler_of_the_association_thread_ends_it(scp: Scp) -> None:
    # As the node's size limit does from EVT_DATA_RECV, which now runs in that thread.
    def abort_on_second_store(event: Any) -> None:
        if len(scp.stored) == 1 and event.data[:1] == b"\x04":
            event.assoc.abort(block=False)

    assoc = _requestor(scp, CTImageStorage)
    (served,) = scp.associations()
    served.bind(evt.EVT_DATA_RECV, abort_on_second_store)
    assert assoc.send_c_store(_dataset()).Status == 0x0000
    assert assoc.send_c_store(_dataset()) == Dataset()  # aborted: no response
    served.join(5)
    assert not served.is_alive()
    assert len(scp.stored) == 1
