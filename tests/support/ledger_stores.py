"""Ledger stores of either engine for store-level tests: a directory names one ledger
(its ``ledger.sqlite``, or a PostgreSQL database made for it on first use)."""

from __future__ import annotations

import uuid
from pathlib import Path

from node.store.ledger import LedgerStore, LedgerStoreBase
from node.store.pg_ledger import PostgresLedgerStore
from node.store.postgres import PostgresSettings
from tests.support.postgres import PostgresServer


class LedgerStores:
    """Opens ledger stores on SQLite (``postgres`` None) or on ``postgres``; closes them."""

    def __init__(self, postgres: PostgresServer | None) -> None:
        self.postgres = postgres
        self.engine = "sqlite" if postgres is None else "postgresql"
        self._dsns: dict[Path, str] = {}
        self._opened: list[LedgerStoreBase] = []

    def dsn(self, directory: Path) -> str:
        """The PostgreSQL database of ``directory``'s ledger (made on first use)."""
        assert self.postgres is not None
        key = Path(directory).resolve()
        if key not in self._dsns:
            self._dsns[key] = self.postgres.create_database(f"ledger_{uuid.uuid4().hex}")
        return self._dsns[key]

    def open(self, directory: Path) -> LedgerStoreBase:
        Path(directory).mkdir(parents=True, exist_ok=True)
        store: LedgerStoreBase
        if self.postgres is None:
            store = LedgerStore(directory)
        else:
            store = PostgresLedgerStore(PostgresSettings(self.dsn(directory), pool_size=4))
        self._opened.append(store)
        return store

    def close(self) -> None:
        for store in self._opened:
            store.close()
