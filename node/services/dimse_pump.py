"""One thread per storage association: its reactor does the DUL's socket work itself.

pynetdicom runs two threads per association: the DUL thread reads the socket, runs the
Upper Layer state machine and sends queued PDUs; the association's reactor takes each
complete message, runs its handler and queues the response. storescu sends the next
instance only after the response to the last, so every C-STORE crosses between the two
threads twice (request in, response out), and on a loaded machine each crossing can
cost a scheduler slice.

For an accepted association whose contexts are only Verification and Storage (what
storescu and modalities open), the reactor here runs the DUL's loop body itself: while
no message is complete it reads the socket (``select`` with a short timeout), decodes
PDUs and runs the state machine; after a handler returns it sends the response at once.
Its DUL thread parks meanwhile. The same loop body runs either way (one lock keeps the
two threads from running it at once), so ARTIM, the idle timeout, the node's event
handlers (EVT_DATA_RECV, EVT_DIMSE_RECV, EVT_C_STORE...) and TLS behave as before. As
soon as the association is killed (release, abort from either side, network timeout,
shutdown) the DUL thread takes over again and finishes the state machine as usual.

Associations with Query/Retrieve contexts keep pynetdicom's two threads: a C-GET handler
waits for C-STORE responses that only the DUL thread would read, and C-FIND and C-MOVE
watch for a C-CANCEL while their handler runs.

Written against pynetdicom 3.0.4, whose private loop bodies it copies
(``DULServiceProvider.run_reactor``, ``Association._run_reactor``); with any other
version it is not installed, and the DIMSE gateway says so in a warning at start.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import ssl
import threading
import time
from typing import Any, cast

import pynetdicom
import pynetdicom.association
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.service_class import ServiceClass, StorageServiceClass, VerificationServiceClass
from pynetdicom.sop_class import uid_to_service_class

log = logging.getLogger(__name__)

WRITTEN_FOR = "3.0.4"
# Longest the reactor waits on the socket before it looks at its other duties (a message
# queued by another thread, e.g. the A-ABORT of a shutdown; the idle timeout).
SOCKET_WAIT_SECONDS = 0.02
# How often a parked DUL thread looks whether it has been killed.
PARK_SECONDS = 0.1

_ORIGINAL_DUL_INIT = DULServiceProvider.__init__
_ORIGINAL_KILL_DUL = DULServiceProvider.kill_dul
_ORIGINAL_RUN_REACTOR = Association._run_reactor
_ORIGINAL_KILL = Association.kill


class _Pump:
    """Who runs a DUL's loop: its own thread, or (``active``) its association's reactor."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # held for each turn of the loop, by either thread
        self.active = False
        self.unparked = threading.Event()


def _pump(dul: DULServiceProvider) -> _Pump:
    return cast(_Pump, vars(dul)["_imageshare_pump"])


def _dul_init(self: DULServiceProvider, assoc: Association) -> None:
    _ORIGINAL_DUL_INIT(self, assoc)
    self._imageshare_pump = _Pump()  # type: ignore[attr-defined]


def _step(dul: DULServiceProvider) -> bool:
    """One turn of pynetdicom 3.0.4's DUL loop: whether it handled an event.

    The caller holds the pump's lock.
    """
    if dul.artim_timer.expired:
        dul.event_queue.put("Evt18")
    try:
        # Either a primitive to send or a PDU received, as in pynetdicom's loop.
        if dul._process_recv_primitive():
            pass
        elif dul._is_transport_event():
            dul._idle_timer.restart()
    except Exception:
        log.exception("DIMSE upper layer failed; aborting the association")
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        sock = dul.socket
        if sock is not None:
            sock.send(abort_pdu.encode())
        dul.assoc.is_aborted = True
        dul.assoc.is_established = False
        dul.assoc._kill = True
        dul.kill_dul()
        return False
    try:
        event = dul.event_queue.get(block=False)
    except queue.Empty:
        return False
    # A failing action is logged by the state machine, which has killed the DUL.
    with contextlib.suppress(Exception):
        dul.state_machine.do_action(event)
    return True


def _run_dul(self: DULServiceProvider) -> None:
    """pynetdicom 3.0.4's DUL loop, parked while its association's reactor runs it."""
    self._idle_timer.start()
    sleep = False
    pump = _pump(self)
    while True:
        if not self.assoc._dul_ready.is_set():
            self.assoc._dul_ready.set()
            sleep = True
        if sleep:
            time.sleep(self._run_loop_delay)
        if self._kill_thread:
            break
        if pump.active:
            pump.unparked.wait(PARK_SECONDS)
            sleep = False
            continue
        with pump.lock:
            if pump.active:
                continue
            sleep = not _step(self)


