"""Forwarding of arriving instances to a PACS by C-STORE, with retries that survive restarts.

The forwarder needs no hook in any arrival path (import, STOW-RS, C-STORE, fetch from a
peer): it follows the index. It polls ``instances`` for rows past its durable cursor,
queues them (node/store/forward_state.py), and sends whatever is due over one
association per batch. A failed instance is retried after an exponential backoff
(``initial_backoff`` x 2^(attempt-1)) until ``max_attempts``, then kept as failed and
shown in the status. Staff may retry a retrying or failed instance now, or cancel one:
it stays recorded as cancelled and is never sent (one already on the wire when the cancel
comes is delivered and counted). Delivery is at least once: an instance sent just before
a crash is sent again, which a PACS treats as a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from pynetdicom import AE

from node.errors import ConfigError, Conflict, NotFound
from node.services.dimse_transport import (
    CONNECT_TIMEOUT_SECONDS,
    LOW_LATENCY_HANDLERS,
    MAX_PDU_BYTES,
    client_tls_args,
    mark_dimse_activity,
    read_instance,
    storage_contexts,
)
from node.store.backends import open_forward_state
from node.store.forward_state import CANCELLED, QueuedInstance

if TYPE_CHECKING:
    from node.config import ForwardConfig
    from node.services.runtime import NodeRuntime
    from node.store.instances import InstanceRecord

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
# Instances sent over one association before their outcome is recorded durably.
BATCH = 200


def _is_success(status: int) -> bool:
    # Success, or a warning (coercion, elements discarded): the PACS kept the instance.
    return status == 0x0000 or 0xB000 <= status <= 0xBFFF


class Forwarder:
    """The forwarding service of `imageshare run` (one thread; blocking DIMSE inside it)."""

    def __init__(self, runtime: NodeRuntime, poll_seconds: float = POLL_SECONDS) -> None:
        self.config: ForwardConfig = runtime.config.forward
        self.calling_ae = runtime.config.dimse.ae_title
        self.store = runtime.store
        self.opinions = runtime.services.reports.opinions
        # Raises ConfigError now, at start, for certificates that cannot be loaded.
        self.tls_args = client_tls_args(self.config, self.config.host, "[forward]")
        self.state = open_forward_state(runtime.config)
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Cancelled since this round read the queue: skipped if in its batch.
        self._cancelled: set[str] = set()

    @property
    def destination(self) -> str:
        return f"{self.config.ae_title}@{self.config.host}:{self.config.port}"

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._stop.clear()  # started again when this daemon becomes the log writer again
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
        self._thread.start()
        log.info("forwarding arriving instances to %s", self.destination)

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def close(self) -> None:
        self.state.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                log.exception("forwarding round failed; trying again")
                busy = False
            if not busy:
                self._stop.wait(self._idle_wait())

    def _idle_wait(self) -> float:
        next_due = self.state.next_due_at()
        if next_due is None:
            return self.poll_seconds
        return min(self.poll_seconds, max(0.0, next_due - time.time()))

    # -- one round ---------------------------------------------------------------------

    def run_once(self) -> bool:
        """Queue newly indexed instances and send those due; True if anything was sent."""
        now = time.time()
        self._take_new(now)
        # Cleared before the queue is read: a later cancel is in the set, an earlier one
        # is out of the batch already.
        self._cancelled.clear()
        due = self.state.due(now, BATCH)
        if not due:
            return False
        self._deliver(due)
        return True

    def _take_new(self, now: float) -> None:
        arrivals = self.store.arrivals_after(self.state.last_rowid, 1000)
        # An opinion returned through a link waits for staff (``release``); the cursor
        # still moves past it.
        held = self.opinions.held([a.sop_instance_uid for a in arrivals])
        rows = [(a.position, a.sop_instance_uid, a.study_instance_uid) for a in arrivals]
        if held and rows:
            self.state.enqueue([r for r in rows if r[1] not in held], now)
            self.state.advance(rows[-1][0])
        else:
            self.state.enqueue(rows, now)

    def release(self, sop_instance_uid: str, study_instance_uid: str) -> None:
        """Queue an instance that was held (an opinion staff accepted), due now."""
        self.state.enqueue([(0, sop_instance_uid, study_instance_uid)], time.time())

    def _deliver(self, due: list[QueuedInstance]) -> None:
        batch: list[tuple[QueuedInstance, InstanceRecord]] = []
        gone: list[str] = []
        for item in due:
            try:
                batch.append((item, self.store.instance(item.sop_instance_uid)))
            except NotFound:
                gone.append(item.sop_instance_uid)
        self.state.forget(gone)
        if not batch:
            return
        delivered: list[str] = []
        failures: dict[str, list[QueuedInstance]] = defaultdict(list)
        try:
            self._send(batch, delivered, failures)
        except Exception as exc:  # no association, or it broke down: the rest failed
            settled = set(delivered) | {i.sop_instance_uid for f in failures.values() for i in f}
            reason = str(exc) or type(exc).__name__
            failures[reason] += [item for item, _ in batch if item.sop_instance_uid not in settled]
        now = time.time()
        self.state.delivered(delivered, now)
        for reason, items in failures.items():
            self.state.attempt_failed(
                items, reason, now, self.config.max_attempts, self.config.initial_backoff
            )
            log.warning(
                "forwarding %d instance(s) to %s failed: %s", len(items), self.destination, reason
            )
        if delivered:
            log.info("forwarded %d instance(s) to %s", len(delivered), self.destination)

    def _send(
        self,
        batch: list[tuple[QueuedInstance, InstanceRecord]],
        delivered: list[str],
        failures: dict[str, list[QueuedInstance]],
    ) -> None:
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = CONNECT_TIMEOUT_SECONDS
        assoc = ae.associate(
            self.config.host,
            self.config.port,
            contexts=storage_contexts([record for _, record in batch]),
            ae_title=self.config.ae_title,
            max_pdu=MAX_PDU_BYTES,
            evt_handlers=LOW_LATENCY_HANDLERS,
            tls_args=self.tls_args,
        )
        if not assoc.is_established:
            raise ConnectionError(f"no association with {self.destination}")
        try:
            for item, record in batch:
                if self._stop.is_set():
                    break  # shutting down: the rest stay queued, no attempt counted
                if item.sop_instance_uid in self._cancelled:
                    continue  # cancelled during this round: never sent, no attempt
                if not assoc.is_established:
                    failures["the PACS ended the association"].append(item)
                    continue
                mark_dimse_activity()
                try:
                    status = assoc.send_c_store(read_instance(self.store, record))
                except Exception as exc:
                    failures[f"cannot send: {exc}"].append(item)
                    continue
                code = status.get("Status") if status else None
                if code is None:
                    failures["no response from the PACS"].append(item)
                elif _is_success(int(code)):
                    delivered.append(item.sop_instance_uid)
                else:
                    failures[f"PACS answered status 0x{int(code):04X}"].append(item)
        finally:
            if assoc.is_established:
                assoc.release()

    # -- staff actions (the dashboard) -------------------------------------------------

    def retry(self, sop_instance_uid: str) -> None:
        """Send a retrying or failed instance at the next round, its attempts afresh.

        Raises NotFound if it is not queued, Conflict if it was cancelled.
        """
        if not self.state.retry_now(sop_instance_uid, time.time()):
            if self.state.state_of(sop_instance_uid) == CANCELLED:
                raise Conflict("that instance's forwarding was cancelled: it is never sent")
            raise NotFound("no such instance in the forwarding queue")
        log.info("forwarding of one instance retried from the dashboard")

    def cancel(self, sop_instance_uid: str) -> None:
        """Never send a queued instance; it stays recorded as cancelled.

        Raises NotFound if it is not queued (already delivered, or never taken in).
        """
        if not self.state.cancel(sop_instance_uid):
            raise NotFound("no such instance in the forwarding queue")
        self._cancelled.add(sop_instance_uid)
        log.info("forwarding of one instance cancelled from the dashboard")

    def status(self) -> dict[str, Any]:
        """The forwarding outcome for the admin API."""
        return {
            "enabled": True,
            "running": self._thread is not None and self._thread.is_alive(),
            "destination": {
                "ae_title": self.config.ae_title,
                "host": self.config.host,
                "port": self.config.port,
            },
            "max_attempts": self.config.max_attempts,
            **self.state.summary(),
        }


def forward_service(runtime: NodeRuntime) -> Forwarder | None:
    """The background-service factory for `imageshare run`; None when forwarding is off.

    Raises ConfigError for an incomplete [forward] section.
    """
    config = runtime.config.forward
    if not config.ae_title:
        return None
    if not config.host or not 0 < config.port < 65536:
        raise ConfigError("forward needs host and a port between 1 and 65535")
    if config.max_attempts < 1 or config.initial_backoff <= 0:
        raise ConfigError("forward.max_attempts must be >= 1 and initial_backoff > 0")
    forwarder = Forwarder(runtime)
    runtime.services.forwarder = forwarder
    runtime.services.closes(forwarder)
    return forwarder
