"""The security audit export (IHE ATNA): audit messages to the hospital's syslog collector.

Not the ledger auditor (node/services/audit.py): this feed is for the hospital's own SIEM.
Each security-relevant event is built by node.core.atna, framed as RFC 5424 and added to
a bounded on-disk queue (node.store.audit_queue) at once, by whichever process saw it
(the daemon, or a CLI command). One sender thread in the daemon takes messages from the
queue oldest first and sends them over UDP, TCP or TLS, reconnecting with backoff; a
message leaves the queue only once the connection it was written to stayed open for
CONFIRM_SECONDS after, so a collector that is down, restarting or refusing this node
receives the queue when it is back.

Delivery is at least once over TCP and TLS (a batch may arrive twice if the collector
closed the connection just after reading it), except for messages written to a
connection the collector dropped without closing it and without the node noticing
within CONFIRM_SECONDS (syslog has no acknowledgement). UDP is best effort.
Recording never raises into the caller: a failure to queue is logged.
"""

from __future__ import annotations

import asyncio
import collections
import getpass
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Concatenate, ParamSpec

from node.core.atna import AuditEvent, AuditSource, audit_message_xml, octet_counted, syslog_frame
from node.errors import ConfigError
from node.store.audit_queue import AuditQueue, QueuedMessage

if TYPE_CHECKING:
    from node.config import AuditExportConfig, NodeConfig
    from node.services.runtime import NodeRuntime

log = logging.getLogger(__name__)

P = ParamSpec("P")
BATCH = 100
POLL_SECONDS = 0.5
CONNECT_TIMEOUT_SECONDS = 5.0
# How long a connection must stay open after a batch was written for the batch to count
# as delivered (see SecurityAuditExport._run).
CONFIRM_SECONDS = 0.5
INITIAL_BACKOFF_SECONDS = 0.5
# How long `imageshare run` waits at shutdown to send what is left (the stop event).
DRAIN_SECONDS = 3.0


