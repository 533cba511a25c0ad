"""DICOM TLS (PS3.15 Annex B, BCP 195): DCMTK's TLS tools against a real node process.

The test is its own PKI: a node CA (the node's certificate), a hospital CA (its
workstations' client certificates and its PACS), and another CA that the node does not
trust. The TLS listener requires a client certificate from the hospital CA; a caller may
be bound to one certificate; the node's own associations (forwarding, C-MOVE) check the
peer's certificate against the CA configured for that peer.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import load_config
from node.errors import ConfigError
from node.samples import SyntheticStudy, make_ct_study
from tests.support.nodes import NodeProcess, free_port, init_node, wait_until
from tests.test_dimse import DCMTK_ENV, dcmtk

VIEWER = "VIEWER"  # a caller bound to its address only
PINNED = "PINNED"  # a caller bound to its address and to the viewer certificate
RECEIVER = "RECEIVER"  # a C-MOVE destination reached over TLS
PACS = "PACS"


@dataclass
class Credential:
    key: Path
    cert: Path

    @property
    def sha256(self) -> str:
        der = x509.load_pem_x509_certificate(self.cert.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        return hashlib.sha256(der).hexdigest()

    def tls_args(self) -> list[str]:
        """DCMTK's ``+tls KEY CERT``."""
        return ["+tls", str(self.key), str(self.cert)]


class Authority:
    """A test CA that writes PEM keys and certificates into a folder."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        self.cert = (
            self._builder(subject, self.key.public_key())
            .issuer_name(subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.file = folder / f"{name}-ca.pem"
        self.file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    def issue(self, name: str) -> Credential:
        """A leaf certificate for 127.0.0.1 / localhost, for servers and clients alike."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        cert = (
            self._builder(subject, key.public_key())
            .issuer_name(self.cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        made = Credential(self.folder / f"{name}.key", self.folder / f"{name}.pem")
        made.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        made.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return made


@dataclass
class Pki:
    node_ca: Authority
    hospital_ca: Authority
    other_ca: Authority
    node: Credential  # the node's own certificate, also its client certificate
    viewer: Credential
    second_viewer: Credential  # valid (hospital CA), but not the one PINNED is bound to
    pacs: Credential
    intruder: Credential  # from the other CA
    fake_pacs: Credential  # from the other CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    node_ca = Authority(folder, "node")
    hospital_ca = Authority(folder, "hospital")
    other_ca = Authority(folder, "other")
    return Pki(
        node_ca,
        hospital_ca,
        other_ca,
        node=node_ca.issue("imageshare-node"),
        viewer=hospital_ca.issue("viewer"),
        second_viewer=hospital_ca.issue("second-viewer"),
        pacs=hospital_ca.issue("pacs"),
        intruder=other_ca.issue("intruder"),
        fake_pacs=other_ca.issue("fake-pacs"),
    )


@pytest.fixture(scope="module")
def move_port() -> int:
    return free_port()


@dataclass
class TlsNode:
    """A node process and the port of its DICOM TLS listener."""

    process: NodeProcess
    tls_port: int

    @property
    def log(self) -> str:
        return self.process.log_path.read_text()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: Pki, move_port: int) -> Iterator[TlsNode]:
    """A node listening for DICOM TLS only, client certificates from the hospital CA."""
    process = init_node(tmp_path_factory.mktemp("tls"), "tls.example/imageshare")
    made = TlsNode(process, free_port())
    process.append_config(tls_listener(made.tls_port, pki) + destination(move_port, pki))
    process.append_config(
        f'[[dimse.callers]]\nae_title = "{VIEWER}"\nhost = "127.0.0.1"\n\n'
        f'[[dimse.callers]]\nae_title = "{PINNED}"\nhost = "127.0.0.1"\n'
        f'certificate_sha256 = "{pki.viewer.sha256}"'
    )
    process.start()
    wait_until(lambda: echo(made, pki.viewer, pki).returncode == 0, message="TLS to listen")
    yield made
    process.stop()


def tls_listener(port: int, pki: Pki) -> str:
    return (
        f"[dimse.tls]\nenabled = true\nport = {port}\nplain = false\n"
        f'cert_file = "{pki.node.cert}"\nkey_file = "{pki.node.key}"\n'
        f'ca_file = "{pki.hospital_ca.file}"\n\n'
    )


def destination(port: int, pki: Pki) -> str:
    return (
        f'[[dimse.destinations]]\nae_title = "{RECEIVER}"\nhost = "127.0.0.1"\nport = {port}\n'
        f'tls = true\nca_file = "{pki.hospital_ca.file}"\n'
        f'cert_file = "{pki.node.cert}"\nkey_file = "{pki.node.key}"\n\n'
    )


