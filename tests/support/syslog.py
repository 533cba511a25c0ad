"""A real rsyslog collector for tests, and a reader of the DICOM audit messages it wrote."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.nodes import free_port, terminate, wait_until

BOM = b"\xef\xbb\xbf"


def require_rsyslogd() -> str:
    path = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
    if not Path(path).exists():
        pytest.skip("rsyslogd is not installed (scripts/setup-env installs it)")
    return path


@dataclass(frozen=True)
class CertificateAuthority:
    """A test CA with a server certificate for 127.0.0.1 and a client certificate (for
    a node) signed by it, as PEM files."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path


def make_test_ca(directory: Path) -> CertificateAuthority:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test audit CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(name: str, san: x509.GeneralName) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem_key = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), pem_key

    directory.mkdir(parents=True, exist_ok=True)
    result = CertificateAuthority(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "node.pem",
        directory / "node.key",
    )
    result.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server = issue("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    result.cert_file.write_bytes(server[0])
    result.key_file.write_bytes(server[1])
    client = issue("a.example", x509.DNSName("a.example"))
    result.client_cert_file.write_bytes(client[0])
    result.client_key_file.write_bytes(client[1])
    return result


class Rsyslog:
    """rsyslogd in the foreground on one loopback port (udp, tcp, tls, or mtls: TLS with
    client certificates from the CA required), writing every
    message it receives, raw, one a line, to ``output``."""

    def __init__(
        self, directory: Path, transport: str, tls: CertificateAuthority | None = None
    ) -> None:
        self.binary = require_rsyslogd()
        self.directory = directory
        self.transport = transport
        self.port = free_port()
        self.output = directory / "received.log"
        self.conf = directory / "rsyslog.conf"
        self.pid_file = directory / "rsyslogd.pid"
        self.log = directory / "rsyslogd.out"
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "work").mkdir(exist_ok=True)
        tls_globals = ""
        if transport in ("tls", "mtls"):
            assert tls is not None
            tls_globals = (
                f' defaultNetstreamDriverCAFile="{tls.ca_file}"'
                f' defaultNetstreamDriverCertFile="{tls.cert_file}"'
                f' defaultNetstreamDriverKeyFile="{tls.key_file}"'
            )
        if transport == "udp":
            listener = (
                'module(load="imudp")\n'
                f'input(type="imudp" address="127.0.0.1" port="{self.port}")\n'
            )
        elif transport == "tcp":
            listener = (
                'module(load="imtcp")\n'
                f'input(type="imtcp" address="127.0.0.1" port="{self.port}")\n'
            )
        else:
            # mtls: only clients with a certificate from the CA may connect.
            auth = "x509/certvalid" if transport == "mtls" else "anon"
            listener = (
                'module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"'
                f' streamDriver.authMode="{auth}")\n'
                f'input(type="imtcp" address="127.0.0.1" port="{self.port}")\n'
            )
        self.conf.write_text(
            f'global(workDirectory="{directory / "work"}" maxMessageSize="64k"{tls_globals})\n'
            + listener
            + 'template(name="raw" type="string" string="%rawmsg%\\n")\n'
            + f'action(type="omfile" file="{self.output}" template="raw")\n'
        )

    def start(self) -> Rsyslog:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-n", "-f", str(self.conf), "-i", str(self.pid_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.transport == "udp":
            wait_until(self.pid_file.exists, message="rsyslogd to start")
        else:
            wait_until(self._accepts, message="rsyslogd to listen")
        return self

    def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"rsyslogd exited:\n{self.log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, 10)
        self.process = None

    def messages(self) -> list[AuditRecord]:
        """Every message received so far, parsed."""
        if not self.output.exists():
            return []
        return [parse_record(line) for line in self.output.read_bytes().splitlines() if line]


@dataclass(frozen=True)
class AuditRecord:
    """One received syslog message: its RFC 5424 header fields and its audit XML."""

    pri: int
    header: list[str]
    xml: ET.Element

    @property
    def event_id(self) -> str:
        return self._code("EventIdentification/EventID")

    @property
    def type_codes(self) -> list[str]:
        found = self.xml.findall("EventIdentification/EventTypeCode")
        return [e.attrib["csd-code"] for e in found]

    @property
    def action(self) -> str:
        return self._ident().attrib["EventActionCode"]

    @property
    def outcome(self) -> str:
        return self._ident().attrib["EventOutcomeIndicator"]

    @property
    def source(self) -> str:
        source = self.xml.find("AuditSourceIdentification")
        assert source is not None
        return source.attrib["AuditSourceID"]

    def objects(self, id_type: str) -> list[str]:
        return [
            o.attrib["ParticipantObjectID"]
            for o in self.xml.findall("ParticipantObjectIdentification")
            if self._child_code(o, "ParticipantObjectIDTypeCode") == id_type
        ]

    def details(self) -> dict[str, str]:
        return {
            d.attrib["type"]: d.attrib["value"]
            for d in self.xml.findall("ParticipantObjectIdentification/ParticipantObjectDetail")
        }

    def _ident(self) -> ET.Element:
        ident = self.xml.find("EventIdentification")
        assert ident is not None
        return ident

    def _code(self, path: str) -> str:
        element = self.xml.find(path)
        assert element is not None, path
        return element.attrib["csd-code"]

    @staticmethod
    def _child_code(element: ET.Element, tag: str) -> str:
        child = element.find(tag)
        return "" if child is None else child.attrib["csd-code"]


def parse_record(line: bytes) -> AuditRecord:
    """An RFC 5424 message with the DICOM audit XML as MSG; asserts the required parts."""
    head, sep, body = line.partition(BOM)
    assert sep, f"no BOM before the message: {line[:120]!r}"
    fields = head.decode("ascii").split(" ")
    # <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA, then MSG.
    assert len(fields) == 8 and fields[-1] == "", fields
    pri_version = fields[0]
    assert pri_version.startswith("<") and pri_version.endswith(">1"), pri_version
    root = ET.fromstring(body)
    assert root.tag == "AuditMessage"
    ident = root.find("EventIdentification")
    assert ident is not None and ident.find("EventID") is not None
    for attribute in ("EventActionCode", "EventDateTime", "EventOutcomeIndicator"):
        assert attribute in ident.attrib, attribute
    assert root.findall("ActiveParticipant"), "an audit message names its participants"
    assert root.find("AuditSourceIdentification") is not None
    return AuditRecord(int(pri_version[1:-2]), fields[1:7], root)
