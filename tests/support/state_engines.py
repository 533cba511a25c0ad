"""The engine a state store's test runs on: SQLite in the test's directory, or a fresh
database of the test run's PostgreSQL (node/store/pg_sql.py). Opening the store twice is
a restart on SQLite and a second daemon of the same node on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from node.store.postgres import PostgresSettings, open_pool
from tests.support.postgres import PostgresServer

ENGINES = ("sqlite", "postgresql")
T = TypeVar("T")


@dataclass
class StateEngine:
    name: str
    directory: Path
    postgres: PostgresServer | None
    dsn: str | None = None  # of the test's own database, created on first use
    pools: list[Any] = field(default_factory=list)

    def pool(self) -> Any:
        """A new pool on the test's own database, as another daemon would open."""
        if self.postgres is None:
            raise ValueError("no PostgreSQL on the sqlite engine")
        if self.dsn is None:
            self.dsn = self.postgres.create_database(f"state_{uuid.uuid4().hex}")
        pool = open_pool(PostgresSettings(self.dsn, 4))
        self.pools.append(pool)
        return pool

    def open(self, sqlite: Callable[[Path], T], postgresql: Callable[[Any], T]) -> T:
        """The store on this engine: ``sqlite(directory)`` or ``postgresql(pool)``."""
        if self.name == "sqlite":
            return sqlite(self.directory)
        return postgresql(self.pool())

    def opener(
        self, sqlite: Callable[[Path], T], file_name: str, postgresql: Callable[[Any], T]
    ) -> Callable[[], T]:
        """Open the store on its file ``file_name`` or on a pool, each call anew."""
        return lambda: self.open(lambda directory: sqlite(directory / file_name), postgresql)

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
