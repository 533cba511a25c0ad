"""The stores a node.toml asks for ([store] backend): the one place each is chosen."""

from __future__ import annotations

from pathlib import Path

from node.config import NodeConfig
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
