"""node.toml: every setting, its default, and validation.

The file is TOML, checked against the schema below with msgspec at load time: a wrong
type, a value out of range, a bad origin or an unknown key (at any level: a typo must
never silently fall back to a default) stops the node with one sentence naming the key,
e.g. ``node.toml: [dimse] port: expected an integer, got "abc"``. Paths are relative to
the directory holding the file.

Adding a setting is one line in its table's class: ``name: Type = default`` (with a
constraint type such as ``PositiveInt`` where a range applies), plus its documentation
in node.example.toml. Checks across several keys go in the class's ``__post_init__``,
raising ``ValueError("key: problem")``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from node.core.keys import parse_verifier_key
from node.core.notes import MAX_SIGNATURES
from node.core.origins import NODE_ORIGIN_RULE, is_node_origin
from node.errors import BadInput, ConfigError, ImageShareError

DEFAULT_CONFIG_NAME = "node.toml"
CONFIG_ENV = "IMAGESHARE_CONFIG"

# Constraint types: msgspec checks them while reading, and names the key if one fails.
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
# Durations are capped at a day: TOML's inf would otherwise switch a timeout off.
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0, le=86400)]


class Table(msgspec.Struct, forbid_unknown_fields=True):
    """Base of every node.toml table: a key the class does not declare is refused."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); raises ValueError unless the port is 1-65535."""
    host, _, port = listen.rpartition(":")
    # isascii too: isdigit alone also takes other scripts' digits, such as "٣".
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8600")
    return host, int(port)


# A DICOM AE title: 1-16 characters of printable ASCII without backslash, not all spaces.
_AE_TITLE = re.compile(r"[ -\[\]-~]{1,16}")


def is_ae_title(title: str) -> bool:
    """True if ``title`` is a DICOM AE title (spaces around it are not significant)."""
    return _AE_TITLE.fullmatch(title) is not None and bool(title.strip())


def _check_ae_title(key: str, title: str) -> None:
    if not is_ae_title(title):
        raise ValueError(f"{key}: {title!r} is not an AE title (1-16 printable characters)")


def _check_node_origin(key: str, origin: str) -> None:
    if not is_node_origin(origin):
        raise ValueError(f"{key}: {origin!r} is not a node origin ({NODE_ORIGIN_RULE})")


# A web origin as a browser sends it: scheme://host[:port] in lower case, nothing else.
# Not a node origin (node.core.origins): this one names a viewer's site, for CORS.
_WEB_ORIGIN = re.compile(r"https?://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")


def _cors_origin(origin: str) -> str:
    """A configured CORS origin, lower-cased as browsers send it; "*" and "null" refused."""
    text = origin.strip().lower()
    if not _WEB_ORIGIN.fullmatch(text):
        raise ValueError(
            f"cors_origins: {origin!r} is not an origin like https://viewer.example:3000"
            " (list each viewer's origin; '*' and 'null' are refused)"
        )
    return text


class HttpConfig(Table):
    listen: str = "127.0.0.1:8600"
    # The URL peers and wallets use to reach this node; defaults to http://<listen>.
    public_url: str = ""
    max_body_bytes: PositiveInt = 2 * 1024**3
    # Origins (scheme://host[:port]) of browser viewers elsewhere that may read /dicomweb
    # and the public /ledger with CORS; empty: none (the node's own pages need none).
    cors_origins: list[str] = []
    # Seconds a client may take to send a request before it is cut off.
    client_timeout: PositiveSeconds = 120.0
    # Slowest request body accepted, in bytes/s over each client_timeout window: a client
    # that stalls or trickles its body is cut off instead of holding a connection forever.
    min_body_rate: NonNegativeInt = 1024
    # HTTPS: this node's certificate (chain) and private key, PEM; both set, the listener
    # speaks only TLS 1.2 and 1.3 (BCP 195 ciphers). Empty: plain HTTP.
    cert_file: str = ""
    key_file: str = ""
    # Strict-Transport-Security max-age sent on every answer over HTTPS; 0: not sent.
    hsts_max_age: NonNegativeInt = 31_536_000
    # The CA (PEM) that https:// peers' certificates must chain to; empty: the system's.
    trusted_ca_file: str = ""

    def __post_init__(self) -> None:
        try:
            parse_listen(self.listen)
        except ValueError as exc:
            raise ValueError(f"listen: {exc}") from None
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ValueError(f"public_url: {self.public_url!r} must start with http(s)://")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: goes together with key_file")
        self.cors_origins = [_cors_origin(o) for o in self.cors_origins]

    @property
    def tls(self) -> bool:
        """Whether the listener serves HTTPS."""
        return bool(self.cert_file)

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


