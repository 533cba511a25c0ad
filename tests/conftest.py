"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.ledger_stores import LedgerStores
from tests.support.nodes import NodeProcess, init_node
from tests.support.postgres import PostgresServer, running_postgres
from tests.support.privacy import sweep


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Make initialised nodes (call with an origin); every started one is stopped after."""
    made: list[NodeProcess] = []

    def make(origin: str = "a.example/imageshare", name: str | None = None) -> NodeProcess:
        node = init_node(tmp_path, origin, name)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server of the test run's own (started on first use)."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def running_node(node_factory: Callable[..., NodeProcess]) -> NodeProcess:
    """One started node with no data."""
    return node_factory().start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the whole suite: no ledger written by any scenario holds PHI or a DICOM UID."""
    if exitstatus != 0 or session.config.option.collectonly:
        return
    base = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    result = sweep(base)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"privacy sweep: {result.entries} ledger entries in {result.ledgers} ledgers"
            f" searched for {result.values} PHI values and UIDs;"
            f" {len(result.findings)} found"
        )
        for finding in result.findings[:20]:
            reporter.write_line(f"  PHI IN THE LEDGER: {finding}")
    if result.findings:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_stores(request: pytest.FixtureRequest) -> Iterator[LedgerStores]:
    """Opens ledger stores on each engine in turn (a directory names one ledger)."""
    postgres = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    stores = LedgerStores(postgres)
    yield stores
    stores.close()
