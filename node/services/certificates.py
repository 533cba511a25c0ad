"""Self-signed HTTPS certificates for a test or a lab: a small CA and a node's certificate.

`imageshare init --tls-self-signed` makes a CA (or takes an existing one, so that the
nodes of one lab share it) and issues the node a server certificate for the hosts it is
reached at. Keys are ECDSA P-256, written with mode 0600; certificates are valid for
two years (the CA for ten). Peers trust the CA by pinning its certificate
(``[http] trusted_ca_file``). A hospital uses its own PKI instead (docs/operations.md).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.errors import ConfigError
from node.store.secrets import write_secret

CA_DAYS = 3650
CERTIFICATE_DAYS = 730
# Clocks of a lab's machines differ a little: a certificate is valid from a bit before now.
BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA's certificate and its private key, as PEM files."""

    cert_file: Path
    key_file: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(directory: Path, name: str, now: datetime.datetime) -> CertificateAuthority:
    """A new CA in ``directory`` (``ca.pem``, ``ca-key.pem`` with mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    ca = CertificateAuthority(directory / "ca.pem", directory / "ca-key.pem")
    write_secret(ca.key_file, _key_pem(key))
    ca.cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return ca


def load_ca(ca: CertificateAuthority) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA's certificate and key; raises ConfigError if they are unreadable, not a CA,
    or do not belong together."""
    try:
        certificate = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
        key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"cannot read the CA {ca.cert_file} and its key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"the CA key {ca.key_file} is not an ECDSA key")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    same = key.public_key().public_bytes(serialization.Encoding.DER, public) == (
        certificate.public_key().public_bytes(serialization.Encoding.DER, public)
    )
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not same or not is_ca:
        raise ConfigError(f"{ca.cert_file} is not a CA certificate for the key {ca.key_file}")
    return certificate, key


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # in order, once each
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue_server_certificate(
    ca: CertificateAuthority,
    hosts: list[str],
    cert_file: Path,
    key_file: Path,
    now: datetime.datetime,
) -> None:
    """A server certificate signed by ``ca`` for ``hosts`` (DNS names or IP addresses),
    written to ``cert_file`` (leaf then CA, PEM) and ``key_file`` (mode 0600)."""
    ca_certificate, ca_key = load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_secret(key_file, _key_pem(key))
    pem = serialization.Encoding.PEM
    cert_file.write_bytes(certificate.public_bytes(pem) + ca_certificate.public_bytes(pem))
