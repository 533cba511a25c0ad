"""Two `imageshare run` daemons of one node on one PostgreSQL and one bucket: both serve,
both append to the node's one log, and when the log writer is killed the other takes
over and the log still verifies."""

from __future__ import annotations

import base64
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.core.entries import decode_entry, encode_entry
from tests.support.nodes import NodeProcess, free_port, init_node, log_entries, wait_until
from tests.support.patients import call, enroll_new_key, make_grant
from tests.support.postgres import PostgresServer, node_store_settings
from tests.support.s3 import SERVERS, running_s3

ORIGIN = "twin.example/imageshare"
GRANTEE = "b.example/imageshare"
TAKE_OVER = "this daemon now writes the node's log"


def second_daemon(first: NodeProcess, base: Path) -> NodeProcess:
    """A daemon of ``first``'s node (its node.toml, key and token) in a data directory
    of its own, on ports of its own."""
    data_dir = base / "second"
    shutil.copytree(first.data_dir, data_dir, ignore=shutil.ignore_patterns("daemon.log"))
    http_port, dimse_port = free_port(), free_port()
    config = (data_dir / "node.toml").read_text()
    config = config.replace(f"127.0.0.1:{first.http_port}", f"127.0.0.1:{http_port}")
    config = config.replace(f"port = {first.dimse_port}", f"port = {dimse_port}")
    (data_dir / "node.toml").write_text(config)
    return NodeProcess(
        data_dir, first.origin, http_port, dimse_port, first.vkey, first.admin_token
    )


@pytest.fixture
def twins(postgres: PostgresServer, tmp_path: Path) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    with running_s3(SERVERS[0]) as s3:
        s3.client().create_bucket(Bucket="twins")  # type: ignore[attr-defined]
        first = init_node(tmp_path, ORIGIN, "first")
        dsn = postgres.create_database("twins")
        first.append_config(node_store_settings(first.data_dir, dsn, s3, "twins"))
        second = second_daemon(first, tmp_path)
        try:
            first.start()
            wait_until(lambda: TAKE_OVER in first.log_path.read_text(), message="a writer")
            second.start()
            yield first, second
        finally:
            first.stop()
            second.stop()


def test_two_daemons_append_to_one_log_and_the_survivor_takes_over_from_a_killed_writer(
    twins: tuple[NodeProcess, NodeProcess],
) -> None:
    first, second = twins
    for daemon in twins:
        assert daemon.get_json("/dicomweb/studies") == []
    assert TAKE_OVER not in second.log_path.read_text()  # one writer at a time
    key = enroll_new_key(second, "PAT-TWIN")
    acknowledged: dict[int, bytes] = {}
    through = {first.http_port: 0, second.http_port: 0}
    lock = threading.Lock()

    def grant_through(daemon: NodeProcess, count: int) -> None:
        for _ in range(count):
            try:
                status, answer = call(
                    daemon, key, "POST", "/patient/grants", make_grant(key, ORIGIN, GRANTEE)
                )
            except OSError:
                return  # the daemon was killed: nothing more is acknowledged by it
            if status == 200:
                with lock:
                    assert answer["index"] not in acknowledged, "an index given twice"
                    acknowledged[answer["index"]] = base64.b64decode(answer["entry"])
                    through[daemon.http_port] += 1

    burst = [
        threading.Thread(target=grant_through, args=(daemon, 40)) for daemon in (first, second)
    ]
    for thread in burst:
        thread.start()
    wait_until(lambda: min(through.values()) >= 10, timeout=60, message="grants through both")
    first.kill9()
    for thread in burst:
        thread.join(timeout=120)
    wait_until(
        lambda: TAKE_OVER in second.log_path.read_text(), timeout=10, message="a take-over"
    )
    assert through[second.http_port] == 40  # the survivor acknowledged all it was sent
    entries = log_entries(second)
    assert all(encode_entry(entries[i]) == raw for i, raw in acknowledged.items())
    assert sum(1 for e in entries if e.body.kind == "grant") >= len(acknowledged)
    second.cli("ledger", "verify")
    assert decode_entry(acknowledged[max(acknowledged)]).body.kind == "grant"