def tls_called(node: TlsNode, calling_ae: str, client: Credential | None, pki: Pki) -> list[str]:
    """DCMTK arguments: TLS with this client certificate (or none), the node CA trusted."""
    tls = client.tls_args() if client else ["+tla"]
    called = ["-aet", calling_ae, "-aec", "IMAGESHARE", "127.0.0.1", str(node.tls_port)]
    return [*tls, "+cf", str(pki.node_ca.file), *called]


def echo(
    node: TlsNode, client: Credential | None, pki: Pki, calling_ae: str = VIEWER
) -> subprocess.CompletedProcess[str]:
    return dcmtk("echoscu", *tls_called(node, calling_ae, client, pki), timeout=30)


def study_keys(study: SyntheticStudy) -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}"]


@pytest.fixture(scope="module")
def study(node: TlsNode, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    """A 1 x 3 study, stored over DICOM TLS by storescu."""
    made = make_ct_study(tmp_path_factory.mktemp("study"), series=1, slices=3)
    args = tls_called(node, "CT_SCANNER", pki.viewer, pki)
    result = dcmtk("storescu", *args, "+sd", str(made.files[0].parent))
    assert result.returncode == 0, result.stderr
    return made


def indexed(node: TlsNode, study: SyntheticStudy) -> int:
    """How many of the study's instances the node's index holds."""
    with sqlite3.connect(node.process.data_dir / "index.sqlite") as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM instances WHERE study_instance_uid = ?", (study.study_uid,)
        ).fetchone()
    return int(row[0])


def retrieve_over_tls(
    node: TlsNode, calling_ae: str, client: Credential, pki: Pki, study: SyntheticStudy
) -> tuple[bool, set[str]]:
    """C-GET the study over TLS with pynetdicom (DCMTK's getscu has no TLS): whether the
    association was accepted with the Get context, and the SOP Instance UIDs received."""
    received: set[str] = set()

    def on_store(event: Any) -> int:
        received.add(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    role = build_role(CTImageStorage, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1",
        node.tls_port,
        ae_title="IMAGESHARE",
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        tls_args=(client_context(client, pki), "127.0.0.1"),
    )
    assert assoc.is_established
    accepted = any(
        cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet
        for cx in assoc.accepted_contexts
    )
    if accepted:
        for _status, _ in assoc.send_c_get(
            identifier(study), StudyRootQueryRetrieveInformationModelGet
        ):
            pass
    assoc.release()
    return accepted, received


def client_context(client: Credential, pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.node_ca.file)
    context.load_cert_chain(client.cert, client.key)
    return context


def identifier(study: SyntheticStudy) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study.study_uid
    return query


class TestTlsListener:
    def test_echoscu_over_tls_with_a_hospital_certificate_is_answered(
        self, node: TlsNode, pki: Pki
    ) -> None:
        result = echo(node, pki.viewer, pki)
        assert result.returncode == 0, result.stderr

    def test_storescu_over_tls_stores_and_indexes_the_study(
        self, node: TlsNode, study: SyntheticStudy
    ) -> None:
        assert indexed(node, study) == 3

    def test_getscu_over_tls_retrieves_for_a_configured_caller(
        self, node: TlsNode, pki: Pki, study: SyntheticStudy, tmp_path: Path
    ) -> None:
        accepted, received = retrieve_over_tls(node, VIEWER, pki.viewer, pki, study)
        assert accepted
        assert received == set(study.sop_uids)

    def test_plain_association_to_the_tls_port_is_refused(
        self, node: TlsNode, study: SyntheticStudy
    ) -> None:
        port = str(node.tls_port)
        result = dcmtk("echoscu", "-aet", VIEWER, "-aec", "IMAGESHARE", "127.0.0.1", port)
        assert result.returncode != 0

    def test_plain_listener_is_off_when_plain_is_false(self, node: TlsNode) -> None:
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", node.process.dimse_port), timeout=5),
        ):
            pass

    def test_certificate_from_another_ca_is_refused_at_the_handshake(
        self, node: TlsNode, pki: Pki
    ) -> None:
        result = echo(node, pki.intruder, pki)
        assert result.returncode != 0
        wait_until(
            lambda: (
                "DICOM TLS handshake from 127.0.0.1 refused: unable to get local issuer" in node.log
            ),
            timeout=10,
            message="the refused handshake in the node's log",
        )
        assert echo(node, pki.viewer, pki).returncode == 0  # the daemon keeps serving

    def test_no_client_certificate_is_refused_when_a_ca_is_configured(
        self, node: TlsNode, pki: Pki
    ) -> None:
        before = node.log.count("DICOM TLS handshake from 127.0.0.1 refused")
        result = echo(node, None, pki)
        assert result.returncode != 0
        wait_until(
            lambda: node.log.count("DICOM TLS handshake from 127.0.0.1 refused") > before,
            timeout=10,
            message="the refused handshake in the node's log",
        )

    def test_a_silent_client_does_not_stall_the_tls_listener(self, node: TlsNode, pki: Pki) -> None:
        with socket.create_connection(("127.0.0.1", node.tls_port), timeout=5):
            # Connected, no ClientHello: another caller is still served meanwhile.
            assert echo(node, pki.viewer, pki).returncode == 0

    def test_tls_1_2_without_an_aead_cipher_is_refused(self, node: TlsNode, pki: Pki) -> None:
        weak = client_context(pki.viewer, pki)
        weak.maximum_version = ssl.TLSVersion.TLSv1_2
        weak.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")  # CBC, no AEAD
        raw = socket.create_connection(("127.0.0.1", node.tls_port), timeout=10)
        with raw, pytest.raises(ssl.SSLError):
            weak.wrap_socket(raw, server_hostname="127.0.0.1")
        strong = client_context(pki.viewer, pki)
        strong.maximum_version = ssl.TLSVersion.TLSv1_2
        raw = socket.create_connection(("127.0.0.1", node.tls_port), timeout=10)
        with raw, strong.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.2"
            cipher = tls.cipher()
            assert cipher is not None
            assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]

    def test_caller_bound_to_a_certificate_may_retrieve_with_it(
        self, node: TlsNode, pki: Pki, study: SyntheticStudy, tmp_path: Path
    ) -> None:
        assert retrieve_over_tls(node, PINNED, pki.viewer, pki, study) == (
            True,
            set(study.sop_uids),
        )

    def test_caller_bound_to_a_certificate_is_refused_with_another_valid_one(
        self, node: TlsNode, pki: Pki, study: SyntheticStudy, tmp_path: Path
    ) -> None:
        # Over TLS with a valid certificate from the hospital CA, but not PINNED's own.
        assert retrieve_over_tls(node, PINNED, pki.second_viewer, pki, study) == (False, set())
        out = tmp_path / "found"
        out.mkdir()
        args = tls_called(node, PINNED, pki.second_viewer, pki)
        found = dcmtk("findscu", "-S", *args, "-X", "-od", str(out), *study_keys(study))
        assert found.returncode != 0
        assert list(out.iterdir()) == []
        wait_until(
            lambda: f"query/retrieve from '{PINNED}' at 127.0.0.1 refused" in node.log,
            timeout=10,
            message="the refusal in the node's log",
        )


