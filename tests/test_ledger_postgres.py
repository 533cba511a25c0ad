"""Several daemons of one node on one PostgreSQL ledger: real processes appending to the
same own log, killed mid-burst, and taking over the log writer lock."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from node.core.entries import Grant
from node.core.keys import NodeIdentity
from node.errors import ConfigError
from node.services.ledger import WriterOnly
from node.store.ledger import LEDGER_FILE, IntegrityReport, LedgerStore, SoleWriter
from node.store.pg_ledger import (
    LogWriterLock,
    PostgresLedgerStore,
    refuse_a_log_left_in_sqlite,
)
from node.store.postgres import PostgresSettings
from tests.support.postgres import PostgresServer

ORIGIN = "a.example/imageshare"
ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """One real process of tests/support/ledger_process.py; its stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.ledger_process", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for(self, wanted: str | int, timeout: float = 60.0) -> None:
        """Until the line ``wanted`` (or that many lines) is printed; fails at the deadline."""
        deadline = time.monotonic() + timeout
        while not (wanted in self.seen if isinstance(wanted, str) else len(self.seen) >= wanted):
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, remaining))
            except queue.Empty:
                pytest.fail(f"worker did not print {wanted!r} within {timeout} s")
            if line is None:
                pytest.fail(f"worker ended (rc {self.process.wait()}) before {wanted!r}")
            self.seen.append(line)

    def finish(self) -> list[str]:
        """Every line printed, once the process has ended."""
        self.process.wait(timeout=120)
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(line)
        return self.seen

    def kill(self) -> list[str]:
        os.kill(self.process.pid, signal.SIGKILL)
        return self.finish()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def dsn(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    return postgres.create_database(f"ledger_{request.node.name.lower()[:40]}_{os.getpid()}")


@pytest.fixture
def identity() -> NodeIdentity:
    return NodeIdentity.generate(ORIGIN)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def appender(dsn: str, identity: NodeIdentity, tag: str, count: int) -> Worker:
    return Worker("append", dsn, ORIGIN, identity.seed.hex(), tag, str(count), "4")


def acknowledged(lines: list[str]) -> dict[int, bytes]:
    acks: dict[int, bytes] = {}
    for line in lines:
        if line != "done":
            index, leaf = line.split()
            assert int(index) not in acks, f"index {index} acknowledged twice"
            acks[int(index)] = bytes.fromhex(leaf)
    return acks


def test_two_processes_appending_to_one_log_never_fork_it_nor_reuse_an_index(
    dsn: str, identity: NodeIdentity, workers: list[Worker]
) -> None:
    workers += [appender(dsn, identity, tag, 150) for tag in ("a", "b")]
    lines = [line for w in workers for line in w.finish()]
    assert all(w.process.returncode == 0 for w in workers)
    acks = acknowledged(lines)
    assert sorted(acks) == list(range(300))
    store = PostgresLedgerStore(PostgresSettings(dsn, 2))
    try:
        own = store.own_log(ORIGIN, identity.vkey)
        assert own.size() == 300
        assert all(own.leaf_hash(index) == leaf for index, leaf in acks.items())
        report = own.verify(identity.vkey)
        assert report.ok, report.problems
        assert report.checkpoint_size == 300
    finally:
        store.close()


def test_an_append_acknowledged_before_kill_9_is_in_the_log_and_the_log_verifies(
    dsn: str, identity: NodeIdentity, workers: list[Worker]
) -> None:
    survivor, victim = appender(dsn, identity, "s", 200), appender(dsn, identity, "v", 100_000)
    workers += [survivor, victim]
    victim.wait_for(50)
    killed = victim.kill()
    assert victim.process.returncode == -signal.SIGKILL
    acks = acknowledged(killed) | acknowledged(survivor.finish())
    assert len(acks) == len(killed) + 200
    store = PostgresLedgerStore(PostgresSettings(dsn, 2))
    try:
        own = store.own_log(ORIGIN, identity.vkey)
        size = own.size()
        assert size >= len(acks)  # a commit may land unacknowledged as the process dies
        assert all(own.leaf_hash(index) == leaf for index, leaf in acks.items())
        assert own.verify(identity.vkey).ok
        # The log goes on from where the killed process left it.
        assert own.append(Grant(token=b"after"), 3).index == size
        assert own.verify(identity.vkey).ok
    finally:
        store.close()


def test_when_the_log_writer_dies_another_daemon_takes_over_within_seconds(
    dsn: str, workers: list[Worker]
) -> None:
    first = Worker("writer", dsn)
    workers.append(first)
    first.wait_for("held")
    second = Worker("writer", dsn)
    workers.append(second)
    here = LogWriterLock(dsn)
    try:
        assert not here.try_take()  # one holder at a time
        first.kill()
        started = time.monotonic()
        second.wait_for("held", timeout=10)
        assert time.monotonic() - started < 10
        assert not here.try_take()
    finally:
        here.release()


class Recorder:
    """A background service that records when it runs."""

    def __init__(self) -> None:
        self.running = False
        self.starts = 0

    async def start(self) -> None:
        self.running, self.starts = True, self.starts + 1

    async def stop(self) -> None:
        self.running = False


async def poll(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.05)


def test_the_sole_daemon_of_a_node_runs_the_writers_services_from_the_start() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        duty = WriterOnly(SoleWriter().try_take, recorder, interval=0.05)
        await duty.start()
        assert recorder.running  # started within start(), as before there were writers
        await duty.stop()
        assert not recorder.running

    asyncio.run(scenario())


def test_writer_services_move_to_another_daemon_when_the_writer_stops(dsn: str) -> None:
    async def scenario() -> None:
        locks = [LogWriterLock(dsn), LogWriterLock(dsn)]
        recorders = [Recorder(), Recorder()]
        duties = [
            WriterOnly(k.try_take, r, interval=0.05)
            for k, r in zip(locks, recorders, strict=True)
        ]
        try:
            for duty in duties:
                await duty.start()
            assert [r.running for r in recorders] == [True, False]
            await duties[0].stop()
            locks[0].release()  # as LedgerService.close does
            await poll(lambda: recorders[1].running, timeout=5)
        finally:
            for duty in duties:
                await duty.stop()
            for lock in locks:
                lock.release()

    asyncio.run(scenario())


def test_a_writer_whose_session_ends_stops_its_services(dsn: str) -> None:
    async def scenario() -> None:
        lock, recorder, other = LogWriterLock(dsn), Recorder(), LogWriterLock(dsn)
        duty = WriterOnly(lock.try_take, recorder, interval=1.0)
        try:
            await duty.start()
            assert recorder.running
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks"
                    " WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
                    " AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"
                )
            await poll(other.try_take, timeout=5)  # the lock was freed with the session
            await poll(lambda: not recorder.running, timeout=5)
            assert not lock.try_take()
        finally:
            await duty.stop()
            lock.release()
            other.release()

    asyncio.run(scenario())