class OutgoingTls(Table, kw_only=True):
    """TLS for an association the node opens (PS3.15 Annex B): to a C-MOVE destination or
    the forwarding PACS. Paths are relative to the folder of node.toml."""

    # Associate over TLS (BCP 195: TLS 1.2 or later, AEAD ciphers) instead of plain TCP.
    tls: bool = False
    # The CA that signed the peer's certificate (empty: the system's CAs); the peer's
    # certificate must also name the host it is reached at.
    ca_file: str = ""
    # This node's client certificate and key (PEM), for a peer that requires one.
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: goes together with key_file")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ValueError("tls: must be true for ca_file, cert_file and key_file to apply")


class DimseDestination(OutgoingTls, kw_only=True):
    ae_title: str
    host: str
    port: Port

    def __post_init__(self) -> None:
        _check_ae_title("ae_title", self.ae_title)
        super().__post_init__()


class DimseCaller(Table):
    """An AE the node knows, bound to the IP address its associations come from."""

    ae_title: str
    host: str
    # May C-FIND, C-GET and C-MOVE; false: store only (e.g. a modality).
    query_retrieve: bool = True
    # SHA-256 of the DER client certificate it must present over DICOM TLS (hex, colons
    # allowed); empty: its address is enough. Set, it is never matched on the plain port.
    certificate_sha256: str = ""

    def __post_init__(self) -> None:
        _check_ae_title("ae_title", self.ae_title)
        fingerprint = self.certificate_sha256.replace(":", "").lower()
        if fingerprint and not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            raise ValueError("certificate_sha256: must be 64 hex digits (a SHA-256 digest)")
        self.certificate_sha256 = fingerprint
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(
                f"host: must be the IP address the associations of {self.ae_title.strip()!r}"
                f" come from, not {self.host!r}"
            ) from None


class DimseTlsConfig(Table):
    """The DICOM TLS listener (PS3.15 Annex B, BCP 195 profiles)."""

    enabled: bool = False
    port: Port = 2762
    # This node's certificate (chain) and private key, PEM.
    cert_file: str = ""
    key_file: str = ""
    # CAs whose client certificates are accepted; set, every caller must present one.
    ca_file: str = ""
    # Keep the plain listener ([dimse] port) beside the TLS one.
    plain: bool = True

    def __post_init__(self) -> None:
        if self.enabled and not (self.cert_file and self.key_file):
            raise ValueError("cert_file: the TLS listener needs cert_file and key_file")


class DimseConfig(Table):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 11112
    ae_title: str = "IMAGESHARE"
    # Calling AE titles allowed to associate at all (title only, which any device can
    # claim); empty allows any.
    allowed_calling_aes: list[str] = []
    # C-ECHO and C-STORE from any calling AE; false: only from the callers below.
    store_from_any_ae: bool = True
    # The only AEs that may query and retrieve, each from its own address.
    callers: list[DimseCaller] = []
    # C-MOVE destinations by AE title.
    destinations: list[DimseDestination] = []
    # Refuse storage SOP classes this node does not know.
    refuse_unknown_sop_classes: bool = False
    tls: DimseTlsConfig = msgspec.field(default_factory=DimseTlsConfig)

    def __post_init__(self) -> None:
        _check_ae_title("ae_title", self.ae_title)
        for title in self.allowed_calling_aes:
            _check_ae_title("allowed_calling_aes", title)
        titles = {t.strip() for t in self.allowed_calling_aes}
        for caller in self.callers:
            if titles and caller.ae_title.strip() not in titles:
                raise ValueError(
                    f"callers: {caller.ae_title!r} is not in allowed_calling_aes,"
                    " so its associations would be rejected"
                )


