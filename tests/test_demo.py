"""`scripts/demo.py --no-wait`: the whole federation story runs end to end and says so.

The demo is run once (module fixture) as a user would, with the project's interpreter and
its data directory in tmp_path; the tests read what it printed and what it left behind.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.nodes import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    data_dir = tmp_path_factory.mktemp("demo") / "demo-data"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "demo.py"),
            "--no-wait",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    return result, data_dir


class TestDemo:
    def test_runs_the_whole_story_and_exits_0(
        self, demo: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        result, _ = demo
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "The story ran end to end: fetched, refused (revoked), audit clean." in result.stdout

    def test_each_step_states_its_outcome_in_order(
        self, demo: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        out = demo[0].stdout
        outcomes = [
            "-> federation of 3: every node knows every other",
            "-> three nodes up",
            "-> enrolled",
            "-> report kept as instance",
            "-> granted",
            "-> fetched: hospital-b.example/imageshare holds the granted study, and only that one",
            "-> replicated: B and C held it",
            "-> revoked",
            "-> refused: revoked (exit 1), as expected",
            "-> shared by a link",
            "-> second opinion: hospital-c.example/imageshare holds the shared study",
            "-> patient log proven: the access, the revocation, the denial and the link's reads",
            "-> audit clean: exit 0",
        ]
        positions = [out.find(line) for line in outcomes]
        missing = [line for line in outcomes if line not in out]
        assert not missing, missing
        assert positions == sorted(positions)

    def test_shows_the_commands_and_their_real_answers(
        self, demo: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        out = demo[0].stdout
        assert "$ imageshare patient grant" in out and "$ imageshare audit" in out
        assert "refused the token (revoked)" in out
        # The study's 24 images and the report the RIS posted, which travels with them.
        assert "hospital-b.example/imageshare received 25 images" in out
        assert "and its report: CT chest report (final)" in out
        assert "clean: 3 log(s) verified" in out
        assert "/admin" in out and "/wallet/" in out and "admin token:" in out

    def test_stops_every_node_cleanly_and_keeps_their_data(
        self, demo: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        result, data_dir = demo
        for name in ("hospital-a", "hospital-b", "hospital-c"):
            assert f"{name} stopped cleanly (exit 0)" in result.stdout
            assert (data_dir / name / "node.toml").exists()
        assert (data_dir / "wallet").is_dir()


class TestDemoFailure:
    def test_busy_base_port_is_a_clear_error_with_exit_1(self, tmp_path: Path) -> None:
        port = free_port()
        with socket.create_server(("127.0.0.1", port)):
            result = subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "demo.py"), "--no-wait",
                 "--base-port", str(port), "--data-dir", str(tmp_path / "demo")],
                capture_output=True, text=True, timeout=60, cwd=ROOT,
            )  # fmt: skip
        assert result.returncode == 1
        assert f"port(s) [{port}] are in use" in result.stderr
        assert "Traceback" not in result.stderr

    def test_a_data_dir_holding_something_else_is_left_alone(self, tmp_path: Path) -> None:
        precious = tmp_path / "precious.txt"
        precious.write_text("not a demo")
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "demo.py"), "--no-wait",
             "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 1
        assert "not replacing it" in result.stderr
        assert precious.read_text() == "not a demo"
