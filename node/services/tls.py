"""TLS for the node's HTTP: the one place its protocol versions, ciphers and trust are set.

BCP 195 (TLS 1.2 or later; for TLS 1.2 only ECDHE with AES-GCM or ChaCha20; no
compression, no renegotiation) for every TLS the node speaks: the HTTPS listener
(``server_tls_context``), calls to ``https://`` peers (``client_tls_context``, used by
node.services.peer_client), the CLI reaching its own daemon (``own_certificate_context``)
and DICOM TLS (node.services.dimse_transport).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.errors import ConfigError

# BCP 195 for TLS 1.2 (TLS 1.3's suites are all AEAD): forward secrecy and AEAD only.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context`` limited to BCP 195: TLS 1.2 or later, AEAD ciphers, no compression."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(BCP195_CIPHERS)
    return context


def client_tls_context(ca_file: str = "") -> ssl.SSLContext:
    """Trust for ``https://`` peers: only the CAs in ``ca_file`` (PEM) when given, else the
    system's. The certificate must chain to one and name the host. Raises ConfigError if
    the file cannot be loaded."""
    context = bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # checks chain and name
    if not ca_file:
        context.load_default_certs()
        return context
    try:
        context.load_verify_locations(ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"trusted CA file {ca_file}: cannot load it: {_why(exc)}") from exc
    return context


def own_certificate_context(cert_file: str) -> ssl.SSLContext:
    """Trust for the node's own daemon reached on this machine: exactly the first
    certificate of its ``cert_file``, whatever host name it was reached at (loopback is
    rarely a name in a hospital's certificate). Raises ConfigError if it cannot be read."""
    try:
        text = Path(cert_file).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"[http] cert_file: cannot read {cert_file}: {exc}") from exc
    end = "-----END CERTIFICATE-----"
    if end not in text:
        raise ConfigError(f"[http] cert_file: {cert_file} holds no PEM certificate")
    context = bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = False
    # The leaf itself is the trust anchor: no CA that signed it is trusted here.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cadata=text[: text.index(end) + len(end)] + "\n")
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The HTTPS listener's context ([http] cert_file, key_file): TLS 1.2 and 1.3 only.
    Raises ConfigError naming the key if a file cannot be loaded."""
    context = bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[http] cert_file: cannot load {cert_file}: {_why(exc)}") from exc
    return context


def _why(exc: OSError) -> str:
    return exc.strerror if exc.strerror else str(exc)
