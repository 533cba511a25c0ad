"""The typed service container: each service of a node is built once, in one place, and
closed with the node."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from node.services.consent import ConsentService
from node.services.ledger import LedgerService
from node.services.runtime import open_runtime
from node.services.transfer import TransferService
from node.store.ledger import LedgerStore
from tests.support.nodes import init_node


@pytest.fixture(scope="module")
def node_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_node(tmp_path_factory.mktemp("runtime"), "a.example/imageshare").config


def test_each_service_is_built_once_even_when_many_threads_ask_first(node_config: Path) -> None:
    runtime = open_runtime(node_config)
    try:
        seen: list[object] = []
        start = threading.Barrier(8)

        def ask() -> None:
            start.wait()
            seen.extend([runtime.services.consent, runtime.services.transfer])

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(seen) == 16 and len({id(s) for s in seen}) == 2
        assert isinstance(runtime.services.consent, ConsentService)
        assert isinstance(runtime.services.transfer, TransferService)
        # Consent opened the ledger it reads: the node's one ledger service.
        assert isinstance(runtime.services.ledger, LedgerService)
        assert runtime.services.consent.ledger is runtime.services.ledger
    finally:
        runtime.close()


def test_closing_the_node_closes_every_service_it_built(node_config: Path) -> None:
    runtime = open_runtime(node_config)
    ledger = runtime.services.ledger.store
    assert isinstance(ledger, LedgerStore)  # a small site's ledger is SQLite's
    ledger_reads = ledger.reader
    nonces = runtime.services.nonces
    runtime.close()
    with pytest.raises(sqlite3.ProgrammingError):
        ledger_reads.execute("SELECT 1")
    with pytest.raises(sqlite3.ProgrammingError):
        nonces.remember("node:a.example/x", bytes(16), 1)
