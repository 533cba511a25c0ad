"""`imageshare ledger verify` finds tampering with the stored log and names where."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from node.config import load_config
from node.core.entries import Denial, Grant
from node.core.keys import NodeIdentity
from node.edges.cli import main
from node.store.backends import open_ledger_store
from node.store.ledger import LEDGER_FILE
from node.store.pg_sql import PgConnection
from node.store.secrets import read_seed
from tests.support.nodes import NodeProcess, init_node
from tests.support.postgres import PostgresServer, ledger_store_settings

ENTRIES = 48


def fill_log(node: NodeProcess, count: int = ENTRIES) -> None:
    identity = NodeIdentity(node.origin, read_seed(node.data_dir / "node.key"))
    store = open_ledger_store(load_config(node.config))
    try:
        own = store.own_log(identity.origin, identity.vkey)
        for i in range(count):
            own.append(
                Denial(
                    token_id=bytes([i]) * 32,
                    requester="b.example/x",
                    rule="expired",
                    study=None,
                ),
                1_700_000_000 + i,
            )
        own.publish_checkpoint(identity, 1_700_000_100)
    finally:
        store.close()


@contextlib.contextmanager
def raw_ledger(node: NodeProcess) -> Iterator[Any]:
    """The node's ledger database on its engine, past the store; committed at the end."""
    store = load_config(node.config).store
    if store.backend == "sqlite":
        conn = sqlite3.connect(node.data_dir / LEDGER_FILE)
        with conn:
            yield conn
        conn.close()
    else:
        with psycopg.connect(store.dsn) as pg:
            yield PgConnection(pg, "ledger")


def tamper(node: NodeProcess, *statements: tuple[str, tuple[object, ...]]) -> None:
    with raw_ledger(node) as conn:
        for sql, params in statements:
            conn.execute(sql, params)


def entry_data(node: NodeProcess, index: int) -> tuple[bytes, bytes]:
    with raw_ledger(node) as conn:
        row = conn.execute("SELECT data, leaf_hash FROM entries WHERE idx=?", (index,)).fetchone()
    return bytes(row[0]), bytes(row[1])


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    """One initialised node with a filled, checkpointed log; copied for each test."""
    node = init_node(tmp_path_factory.mktemp("ledger-verify"), "a.example/imageshare")
    fill_log(node)
    return node


@pytest.fixture(params=["sqlite", "postgresql"])
def filled_node(
    template: NodeProcess, tmp_path: Path, request: pytest.FixtureRequest
) -> NodeProcess:
    """The template node's copy, its log in its ledger.sqlite or refilled on PostgreSQL."""
    data_dir = tmp_path / "node"
    if request.param == "sqlite":
        shutil.copytree(template.data_dir, data_dir)
        return dataclasses.replace(template, data_dir=data_dir)
    shutil.copytree(template.data_dir, data_dir, ignore=shutil.ignore_patterns(LEDGER_FILE + "*"))
    node = dataclasses.replace(template, data_dir=data_dir)
    postgres: PostgresServer = request.getfixturevalue("postgres")
    dsn = postgres.create_database(f"verify_{uuid.uuid4().hex}")
    node.append_config(ledger_store_settings(data_dir, dsn))
    fill_log(node)
    return node


@pytest.fixture
def verify(capsys: pytest.CaptureFixture[str]) -> Callable[[NodeProcess], Verdict]:
    """Run the real `imageshare ledger verify --json` command in this process (fast)."""

    def run(node: NodeProcess) -> Verdict:
        capsys.readouterr()
        code = main(["ledger", "verify", "--json", "-c", str(node.config)])
        out, err = capsys.readouterr()
        return code, json.loads(out), err

    return run


Verdict = tuple[int, dict[str, object], str]


