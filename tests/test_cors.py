"""CORS against a real node: only /dicomweb and the public /ledger reads, only for the
configured viewer origins; never another origin, never "null", never admin, p2p or patient."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from node.config import load_config
from node.errors import ConfigError
from node.samples import make_ct_study
from tests.support.nodes import NodeProcess, init_node

VIEWER = "https://viewer.hospital.example:3000"
HOSTILE = "https://attacker.example"
# Sandboxed iframes, file:// pages and data: URLs send "Origin: null".
OPAQUE = "null"

# Paths of every kind that are not for other origins, with the method they answer.
NOT_FOR_OTHER_ORIGINS = [
    ("GET", "/admin/api/status"),
    ("GET", "/admin/"),
    ("GET", "/p2p/whoami"),
    ("GET", "/patient/roster"),
    ("POST", "/patient/grants"),
    ("GET", "/healthz"),
    ("GET", "/wallet/"),
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    base = tmp_path_factory.mktemp("cors")
    made = init_node(base, "cors.example/imageshare")
    setting = f'cors_origins = ["{VIEWER}"]\n'
    made.config.write_text(made.config.read_text().replace("[http]\n", "[http]\n" + setting))
    make_ct_study(base / "study", series=1, slices=2, rows=32, columns=32)
    made.cli("import", str(base / "study"))
    made.start()
    yield made
    made.stop()


def get(node: NodeProcess, path: str, origin: str, method: str = "GET") -> requests.Response:
    headers = {**node.auth, "Origin": origin}
    return requests.request(method, node.url + path, headers=headers, timeout=10)


def preflight(node: NodeProcess, path: str, origin: str, method: str = "GET") -> requests.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, accept",
    }
    return requests.options(node.url + path, headers=headers, timeout=10)


class TestOtherOrigins:
    @pytest.mark.parametrize("origin", [HOSTILE, OPAQUE, VIEWER + ".attacker.example"])
    def test_dicomweb_and_ledger_do_not_answer_an_unconfigured_origin(
        self, node: NodeProcess, origin: str
    ) -> None:
        for path in ("/dicomweb/studies", "/ledger/logs"):
            response = get(node, path, origin)
            assert response.status_code == 200, path
            assert "Access-Control-Allow-Origin" not in response.headers, path
            assert "Origin" in response.headers["Vary"], path  # caches keep answers apart
            answer = preflight(node, path, origin)
            assert answer.status_code != 204, path
            assert "Access-Control-Allow-Origin" not in answer.headers, path

    @pytest.mark.parametrize(("method", "path"), NOT_FOR_OTHER_ORIGINS)
    def test_other_paths_never_answer_another_origin_even_a_configured_one(
        self, node: NodeProcess, method: str, path: str
    ) -> None:
        for origin in (VIEWER, HOSTILE, OPAQUE):
            response = get(node, path, origin, method)
            assert "Access-Control-Allow-Origin" not in response.headers, (path, origin)
            answer = preflight(node, path, origin, method)
            assert answer.status_code != 204, (path, origin)
            assert "Access-Control-Allow-Origin" not in answer.headers, (path, origin)

    def test_ledger_reads_do_not_extend_to_writes(self, node: NodeProcess) -> None:
        answer = preflight(node, "/ledger/logs", VIEWER, "POST")
        assert "Access-Control-Allow-Origin" not in answer.headers


class TestConfiguredViewer:
    def test_dicomweb_read_carries_the_viewer_origin(self, node: NodeProcess) -> None:
        response = get(node, "/dicomweb/studies", VIEWER)
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == VIEWER
        assert "Origin" in response.headers["Vary"]
        assert "Warning" in response.headers["Access-Control-Expose-Headers"]

    @pytest.mark.parametrize("method", ["GET", "POST"])
    def test_dicomweb_preflight_is_answered(self, node: NodeProcess, method: str) -> None:
        answer = preflight(node, "/dicomweb/studies", VIEWER, method)
        assert answer.status_code == 204
        assert answer.headers["Access-Control-Allow-Origin"] == VIEWER
        assert method in answer.headers["Access-Control-Allow-Methods"]
        allowed = answer.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed and "accept" in allowed

    def test_dicomweb_still_needs_the_admin_token(self, node: NodeProcess) -> None:
        response = requests.get(
            node.url + "/dicomweb/studies", headers={"Origin": VIEWER}, timeout=10
        )
        assert response.status_code == 401
        assert response.headers["Access-Control-Allow-Origin"] == VIEWER  # so it can read why

    def test_public_ledger_read_and_its_preflight_carry_the_viewer_origin(
        self, node: NodeProcess
    ) -> None:
        response = requests.get(node.url + "/ledger/logs", headers={"Origin": VIEWER}, timeout=10)
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == VIEWER
        answer = preflight(node, "/ledger/logs", VIEWER)
        assert answer.status_code == 204
        assert answer.headers["Access-Control-Allow-Origin"] == VIEWER
        assert answer.headers["Access-Control-Allow-Methods"] == "GET, HEAD"


class TestDefault:
    def test_a_node_without_configured_origins_answers_none(self, tmp_path: Path) -> None:
        plain = init_node(tmp_path, "plain.example/imageshare")
        plain.start()
        try:
            for origin in (VIEWER, HOSTILE, OPAQUE):
                for path in ("/dicomweb/studies", "/ledger/logs"):
                    assert "Access-Control-Allow-Origin" not in get(plain, path, origin).headers
                    answer = preflight(plain, path, origin)
                    assert "Access-Control-Allow-Origin" not in answer.headers
        finally:
            plain.stop()


class TestConfiguration:
    @pytest.mark.parametrize(
        "origin", ["*", "null", "https://viewer.example/", "viewer.example", "https://a b"]
    )
    def test_wildcards_null_and_non_origins_are_refused(self, tmp_path: Path, origin: str) -> None:
        path = tmp_path / "node.toml"
        path.write_text(f'origin = "x.example/imageshare"\n[http]\ncors_origins = ["{origin}"]\n')
        with pytest.raises(ConfigError, match="cors_origins"):
            load_config(path)

    def test_an_origin_is_kept_in_lower_case_as_browsers_send_it(self, tmp_path: Path) -> None:
        path = tmp_path / "node.toml"
        path.write_text(
            f'origin = "x.example/imageshare"\n[http]\ncors_origins = ["{VIEWER.upper()}"]\n'
        )
        assert load_config(path).http.cors_origins == [VIEWER]