def _kill_dul(self: DULServiceProvider) -> None:
    _ORIGINAL_KILL_DUL(self)
    _pump(self).unparked.set()  # a parked thread exits at once


def _unpump(dul: DULServiceProvider) -> None:
    """Hand the socket back to the DUL thread."""
    pump = _pump(dul)
    pump.active = False
    pump.unparked.set()


def _kill(self: Association) -> None:
    # pynetdicom's kill waits for the state machine to reach Sta1, which takes the DUL
    # thread's turns: it must not still be parked.
    _unpump(self.dul)
    _ORIGINAL_KILL(self)


def only_verification_and_storage(assoc: Association) -> bool:
    """Whether every accepted context is Verification or Storage (or, with unrestricted
    storage, a SOP class pynetdicom does not know, which it serves as storage)."""
    contexts = assoc.accepted_contexts
    if not contexts:
        return False
    for context in contexts:
        service = uid_to_service_class(str(context.abstract_syntax))
        if service in (VerificationServiceClass, StorageServiceClass):
            continue
        if service is ServiceClass and _config.UNRESTRICTED_STORAGE_SERVICE:
            continue
        return False
    return True


def _wait_for_socket(dul: DULServiceProvider) -> None:
    """Until the socket has data, or SOCKET_WAIT_SECONDS."""
    transport = dul.socket
    sock: Any = transport.socket if transport is not None else None
    if sock is None or not transport._is_connected:  # type: ignore[union-attr]
        time.sleep(0.001)  # the state machine is closing it: its next turn sees that
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes that select cannot see
    try:
        select.select([sock], [], [], SOCKET_WAIT_SECONDS)
    except (OSError, ValueError):  # closed under us: the next turn sees it
        time.sleep(0.001)


def _turn(dul: DULServiceProvider, *, drain: bool) -> None:
    """The DUL's work in the reactor's thread: with ``drain``, until nothing is queued to
    send (the handler's response goes out at once); otherwise one turn, and when it
    found nothing to do, a wait for the socket."""
    pump = _pump(dul)
    with pump.lock:
        if not pump.active or dul._kill_thread:
            idle = True
        elif drain:
            while (
                pump.active
                and not dul._kill_thread
                and (dul.to_provider_queue.queue or dul.event_queue.queue)
            ):
                _step(dul)
            return
        else:
            idle = not _step(dul)
    if idle:
        if pump.active and not dul._kill_thread:
            _wait_for_socket(dul)
        else:
            time.sleep(0.001)  # the DUL thread is finishing: let it


def _run_reactor(self: Association) -> None:
    """pynetdicom 3.0.4's acceptor reactor (``Association._run_reactor``), doing the DUL's
    work in its own thread for a storage association."""
    if not (self.is_acceptor and only_verification_and_storage(self)):
        _ORIGINAL_RUN_REACTOR(self)
        return
    dul = self.dul
    pump = _pump(dul)
    with pump.lock:  # not in the middle of a turn of the DUL thread
        pump.unparked.clear()
        pump.active = True
    try:
        _pumped_reactor(self)
    finally:
        _unpump(dul)


def _pumped_reactor(self: Association) -> None:
    dul = self.dul
    self._is_paused = False
    while not self._kill:
        # send_* from another thread pauses the reactor here, as in pynetdicom.
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, cast(int, context_id))
            _turn(dul, drain=True)
        else:
            _turn(dul, drain=False)

        # From here on as pynetdicom's reactor.
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not dul.is_alive():
            self.kill()
            return
        if dul.idle_timer_expired():
            pynetdicom.association.LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                _unpump(dul)
                self.release()
            else:
                self.abort()
            self.kill()
            return


def install() -> bool:
    """Install the single-thread reactor for storage associations; False when pynetdicom
    is not the version it was written for (the DIMSE gateway logs that at start)."""
    if pynetdicom.__version__ != WRITTEN_FOR:
        return False
    DULServiceProvider.__init__ = _dul_init  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = _run_dul  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = _kill_dul  # type: ignore[method-assign]
    Association._run_reactor = _run_reactor  # type: ignore[method-assign]
    Association.kill = _kill  # type: ignore[method-assign]
    return True


INSTALLED = install()