class ForwardConfig(OutgoingTls, kw_only=True):
    # Forward every arriving study to this PACS AE by C-STORE; empty disables.
    ae_title: str = ""
    host: str = ""
    port: Port = 104
    max_attempts: PositiveInt = 8
    initial_backoff: NonNegativeSeconds = 2.0

    def __post_init__(self) -> None:
        if self.ae_title:
            _check_ae_title("ae_title", self.ae_title)
            if not self.host:
                raise ValueError(f"host: forwarding to {self.ae_title!r} needs its host")
        super().__post_init__()


class PacsConfig(OutgoingTls, kw_only=True):
    """The hospital's PACS the node lists and retrieves studies from (docs/pacs.md)."""

    # Its DIMSE Query/Retrieve SCP (C-FIND, C-GET); empty: none. TLS as for [forward].
    ae_title: str = ""
    host: str = ""
    port: Port = 104
    # Its DICOMweb server: the base URL QIDO-RS and WADO-RS paths follow; empty: none.
    dicomweb_url: str = ""
    # Sent on every DICOMweb request, "Name: value" (e.g. "Authorization: Bearer ...").
    dicomweb_auth_header: str = ""
    # Longest wait for one answer of the PACS.
    timeout: PositiveSeconds = 30.0
    # Bytes of retrieved studies kept; the least recently used beyond it are dropped.
    cache_bytes: PositiveInt = 10 * 1024**3
    # Retrieve a study in the background as soon as a grant for it is recorded.
    prefetch: bool = False

    def __post_init__(self) -> None:
        if self.ae_title:
            _check_ae_title("ae_title", self.ae_title)
            if not self.host:
                raise ValueError(f"host: the PACS {self.ae_title!r} needs its host")
        if self.dicomweb_url and not re.match(r"https?://[^/\s]+", self.dicomweb_url):
            raise ValueError("dicomweb_url: must be an http:// or https:// URL")
        if self.dicomweb_auth_header and not re.fullmatch(
            r"[A-Za-z0-9-]+: ?[ -~]+", self.dicomweb_auth_header
        ):
            raise ValueError('dicomweb_auth_header: must be "Name: value" in printable ASCII')
        super().__post_init__()

    @property
    def enabled(self) -> bool:
        return bool(self.ae_title or self.dicomweb_url)


_MIB = 1024**2


