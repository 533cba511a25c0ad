"""How the node speaks DIMSE on the wire: pynetdicom settings, low latency, sending, TLS.

Shared by the DIMSE edge (C-GET, C-MOVE) and the PACS forwarder. pynetdicom is tuned
here, process-wide, once: quiet logging, TCP_NODELAY on every connection, and short idle
polls while DIMSE traffic flows. DICOM TLS contexts follow BCP 195 (TLS 1.2+, ECDHE with
AEAD ciphers, no compression) on both sides.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import ssl
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, cast

import pynetdicom.association
import pynetdicom.dul
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    build_context,
    evt,
)
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket

from node.errors import BadInput, ConfigError
from node.services import dimse_pump  # noqa: F401  # one thread per storage association
from node.services.dimse_pdata import MAX_PDU_BYTES as MAX_PDU_BYTES  # its users' import
from node.services.dimse_pdata import check_pdu_length, receive_into
from node.services.tls import bcp195
from node.store.instances import InstanceRecord
from node.store.protocols import InstanceStore

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import DimsePrimitiveType
    from pynetdicom.events import Event

    from node.config import DimseTlsConfig, OutgoingTls

log = logging.getLogger(__name__)


# pynetdicom logs every message at INFO, and its standard handlers format every message
# and PDU (copying each received data set) even when that log is silenced. The node logs
# what an operator needs itself.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
_config.LOG_HANDLER_LEVEL = "none"

# pynetdicom's two threads per association (socket reader, message reactor; a storage
# association has only the reactor: dimse_pump) sleep 1 ms whenever they find nothing to
# do, which a study pays between every two messages. While
# DIMSE traffic flows the node has them poll every 0.1 ms instead (measured: ~10% faster
# when the machine is quiet, ~30% when it is busy); an idle association goes back to
# 1 ms, since fast polling costs ~15% of a core per open association.
FAST_POLL_SECONDS = 0.0001
BUSY_WINDOW_SECONDS = 0.5
_PYNETDICOM_IDLE_SLEEP = 0.001


class _PollClock:
    """The ``time`` module as pynetdicom's DUL and association modules see it.

    Only their idle sleep changes: it is short until BUSY_WINDOW_SECONDS after the last
    DIMSE activity the node saw.
    """

    def __init__(self) -> None:
        self.busy_until = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == _PYNETDICOM_IDLE_SLEEP and time.monotonic() < self.busy_until:
            seconds = FAST_POLL_SECONDS
        time.sleep(seconds)


_POLL_CLOCK = _PollClock()
pynetdicom.association.time = _POLL_CLOCK  # type: ignore[assignment]
pynetdicom.dul.time = _POLL_CLOCK  # type: ignore[assignment]


_SEND_C_STORE = pynetdicom.association.Association.send_c_store
_REACTOR_RESUME_WAIT_SECONDS = 1.0


def _send_c_store_once_the_reactor_runs(
    assoc: pynetdicom.association.Association, *args: Any, **kwargs: Any
) -> Any:
    """pynetdicom's send_c_store, started only once the association's reactor has left
    its pause.

    send_c_store pauses the reactor by clearing a checkpoint and waiting for the flag the
    reactor raises before it waits on that checkpoint. Right after the previous send has
    released it, the flag can still be up while the reactor runs on: the next send then
    goes ahead, the reactor takes its response ("unexpected C-STORE service message") and
    the send waits out the DIMSE timeout. Back-to-back sends from another thread (C-MOVE
    sub-operations, forwarding) hit this under load. A send from the association's own
    reactor thread (C-GET, inside an SCP handler) keeps the flag up on purpose and does
    not wait.
    """
    if threading.current_thread() is not assoc:
        deadline = time.monotonic() + _REACTOR_RESUME_WAIT_SECONDS
        while (
            assoc._is_paused and assoc._reactor_checkpoint.is_set() and time.monotonic() < deadline
        ):
            time.sleep(FAST_POLL_SECONDS / 2)
    return _SEND_C_STORE(assoc, *args, **kwargs)


pynetdicom.association.Association.send_c_store = _send_c_store_once_the_reactor_runs  # type: ignore[method-assign,assignment]


def _command_element(tag: int, value: bytes) -> bytes:
    """One element of a command set (Implicit VR Little Endian)."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def c_store_response_command_set(rsp: C_STORE) -> bytes | None:
    """The command set of a C-STORE response, encoded as pynetdicom encodes it; None for a
    response that carries more than the status (an error comment, an offending element)."""
    sop_class, sop_instance = rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID
    if (
        rsp.ErrorComment is not None
        or rsp.OffendingElement is not None
        or sop_class is None
        or sop_instance is None
        or rsp.MessageIDBeingRespondedTo is None
        or rsp.Status is None
    ):
        return None
    elements = b"".join(
        (
            _command_element(0x00000002, _even(sop_class, b"\x00")),
            _command_element(0x00000100, struct.pack("<H", 0x8001)),  # C-STORE-RSP
            _command_element(0x00000120, struct.pack("<H", rsp.MessageIDBeingRespondedTo)),
            _command_element(0x00000800, struct.pack("<H", 0x0101)),  # no data set
            _command_element(0x00000900, struct.pack("<H", rsp.Status)),
            _command_element(0x00001000, _even(sop_instance, b"\x00")),
        )
    )
    return _command_element(0x00000000, struct.pack("<I", len(elements))) + elements


