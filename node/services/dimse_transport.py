"""How the node speaks DIMSE on the wire: pynetdicom settings, low latency, sending.

Shared by the DIMSE edge (C-GET, C-MOVE) and the PACS forwarder. pynetdicom is tuned
here, process-wide, once: quiet logging, TCP_NODELAY on every connection, and short idle
polls while DIMSE traffic flows.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any

import pynetdicom.association
import pynetdicom.dul
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config, build_context, evt
from pynetdicom.presentation import PresentationContext

from node.errors import BadInput
from node.store.instances import InstanceRecord, InstanceStore

if TYPE_CHECKING:
    from pynetdicom.events import Event


# pynetdicom logs every message at INFO, and its standard handlers format every message
# and PDU (copying each received data set) even when that log is silenced. The node logs
# what an operator needs itself.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
_config.LOG_HANDLER_LEVEL = "none"

# pynetdicom's two threads per association (socket reader, message reactor) sleep 1 ms
# whenever they find nothing to do, which a study pays between every two C-STOREs. While
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


def mark_dimse_activity() -> None:
    """Note DIMSE traffic: pynetdicom polls fast for the next BUSY_WINDOW_SECONDS."""
    _POLL_CLOCK.busy_until = time.monotonic() + BUSY_WINDOW_SECONDS


# Largest PDU the node accepts: large PDUs mean fewer, cheaper reads per instance.
MAX_PDU_BYTES = 4 * 1024 * 1024
# Longest wait for a TCP connection to a peer AE (pynetdicom waits forever by default).
CONNECT_TIMEOUT_SECONDS = 10.0


def set_low_latency(event: Event) -> None:
    """On every DIMSE connection, accepted or opened: no Nagle delay, fast polls.

    Without TCP_NODELAY each small response waits for the peer's delayed ACK (~40 ms).
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    mark_dimse_activity()


LOW_LATENCY_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, set_low_latency)]


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