class ObjectStoreConfig(Table):
    """[store.objects]: the S3-compatible object store of ``backend = "postgresql"``."""

    # The store's URL (http:// or https://); empty: AWS S3 itself.
    endpoint: str = ""
    bucket: str = ""
    region: str = "us-east-1"
    # Prepended to every key (e.g. "imageshare/"), to share a bucket with other data.
    prefix: str = ""
    # The access key pair, in AWS's credentials-file format ([default] aws_access_key_id,
    # aws_secret_access_key), mode 600; empty: AWS_ACCESS_KEY_ID and
    # AWS_SECRET_ACCESS_KEY from the environment. Relative to the folder of node.toml.
    credentials_file: str = ""
    # Server-side encryption of each object: "" (the bucket's default), "AES256" (SSE-S3)
    # or "aws:kms" (SSE-KMS, with kms_key_id or the account's default key).
    server_side_encryption: Literal["", "AES256", "aws:kms"] = ""
    kms_key_id: str = ""
    # Instances larger than this go up in parts of part_bytes (S3: at least 5 MiB).
    multipart_threshold_bytes: Annotated[int, msgspec.Meta(ge=5 * _MIB)] = 64 * _MIB
    part_bytes: Annotated[int, msgspec.Meta(ge=5 * _MIB, le=5 * 1024 * _MIB)] = 16 * _MIB

    def __post_init__(self) -> None:
        if self.endpoint and not re.fullmatch(r"https?://[^/\s]+/?", self.endpoint):
            raise ValueError("endpoint: must be an http:// or https:// URL without a path")
        if self.bucket and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.bucket):
            raise ValueError("bucket: must be an S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
        if self.kms_key_id and self.server_side_encryption != "aws:kms":
            raise ValueError('kms_key_id: applies only with server_side_encryption = "aws:kms"')


class StoreConfig(Table):
    # Where instances and their index live: "sqlite" (files on the data directory's disk,
    # the index in SQLite: the embedded default) or "postgresql" (the index on a
    # PostgreSQL server, the files in an S3-compatible object store: [store.objects]).
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    # The PostgreSQL server (libpq connection string or postgresql:// URI), without a
    # password: that comes from a passfile (passfile= in it, or PGPASSFILE) or PGPASSWORD.
    dsn: str = ""
    # Connections each of the daemon's PostgreSQL stores (index, ledger) keeps at most.
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8
    objects: ObjectStoreConfig = msgspec.field(default_factory=ObjectStoreConfig)
    # Largest single DICOM instance accepted, in bytes.
    max_instance_bytes: PositiveInt = 1024**3
    # Most times a Deflated Explicit VR Little Endian dataset may inflate (past its first
    # 16 MiB); with max_instance_bytes it bounds a deflate bomb, received or stored.
    max_inflation_ratio: Annotated[float, msgspec.Meta(ge=1)] = 100.0
    # Instances written between two durable commits during bulk ingest.
    batch_size: PositiveInt = 64

    def __post_init__(self) -> None:
        if self.backend == "sqlite":
            if self.dsn or self.objects.bucket:
                raise ValueError('backend: dsn and [store.objects] need backend = "postgresql"')
            return
        if not self.dsn:
            raise ValueError('dsn: backend = "postgresql" needs the PostgreSQL server\'s dsn')
        if not self.objects.bucket:
            raise ValueError('objects: backend = "postgresql" needs [store.objects] bucket')
        _check_dsn(self.dsn)


def _check_dsn(dsn: str) -> None:
    """A PostgreSQL connection string that libpq can read and that holds no password (a
    node.toml is no place for one); the message never repeats the string."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # psycopg's ProgrammingError; its message quotes the string
        raise ValueError("dsn: not a PostgreSQL connection string") from None
    if parts.get("password"):
        raise ValueError(
            "dsn: must not hold the password; use a passfile (passfile= or PGPASSFILE)"
            " or PGPASSWORD"
        )


class ConsentConfig(Table):
    max_lifetime_days: PositiveInt = 365
    # Longest lifetime of a share link (it opens the study to whoever holds it).
    max_link_lifetime_days: PositiveInt = 30
    clock_skew_seconds: NonNegativeInt = 300
    # Denial entries one requesting node may cause per minute; over it, refusals are
    # still answered but not written (the ledger is permanent and copied to every peer).
    max_denials_per_minute: PositiveInt = 60
    # Break-glass (docs/consent.md): who may access a patient in an emergency when the
    # patient signed no policy, how many emergency requests a member may make an hour,
    # and how long a served request may go on transferring (retries of a cut stream).
    emergency_default: Literal["any_member", "never"] = "any_member"
    max_emergency_per_hour: PositiveInt = 10
    emergency_window_minutes: PositiveInt = 60


class LedgerConfig(Table):
    # Longest a durable append waits to share its fsync with others, in milliseconds.
    group_commit_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 2.0


class TransferConfig(Table):
    # Compression of study bytes on the wire (zstd, before encryption): "auto" offers it
    # when fetching and uses it when sending where the link's rate makes it pay; "off".
    compression: Literal["auto", "off"] = "auto"


class DashboardConfig(Table):
    # Link that opens a study in a viewer: {study_uid} and {dicomweb} (this node's DICOMweb
    # root) are replaced, e.g. "https://viewer.example/viewer?StudyInstanceUIDs={study_uid}".
    # Empty: a plain link to the study's DICOMweb metadata.
    viewer_url: str = ""


class ViewerConfig(Table):
    # The prebuilt OHIF viewer (the dist folder of npm's @ohif/app) served at /viewer/;
    # a relative path is taken from the folder of node.toml. Empty: the copy that
    # scripts/setup-env installs in the clone (vendor/ohif), if there is one.
    ohif_dir: str = ""


class ReportsConfig(Table):
    # Largest PDF a posted report (or a returned opinion) may hold, in bytes.
    max_document_bytes: PositiveInt = 16 * 1024**2


class AuditExportConfig(Table):
    """The security audit feed (DICOM PS3.15 audit messages over syslog) to the SIEM."""

    enabled: bool = False
    # udp (RFC 5426), tcp (octet-counted, RFC 6587) or tls (RFC 5425).
    transport: Literal["udp", "tcp", "tls"] = "tls"
    host: str = ""
    port: Port = 6514
    # TLS: the CA that signed the collector's certificate (empty: the system's CAs), and
    # this node's client certificate and key if the collector requires one; relative
    # paths are taken from the folder of node.toml.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # Messages kept on disk while the collector is unreachable; over either bound the
    # oldest are dropped (and counted).
    queue_max_messages: PositiveInt = 100_000
    queue_max_bytes: PositiveInt = 256 * 1024**2
    # Longest wait between two connection attempts, in seconds.
    max_backoff: PositiveSeconds = 30.0

    def __post_init__(self) -> None:
        if self.enabled and not self.host:
            raise ValueError("host: needed when the export is enabled")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: goes together with key_file")


class AlertsConfig(Table):
    """Alerts (node/services/alerts.py): sent once per incident to a webhook and by e-mail."""

    # A JSON POST per incident; empty: none.
    webhook_url: str = ""
    # E-mail through this SMTP server; empty: none.
    smtp_host: str = ""
    smtp_port: Port = 587
    smtp_starttls: bool = True
    smtp_from: str = ""
    smtp_to: list[str] = []
    # The SMTP login: a file (mode 0600) holding the user name on its first line and the
    # password on its second; relative to the folder of node.toml. Empty: no login.
    smtp_credentials_file: str = ""
    # A peer counts as down once this many replication rounds in a row have failed (one
    # missed round on a busy network is not worth waking anyone).
    peer_down_rounds: PositiveInt = 3
    # The data directory's disk counts as low once it is this full, in percent.
    disk_full_percent: Annotated[int, msgspec.Meta(ge=1, le=100)] = 90
    # A TLS certificate alerts this many days before it expires.
    certificate_days: PositiveInt = 14
    # Seconds between two checks of every condition.
    check_interval: PositiveSeconds = 10.0

    def __post_init__(self) -> None:
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError("webhook_url: must be an http:// or https:// URL")
        if self.smtp_host and not (self.smtp_from and self.smtp_to):
            raise ValueError("smtp_host: needs smtp_from and smtp_to")


class PeerConfig(Table):
    origin: str
    url: str
    vkey: str

    def __post_init__(self) -> None:
        _check_node_origin("origin", self.origin)


class FederationConfig(Table):
    discovery: bool = True
    replicate_interval: PositiveSeconds = 1.0
    request_timeout: PositiveSeconds = 10.0
    # Largest age, in seconds, of a signed node-to-node request.
    max_request_age: PositiveInt = 300
    # The federation key (a C2SP vkey) that signs the roster; "" runs without a federation.
    key: str = ""
    # Where `imageshare roster fetch` takes the roster log from by default.
    roster_url: str = ""
    roster_file: str = ""
    # Seconds between two fetches of the roster log from roster_url by the daemon.
    roster_refresh: PositiveSeconds = 300.0
    # Whose entries this node copies: "dealings" (the logs of members it is custodian or
    # grantee with, plus mirror_also) or "all" (an archive). Every member's checkpoints are
    # verified and witnessed either way (docs/federation.md, "Selective mirroring").
    mirror: Literal["dealings", "all"] = "dealings"
    mirror_also: list[str] = []

    def __post_init__(self) -> None:
        bad = [o for o in self.mirror_also if not is_node_origin(o)]
        if bad:
            raise ValueError(f"mirror_also: not node origins: {', '.join(bad)}")
        if self.key:
            try:
                parse_verifier_key(self.key)
            except BadInput as exc:
                raise ValueError(f"key: not a federation verifier key ({exc})") from exc
        if self.roster_url and not self.roster_url.startswith(("http://", "https://")):
            raise ValueError("roster_url: must start with http:// or https://")


class OutsideWitness(Table):
    """A C2SP tlog-witness outside the federation asked to cosign this node's checkpoints."""

    # Its C2SP verifier key, name+keyid+base64(0x04 || key) (or an Ed25519 0x01 key).
    vkey: str
    # Where it serves tlog-witness: add-checkpoint is POSTed to <url>/add-checkpoint.
    url: str

    def __post_init__(self) -> None:
        from node.core.notes import parse_vkey

        try:
            parse_vkey(self.vkey)
        except ImageShareError:
            raise ValueError("vkey: not a C2SP Ed25519 verifier key") from None
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url: must be an http:// or https:// URL")


class WitnessConfig(Table):
    """Who witnesses this node's log, and when one of its checkpoints counts as published."""

    outside: list[OutsideWitness] = []
    # The witnesses (member origins or outside witnesses' key names) the policy counts;
    # empty: every member and outside witness.
    policy: list[str] = []
    # How many of them must cosign a checkpoint before it counts as published.
    threshold: NonNegativeInt = 1

    def __post_init__(self) -> None:
        if self.policy and self.threshold > len(self.policy):
            raise ValueError("threshold: larger than the number of policy witnesses")
        if self.threshold > MAX_SIGNATURES - 1:
            # A checkpoint carries its log's signature and at most this many cosignatures.
            raise ValueError(f"threshold: at most {MAX_SIGNATURES - 1}")


class NodeConfig(Table):
    """The whole of node.toml; ``data_dir`` is absolute once loaded by load_config."""

    origin: str
    data_dir: Path = Path(".")
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    dimse: DimseConfig = msgspec.field(default_factory=DimseConfig)
    forward: ForwardConfig = msgspec.field(default_factory=ForwardConfig)
    pacs: PacsConfig = msgspec.field(default_factory=PacsConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    consent: ConsentConfig = msgspec.field(default_factory=ConsentConfig)
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    witness: WitnessConfig = msgspec.field(default_factory=WitnessConfig)
    federation: FederationConfig = msgspec.field(default_factory=FederationConfig)
    transfer: TransferConfig = msgspec.field(default_factory=TransferConfig)
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)
    viewer: ViewerConfig = msgspec.field(default_factory=ViewerConfig)
    reports: ReportsConfig = msgspec.field(default_factory=ReportsConfig)
    audit_export: AuditExportConfig = msgspec.field(default_factory=AuditExportConfig)
    alerts: AlertsConfig = msgspec.field(default_factory=AlertsConfig)
    peers: list[PeerConfig] = []

    def __post_init__(self) -> None:
        _check_node_origin("origin", self.origin)

    @property
    def public_url(self) -> str:
        scheme = "https" if self.http.tls else "http"
        return (self.http.public_url or f"{scheme}://{self.http.listen}").rstrip("/")

    @property
    def key_path(self) -> Path:
        return self.data_dir / "node.key"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME)