def local_user() -> str:
    """The operating-system user running this process (the actor of CLI changes)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class SecurityAuditExport:
    """Records audit events into the queue and, in the daemon, sends them on.

    Disabled (the default) it records nothing and opens nothing.
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config: AuditExportConfig = config.audit_export
        self.source = AuditSource(config.origin, config.dimse.ae_title)
        self.hostname = socket.gethostname()
        self.queue: AuditQueue | None = None
        if self.config.enabled:
            self.queue = AuditQueue(
                config.data_dir, self.config.queue_max_messages, self.config.queue_max_bytes
            )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.queue is not None

    def record(
        self,
        build: Callable[Concatenate[AuditSource, P], AuditEvent],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> None:
        """Queue the event ``build(source, *args, **kwargs)``; nothing when disabled.

        Never raises: an event that cannot be queued is logged as an error.
        """
        if self.queue is None:
            return
        try:
            event = build(self.source, *args, **kwargs)
            now = time.time()
            frame = syslog_frame(
                audit_message_xml(event, self.source, now),
                now,
                self.hostname,
                str(os.getpid()),
                event.outcome,
            )
            dropped = self.queue.add(frame)
        except Exception:  # an audit failure must not fail the audited request
            log.exception("could not queue a security audit message")
            return
        if dropped:
            log.warning(
                "security audit queue full (%d messages or %d bytes): dropped the %d oldest",
                self.queue.max_messages,
                self.queue.max_bytes,
                dropped,
            )
        self._wake.set()

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()

    # -- the daemon's sender ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the sender; raises ConfigError if the TLS files cannot be used."""
        if self.config.transport == "tls":
            try:
                tls_context(self.config)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"audit_export: the TLS files cannot be used: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="audit-export", daemon=True)
        self._thread.start()
        log.info(
            "security audit export to %s://%s:%d",
            self.config.transport,
            self.config.host,
            self.config.port,
        )

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _run(self) -> None:
        assert self.queue is not None
        queue = self.queue
        connection = SyslogConnection(self.config)
        # Syslog has no acknowledgement: a batch leaves the queue only once the connection
        # it was written to is still open CONFIRM_SECONDS later. A collector that refuses
        # the client after the TLS 1.3 handshake, stops or resets the connection within
        # that time gets the batch again on the next connection (at least once). UDP
        # cannot tell: written is sent.
        hold = 0.0 if self.config.transport == "udp" else CONFIRM_SECONDS
        written: collections.deque[tuple[float, list[QueuedMessage]]] = collections.deque()
        last_written = 0  # id of the newest message written to the current connection
        backoff = INITIAL_BACKOFF_SECONDS
        drain_until: float | None = None
        try:
            while True:
                now = time.monotonic()
                if self._stop.is_set() and drain_until is None:
                    drain_until = now + DRAIN_SECONDS
                if drain_until is not None and now > drain_until:
                    return  # what is left is sent at the next start
                if written and not connection.still_open():
                    log.warning(
                        "security audit collector %s:%d closed the connection; sending again",
                        self.config.host,
                        self.config.port,
                    )
                    connection.close()
                    written.clear()
                    last_written = 0
                while written and now - written[0][0] >= hold:
                    confirmed = written.popleft()[1]
                    queue.remove(confirmed)
                    self.sent += len(confirmed)
                batch = queue.oldest(BATCH, after=last_written)
                if not batch:
                    if drain_until is not None and not written:
                        return
                    self._pause(hold if written else POLL_SECONDS, drain_until is not None)
                    continue
                try:
                    connection.ensure_open()
                    for item in batch:
                        connection.send(item.message)
                except (OSError, ssl.SSLError) as exc:
                    connection.close()
                    written.clear()
                    last_written = 0
                    log.warning(
                        "security audit collector %s:%d unreachable (%s); retry in %.1fs",
                        self.config.host,
                        self.config.port,
                        exc,
                        backoff,
                    )
                    self._pause(backoff, drain_until is not None)
                    backoff = min(backoff * 2, self.config.max_backoff)
                    continue
                written.append((time.monotonic(), batch))
                last_written = batch[-1].message_id
                backoff = INITIAL_BACKOFF_SECONDS
        finally:
            connection.close()

    def _pause(self, seconds: float, draining: bool) -> None:
        """Wait ``seconds``, or less if an event is recorded or (not draining) stop is asked."""
        if draining:
            time.sleep(min(seconds, 0.05))
        else:
            self._wake.wait(seconds)
            self._wake.clear()


class SyslogConnection:
    """One connection to the collector: UDP (RFC 5426), TCP (RFC 6587) or TLS (RFC 5425)."""

    def __init__(self, config: AuditExportConfig) -> None:
        self.config = config
        self._sock: socket.socket | None = None

    def still_open(self) -> bool:
        """False once the collector closed the connection (always True for UDP)."""
        if self._sock is None:
            return False
        return self.config.transport == "udp" or not self._peer_closed()

    def ensure_open(self) -> None:
        """Connect if not connected or if the collector closed the connection."""
        if self._sock is not None and self.config.transport != "udp" and self._peer_closed():
            self.close()
        if self._sock is None:
            self._sock = self._connect()

    def _connect(self) -> socket.socket:
        config = self.config
        if config.transport == "udp":
            sock = socket.socket(
                socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_DGRAM
            )
            sock.connect((config.host, config.port))  # ICMP refusals surface as errors
            return sock
        sock = socket.create_connection((config.host, config.port), CONNECT_TIMEOUT_SECONDS)
        if config.transport == "tls":
            try:
                sock = tls_context(config).wrap_socket(sock, server_hostname=config.host)
            except BaseException:
                sock.close()
                raise
        return sock

    def send(self, frame: bytes) -> None:
        assert self._sock is not None
        if self.config.transport == "udp":
            self._sock.send(frame)
        else:
            self._sock.sendall(octet_counted(frame))

    def _peer_closed(self) -> bool:
        """True if the collector closed the connection (a collector never sends data)."""
        sock = self._sock
        assert sock is not None
        poller = select.poll()  # not select(): the daemon's descriptors may pass 1024
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        sock.setblocking(False)
        try:
            return sock.recv(1) == b""
        except (ssl.SSLWantReadError, BlockingIOError):
            return False  # a TLS record without data (a session ticket)
        except OSError:
            return True
        finally:
            sock.settimeout(CONNECT_TIMEOUT_SECONDS)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def tls_context(config: AuditExportConfig) -> ssl.SSLContext:
    """Client TLS for the collector: its certificate checked (ca_file or the system's CAs),
    its host name verified, TLS 1.2 or later, and this node's certificate if configured."""
    context = ssl.create_default_context(cafile=config.ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.cert_file:
        context.load_cert_chain(config.cert_file, config.key_file)
    return context


def audit_export_service(runtime: NodeRuntime) -> SecurityAuditExport | None:
    """The sender of `imageshare run`, if the export is enabled."""
    export = runtime.security_audit
    return export if export.enabled else None


def record_once(
    config: NodeConfig,
    build: Callable[Concatenate[AuditSource, P], AuditEvent],
    *args: P.args,
    **kwargs: P.kwargs,
) -> None:
    """Queue one event from a short-lived process (a CLI command); the daemon sends it."""
    if not config.audit_export.enabled:
        return
    export = SecurityAuditExport(config)
    try:
        export.record(build, *args, **kwargs)
    finally:
        export.close()