def test_a_node_whose_log_is_in_its_sqlite_file_does_not_start_an_empty_one_on_postgresql(
    dsn: str, identity: NodeIdentity, tmp_path: Path
) -> None:
    embedded = LedgerStore(tmp_path)
    embedded.own_log(ORIGIN, identity.vkey).append(Grant(token=b"held"), 1)
    embedded.close()
    store = PostgresLedgerStore(PostgresSettings(dsn, 2))
    try:
        with pytest.raises(ConfigError, match="holds 1 entries"):
            refuse_a_log_left_in_sqlite(store, tmp_path / LEDGER_FILE)
        store.own_log(ORIGIN, identity.vkey).append(Grant(token=b"held"), 1)
        refuse_a_log_left_in_sqlite(store, tmp_path / LEDGER_FILE)  # as long: no refusal
        refuse_a_log_left_in_sqlite(store, tmp_path / "absent.sqlite")
    finally:
        store.close()


def test_verify_sees_one_state_while_another_daemon_appends(
    dsn: str, identity: NodeIdentity, workers: list[Worker]
) -> None:
    store = PostgresLedgerStore(PostgresSettings(dsn, 2))
    try:
        own = store.own_log(ORIGIN, identity.vkey)
        workers.append(busy := appender(dsn, identity, "busy", 2_000))
        busy.wait_for(10)
        reports: list[IntegrityReport] = []
        while busy.process.poll() is None and len(reports) < 20:
            reports.append(own.verify(identity.vkey))
        assert reports and all(r.ok for r in reports), [r.problems for r in reports]
        assert busy.finish()[-1] == "done"
    finally:
        store.close()