def load_config(path: Path | None = None) -> NodeConfig:
    """Read and validate node.toml; raises ConfigError with one sentence naming the key."""
    path = (path or default_config_path()).resolve()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no configuration at {path} (run 'imageshare init' or pass -c)") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: not valid TOML: {exc}") from exc
    try:
        config = msgspec.convert(raw, NodeConfig, strict=True, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path.name}: {explain_error(str(exc), raw)}") from None
    config.data_dir = (path.parent / config.data_dir).resolve()
    tables = [config.audit_export, config.dimse.tls, config.forward, config.pacs]
    tables += config.dimse.destinations
    tables.append(config.http)
    for table in tables:
        for name in ("ca_file", "cert_file", "key_file", "trusted_ca_file"):
            if getattr(table, name, ""):  # relative to the config file, like data_dir
                setattr(table, name, str(path.parent / getattr(table, name)))
    if config.alerts.smtp_credentials_file:
        config.alerts.smtp_credentials_file = str(path.parent / config.alerts.smtp_credentials_file)
    if config.store.objects.credentials_file:
        config.store.objects.credentials_file = str(
            path.parent / config.store.objects.credentials_file
        )
    if config.viewer.ohif_dir:
        config.viewer.ohif_dir = str(path.parent / config.viewer.ohif_dir)
    return config


