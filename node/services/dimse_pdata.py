"""P-DATA received with one copy of its bytes: the node's own decoding of P-DATA-TF PDUs.

pynetdicom copies every received P-DATA PDU five times before a handler sees its data set
(the PDU appended to a buffer, the buffer copied to bytes for EVT_DATA_RECV, each PDV
value sliced out, its message control header sliced off, the fragment written into a
growing BytesIO): a 512 KiB instance costs 2.5 MiB of copying and a Python object per
fragment. Here a P-DATA-TF PDU is read straight into one buffer, its PDVs are views into
it, and the data set fragments of a message are joined once when its last one arrives.
Every other PDU type goes through pynetdicom's own decoding, as before.

The PDU layer here is stricter than pynetdicom's (which silently cuts a PDV that claims
more than its PDU holds): a P-DATA-TF PDU with no PDV, a PDV shorter than its context ID
and message control header, a PDV that runs past the end of its PDU, or a PDV on a
presentation context the association did not accept is refused, and the association is
aborted (pynetdicom's event for an invalid PDU, Evt19: an A-ABORT, then the connection
closed). A PDU over ``MAX_PDU_BYTES`` is refused before its body is read.

Written against pynetdicom 3.0.4, whose private ``DULServiceProvider._read_pdu_data`` and
``DIMSEMessage.decode_msg`` it replaces (``install``, only with that version).
"""

from __future__ import annotations

import io
import logging
import socket
import struct
from typing import TYPE_CHECKING, Any, cast

import pynetdicom
from pynetdicom import _config, evt
from pynetdicom.dimse_messages import _MESSAGE_TYPES, DIMSEMessage
from pynetdicom.dsutils import decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

WRITTEN_FOR = "3.0.4"
# Largest PDU the node accepts: large PDUs mean fewer, cheaper reads per instance.
MAX_PDU_BYTES = 4 * 1024 * 1024
_P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))
_PDU_HEADER = struct.Struct(">BBL")
_PDV_LENGTH = struct.Struct(">L")
_NO_DATA_SET = 0x0101  # CommandDataSetType of a message without a data set

_ORIGINAL_READ_PDU_DATA = DULServiceProvider._read_pdu_data
_ORIGINAL_DECODE_MSG = DIMSEMessage.decode_msg


class PduRefused(ValueError):
    """A P-DATA-TF PDU the node does not accept (the association is aborted)."""


def check_pdu_length(length: int) -> None:
    """Refuse a PDU longer than the node accepts, before any of its body is read: pynetdicom
    would otherwise hold whatever length the peer claims (up to 4 GiB) in memory."""
    if length > MAX_PDU_BYTES:
        raise ConnectionAbortedError(
            f"a PDU of {length} bytes is over the node's maximum of {MAX_PDU_BYTES}"
        )


