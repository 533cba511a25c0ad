"""`imageshare init`: a new node's files, keys and refusals."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from cryptography import x509
from nacl.signing import SigningKey

from node.config import load_config
from node.core.base64url import b64url_encode
from node.core.keys import parse_verifier_key
from tests.support.nodes import NodeProcess, run_cli


class TestInit:
    def test_init_creates_node_with_private_key_files(self, tmp_path: Path) -> None:
        result = run_cli("init", str(tmp_path / "n"), "--origin", "a.example/imageshare", "--json")
        info = json.loads(result.stdout)
        assert set(info) == {"origin", "vkey", "config", "http", "admin_token"}
        assert info["http"] == "127.0.0.1:8600"
        assert parse_verifier_key(info["vkey"]).name == "a.example/imageshare"
        for name in ("node.key", "admin.token", "node.toml"):
            mode = stat.S_IMODE((tmp_path / "n" / name).stat().st_mode)
            assert mode == 0o600, name

    def test_init_refuses_existing_node(self, tmp_path: Path) -> None:
        run_cli("init", str(tmp_path / "n"), "--origin", "a.example/imageshare")
        again = run_cli("init", str(tmp_path / "n"), "--origin", "b.example/x", check=False)
        assert again.returncode == 2
        assert "already holds a node" in again.stderr
        assert "Traceback" not in again.stderr

    def test_init_refuses_bad_http_address(self, tmp_path: Path) -> None:
        bad = run_cli(
            "init", str(tmp_path / "n"), "--origin", "a.ex/x", "--http", "nope", check=False
        )
        assert bad.returncode == 2
        assert bad.stderr.count("\n") == 1

    def test_init_refuses_an_origin_that_would_break_its_node_toml(self, tmp_path: Path) -> None:
        bad = run_cli("init", str(tmp_path / "n"), "--origin", "nl.example/x\n", check=False)
        assert bad.returncode == 2
        assert "is not a node origin" in bad.stderr
        assert bad.stderr.count("\n") == 1
        assert not (tmp_path / "n").exists()

    def test_init_writes_a_config_that_passes_the_schema(self, tmp_path: Path) -> None:
        run_cli("init", str(tmp_path / "n"), "--origin", "a.example/imageshare")
        config = load_config(tmp_path / "n" / "node.toml")
        assert config.origin == "a.example/imageshare"
        assert config.data_dir == (tmp_path / "n").resolve()


class TestInitSelfSignedTls:
    def test_init_makes_a_ca_and_a_certificate_for_the_origin_host_and_the_listen_address(
        self, tmp_path: Path
    ) -> None:
        result = run_cli(
            "init",
            str(tmp_path / "n"),
            "--origin",
            "https://a.example:8443/imageshare",
            "--http",
            "127.0.0.1:8643",
            "--tls-self-signed",
            "--json",
        )
        assert set(json.loads(result.stdout)) == {"origin", "vkey", "config", "http", "admin_token"}
        config = load_config(tmp_path / "n" / "node.toml")
        assert config.http.tls and config.public_url == "https://127.0.0.1:8643"
        assert config.http.trusted_ca_file == str(tmp_path / "n" / "tls" / "ca.pem")
        leaf = x509.load_pem_x509_certificates(Path(config.http.cert_file).read_bytes())[0]
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["a.example", "localhost"]
        assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        for name in ("key.pem", "ca-key.pem"):
            assert stat.S_IMODE((tmp_path / "n" / "tls" / name).stat().st_mode) == 0o600

    def test_init_refuses_a_certificate_that_is_no_ca_as_the_lab_ca(self, tmp_path: Path) -> None:
        run_cli("init", str(tmp_path / "a"), "--origin", "a.example/x", "--tls-self-signed")
        tls = tmp_path / "a" / "tls"
        bad = run_cli(
            "init",
            str(tmp_path / "b"),
            "--origin",
            "b.example/x",
            "--tls-self-signed",
            "--tls-ca",
            str(tls / "cert.pem"),
            "--tls-ca-key",
            str(tls / "key.pem"),
            check=False,
        )
        assert bad.returncode == 2 and "is not a CA certificate" in bad.stderr
        assert bad.stderr.count("\n") == 1
        assert not (tmp_path / "b").exists()  # nothing half-made to block a retry

    def test_a_certificate_that_cannot_be_loaded_stops_run_naming_the_key(
        self, tmp_path: Path
    ) -> None:
        run_cli("init", str(tmp_path / "n"), "--origin", "a.example/x", "--tls-self-signed")
        (tmp_path / "n" / "tls" / "cert.pem").write_text("not a certificate\n")
        result = run_cli("run", "-c", str(tmp_path / "n" / "node.toml"), check=False)
        assert result.returncode == 2
        assert result.stderr.startswith("imageshare: [http] cert_file: cannot load"), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr

    def test_tls_ca_without_tls_self_signed_is_a_usage_error(self, tmp_path: Path) -> None:
        bad = run_cli(
            "init", str(tmp_path / "n"), "--origin", "a.ex/x", "--tls-ca", "ca.pem", check=False
        )
        assert bad.returncode == 2 and "go with --tls-self-signed" in bad.stderr
        assert not (tmp_path / "n").exists()


class TestRun:
    def test_healthz_answers_without_auth_once_serving(self, running_node: NodeProcess) -> None:
        health = running_node.get_json("/healthz", auth=False)
        assert health["status"] == "ok"
        assert health["origin"] == running_node.origin


class TestEnrollKeyArgument:
    def test_key_beginning_with_a_dash_is_taken_as_the_value(
        self, running_node: NodeProcess
    ) -> None:
        while True:  # one key in 64 begins with "-" in base64url
            key_text = b64url_encode(bytes(SigningKey(os.urandom(32)).verify_key))
            if key_text.startswith("-"):
                break
        result = running_node.cli("enroll", "--patient-id", "MRN-DASH", "--key", key_text, "--json")
        assert json.loads(result.stdout)