def _decode_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value)
    # msgspec turns a TypeError from here into a ValidationError at the key.
    raise TypeError(f"Expected `str`, got `{type(value).__name__}`")


# msgspec's messages: "<problem> - at `$.http.port`" (the location is absent at the top).
_LOCATED = re.compile(r"(?s)(?P<problem>.*?)(?: - at `\$(?P<where>[^`]*)`)?")
_STEP = re.compile(r"\.(?P<key>\w+)|\[(?P<index>\d+)\]")
_EXPECTED = re.compile(r"Expected `(?P<kind>\w+)`(?P<bound>[^,]*)(?:, got `\w+`)?")
_FIELD = re.compile(r"Object (?P<what>contains unknown|missing required) field `(?P<key>[^`]+)`")
_KINDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "a table",
    "Path": "a string",
}


def explain_error(message: str, raw: Any) -> str:
    """One sentence from a msgspec ValidationError about ``raw``: ``[table] key: problem``."""
    located = _LOCATED.fullmatch(message)
    assert located is not None  # the pattern matches any text
    problem, steps = located["problem"], _steps(located["where"] or "")
    field = _FIELD.fullmatch(problem)
    expected = _EXPECTED.fullmatch(problem)
    if field:
        steps.append(field["key"])
        problem = (
            "unknown setting (node.example.toml lists every setting)"
            if field["what"] == "contains unknown"
            else "missing; it is required"
        )
    elif expected:
        kind = _KINDS.get(expected["kind"], expected["kind"])
        problem = f"expected {kind}{expected['bound']}, got {_shown(raw, steps)}"
    else:  # a table's own __post_init__ check: the problem starts with the key
        table = _place(steps, raw, table_only=True)
        return f"{table} {problem}" if table else problem
    place = _place(steps, raw)
    return f"{place}: {problem}" if place else problem


