"""The stores a node.toml asks for ([store] backend): the one place each is chosen."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from node.config import NodeConfig
from node.store import (
    consent_state,
    federation_state,
    forward_state,
    links,
    nonces,
    opinions,
    transfers,
)
from node.store.instances import SqliteInstanceStore
from node.store.ledger import LEDGER_FILE, LedgerStore, LedgerStoreBase
from node.store.protocols import InstanceStore


def open_instance_store(config: NodeConfig) -> InstanceStore:
    """The embedded store (files and SQLite in the data directory), or PostgreSQL and an
    S3-compatible object store; ConfigError if the servers cannot be reached."""
    store = config.store
    if store.backend == "sqlite":
        return SqliteInstanceStore(
            config.data_dir, store.max_instance_bytes, store.max_inflation_ratio
        )
    from node.store.objects import ObjectStoreSettings, S3Objects
    from node.store.postgres import PostgresInstanceStore, PostgresSettings

    objects = store.objects
    settings = ObjectStoreSettings(
        endpoint=objects.endpoint,
        bucket=objects.bucket,
        region=objects.region,
        prefix=objects.prefix,
        credentials_file=Path(objects.credentials_file) if objects.credentials_file else None,
        server_side_encryption=objects.server_side_encryption,
        kms_key_id=objects.kms_key_id,
        multipart_threshold_bytes=objects.multipart_threshold_bytes,
        part_bytes=objects.part_bytes,
    )
    return PostgresInstanceStore(
        config.data_dir,
        PostgresSettings(store.dsn, store.pool_size),
        S3Objects(settings),
        store.max_instance_bytes,
        store.max_inflation_ratio,
    )


# ---- the node's state stores (nonces, consent, links, transfers, forwarding, federation,
# opinions): on SQLite, a file each in the data directory; on PostgreSQL, tables of the
# index's database, one pool per process shared by them all.

T = TypeVar("T")

_state_pools: dict[str, Any] = {}
_state_pools_lock = threading.Lock()


def state_pool(config: NodeConfig) -> Any:
    """The process's pool for the state stores on PostgreSQL (opened on first use)."""
    from node.store.postgres import PostgresSettings, open_pool

    with _state_pools_lock:
        pool = _state_pools.get(config.store.dsn)
        if pool is None:
            pool = open_pool(PostgresSettings(config.store.dsn, config.store.pool_size))
            _state_pools[config.store.dsn] = pool
        return pool


def _state_store(
    config: NodeConfig, sqlite: Callable[[Path], T], postgresql: Callable[[Any], T]
) -> T:
    """``sqlite(data_dir)``, or ``postgresql(pool)`` with the process's state pool."""
    if config.store.backend == "sqlite":
        return sqlite(config.data_dir)
    return postgresql(state_pool(config))


def _file_or_tables(
    config: NodeConfig, sqlite: Callable[[Path], T], file_name: str, postgresql: Callable[[Any], T]
) -> T:
    """A store opened on its SQLite file in the data directory, or on the state pool."""
    return _state_store(config, lambda data_dir: sqlite(data_dir / file_name), postgresql)


def open_nonce_store(config: NodeConfig) -> nonces.NonceStore:
    """Nonces of signed requests seen (node/store/nonces.py)."""
    max_age = config.federation.max_request_age
    return _state_store(
        config,
        lambda data_dir: nonces.NonceStore(data_dir / nonces.FILE_NAME, max_age),
        lambda pool: nonces.PostgresNonceStore(pool, max_age),
    )


def open_consent_state(config: NodeConfig) -> consent_state.ConsentState:
    """Enrolments, grants and revocations replayed from the log (node/store/consent_state.py)."""
    return _file_or_tables(
        config,
        consent_state.ConsentState,
        consent_state.FILE_NAME,
        consent_state.PostgresConsentState,
    )


def open_link_store(config: NodeConfig) -> links.LinkStore:
    """The custodian's share links (node/store/links.py)."""
    return _file_or_tables(config, links.LinkStore, links.FILE_NAME, links.PostgresLinkStore)


def daemon_name(config: NodeConfig) -> str:
    """This daemon among the node's: its host and data directory, the same after a restart."""
    return f"{socket.gethostname()}:{config.data_dir.resolve()}"


def open_transfer_store(config: NodeConfig) -> transfers.TransferStore:
    """The transfer journal and fetch history (node/store/transfers.py)."""
    return _state_store(
        config,
        transfers.TransferStore,
        lambda pool: transfers.PostgresTransferStore(pool, daemon_name(config)),
    )


def open_forward_state(config: NodeConfig) -> forward_state.ForwardState:
    """The forwarder's cursor and queue (node/store/forward_state.py)."""
    return _file_or_tables(
        config,
        forward_state.ForwardState,
        forward_state.FILE_NAME,
        forward_state.PostgresForwardState,
    )


def open_federation_state(config: NodeConfig) -> federation_state.FederationState:
    """Equivocation proofs and selective mirroring's state (node/store/federation_state.py)."""
    return _file_or_tables(
        config,
        federation_state.FederationState,
        federation_state.STATE_FILE,
        federation_state.PostgresFederationState,
    )


def open_opinion_store(config: NodeConfig) -> opinions.OpinionStore:
    """The state of returned opinions (node/store/opinions.py)."""
    return _file_or_tables(
        config, opinions.OpinionStore, opinions.FILE_NAME, opinions.PostgresOpinionStore
    )


def open_ledger_store(config: NodeConfig) -> LedgerStoreBase:
    """The node's own log and its mirrors: ``ledger.sqlite`` in the data directory, or
    PostgreSQL, shared by the node's daemons; ConfigError if the server cannot be reached."""
    store = config.store
    if store.backend == "sqlite":
        return LedgerStore(config.data_dir)
    from node.store.pg_ledger import PostgresLedgerStore, refuse_a_log_left_in_sqlite
    from node.store.postgres import PostgresSettings

    ledger = PostgresLedgerStore(PostgresSettings(store.dsn, store.pool_size))
    try:
        refuse_a_log_left_in_sqlite(ledger, config.data_dir / LEDGER_FILE)
    except BaseException:
        ledger.close()
        raise
    return ledger
