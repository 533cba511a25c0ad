"""HTTPS between real nodes: TLS 1.2/1.3 only, HSTS, a pinned CA, a foreign CA refused.

Custodian A is made with `init --tls-self-signed` (a new lab CA); grantee B with the same
CA (`--tls-ca`); stranger S with a CA of its own. A and B list each other by https://
URLs and pin the lab CA; B also lists S. The wallet CLI, the audit CLI and B's fetch all
go over HTTPS.
"""

from __future__ import annotations

import json
import socket
import ssl
import stat
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from node.samples import make_ct_study
from tests.support.nodes import NodeProcess, init_node, run_cli, wait_until


@dataclass
class Lab:
    """Custodian and grantee sharing one lab CA, and a stranger with a CA of its own."""

    a: NodeProcess
    b: NodeProcess
    stranger: NodeProcess
    wallet: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("https")
    a = init_node(base, "a.https.example/imageshare", "a", "--tls-self-signed")
    assert a.ca_file is not None
    lab_ca = ["--tls-self-signed", "--tls-ca", str(a.data_dir / "tls" / "ca.pem")]
    lab_ca += ["--tls-ca-key", str(a.data_dir / "tls" / "ca-key.pem")]
    b = init_node(base, "b.https.example/imageshare", "b", *lab_ca)
    stranger = init_node(base, "s.https.example/imageshare", "s", "--tls-self-signed")
    lean = "[federation]\ndiscovery = false\n"
    a.append_config(lean + b.peer_table)
    b.append_config(lean + a.peer_table + stranger.peer_table)
    stranger.append_config(lean)
    make_ct_study(base / "study", series=1, slices=3, patient_id="MRN-HTTPS")
    a.cli("import", str(base / "study"))
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(NodeProcess.start, (a, b, stranger)))
        yield Lab(a, b, stranger, base / "wallet")
    finally:
        for node in (a, b, stranger):
            node.stop()