_SEND_MSG = DIMSEServiceProvider.send_msg


def _send_msg(self: DIMSEServiceProvider, primitive: DimsePrimitiveType, context_id: int) -> None:
    """pynetdicom's send_msg, but a C-STORE response that fits one PDU is encoded here: its
    DIMSEMessage and pydicom command set cost about 0.3 ms an instance. Nobody is told of
    the message sent (EVT_DIMSE_SENT), so only while nobody listens for it."""
    command_set = (
        c_store_response_command_set(primitive)
        if type(primitive) is C_STORE and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        else None
    )
    max_pdu = self.maximum_pdu_size
    if command_set is None or (max_pdu and len(command_set) > max_pdu - 6):
        _SEND_MSG(self, primitive, context_id)
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + command_set))  # last
    self.dul.send_pdu(pdata)


DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]


def mark_dimse_activity() -> None:
    """Note DIMSE traffic: pynetdicom polls fast for the next BUSY_WINDOW_SECONDS."""
    _POLL_CLOCK.busy_until = time.monotonic() + BUSY_WINDOW_SECONDS


# Longest wait for a TCP connection to a peer AE (pynetdicom waits forever by default).
CONNECT_TIMEOUT_SECONDS = 10.0


def _recv_whole(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """pynetdicom's AssociationSocket.recv in large reads straight into one buffer.

    pynetdicom reads a PDU 4 KiB at a time, appending to a growing buffer; this reads as
    much as the socket has, into the PDU's final buffer. A PDU longer than the largest
    the node accepts is refused before any of it is read (``check_pdu_length``). The
    refusal closes the connection (pynetdicom treats the error as the transport closing).
    """
    check_pdu_length(nr_bytes)
    buffer = bytearray(nr_bytes)
    with memoryview(buffer) as view:
        received = receive_into(cast(socket.socket, self.socket), view)
    del buffer[received:]  # closed by the peer: what arrived, as pynetdicom returns it
    return buffer


AssociationSocket.recv = _recv_whole  # type: ignore[method-assign]


def set_low_latency(event: Event) -> None:
    """On every DIMSE connection, accepted or opened: no Nagle delay, fast polls.

    Without TCP_NODELAY each small response waits for the peer's delayed ACK (~40 ms).
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None and sock.fileno() != -1:  # -1: closed by a refused TLS handshake
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    mark_dimse_activity()


LOW_LATENCY_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, set_low_latency)]


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element of the file meta information (Explicit VR Little Endian, 2-byte length)."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _even(value: str, padding: bytes) -> bytes:
    encoded = value.encode("latin-1")  # pydicom's default character set, for UI and SH
    return encoded + padding if len(encoded) % 2 else encoded


def received_part10(request: C_STORE, transfer_syntax: str) -> bytes:
    """A C-STORE's data set, received in ``transfer_syntax``, as a DICOM Part 10 file: the
    bytes pynetdicom's ``event.encoded_dataset()`` gives, without the pydicom file meta
    data set it builds and encodes for them (a quarter of a millisecond an instance)."""
    if request.DataSet is None:
        raise BadInput("the C-STORE request has no data set")
    sop_class, sop_instance = request.AffectedSOPClassUID, request.AffectedSOPInstanceUID
    if sop_class is None or sop_instance is None:
        raise BadInput("the C-STORE request names no SOP class or instance")
    elements = b"".join(
        (
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _meta_element(0x00020002, b"UI", _even(sop_class, b"\x00")),
            _meta_element(0x00020003, b"UI", _even(sop_instance, b"\x00")),
            _meta_element(0x00020010, b"UI", _even(transfer_syntax, b"\x00")),
            _meta_element(0x00020012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _meta_element(0x00020013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    group_length = _meta_element(0x00020000, b"UL", struct.pack("<I", len(elements)))
    return b"".join((_PREAMBLE, group_length, elements, request.DataSet.getvalue()))


def storage_contexts(records: list[InstanceRecord]) -> list[PresentationContext]:
    """Presentation contexts to send these instances in their stored transfer syntax.

    Each stored syntax gets a context of its own, so that a peer accepting one does not
    shut out the others; a little-endian context per SOP class is the fallback that
    pynetdicom can convert uncompressed data to. Raises BadInput over 128 contexts.
    """
    plain: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    syntaxes: dict[str, set[str]] = {}
    for record in records:
        syntaxes.setdefault(record.sop_class_uid, set()).add(record.transfer_syntax_uid)
    contexts = []
    for sop_class, stored in sorted(syntaxes.items()):
        contexts += [build_context(sop_class, syntax) for syntax in sorted(stored)]
        if not stored <= set(plain):
            contexts.append(build_context(sop_class, plain))
    if len(contexts) > 128:
        raise BadInput("too many SOP classes for one association (at most 128)")
    return contexts


def read_instance(store: InstanceStore, record: InstanceRecord) -> Dataset:
    """A stored instance, decoded for sending by C-STORE (a deflated one within the limits).

    Raises ImageShareError if it cannot be read.
    """
    return store.read_dataset(record)


class _LazyHandshakeContext(ssl.SSLContext):
    """A server context whose handshake runs in the connection's own thread.

    pynetdicom wraps each accepted socket in its one accept thread; a handshake there
    would let a client that connects and says nothing stall the whole TLS listener.
    ``complete_tls_handshake`` does it instead, with a deadline.
    """

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def _load(context: ssl.SSLContext, key: str, cert_file: str, key_file: str, ca_file: str) -> None:
    """Load certificates, turning a bad file into a ConfigError naming the key and file."""
    loads = [("cert_file", cert_file, lambda: context.load_cert_chain(cert_file, key_file))]
    loads.append(("ca_file", ca_file, lambda: context.load_verify_locations(ca_file)))
    for name, path, load in loads:
        if not path:
            continue
        try:
            load()
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if exc.strerror else str(exc)
            raise ConfigError(f"{key} {name}: cannot load {path}: {why}") from exc


def server_tls_context(tls: DimseTlsConfig) -> ssl.SSLContext:
    """The TLS listener's context; with ``ca_file`` a client certificate from it is required."""
    context = bcp195(_LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER))
    _load(context, "[dimse.tls]", tls.cert_file, tls.key_file, tls.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED if tls.ca_file else ssl.CERT_NONE
    return context


def client_tls_args(peer: OutgoingTls, host: str, key: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to ``host``, or None for plain TCP.

    The peer's certificate must chain to ``ca_file`` (or the system's CAs) and name
    ``host``. Raises ConfigError for files that cannot be loaded.
    """
    if not peer.tls:
        return None
    context = bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # checks chain and name
    if not peer.ca_file:
        context.load_default_certs()
    _load(context, key, peer.cert_file, peer.key_file, peer.ca_file)
    return context, host


def complete_tls_handshake(event: Event) -> None:
    """EVT_CONN_OPEN on the TLS listener: the handshake, within CONNECT_TIMEOUT_SECONDS.

    A refused handshake (no certificate, one from another CA, plain DIMSE) is logged in
    one line and the connection closed, so the association ends without reading a PDU.
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if not isinstance(sock, ssl.SSLSocket):
        return
    address = event.assoc.requestor.address
    timeout = sock.gettimeout()  # pynetdicom's own, for reading PDUs later
    try:
        sock.settimeout(CONNECT_TIMEOUT_SECONDS)
        sock.do_handshake()
        sock.settimeout(timeout)
    except (OSError, ValueError) as exc:
        reason = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else exc
        log.warning("DICOM TLS handshake from %s refused: %s", address, reason)
        with contextlib.suppress(OSError):
            sock.close()


def peer_certificate_sha256(sock: Any) -> str | None:
    """The SHA-256 (hex) of the certificate a TLS peer presented, or None (plain, or none)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else None
