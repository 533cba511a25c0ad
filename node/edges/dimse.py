"""The DIMSE gateway: how PACS and modalities reach the node (pynetdicom handlers, thin).

Verification, Storage, and Query/Retrieve (C-FIND, C-GET, C-MOVE; Patient and Study
Root) SCPs on one AE. Storage goes through the store's one durable path, so a C-STORE
is answered with success only once its instance is fsynced and indexed. The node's
errors map to DIMSE status codes in ``failure_status`` alone.

Access is decided once per association, in ``on_requested``, from the calling AE title
AND the address the association comes from (a title alone is no identity: any device
can send any title), and for a caller bound to a certificate, the TLS client certificate
it presented: a caller not in ``[[dimse.callers]]`` at that address is never
offered the query/retrieve contexts, and is rejected outright when
``store_from_any_ae`` is off. Every C-FIND, C-GET and C-MOVE is logged at INFO with the
calling AE, its address and counts (never patient data or UIDs).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    build_context,
    evt,
)
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from node.config import DimseCaller, DimseConfig, DimseDestination
from node.core import atna
from node.errors import BadInput, ConfigError, ImageShareError, PayloadTooLarge, StorageFull
from node.services import dimse_pdata, dimse_pump
from node.services.dimse_query import (
    Model,
    find,
    select_for_retrieve,
)
from node.services.dimse_transport import (
    CONNECT_TIMEOUT_SECONDS,
    LOW_LATENCY_HANDLERS,
    MAX_PDU_BYTES,
    client_tls_args,
    complete_tls_handshake,
    mark_dimse_activity,
    peer_certificate_sha256,
    read_instance,
    received_part10,
    server_tls_context,
    storage_contexts,
)
from node.store.dicom_header import InstanceHeader
from node.store.instances import InstanceRecord

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.transport import ThreadedAssociationServer

    from node.services.runtime import NodeRuntime

log = logging.getLogger(__name__)

SOURCE = "dimse"
# At shutdown, how long the running associations get to finish the message in hand.
ASSOCIATION_STOP_SECONDS = 20.0
# Room for the command set and PDU headers around an instance of the largest size.
MESSAGE_OVERHEAD = 1024 * 1024

STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_IDENTIFIER_MISMATCH = 0xA900
# PS3.4 B.2.3, as DCMTK's storescp answers it for a class or an instance other than the
# request's.
STATUS_DATA_SET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_UNABLE_TO_PROCESS = 0xC001
# A-ASSOCIATE-RJ: rejected permanent, by the service user, calling AE title not recognised.
REJECT_UNKNOWN_CALLER = (0x01, 0x01, 0x03)

# Transfer syntaxes of query and retrieve requests. Not Deflated Explicit VR Little Endian:
# pynetdicom inflates a deflated identifier whole in memory (a small message could take
# gigabytes), and an identifier is a few attributes that gain nothing from it.
QUERY_TRANSFER_SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]

_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: Model.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: Model.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelMove: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: Model.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: Model.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelMove: Model.STUDY_ROOT,
}
QUERY_RETRIEVE_CLASSES = frozenset(str(uid) for uid in _MODELS)


def _same_address(configured: str, address: str) -> bool:
    """Whether a peer address is the configured IP (an IPv4-mapped IPv6 peer counts)."""
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return peer == ipaddress.ip_address(configured)


def known_caller(
    config: DimseConfig, ae_title: str, address: str, certificate_sha256: str | None = None
) -> DimseCaller | None:
    """The configured caller with this AE title at this address, or None.

    A caller bound to a certificate also needs the TLS client certificate it presented
    (``certificate_sha256``) to be that one.
    """
    for caller in config.callers:
        if caller.ae_title.strip() != ae_title.strip() or not _same_address(caller.host, address):
            continue
        if caller.certificate_sha256 and caller.certificate_sha256 != certificate_sha256:
            continue
        return caller
    return None


class DataSetMismatch(BadInput):
    """A C-STORE data set that is not the instance its request names."""


def check_matches_request(header: InstanceHeader, request: C_STORE) -> None:
    """Raise DataSetMismatch unless the data set is the SOP class and instance that the
    C-STORE request's Affected SOP Class and Instance UIDs name (no UID in the message:
    it goes to the log and to the sender)."""
    if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
        raise DataSetMismatch("SOP Instance UID is not the request's Affected one")
    if header.sop_class_uid != str(request.AffectedSOPClassUID):
        raise DataSetMismatch("SOP Class UID is not the request's Affected one")


def failure_status(exc: Exception, identifier_error: bool = False) -> Dataset:
    """The DIMSE failure status for one of the node's errors, with its reason as comment.

    ``identifier_error`` selects the query/retrieve meaning of bad input (A900) over the
    storage one (C000).
    """
    if isinstance(exc, PayloadTooLarge | StorageFull):
        code = STATUS_OUT_OF_RESOURCES
    elif isinstance(exc, DataSetMismatch):
        code = STATUS_DATA_SET_MISMATCH
    elif isinstance(exc, BadInput):
        code = STATUS_IDENTIFIER_MISMATCH if identifier_error else STATUS_CANNOT_UNDERSTAND
    else:
        code = STATUS_UNABLE_TO_PROCESS
    status = Dataset()
    status.Status = code
    message = str(exc) if isinstance(exc, ImageShareError) else "internal error; see the log"
    status.ErrorComment = message[:64]  # LO: at most 64 characters
    return status


class SubOperationOutcomes:
    """The answers to one C-GET's or C-MOVE's C-STORE sub-operations, for its log line."""

    def __init__(self) -> None:
        self.completed = 0
        self.warning = 0
        self.failed = 0

    def on_message(self, event: Event) -> None:
        """EVT_DIMSE_RECV on the association that carries the sub-operations."""
        message = event.message
        if not isinstance(message, C_STORE_RSP):
            return
        status = int(message.command_set.Status)
        if status == STATUS_SUCCESS:
            self.completed += 1
        elif 0xB000 <= status <= 0xBFFF:
            self.warning += 1
        else:
            self.failed += 1

    def __str__(self) -> str:
        return f"{self.completed} completed, {self.warning} warning, {self.failed} failed"


def _join_all(threads: Sequence[threading.Thread], within: float) -> None:
    deadline = time.monotonic() + within
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("DIMSE association %s still running at shutdown", thread.name)


class DimseGateway:
    """The node's AE: a background service of `imageshare run`."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.config: DimseConfig = runtime.config.dimse
        self._servers: list[ThreadedAssociationServer] = []
        # pynetdicom holds a message in memory until it is complete, with no size limit;
        # an association sending more than an instance may hold is aborted instead.
        self.max_message_bytes = runtime.config.store.max_instance_bytes + MESSAGE_OVERHEAD
        self._unfinished_bytes: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        # pynetdicom's tls_args per C-MOVE destination title (None: plain TCP).
        self._destination_tls: dict[str, tuple[ssl.SSLContext, str] | None] = {}

    # -- life cycle --------------------------------------------------------------------

    def build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.connection_timeout = CONNECT_TIMEOUT_SECONDS  # for C-MOVE destinations
        ae.require_calling_aet = list(self.config.allowed_calling_aes)
        # Unrestricted: any storage SOP class is accepted (in the first transfer syntax the
        # peer proposes) and stored as received. It also spares copying ~150 storage
        # contexts for every association, which costs tens of milliseconds each.
        unrestricted = not self.config.refuse_unknown_sop_classes
        _config.UNRESTRICTED_STORAGE_SERVICE = unrestricted
        ae.add_supported_context(Verification)
        if not unrestricted:
            for context in AllStoragePresentationContexts:
                # scu_role lets C-GET send instances back over the requestor's association.
                ae.add_supported_context(
                    str(context.abstract_syntax),
                    ALL_TRANSFER_SYNTAXES,
                    scu_role=True,
                    scp_role=True,
                )
        for sop_class in _MODELS:
            ae.add_supported_context(sop_class, QUERY_TRANSFER_SYNTAXES)
        return ae

    async def start(self) -> None:
        if not (dimse_pump.INSTALLED and dimse_pdata.INSTALLED):
            log.warning(
                "pynetdicom %s is not %s: storage associations run in two threads and"
                " P-DATA is decoded by pynetdicom (slower)",
                pynetdicom.__version__,
                dimse_pump.WRITTEN_FOR,
            )
        ae = self.build_ae()
        handlers: list[Any] = [
            *LOW_LATENCY_HANDLERS,
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_DATA_RECV, self.on_data_received),
            (evt.EVT_DIMSE_RECV, self.on_message_complete),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_C_MOVE, self.on_move),
        ]
        # Loaded once: a certificate that cannot be loaded stops the start, not a C-MOVE.
        self._destination_tls = {
            d.ae_title.strip(): client_tls_args(d, d.host, f"[[dimse.destinations]] {d.ae_title}")
            for d in self.config.destinations
        }
        tls = self.config.tls
        listeners: list[tuple[int, Any]] = []
        if not tls.enabled or tls.plain:
            listeners.append((self.config.port, None))
        if tls.enabled:
            listeners.append((tls.port, server_tls_context(tls)))
        for port, ssl_context in listeners:
            address = (self.config.host, port)
            try:
                server = await asyncio.to_thread(
                    ae.start_server,
                    address,
                    block=False,
                    evt_handlers=[(evt.EVT_CONN_OPEN, complete_tls_handshake), *handlers]
                    if ssl_context
                    else handlers,
                    ssl_context=ssl_context,
                )
            except OSError as exc:
                await self.stop()
                raise ConfigError(
                    f"cannot listen for DIMSE on {address[0]}:{address[1]}: {exc.strerror}"
                ) from exc
            assert server is not None  # block=False returns the running server
            self._servers.append(server)
            kind = "DICOM TLS" if ssl_context else "DIMSE"
            log.info("%s %s listening on %s:%d", kind, self.config.ae_title, *address)

    async def stop(self) -> None:
        """Stop listening, then end the running associations and wait for them.

        Each association runs in a thread of its own that calls the store: the node's
        stores must not close under one (a SQLite connection closed under a statement
        crashes the process). An A-ABORT goes out once the message being handled is done.
        """
        servers, self._servers = self._servers, []
        for server in servers:
            await asyncio.to_thread(server.shutdown)
        running = [assoc for server in servers for assoc in server.active_associations]
        for assoc in running:
            assoc.abort(block=False)
        await asyncio.to_thread(_join_all, running, ASSOCIATION_STOP_SECONDS)

    # -- handlers ----------------------------------------------------------------------

    def on_requested(self, event: Event) -> None:
        """Decide what this association may do, before its contexts are negotiated.

        Unknown (title, address) pairs lose the query/retrieve contexts, so no C-FIND,
        C-GET or C-MOVE of theirs ever reaches a handler; with ``store_from_any_ae`` off
        they are rejected.
        """
        assoc = event.assoc
        request = cast("A_ASSOCIATE", assoc.requestor.primitive)  # set before EVT_REQUESTED
        calling = str(request.calling_ae_title).strip()
        address = assoc.requestor.address
        allowed_titles = {t.strip() for t in self.config.allowed_calling_aes}
        if allowed_titles and calling not in allowed_titles:
            return  # pynetdicom rejects it next; on_rejected logs why
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        certificate = peer_certificate_sha256(sock)
        caller = known_caller(self.config, calling, address, certificate)
        if caller is None and not self.config.store_from_any_ae:
            log.warning(
                "DIMSE association from %r at %s rejected: not a configured caller at this"
                " address (store_from_any_ae is off)",
                calling,
                address,
            )
            assoc.acse.send_reject(*REJECT_UNKNOWN_CALLER)
            assoc.kill()  # as pynetdicom does after its own rejections
            return
        if caller is not None and caller.query_retrieve:
            return
        assoc.acceptor.supported_contexts = [
            cx
            for cx in assoc.acceptor.supported_contexts
            if str(cx.abstract_syntax) not in QUERY_RETRIEVE_CLASSES
        ]
        proposed = {str(cx.abstract_syntax) for cx in request.presentation_context_definition_list}
        if proposed & QUERY_RETRIEVE_CLASSES:
            reason = (
                "it may only store"
                if caller is not None
                else "not a configured caller at this address"
            )
            log.warning("DIMSE query/retrieve from %r at %s refused: %s", calling, address, reason)

    def on_rejected(self, event: Event) -> None:
        calling = event.assoc.requestor.ae_title
        allowed = {title.strip() for title in self.config.allowed_calling_aes}
        if allowed and calling.strip() not in allowed:
            reason = "calling AE title is not on the allow-list"
        else:
            reason = "refused by pynetdicom's association rules (e.g. too many associations)"
        log.warning(
            "DIMSE association from %r at %s rejected: %s",
            calling,
            event.assoc.requestor.address,
            reason,
        )

    def on_data_received(self, event: Event) -> None:
        """Count a PDU towards the message it belongs to; abort past the size limit."""
        received = self._unfinished_bytes.get(event.assoc, 0) + len(event.data)
        self._unfinished_bytes[event.assoc] = received
        if received > self.max_message_bytes:
            log.warning(
                "DIMSE association from %r aborted: a message is over %d bytes",
                event.assoc.requestor.ae_title,
                self.max_message_bytes,
            )
            self._unfinished_bytes[event.assoc] = 0
            event.assoc.abort(block=False)  # called from the socket thread: must not wait

    def on_message_complete(self, event: Event) -> None:
        self._unfinished_bytes[event.assoc] = 0

    def on_echo(self, event: Event) -> int:
        mark_dimse_activity()
        return STATUS_SUCCESS

    def on_store(self, event: Event) -> int | Dataset:
        mark_dimse_activity()
        store = self.runtime.store
        request = cast("C_STORE", event.request)
        try:
            staged = store.stage_bytes(received_part10(request, event.context.transfer_syntax))
            try:
                check_matches_request(staged.header, request)
            except DataSetMismatch:
                store.discard([staged])
                raise
            stored = store.commit([staged], source=SOURCE)
        except Exception as exc:
            self._log_failure("C-STORE", event, exc)
            return failure_status(exc)
        self._audit_transfer(event, False, [r.study_instance_uid for r in stored], "C-STORE")
        return STATUS_SUCCESS

    def on_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        matches = 0
        studies: set[str] = set()
        try:
            model = _MODELS[event.request.AffectedSOPClassUID]
            for match in find(self.runtime.store, event.identifier, model):
                mark_dimse_activity()
                if event.is_cancelled:
                    self._log_operation("C-FIND", event, f"cancelled after {matches} match(es)")
                    yield STATUS_CANCEL, None
                    return
                matches += 1
                if match.get("StudyInstanceUID"):
                    studies.add(str(match.StudyInstanceUID))
                yield STATUS_PENDING, match
        except Exception as exc:
            self._log_failure("C-FIND", event, exc)
            yield failure_status(exc, identifier_error=True), None
            return
        level = str(event.identifier.get("QueryRetrieveLevel", "")).strip().upper()
        self._log_operation(
            "C-FIND", event, f"{level} level, {matches} match(es) in {len(studies)} study(ies)"
        )
        requestor = event.assoc.requestor
        self.runtime.security_audit.record(
            atna.query, requestor.ae_title, requestor.address, "C-FIND", matches
        )

    def _select(self, event: Event) -> list[InstanceRecord]:
        model = _MODELS[event.request.AffectedSOPClassUID]
        return select_for_retrieve(self.runtime.store, event.identifier, model)

    def _send(
        self,
        operation: str,
        event: Event,
        records: list[InstanceRecord],
        outcomes: SubOperationOutcomes,
    ) -> Iterator[Any]:
        # pynetdicom resumes this generator only once the previous C-STORE is answered,
        # so the counts are final here (or, if the peer went away, as far as it got).
        ended = "stopped"
        try:
            for sent, record in enumerate(records):
                mark_dimse_activity()
                if event.is_cancelled:
                    ended = f"cancelled after {sent} of {len(records)} instance(s)"
                    yield STATUS_CANCEL, None
                    return
                try:
                    dataset = read_instance(self.runtime.store, record)
                except ImageShareError as exc:  # a stored file that cannot be read: say why
                    ended = f"failed after {sent} of {len(records)} instance(s)"
                    self._log_failure(operation, event, exc)
                    yield failure_status(exc), None
                    return
                yield STATUS_PENDING, dataset
            ended = "finished"
        finally:
            self._log_operation(operation, event, f"{ended}: {outcomes}")
            if records:
                self._audit_transfer(
                    event, True, [r.study_instance_uid for r in records], operation
                )

    def _audit_transfer(self, event: Event, sent: bool, study_uids: list[str], via: str) -> None:
        """The security audit message of instances sent (C-GET, C-MOVE) or stored (C-STORE)."""
        requestor = event.assoc.requestor
        self.runtime.security_audit.record(
            atna.instances_transferred,
            sent,
            requestor.ae_title,
            requestor.address,
            sorted(set(study_uids)),
            len(study_uids),
            via,
        )

    def on_get(self, event: Event) -> Iterator[Any]:
        try:
            records = self._select(event)
        except Exception as exc:
            self._log_failure("C-GET", event, exc)
            # pynetdicom wants a count first; a failure status then ends the operation.
            yield 1
            yield failure_status(exc, identifier_error=True), None
            return
        self._log_selection("C-GET", event, records)
        yield len(records)
        # The C-STORE responses come back over the caller's own association.
        outcomes = SubOperationOutcomes()
        event.assoc.bind(evt.EVT_DIMSE_RECV, outcomes.on_message)
        try:
            yield from self._send("C-GET", event, records, outcomes)
        finally:
            event.assoc.unbind(evt.EVT_DIMSE_RECV, outcomes.on_message)

    def destination(self, ae_title: str) -> DimseDestination | None:
        for destination in self.config.destinations:
            if destination.ae_title.strip() == ae_title.strip():
                return destination
        return None

    def on_move(self, event: Event) -> Iterator[Any]:
        target = self.destination(event.move_destination or "")
        if target is None:
            log.warning(
                "C-MOVE from %r at %s to unknown destination %r refused",
                event.assoc.requestor.ae_title,
                event.assoc.requestor.address,
                event.move_destination,
            )
            yield None, None  # pynetdicom answers A801: move destination unknown
            return
        failure: Dataset | None = None
        records: list[InstanceRecord] = []
        # A failure is reported after a count of one, for which pynetdicom first opens the
        # association to the destination: it needs some context even then.
        contexts = [build_context(Verification)]
        try:
            records = self._select(event)
            if records:
                contexts = storage_contexts(records)
        except Exception as exc:
            self._log_failure("C-MOVE", event, exc)
            failure = failure_status(exc, identifier_error=True)
        outcomes = SubOperationOutcomes()
        options = {
            "contexts": contexts,
            "evt_handlers": [*LOW_LATENCY_HANDLERS, (evt.EVT_DIMSE_RECV, outcomes.on_message)],
            "max_pdu": MAX_PDU_BYTES,
            "tls_args": self._destination_tls.get(target.ae_title.strip()),
        }
        # pynetdicom wants the destination, then a count, then one status per instance.
        yield target.host, target.port, options
        if failure is not None:
            yield 1
            yield failure, None
            return
        where = f" to {target.ae_title!r} at {target.host}:{target.port}"
        self._log_selection("C-MOVE", event, records, where)
        yield len(records)
        yield from self._send("C-MOVE", event, records, outcomes)

    def _log_selection(
        self, operation: str, event: Event, records: list[InstanceRecord], target: str = ""
    ) -> None:
        """Before a retrieve starts (none at all when nothing matched): what it sends."""
        studies = len({record.study_instance_uid for record in records})
        what = f"sending {len(records)} instance(s) of {studies} study(ies){target}"
        self._log_operation(operation, event, what)

    def _log_operation(self, operation: str, event: Event, what: str) -> None:
        """The DIMSE audit line of one query/retrieve: who, from where, how much."""
        requestor = event.assoc.requestor
        log.info("%s from %r at %s: %s", operation, requestor.ae_title, requestor.address, what)

    def _log_failure(self, operation: str, event: Event, exc: Exception) -> None:
        calling = event.assoc.requestor.ae_title
        address = event.assoc.requestor.address
        if isinstance(exc, ImageShareError):
            log.warning("%s from %r at %s refused: %s", operation, calling, address, exc)
        else:
            log.exception("%s from %r at %s failed", operation, calling, address)


def dimse_service(runtime: NodeRuntime) -> DimseGateway | None:
    """The background-service factory for `imageshare run`; None when DIMSE is disabled."""
    if not runtime.config.dimse.enabled:
        return None
    return DimseGateway(runtime)