def _handshake(node: NodeProcess, context: ssl.SSLContext) -> tuple[str, str]:
    """The TLS version and cipher the node agrees to with a client limited by ``context``."""
    with (
        socket.create_connection(("127.0.0.1", node.http_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        version, cipher = tls.version(), tls.cipher()
        assert version is not None and cipher is not None
        return version, cipher[0]


def _client(node: NodeProcess, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=node.ca_file)
    context.minimum_version = context.maximum_version = version
    return context


def _wallet(lab: Lab, *args: str, ca: Path | None, check: bool = True) -> Any:
    extra = ["--ca-file", str(ca)] if ca is not None else []
    result = run_cli(
        "patient", *args, "--wallet", str(lab.wallet), "--json", *extra, check=check
    )
    return json.loads(result.stdout) if check else result


class TestListener:
    def test_tls_1_2_and_1_3_are_accepted_with_aead_ciphers(self, lab: Lab) -> None:
        version, cipher = _handshake(lab.a, _client(lab.a, ssl.TLSVersion.TLSv1_2))
        assert version == "TLSv1.2"
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
        assert _handshake(lab.a, _client(lab.a, ssl.TLSVersion.TLSv1_3))[0] == "TLSv1.3"

    def test_tls_1_1_is_refused(self, lab: Lab) -> None:
        context = _client(lab.a, ssl.TLSVersion.TLSv1_1)
        context.set_ciphers("ALL:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
        with pytest.raises(ssl.SSLError) as refused:
            _handshake(lab.a, context)
        # The server refused it, not this client's OpenSSL for want of a protocol.
        assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value)

    def test_tls_1_2_without_forward_secrecy_or_aead_is_refused(self, lab: Lab) -> None:
        context = _client(lab.a, ssl.TLSVersion.TLSv1_2)
        context.set_ciphers("ECDHE-ECDSA-AES128-SHA:AES128-GCM-SHA256")
        with pytest.raises(ssl.SSLError):
            _handshake(lab.a, context)

    def test_answers_carry_hsts(self, lab: Lab) -> None:
        with urllib.request.urlopen(
            lab.a.url + "/healthz", timeout=10, context=lab.a.tls_context
        ) as response:
            assert response.headers["Strict-Transport-Security"] == "max-age=31536000"

    def test_plain_http_to_the_tls_port_gets_no_answer(self, lab: Lab) -> None:
        with socket.create_connection(("127.0.0.1", lab.a.http_port), timeout=10) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
        assert b"HTTP/1.1" not in answer and b"origin" not in answer

    def test_init_keeps_the_keys_private_and_the_ca_key_out_of_a_sharing_node(
        self, lab: Lab
    ) -> None:
        for node in (lab.a, lab.b):
            assert stat.S_IMODE((node.data_dir / "tls" / "key.pem").stat().st_mode) == 0o600
        assert stat.S_IMODE((lab.a.data_dir / "tls" / "ca-key.pem").stat().st_mode) == 0o600
        # B was signed by A's CA: it holds the CA's certificate to pin, never its key.
        assert not (lab.b.data_dir / "tls" / "ca-key.pem").exists()
        assert (lab.b.data_dir / "tls" / "ca.pem").read_bytes() == (
            lab.a.data_dir / "tls" / "ca.pem"
        ).read_bytes()


class TestFederationOverHttps:
    def test_wallet_grant_replication_and_fetch_over_https_with_the_pinned_ca(
        self, lab: Lab
    ) -> None:
        a, b = lab.a, lab.b
        run_cli("patient", "keygen", "--wallet", str(lab.wallet))
        key = _wallet(lab, "pubkey", "--custodian", a.url, ca=a.ca_file)["pubkey"]
        enrolled = json.loads(
            a.cli("enroll", "--patient-id", "MRN-HTTPS", "--key", key, "--json").stdout
        )
        assert enrolled["studies"] == 1
        grant = _wallet(
            lab, "grant", "--custodian", a.url, "--to", b.origin, "--all", ca=a.ca_file
        )

        # B mirrors A's log (with the grant) over HTTPS.
        def b_holds_a_log() -> bool:
            logs = {log["origin"]: log["size"] for log in b.get_json("/ledger/logs", False)}
            return logs.get(a.origin, 0) >= 2

        wait_until(b_holds_a_log, timeout=30, message="B to mirror A's log over HTTPS")

        fetched = json.loads(b.cli("fetch", grant["token"], "--json").stdout)
        assert fetched["instances"] == 3 and fetched["custodian"] == a.origin

        audit = run_cli(
            "audit", a.url, b.url, "--json", "--ca-file", str(a.ca_file), check=False
        )
        report = json.loads(audit.stdout)
        assert report["unreachable"] == [] and report["violations"] == [], audit.stdout
        assert audit.returncode == 0

    def test_a_peer_with_a_certificate_from_another_ca_is_refused(self, lab: Lab) -> None:
        def stranger_refused() -> str | None:
            peers = lab.b.get_json("/admin/api/federation")["peers"]
            status = next(p for p in peers if p["origin"] == lab.stranger.origin)
            error = str(status["last_error"])
            return error if status["reachable"] is False and error else None

        error = wait_until(stranger_refused, timeout=30, message="B to refuse the stranger")
        assert "certificate" in error.lower()
        listed = {log["origin"] for log in lab.b.get_json("/ledger/logs", False)}
        assert lab.stranger.origin not in listed

    def test_the_wallet_refuses_a_custodian_its_pinned_ca_did_not_sign(self, lab: Lab) -> None:
        stranger = lab.stranger.url
        result = _wallet(lab, "pubkey", "--custodian", stranger, ca=lab.a.ca_file, check=False)
        assert result.returncode == 2
        assert "certificate" in result.stderr.lower() and "Traceback" not in result.stderr

    def test_the_wallet_without_the_pinned_ca_refuses_a_lab_certificate(self, lab: Lab) -> None:
        result = _wallet(lab, "pubkey", "--custodian", lab.a.url, ca=None, check=False)
        assert result.returncode == 2 and "certificate" in result.stderr.lower()
