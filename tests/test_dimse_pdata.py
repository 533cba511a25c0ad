"""P-DATA received by the node's own decoding (node/services/dimse_pdata.py), against real
peers on loopback: data sets arrive byte for byte, and hostile P-DATA-TF PDUs written
straight onto an established association's socket abort it with nothing delivered."""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pynetdicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider

from node.services import dimse_pdata
from node.services.dimse_transport import LOW_LATENCY_HANDLERS, received_part10
from tests.support.nodes import free_port, wait_until
from tests.support.samples import ct_dataset


class Scp:
    """A Storage SCP with the node's P-DATA decoding, keeping each data set it received."""

    def __init__(self, max_pdu: int = 16_382) -> None:
        self.port = free_port()
        self.received: list[bytes] = []
        self.part10: list[bytes] = []
        self.lock = threading.Lock()
        ae = AE("PDATASCP")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        handlers: list[Any] = [*LOW_LATENCY_HANDLERS, (evt.EVT_C_STORE, self.on_store)]
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the running server
        self.server = server

    def on_store(self, event: Any) -> int:
        with self.lock:
            self.received.append(event.request.DataSet.getvalue())
            self.part10.append(received_part10(event.request, event.context.transfer_syntax))
        return 0x0000

    def associations(self) -> list[Association]:
        return list(self.server.active_associations)


@pytest.fixture
def scp() -> Iterator[Scp]:
    server = Scp()
    yield server
    server.server.shutdown()


def _requestor(scp: Scp) -> Association:
    ae = AE("PDATASCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", scp.port, ae_title="PDATASCP", evt_handlers=LOW_LATENCY_HANDLERS
    )
    assert assoc.is_established
    return assoc


def _dataset(pixel_bytes: int = 200_000) -> Dataset:
    return ct_dataset("PDATA", bytes(range(256)) * (pixel_bytes // 256))


def _encoded(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def _pdata(*pdvs: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF PDU of these (context ID, message control header + value) PDVs."""
    items = b"".join(struct.pack(">LB", len(value) + 1, cid) + value for cid, value in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


def _context_id(assoc: Association) -> int:
    context_id = assoc.accepted_contexts[0].context_id
    assert context_id is not None
    return context_id


def test_pynetdicom_is_the_version_the_pdata_decoding_was_written_for() -> None:
    assert dimse_pdata.INSTALLED
    assert DULServiceProvider._read_pdu_data is dimse_pdata._read_pdu_data
    assert DIMSEMessage.decode_msg is dimse_pdata._decode_msg


def test_another_pynetdicom_version_keeps_its_own_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    unpatched = object()
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    monkeypatch.setattr(DULServiceProvider, "_read_pdu_data", unpatched)
    assert dimse_pdata.install() is False
    assert DULServiceProvider._read_pdu_data is unpatched


def test_a_data_set_in_many_pdus_and_fragments_arrives_byte_for_byte(scp: Scp) -> None:
    datasets = [_dataset(), _dataset(pixel_bytes=1024), _dataset(pixel_bytes=100_000)]
    assoc = _requestor(scp)
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert scp.received == [_encoded(ds) for ds in datasets]
    # The Part 10 file ends with exactly those bytes, after its file meta.
    assert all(f.endswith(d) for f, d in zip(scp.part10, scp.received, strict=True))


def test_pdvs_of_one_pdu_are_split_at_their_lengths() -> None:
    pdu = bytearray(_pdata((1, b"\x03abc"), (1, b"\x02" + b"x" * 1000), (3, b"\x00")))
    items = dimse_pdata.pdv_items(pdu, {1: None, 3: None})
    assert [(cid, bytes(value)) for cid, value in items] == [
        (1, b"\x03abc"),
        (1, b"\x02" + b"x" * 1000),
        (3, b"\x00"),
    ]


HOSTILE_PDUS = {
    "a PDV longer than its PDU": struct.pack(">BBLLBB", 0x04, 0, 6, 1000, 1, 0x02),
    "a PDV shorter than its header": struct.pack(">BBLLB", 0x04, 0, 5, 1, 1),
    "a PDV length cut off": struct.pack(">BBL", 0x04, 0, 2) + b"\x00\x00",
    "no PDV at all": struct.pack(">BBL", 0x04, 0, 0),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_PDUS))
def test_a_malformed_pdata_pdu_aborts_the_association(
    scp: Scp, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    assoc = _requestor(scp)
    assert assoc.send_c_store(_dataset()).Status == 0x0000
    with caplog.at_level(logging.WARNING, logger=dimse_pdata.__name__):
        assoc.dul.socket.socket.sendall(HOSTILE_PDUS[name])  # type: ignore[union-attr]
        wait_until(lambda: assoc.is_aborted, timeout=10, message="the node's A-ABORT")
        wait_until(lambda: scp.associations() == [], timeout=10, message="the end")
    assert "DIMSE PDU refused" in caplog.text
    assert len(scp.received) == 1  # only the instance sent before
    follow = _requestor(scp)  # and the SCP serves the next association
    assert follow.send_c_store(_dataset()).Status == 0x0000
    follow.release()


def test_a_pdv_on_a_context_not_accepted_aborts_before_anything_is_stored(
    scp: Scp, caplog: pytest.LogCaptureFixture
) -> None:
    assoc = _requestor(scp)
    other = _context_id(assoc) + 2  # the next odd ID: never proposed
    with caplog.at_level(logging.WARNING, logger=dimse_pdata.__name__):
        assoc.dul.socket.socket.sendall(_pdata((other, b"\x03" + b"\0" * 20)))  # type: ignore[union-attr]
        wait_until(lambda: assoc.is_aborted, timeout=10, message="the node's A-ABORT")
    assert f"presentation context {other}, not accepted" in caplog.text
    assert scp.received == []


def test_a_pdu_cut_short_by_the_peer_delivers_nothing(scp: Scp) -> None:
    assoc = _requestor(scp)
    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert sock is not None
    # A PDU that claims 10 000 bytes; 30 arrive, then the connection closes.
    sock.sendall(struct.pack(">BBL", 0x04, 0, 10_000) + struct.pack(">LB", 9_996, 1) + b"\x02" * 25)
    sock.shutdown(2)
    wait_until(lambda: scp.associations() == [], timeout=10, message="the association to end")
    assert scp.received == []


def test_a_pdata_pdu_over_the_maximum_is_refused_before_its_body_is_read(scp: Scp) -> None:
    assoc = _requestor(scp)
    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert sock is not None
    sock.sendall(struct.pack(">BBL", 0x04, 0, dimse_pdata.MAX_PDU_BYTES + 1))
    # Refused on its header alone: the SCP closes without waiting for the 4 MiB body.
    wait_until(lambda: scp.associations() == [], timeout=10, message="the association to end")
    assert scp.received == []