def receive_into(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from ``sock`` in as few reads as the socket allows; the bytes read,
    fewer only if the peer closed the connection."""
    received = 0
    while received < len(view):
        count = sock.recv_into(view[received:])
        if not count:
            break
        received += count
    return received


def pdv_items(pdu: bytearray, accepted: Any) -> list[tuple[int, memoryview]]:
    """The (presentation context ID, value) of each PDV of a whole P-DATA-TF PDU, each
    value a view into ``pdu`` (its message control header first, as pynetdicom gives it).

    Raises PduRefused for no PDV, a PDV too short for its header, one that runs past the
    end of the PDU, or one on a context not in ``accepted``.
    """
    items: list[tuple[int, memoryview]] = []
    view = memoryview(pdu)
    end = len(pdu)
    offset = _PDU_HEADER.size
    while offset < end:
        if offset + 4 > end:
            raise PduRefused("a PDV item's length is cut off by the end of its PDU")
        (length,) = _PDV_LENGTH.unpack_from(pdu, offset)
        start, stop = offset + 4, offset + 4 + length
        if length < 2:
            raise PduRefused(f"a PDV item of {length} bytes has no room for its header")
        if stop > end:
            raise PduRefused(f"a PDV item of {length} bytes runs past the end of its PDU")
        context_id = pdu[start]
        if context_id not in accepted:
            raise PduRefused(f"a PDV on presentation context {context_id}, not accepted")
        items.append((context_id, view[start + 1 : stop]))
        offset = stop
    if not items:
        raise PduRefused("a P-DATA-TF PDU without any PDV item")
    return items


class ReceivedPData(P_DATA_TF):
    """A P-DATA-TF PDU decoded by ``pdv_items``: what pynetdicom's state machine needs of
    one (``to_primitive``), without an item object per PDV."""

    def __init__(self, items: list[tuple[int, memoryview]]) -> None:
        super().__init__()
        self.items = items

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        # Filled as pynetdicom fills it: its setter would refuse a view for bytes.
        primitive.presentation_data_value_list = []
        primitive.presentation_data_value_list.extend(self.items)  # type: ignore[arg-type]
        return primitive


def _read_pdu_data(self: DULServiceProvider) -> None:
    """pynetdicom 3.0.4's ``_read_pdu_data``, with P-DATA-TF PDUs read and decoded here."""
    sock = cast(Any, self.socket)
    try:
        header = bytes(sock.recv(6))
        pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
        check_pdu_length(pdu_length)
    except (OSError, TimeoutError) as exc:
        log.warning("DIMSE connection closed before the entire PDU was received: %s", exc)
        self.event_queue.put("Evt17")
        return
    except struct.error:  # fewer than 6 bytes: the peer closed the connection
        self.event_queue.put("Evt17")
        return
    if pdu_type not in _PDU_TYPES:
        log.warning("DIMSE PDU of unknown type 0x%02X refused", pdu_type)
        self.event_queue.put("Evt19")
        return
    pdu = bytearray(_PDU_HEADER.size + pdu_length)
    pdu[: _PDU_HEADER.size] = header
    try:
        with memoryview(pdu) as body:
            received = receive_into(sock.socket, body[_PDU_HEADER.size :])
    except (OSError, TimeoutError) as exc:
        log.warning("DIMSE connection closed before the entire PDU was received: %s", exc)
        self.event_queue.put("Evt17")
        return
    if received != pdu_length:
        self.event_queue.put("Evt17")  # closed by the peer inside the PDU
        return
    try:
        decoded = _decode_pdata(self, pdu) if pdu_type == _P_DATA_TF else self._decode_pdu(pdu)
    except Exception as exc:
        log.warning("DIMSE PDU refused, aborting the association: %s", exc)
        self.event_queue.put("Evt19")
        return
    self.event_queue.put(decoded[1])
    self._recv_pdu.put(decoded[0])


def _decode_pdata(dul: DULServiceProvider, pdu: bytearray) -> tuple[P_DATA_TF, str]:
    # The node's handler counts its length; the buffer itself, not a copy of it.
    evt.trigger(dul.assoc, evt.EVT_DATA_RECV, {"data": pdu})
    decoded = ReceivedPData(pdv_items(pdu, dul.assoc._accepted_cx))
    evt.trigger(dul.assoc, evt.EVT_PDU_RECV, {"pdu": decoded})
    return decoded, "Evt10"


def _decode_msg(self: DIMSEMessage, primitive: P_DATA, assoc: Association | None = None) -> bool:
    """pynetdicom 3.0.4's ``decode_msg``, but the data set's fragments are kept as views and
    joined once, after the last (``data_set`` a BytesIO over those bytes, not a copy)."""
    if _config.STORE_RECV_CHUNKED_DATASET or primitive.__class__ is not P_DATA:
        return cast(bool, _ORIGINAL_DECODE_MSG(self, primitive, assoc))
    fragments: list[Any] = vars(self).setdefault("_imageshare_fragments", [])
    for context_id, data in primitive.presentation_data_value_list:
        control_header = data[0]
        if control_header & 1:  # command set
            self.encoded_command_set.write(data[1:])
            if control_header & 2:  # its last fragment
                self.context_id = context_id
                self.command_set = decode(self.encoded_command_set, True, True)
                self.__class__ = _MESSAGE_TYPES[cast(int, self.command_set.CommandField)][1]
                if self.command_set.CommandDataSetType == _NO_DATA_SET:
                    return True
        else:
            fragments.append(data[1:])
            if control_header & 2:  # the data set's last fragment
                self.data_set = io.BytesIO(b"".join(fragments))
                fragments.clear()
                return True
    return False


def install() -> bool:
    """Receive P-DATA as above; False when pynetdicom is not the version it was written
    for (pynetdicom's own decoding then stays)."""
    if pynetdicom.__version__ != WRITTEN_FOR:
        return False
    DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
    DIMSEMessage.decode_msg = _decode_msg  # type: ignore[method-assign]
    return True


INSTALLED = install()
