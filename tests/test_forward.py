"""Forwarding of arriving studies to a PACS (a real DCMTK storescp), with retries."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.samples import SyntheticStudy, make_ct_study
from node.store.forward_state import ForwardState, PostgresForwardState
from tests.support.nodes import NodeProcess, free_port, wait_until
from tests.support.state_engines import StateEngine

PACS = "PACS"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class StoreScp:
    """A DCMTK storescp playing the PACS, started and stopped by the test."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreScp:
        self.process = subprocess.Popen(
            ["storescp", "-aet", PACS, "-od", str(self.directory), str(self.port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers_echo, message="storescp to listen")
        return self

    def _answers_echo(self) -> bool:
        result = subprocess.run(
            ["echoscu", "-aec", PACS, "127.0.0.1", str(self.port)],
            capture_output=True,
            env=DCMTK_ENV,
            timeout=10,
            check=False,
        )
        return result.returncode == 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def received(self) -> dict[str, pydicom.Dataset]:
        found: dict[str, pydicom.Dataset] = {}
        for path in self.directory.iterdir():
            ds = pydicom.dcmread(path)
            found[ds.SOPInstanceUID] = ds
        return found


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreScp]:
    scp = StoreScp(free_port(), tmp_path / "pacs")
    yield scp
    scp.stop()


@pytest.fixture
def forwarding_node(node_factory: Callable[..., NodeProcess], pacs: StoreScp) -> NodeProcess:
    """A node, not yet started, that forwards to the PACS with a short backoff."""
    node = node_factory("fwd.example/imageshare")
    node.append_config(
        f'[forward]\nae_title = "{PACS}"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
        "initial_backoff = 0.3\nmax_attempts = 20"
    )
    return node


def forward_action(node: NodeProcess, uid: str, action: str, auth: bool = True) -> Any:
    """POST /admin/api/forwards/{uid}/{action}: (HTTP status, JSON answer)."""
    request = urllib.request.Request(
        f"{node.url}/admin/api/forwards/{uid}/{action}",
        data=b"",
        headers=node.auth if auth else {},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def status(node: NodeProcess) -> dict[str, Any]:
    report: dict[str, Any] = node.get_json("/admin/api/forwarding")
    return report


def start(node: NodeProcess) -> NodeProcess:
    """Start the node and wait for its forwarder: /healthz answers before services start."""
    node.start()
    wait_until(lambda: status(node)["enabled"], timeout=10, message="the forwarder to start")
    return node


def assert_delivered(pacs: StoreScp, study: SyntheticStudy) -> None:
    received = pacs.received()
    assert set(received) == set(study.sop_uids)
    for path in study.files:
        sent = pydicom.dcmread(path)
        assert received[sent.SOPInstanceUID] == sent


class TestForwarding:
    def test_imported_study_is_forwarded_to_the_pacs(
        self, forwarding_node: NodeProcess, pacs: StoreScp, tmp_path: Path
    ) -> None:
        pacs.start()
        node = start(forwarding_node)
        study = make_ct_study(tmp_path / "study", series=2, slices=3)
        # Import runs in a separate process: the forwarder finds the study in the index.
        node.cli("import", str(tmp_path / "study"))
        wait_until(lambda: len(pacs.received()) == 6, message="the study at the PACS")
        assert_delivered(pacs, study)
        wait_until(lambda: status(node)["forwarded"] == 6, timeout=5, message="the count")
        report = status(node)
        assert report["enabled"] is True
        assert report["destination"] == {"ae_title": PACS, "host": "127.0.0.1", "port": pacs.port}
        assert (report["pending"], report["failed"], report["problems"]) == (0, 0, [])
        assert "forwarded 6 instance(s)" in node.log_path.read_text()

    def _import_while_pacs_is_down(
        self, node: NodeProcess, tmp_path: Path
    ) -> tuple[SyntheticStudy, dict[str, Any]]:
        study = make_ct_study(tmp_path / "study", series=1, slices=4)
        node.cli("import", str(tmp_path / "study"))
        # Attempts fail, are counted and shown, and the instances stay queued.
        report = wait_until(
            lambda: (r := status(node))["problems"] and r["problems"][0]["attempts"] >= 1 and r,
            message="failed attempts in the status",
        )
        assert report["pending"] == 4 and report["forwarded"] == 0
        assert "no association" in report["last_error"]
        assert "forwarding 4 instance(s)" in node.log_path.read_text()
        return study, report

    def test_forwarding_retries_until_the_pacs_is_up(
        self, forwarding_node: NodeProcess, pacs: StoreScp, tmp_path: Path
    ) -> None:
        node = start(forwarding_node)
        study, _ = self._import_while_pacs_is_down(node, tmp_path)
        pacs.start()
        wait_until(lambda: len(pacs.received()) == 4, message="the study at the PACS")
        assert_delivered(pacs, study)
        wait_until(
            lambda: (r := status(node))["forwarded"] == 4 and r["pending"] == 0,
            timeout=5,
            message="the status to show the delivery",
        )

    def test_queued_instances_survive_a_crash(
        self, forwarding_node: NodeProcess, pacs: StoreScp, tmp_path: Path
    ) -> None:
        node = start(forwarding_node)
        study, _ = self._import_while_pacs_is_down(node, tmp_path)
        node.kill9()
        pacs.start()
        start(node)
        wait_until(lambda: len(pacs.received()) == 4, message="the study at the PACS")
        assert_delivered(pacs, study)
        assert status(node)["problems"] == []


class TestStaffActions:
    def test_staff_retry_a_failed_instance_and_cancel_one_that_is_then_never_sent(
        self, node_factory: Callable[..., NodeProcess], pacs: StoreScp, tmp_path: Path
    ) -> None:
        node = node_factory("fwd.example/imageshare")
        # One attempt each: a failed instance is sent again only when staff retry it.
        node.append_config(
            f'[forward]\nae_title = "{PACS}"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
            "initial_backoff = 0.3\nmax_attempts = 1"
        )
        start(node)
        study = make_ct_study(tmp_path / "study", series=1, slices=3)
        node.cli("import", str(tmp_path / "study"))
        wait_until(lambda: status(node)["failed"] == 3, message="three failed instances")
        cancelled, retried, left = study.sop_uids
        assert forward_action(node, cancelled, "cancel") == (
            200,
            {"id": cancelled, "state": "cancelled"},
        )
        assert forward_action(node, cancelled, "retry")[0] == 409
        assert forward_action(node, "1.2.3.4.5", "retry")[0] == 404
        assert forward_action(node, "1.2.3.4.5", "cancel")[0] == 404
        assert forward_action(node, "..%2F..%2Fetc", "retry")[0] == 404
        assert forward_action(node, retried, "delete")[0] == 404
        assert forward_action(node, retried, "retry", auth=False)[0] == 401
        pacs.start()
        assert forward_action(node, retried, "retry") == (200, {"id": retried, "state": "pending"})
        wait_until(lambda: retried in pacs.received(), message="the retried instance sent")
        report = wait_until(
            lambda: (r := status(node))["forwarded"] == 1 and r, message="the retry counted"
        )
        assert (report["failed"], report["cancelled"], report["pending"]) == (1, 1, 0)
        assert [p["sop_instance_uid"] for p in report["problems"]] == [left]
        assert forward_action(node, retried, "retry")[0] == 404, "delivered: out of the queue"
        forward_action(node, left, "retry")
        wait_until(lambda: status(node)["forwarded"] == 2, message="the second retry sent")
        assert set(pacs.received()) == {retried, left}, "the cancelled one is never sent"
        assert status(node)["cancelled"] == 1


class TestForwardingStatus:
    def test_disabled_forwarding_says_so_to_the_admin_only(self, running_node: NodeProcess) -> None:
        assert status(running_node) == {"enabled": False}
        with pytest.raises(Exception, match="401"):
            running_node.get_json("/admin/api/forwarding", auth=False)


@pytest.fixture
def open_forward_state(state_engine: StateEngine) -> Callable[[], ForwardState]:
    """Open the queue (again: a restart on SQLite, another daemon on PostgreSQL)."""
    return state_engine.opener(ForwardState, "forward.sqlite", PostgresForwardState)


class TestForwardState:
    """The durable queue's rules, in process, on both engines."""

    def test_backoff_doubles_and_gives_up_at_the_attempt_limit(
        self, open_forward_state: Callable[[], ForwardState]
    ) -> None:
        state = open_forward_state()
        state.enqueue([(1, "1.2.3", "1.2"), (2, "1.2.4", "1.2")], now=100.0)
        assert state.last_rowid == 2
        for attempt, next_try, kept in (
            (1, 101.0, "pending"),
            (2, 102.0, "pending"),
            (3, 104.0, "failed"),
        ):
            due = [q for q in state.due(now=1000.0, limit=10) if q.sop_instance_uid == "1.2.3"]
            state.attempt_failed(due, "refused", now=100.0, max_attempts=3, initial_backoff=1.0)
            summary = state.summary()
            (problem,) = summary["problems"]
            assert (problem["attempts"], problem["next_try"], problem["state"]) == (
                attempt,
                next_try,
                kept,
            )
        assert [q.sop_instance_uid for q in state.due(now=1e12, limit=10)] == ["1.2.4"]
        state.delivered(["1.2.4"], now=200.0)
        summary = state.summary()
        assert (summary["forwarded"], summary["pending"], summary["failed"]) == (1, 0, 1)
        assert summary["last_error"] == "refused"
        state.close()

    def test_a_cancelled_instance_stays_cancelled_when_an_attempt_in_flight_fails(
        self, open_forward_state: Callable[[], ForwardState]
    ) -> None:
        state = open_forward_state()
        state.enqueue([(1, "1.2.3", "1.2")], now=1.0)
        in_flight = state.due(now=1.0, limit=10)
        assert state.cancel("1.2.3")
        state.attempt_failed(in_flight, "refused", now=2.0, max_attempts=5, initial_backoff=1.0)
        assert state.state_of("1.2.3") == "cancelled"
        assert state.due(now=1e12, limit=10) == []
        assert not state.retry_now("1.2.3", now=3.0)
        assert (state.summary()["cancelled"], state.summary()["problems"]) == (1, [])
        state.close()

    def test_state_survives_reopening(self, open_forward_state: Callable[[], ForwardState]) -> None:
        state = open_forward_state()
        state.enqueue([(7, "1.2.3", "1.2")], now=5.0)
        state.close()
        reopened = open_forward_state()
        assert reopened.last_rowid == 7
        assert [q.sop_instance_uid for q in reopened.due(now=5.0, limit=10)] == ["1.2.3"]
        reopened.advance(3)  # the cursor never moves back
        assert reopened.last_rowid == 7
        reopened.close()

    def test_two_daemons_queueing_the_same_arrivals_at_once_queue_each_once(
        self, open_forward_state: Callable[[], ForwardState]
    ) -> None:
        daemons = [open_forward_state(), open_forward_state()]
        arrivals = [(n, f"1.2.{n}", "1.2") for n in range(1, 31)]
        start = threading.Barrier(6)

        def enqueue(n: int) -> None:
            start.wait()
            daemons[n % 2].enqueue(arrivals[: 10 + 4 * n], now=1.0)

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(enqueue, range(6)))
        assert daemons[0].last_rowid == 30
        summary = daemons[1].summary()
        assert (summary["pending"], summary["index_position"]) == (30, 30)
        assert len(daemons[1].due(now=1.0, limit=100)) == 30