@contextmanager
def tls_storescp(
    port: int, ae_title: str, server: Credential, trusted_ca: Path, out: Path
) -> Iterator[Path]:
    """A DCMTK storescp over TLS that requires a client certificate from ``trusted_ca``."""
    out.mkdir()
    command = ["storescp", *server.tls_args(), "+cf", str(trusted_ca), "-aet", ae_title]
    receiver = subprocess.Popen(
        [*command, "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _listening(port), message="storescp to listen")
        yield out
    finally:
        receiver.terminate()
        receiver.wait(10)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def move_over_tls(node: TlsNode, pki: Pki, study: SyntheticStudy) -> list[int]:
    """C-MOVE the study to RECEIVER over TLS with pynetdicom (DCMTK's movescu has no
    TLS): the statuses of the responses."""
    ae = AE(ae_title=VIEWER)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(
        "127.0.0.1",
        node.tls_port,
        ae_title="IMAGESHARE",
        tls_args=(client_context(pki.viewer, pki), "127.0.0.1"),
    )
    assert assoc.is_established
    statuses = [
        int(status.Status)
        for status, _ in assoc.send_c_move(
            identifier(study), RECEIVER, StudyRootQueryRetrieveInformationModelMove
        )
        if status
    ]
    assoc.release()
    return statuses


class TestTlsMove:
    def test_movescu_over_tls_moves_to_a_tls_destination(
        self, node: TlsNode, pki: Pki, study: SyntheticStudy, move_port: int, tmp_path: Path
    ) -> None:
        with tls_storescp(
            move_port, RECEIVER, pki.pacs, pki.node_ca.file, tmp_path / "moved"
        ) as out:
            statuses = move_over_tls(node, pki, study)
            assert statuses[-1] == 0x0000
            got = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
        assert got == set(study.sop_uids)


class TestTlsMoveRefused:
    def test_move_to_a_destination_with_another_cas_certificate_sends_nothing(
        self, node: TlsNode, pki: Pki, study: SyntheticStudy, move_port: int, tmp_path: Path
    ) -> None:
        with tls_storescp(
            move_port, RECEIVER, pki.fake_pacs, pki.node_ca.file, tmp_path / "moved"
        ) as out:
            statuses = move_over_tls(node, pki, study)
            assert statuses and statuses[-1] != 0x0000
            assert list(out.iterdir()) == []


def forwarding_node(tmp_path: Path, pki: Pki, port: int) -> NodeProcess:
    made = init_node(tmp_path, "fwd-tls.example/imageshare")
    made.append_config(
        f'[forward]\nae_title = "{PACS}"\nhost = "127.0.0.1"\nport = {port}\n'
        "initial_backoff = 0.3\nmax_attempts = 20\n"
        f'tls = true\nca_file = "{pki.hospital_ca.file}"\n'
        f'cert_file = "{pki.node.cert}"\nkey_file = "{pki.node.key}"'
    )
    return made.start()


def forwarding(node: NodeProcess) -> dict[str, Any]:
    report: dict[str, Any] = node.get_json("/admin/api/forwarding")
    return report


class TestTlsForwarding:
    def test_forwarding_over_tls_reaches_the_pacs(self, pki: Pki, tmp_path: Path) -> None:
        port = free_port()
        with tls_storescp(port, PACS, pki.pacs, pki.node_ca.file, tmp_path / "pacs") as out:
            node = forwarding_node(tmp_path, pki, port)
            try:
                study = make_ct_study(tmp_path / "study", series=1, slices=2)
                node.cli("import", str(tmp_path / "study"))
                wait_until(lambda: len(list(out.iterdir())) == 2, message="the study at the PACS")
                got = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
                assert got == set(study.sop_uids)
            finally:
                node.stop()

    def test_forwarding_to_a_pacs_with_another_cas_certificate_stays_queued(
        self, pki: Pki, tmp_path: Path
    ) -> None:
        port = free_port()
        with tls_storescp(port, PACS, pki.fake_pacs, pki.node_ca.file, tmp_path / "pacs") as out:
            node = forwarding_node(tmp_path, pki, port)
            try:
                make_ct_study(tmp_path / "study", series=1, slices=2)
                node.cli("import", str(tmp_path / "study"))
                report = wait_until(
                    lambda: (
                        (r := forwarding(node))["problems"]
                        and r["problems"][0]["attempts"] >= 1
                        and r
                    ),
                    message="a failed attempt in the status",
                )
                assert report["pending"] == 2 and report["forwarded"] == 0
                assert list(out.iterdir()) == []
            finally:
                node.stop()


class TestTlsConfig:
    def test_tls_listener_without_a_certificate_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "node.toml"
        path.write_text('origin = "a.example/x"\n[dimse.tls]\nenabled = true\n')
        with pytest.raises(ConfigError, match=r"\[dimse.tls\] cert_file: the TLS listener needs"):
            load_config(path)

    def test_certificate_pin_must_be_a_sha256_digest(self, tmp_path: Path) -> None:
        path = tmp_path / "node.toml"
        path.write_text(
            'origin = "a.example/x"\n[[dimse.callers]]\nae_title = "WS"\nhost = "10.0.0.9"\n'
            'certificate_sha256 = "abc"\n'
        )
        with pytest.raises(ConfigError, match="certificate_sha256: must be 64 hex digits"):
            load_config(path)

    def test_certificate_paths_are_relative_to_node_toml(self, tmp_path: Path) -> None:
        path = tmp_path / "node.toml"
        path.write_text(
            'origin = "a.example/x"\n[dimse.tls]\nenabled = true\ncert_file = "tls/n.pem"\n'
            'key_file = "tls/n.key"\n[forward]\nae_title = "PACS"\nhost = "10.0.0.5"\n'
            'tls = true\nca_file = "tls/ca.pem"\n'
        )
        config = load_config(path)
        assert config.dimse.tls.cert_file == str(tmp_path / "tls" / "n.pem")
        assert config.forward.ca_file == str(tmp_path / "tls" / "ca.pem")

    def test_unloadable_certificate_stops_the_node_naming_the_file(self, tmp_path: Path) -> None:
        made = init_node(tmp_path, "badcert.example/imageshare")
        made.append_config('[dimse.tls]\nenabled = true\ncert_file = "none.pem"\nkey_file = "k"')
        result = made.cli("run", check=False, timeout=60)
        assert result.returncode != 0
        assert f"[dimse.tls] cert_file: cannot load {made.data_dir / 'none.pem'}" in result.stderr
