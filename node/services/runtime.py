"""An opened node: its configuration, identity and stores, shared by every service.

Services and edges receive a NodeRuntime instead of reaching for globals, so that a test
can open several nodes in one process and each edge sees exactly one node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import NodeConfig, load_config
from node.core.keys import NodeIdentity
from node.services.audit_export import SecurityAuditExport
from node.services.ledger import LedgerService
from node.store.instances import SqliteInstanceStore
from node.store.protocols import InstanceStore
from node.store.secrets import read_secret, read_seed


@dataclass
class NodeRuntime:
    config: NodeConfig
    identity: NodeIdentity
    admin_token: str
    store: InstanceStore
    # The security audit feed to the hospital's SIEM (does nothing unless enabled).
    security_audit: SecurityAuditExport
    started_at: float = field(default_factory=time.time)
    # Set once every background service (DIMSE, replication, ...) has started.
    ready: bool = False
    # Services attach themselves here by name (ledger, replication, forwarder, ...).
    services: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        for service in reversed(list(self.services.values())):
            close = getattr(service, "close", None)
            if close is not None:
                close()
        self.store.close()
        self.security_audit.close()


def open_runtime(config: NodeConfig | Path | None = None) -> NodeRuntime:
    """Open the node described by ``config`` (a loaded config, a node.toml path, or the default)."""
    if not isinstance(config, NodeConfig):
        config = load_config(config)
    identity = NodeIdentity(config.origin, read_seed(config.key_path))
    admin_token = read_secret(config.admin_token_path).decode().strip()
    store = SqliteInstanceStore(
        config.data_dir, config.store.max_instance_bytes, config.store.max_inflation_ratio
    )
    runtime = NodeRuntime(
        config=config,
        identity=identity,
        admin_token=admin_token,
        store=store,
        security_audit=SecurityAuditExport(config),
    )
    runtime.services["ledger"] = LedgerService(runtime)
    return runtime
