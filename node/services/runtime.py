"""An opened node: its configuration, identity and stores, shared by every service.

Services and edges receive a NodeRuntime instead of reaching for globals, so that a test
can open several nodes in one process and each edge sees exactly one node. Its services
are built in one place, ``NodeServices``, each typed and on first use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from node.config import NodeConfig, load_config
from node.core.keys import NodeIdentity
from node.services.audit_export import SecurityAuditExport
from node.store.backends import open_instance_store
from node.store.protocols import InstanceStore
from node.store.run_lock import RunLock
from node.store.secrets import read_secret, read_seed

if TYPE_CHECKING:
    from node.services.alerts import AlertService
    from node.services.consent import ConsentService
    from node.services.federation_roster import HeldRosterLog
    from node.services.forward import Forwarder
    from node.services.ledger import LedgerService
    from node.services.links import LinkService
    from node.services.pacs import PacsSource
    from node.services.replication import ReplicationService
    from node.services.reports import ReportService
    from node.services.roster import RosterService
    from node.services.status import StatusService
    from node.services.transfer import TransferService
    from node.services.witness import WitnessService
    from node.store.nonces import NonceStore


T = TypeVar("T")


class Closable(Protocol):
    def close(self) -> None: ...


class NodeServices:
    """The services of one node, each built here on first use and nowhere else.

    Built lazily, so that a command line run opens only what it uses; the daemon starts
    the background ones. Service modules import NodeRuntime, so they are imported here
    when first built, not at the top. Closed in the reverse of the order they were built.
    """

    def __init__(self, runtime: NodeRuntime) -> None:
        self._runtime = runtime
        # Handlers run in worker threads: each service is built once. Reentrant, since
        # building one (consent) may build another (ledger).
        self._lock = threading.RLock()
        self._by_name: dict[str, object] = {}
        self._built: list[object] = []  # in build order: closed last first
        # The PACS forwarder, when `imageshare run` started one (the dashboard reports it).
        self.forwarder: Forwarder | None = None

    def _once(self, name: str, build: Callable[[], T]) -> T:
        with self._lock:
            if name not in self._by_name:
                service = build()
                self._by_name[name] = service
                self._built.append(service)
            return self._by_name[name]  # type: ignore[return-value]

    def closes(self, service: Closable) -> None:
        """Close ``service`` with the node (background services the daemon starts)."""
        with self._lock:
            self._built.append(service)

    @property
    def ledger(self) -> LedgerService:
        """The node's own log and its mirrors."""
        from node.services.ledger import LedgerService

        return self._once("ledger", lambda: LedgerService(self._runtime))

    @property
    def consent(self) -> ConsentService:
        """Consent state, caught up with the own log when first opened."""
        from node.services.consent import ConsentService

        def open_consent() -> ConsentService:
            service = ConsentService(self._runtime)
            service.catch_up()
            return service

        return self._once("consent", open_consent)

    @property
    def roster(self) -> RosterService:
        from node.services.roster import RosterService

        return self._once("roster", lambda: RosterService(self._runtime.config))

    @property
    def roster_log(self) -> HeldRosterLog:
        """The federation's roster log as this node holds it (served read-only)."""
        from node.services.federation_roster import HeldRosterLog

        return self._once("roster_log", lambda: HeldRosterLog(self._runtime.config))

    @property
    def replication(self) -> ReplicationService:
        """Log mirroring; started by the daemon."""
        from node.services.replication import ReplicationService

        return self._once("replication", lambda: ReplicationService(self._runtime))

    @property
    def witness(self) -> WitnessService:
        """C2SP tlog-witness: cosigning members' logs, collecting cosignatures of ours."""
        from node.services.witness import WitnessService

        return self._once("witness", lambda: WitnessService(self._runtime))

    @property
    def transfer(self) -> TransferService:
        from node.services.transfer import TransferService

        return self._once("transfer", lambda: TransferService(self._runtime))

    @property
    def status(self) -> StatusService:
        """The dashboard's reads."""
        from node.services.status import StatusService

        return self._once("status", lambda: StatusService(self._runtime))

    @property
    def alerts(self) -> AlertService:
        """Incidents and their delivery; started by the daemon."""
        from node.services.alerts import AlertService

        return self._once("alerts", lambda: AlertService(self._runtime))

    @property
    def links(self) -> LinkService:
        """The custodian's share links and their viewing sessions."""
        from node.services.links import LinkService

        return self._once("links", lambda: LinkService(self._runtime))

    @property
    def reports(self) -> ReportService:
        """Reports kept as DICOM in their studies (docs/reports.md)."""
        from node.services.reports import ReportService
        from node.store.backends import open_opinion_store

        runtime = self._runtime
        return self._once(
            "reports",
            lambda: ReportService(
                runtime.store,
                runtime.config.reports.max_document_bytes,
                open_opinion_store(runtime.config),
            ),
        )

    @property
    def pacs(self) -> PacsSource | None:
        """The hospital's PACS as a source of studies; None when [pacs] names no PACS."""
        if not self._runtime.config.pacs.enabled:
            return None
        from node.services.pacs import PacsSource

        return self._once("pacs", lambda: PacsSource(self._runtime))

    @property
    def nonces(self) -> NonceStore:
        """Nonces of signed requests seen, shared by /p2p and /patient."""
        from node.store.backends import open_nonce_store

        return self._once("nonces", lambda: open_nonce_store(self._runtime.config))

    def close(self) -> None:
        """Close every service built, the last built first."""
        with self._lock:
            built, self._built, self._by_name = self._built, [], {}
        for service in reversed(built):
            close = getattr(service, "close", None)  # the roster and status hold nothing open
            if close is not None:
                close()


@dataclass
class NodeRuntime:
    config: NodeConfig
    identity: NodeIdentity
    admin_token: str
    store: InstanceStore
    # The security audit feed to the hospital's SIEM (does nothing unless enabled).
    security_audit: SecurityAuditExport
    # Held (shared) while the stores are open: `imageshare migrate` waits for none.
    run_lock: RunLock | None = None
    started_at: float = field(default_factory=time.time)
    # Set once every background service (DIMSE, replication, ...) has started.
    ready: bool = False
    services: NodeServices = field(init=False)

    def __post_init__(self) -> None:
        self.services = NodeServices(self)

    def close(self) -> None:
        self.services.close()
        self.store.close()
        self.security_audit.close()
        if self.run_lock is not None:
            self.run_lock.release()


def open_runtime(config: NodeConfig | Path | None = None) -> NodeRuntime:
    """Open the node described by ``config`` (a loaded config, a node.toml path, or the default)."""
    if not isinstance(config, NodeConfig):
        config = load_config(config)
    identity = NodeIdentity(config.origin, read_seed(config.key_path))
    admin_token = read_secret(config.admin_token_path).decode().strip()
    run_lock = RunLock(config.data_dir, exclusive=False)
    try:
        store = open_instance_store(config)
    except BaseException:
        run_lock.release()
        raise
    runtime = NodeRuntime(
        config=config,
        identity=identity,
        admin_token=admin_token,
        store=store,
        security_audit=SecurityAuditExport(config),
        run_lock=run_lock,
    )
    _ = runtime.services.ledger  # the own log is opened (and created) with the node
    return runtime