def _steps(where: str) -> list[str | int]:
    return [m["key"] if m["key"] else int(m["index"]) for m in _STEP.finditer(where)]


def _value_at(raw: Any, steps: list[str | int]) -> Any:
    for step in steps:
        try:
            raw = raw[step]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _shown(raw: Any, steps: list[str | int]) -> str:
    value = _value_at(raw, steps)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool | str):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + '..."'
    return str(value)


def _place(steps: list[str | int], raw: Any, table_only: bool = False) -> str:
    """Where a key is, as node.toml writes it: ``[http] port``, ``[[peers]] #2 vkey``."""
    key = ""
    if not table_only and steps and isinstance(steps[-1], str):
        key = str(steps.pop())
    elif not table_only and len(steps) >= 2 and not isinstance(_value_at(raw, steps), dict):
        index = steps.pop()
        key = f"{steps.pop()} #{int(index) + 1}"  # one item of a list of values
    names = ".".join(str(s) for s in steps if isinstance(s, str))
    indexes = [s for s in steps if isinstance(s, int)]
    table = f"[[{names}]] #{indexes[-1] + 1}" if indexes else f"[{names}]" if names else ""
    return " ".join(part for part in (table, key) if part)


def render_initial_config(
    origin: str,
    listen: str,
    dimse_port: int,
    ae_title: str,
    http: dict[str, str] | None = None,
) -> str:
    """The node.toml that `imageshare init` writes into a new data directory; ``http``:
    more [http] settings (the HTTPS files of `init --tls-self-signed`)."""
    more = "".join(f"{key} = {json.dumps(value)}\n" for key, value in (http or {}).items())
    return (
        "# ImageShare node configuration; see node.example.toml for every setting.\n"
        f"origin = {json.dumps(origin)}\n"
        'data_dir = "."\n\n'
        "[http]\n"
        f"listen = {json.dumps(listen)}\n{more}\n"
        "[dimse]\n"
        f"port = {dimse_port}\n"
        f"ae_title = {json.dumps(ae_title)}\n"
    )