class TestLedgerVerify:
    def test_intact_log_verifies(
        self, filled_node: NodeProcess, verify: Callable[[NodeProcess], Verdict]
    ) -> None:
        code, report, _ = verify(filled_node)
        assert code == 0
        assert report["ok"] is True
        assert report["checked"] == ENTRIES
        assert report["checkpoint_size"] == ENTRIES

    def test_command_line_reports_in_words_and_exit_status(self, filled_node: NodeProcess) -> None:
        human = filled_node.cli("ledger", "verify")
        assert human.stdout.rstrip().endswith("ok")
        tamper(filled_node, ("DELETE FROM entries WHERE idx=5", ()))
        failed = filled_node.cli("ledger", "verify", check=False)
        assert failed.returncode == 1
        assert failed.stderr.startswith("imageshare: the ledger does not verify at entry 5")

    def test_flipped_byte_in_an_entry_is_found(
        self, filled_node: NodeProcess, verify: Callable[[NodeProcess], Verdict]
    ) -> None:
        data, _ = entry_data(filled_node, 17)
        flipped = data[:-3] + bytes([data[-3] ^ 0x01]) + data[-2:]
        tamper(filled_node, ("UPDATE entries SET data=? WHERE idx=17", (flipped,)))
        code, report, stderr = verify(filled_node)
        assert code == 1
        assert report["first_bad_index"] == 17
        assert "entry 17" in stderr

    def test_deleted_row_is_found(
        self, filled_node: NodeProcess, verify: Callable[[NodeProcess], Verdict]
    ) -> None:
        tamper(filled_node, ("DELETE FROM entries WHERE idx=23", ()))
        code, report, stderr = verify(filled_node)
        assert code == 1
        assert report["first_bad_index"] == 23
        assert "entry 23" in stderr and "missing" in stderr

    def test_swapped_rows_are_found(
        self, filled_node: NodeProcess, verify: Callable[[NodeProcess], Verdict]
    ) -> None:
        a, b = entry_data(filled_node, 10), entry_data(filled_node, 30)
        tamper(
            filled_node,
            ("UPDATE entries SET data=?, leaf_hash=? WHERE idx=10", b),
            ("UPDATE entries SET data=?, leaf_hash=? WHERE idx=30", a),
        )
        code, report, stderr = verify(filled_node)
        assert code == 1
        assert report["first_bad_index"] == 10
        assert "entry 10" in stderr

    def test_wrong_stored_subtree_hash_is_found(
        self, filled_node: NodeProcess, verify: Callable[[NodeProcess], Verdict]
    ) -> None:
        tamper(filled_node, ("UPDATE subtrees SET hash=? WHERE level=2 AND idx=3", (bytes(32),)))
        code, report, stderr = verify(filled_node)
        assert code == 1
        assert report["first_bad_index"] == 12
        assert "12..15" in stderr

    def test_dropped_tail_is_found_against_the_checkpoint(
        self, filled_node: NodeProcess, verify: Callable[[NodeProcess], Verdict]
    ) -> None:
        tamper(
            filled_node,
            ("DELETE FROM entries WHERE idx>=40", ()),
            ("DELETE FROM subtrees WHERE ((idx + 1) << level) > 40", ()),
            ("UPDATE logs SET size=40", ()),
        )
        code, report, stderr = verify(filled_node)
        assert code == 1
        assert report["first_bad_index"] == 40
        assert "exceeds the log size" in stderr

    def test_rewritten_history_fails_the_checkpoint(
        self, filled_node: NodeProcess, verify: Callable[[NodeProcess], Verdict]
    ) -> None:
        # Rebuild a different, internally consistent log in place: only the checkpoint tells.
        tamper(
            filled_node,
            ("DELETE FROM entries", ()),
            ("DELETE FROM subtrees", ()),
            ("UPDATE logs SET size=0", ()),
        )
        store = open_ledger_store(load_config(filled_node.config))
        own = store.own_log(filled_node.origin)
        for i in range(ENTRIES):
            own.append(Grant(token=bytes([i])), 5)
        store.close()
        code, report, stderr = verify(filled_node)
        assert code == 1
        assert report["checked"] == ENTRIES
        assert "differs from the checkpoint" in stderr

    def test_forged_checkpoint_signature_is_found(
        self, filled_node: NodeProcess, verify: Callable[[NodeProcess], Verdict]
    ) -> None:
        with raw_ledger(filled_node) as conn:
            (note,) = conn.execute("SELECT checkpoint FROM logs").fetchone()
        forged = note.replace(f"\n{ENTRIES}\n", f"\n{ENTRIES - 1}\n")
        tamper(filled_node, ("UPDATE logs SET checkpoint=?", (forged,)))
        code, report, stderr = verify(filled_node)
        assert code == 1
        assert report["checkpoint_size"] is None
        assert "signature" in stderr

    def test_row_beyond_the_size_is_found(
        self, filled_node: NodeProcess, verify: Callable[[NodeProcess], Verdict]
    ) -> None:
        data, leaf = entry_data(filled_node, 0)
        tamper(filled_node, ("INSERT INTO entries VALUES (1, ?, ?, ?)", (ENTRIES + 5, data, leaf)))
        code, report, _ = verify(filled_node)
        assert code == 1
        assert report["first_bad_index"] == ENTRIES + 5
