"""Fixtures shared by every test module."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.ledger_stores import LedgerStores
from tests.support.nodes import (
    SCALE_OUT_STORE_ENV,
    NodeProcess,
    init_node,
    use_scale_out_store,
)
from tests.support.postgres import PostgresServer, node_store_settings, running_postgres
from tests.support.privacy import sweep
from tests.support.s3 import running_s3
from tests.support.state_engines import ENGINES, StateEngine


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


@pytest.fixture(scope="session", autouse=True)
def scale_out_store(request: pytest.FixtureRequest) -> Iterator[None]:
    """With IMAGESHARE_TEST_STORE=postgresql, the suite's nodes keep their instances on
    PostgreSQL + S3 (moto), each node in a database and a bucket of its own."""
    backend = os.environ.get(SCALE_OUT_STORE_ENV, "sqlite")
    if backend == "sqlite":
        yield
        return
    if backend != "postgresql":
        raise pytest.UsageError(f"{SCALE_OUT_STORE_ENV}: sqlite or postgresql, not {backend!r}")
    postgres: PostgresServer = request.getfixturevalue("postgres")
    numbers = itertools.count()
    with running_s3("moto") as s3:

        def store_tables(data_dir: Path) -> str:
            number = f"{os.getpid()}-{next(numbers)}"
            dsn = postgres.create_database(f"node_{number.replace('-', '_')}")
            s3.client().create_bucket(Bucket=f"node-{number}")  # type: ignore[attr-defined]
            return node_store_settings(data_dir, dsn, s3, f"node-{number}")

        use_scale_out_store(store_tables)
        try:
            yield
        finally:
            use_scale_out_store(None)


@pytest.fixture(params=ENGINES)
def state_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateEngine]:
    """A state store's engine, SQLite or PostgreSQL (tests/support/state_engines.py)."""
    server = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    engine = StateEngine(request.param, tmp_path, server)
    yield engine
    engine.close()


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
