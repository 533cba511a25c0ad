"""node.toml: every setting, its default, and validation.

The file is TOML. Paths are relative to the directory holding the file. Unknown keys
are refused so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from node.errors import ConfigError

DEFAULT_CONFIG_NAME = "node.toml"
CONFIG_ENV = "IMAGESHARE_CONFIG"


@dataclass
class HttpConfig:
    listen: str = "127.0.0.1:8600"
    # The URL peers and wallets use to reach this node; defaults to http://<listen>.
    public_url: str = ""
    max_body_bytes: int = 2 * 1024**3
    # Origins (scheme://host[:port]) of browser viewers elsewhere that may read /dicomweb
    # and the public /ledger with CORS; empty: none (the node's own pages need none).
    cors_origins: list[str] = field(default_factory=list)
    # Seconds a client may take to send a request before it is cut off.
    client_timeout: float = 120.0
    # Slowest request body accepted, in bytes/s over each client_timeout window: a client
    # that stalls or trickles its body is cut off instead of holding a connection forever.
    min_body_rate: int = 1024

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass
class DimseDestination:
    ae_title: str
    host: str
    port: int


@dataclass
class DimseCaller:
    """An AE the node knows, bound to the IP address its associations come from."""

    ae_title: str
    host: str
    # May C-FIND, C-GET and C-MOVE; false: store only (e.g. a modality).
    query_retrieve: bool = True


@dataclass
class DimseConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "IMAGESHARE"
    # Calling AE titles allowed to associate at all (title only, which any device can
    # claim); empty allows any.
    allowed_calling_aes: list[str] = field(default_factory=list)
    # C-ECHO and C-STORE from any calling AE; false: only from the callers below.
    store_from_any_ae: bool = True
    # The only AEs that may query and retrieve, each from its own address.
    callers: list[DimseCaller] = field(default_factory=list)
    # C-MOVE destinations by AE title.
    destinations: list[DimseDestination] = field(default_factory=list)
    # Refuse storage SOP classes this node does not know.
    refuse_unknown_sop_classes: bool = False


@dataclass
class ForwardConfig:
    # Forward every arriving study to this PACS AE by C-STORE; empty disables.
    ae_title: str = ""
    host: str = ""
    port: int = 104
    max_attempts: int = 8
    initial_backoff: float = 2.0


@dataclass
class StoreConfig:
    # Largest single DICOM instance accepted, in bytes.
    max_instance_bytes: int = 1024**3
    # Instances written between two durable commits during bulk ingest.
    batch_size: int = 64


@dataclass
class ConsentConfig:
    max_lifetime_days: int = 365
    clock_skew_seconds: int = 300
    # Denial entries one requesting node may cause per minute; over it, refusals are
    # still answered but not written (the ledger is permanent and copied to every peer).
    max_denials_per_minute: int = 60

    def __post_init__(self) -> None:
        limit = self.max_denials_per_minute
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError("consent.max_denials_per_minute must be a whole number >= 1")


@dataclass
class LedgerConfig:
    # Longest a durable append waits to share its fsync with others, in milliseconds.
    group_commit_ms: float = 2.0


@dataclass
class DashboardConfig:
    # Link that opens a study in a viewer: {study_uid} and {dicomweb} (this node's DICOMweb
    # root) are replaced, e.g. "https://viewer.example/viewer?StudyInstanceUIDs={study_uid}".
    # Empty: a plain link to the study's DICOMweb metadata.
    viewer_url: str = ""


AUDIT_EXPORT_TRANSPORTS = ("udp", "tcp", "tls")


@dataclass
class AuditExportConfig:
    """The security audit feed (DICOM PS3.15 audit messages over syslog) to the SIEM."""

    enabled: bool = False
    # udp (RFC 5426), tcp (octet-counted, RFC 6587) or tls (RFC 5425).
    transport: str = "tls"
    host: str = ""
    port: int = 6514
    # TLS: the CA that signed the collector's certificate (empty: the system's CAs), and
    # this node's client certificate and key if the collector requires one.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # Messages kept on disk while the collector is unreachable; over either bound the
    # oldest are dropped (and counted).
    queue_max_messages: int = 100_000
    queue_max_bytes: int = 256 * 1024**2
    # Longest wait between two connection attempts, in seconds.
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.transport not in AUDIT_EXPORT_TRANSPORTS:
            raise ConfigError(f"audit_export.transport must be one of {AUDIT_EXPORT_TRANSPORTS}")
        if self.enabled and not self.host:
            raise ConfigError("audit_export.host is needed when audit_export.enabled")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError("audit_export.port must be 1 to 65535")
        for name in ("queue_max_messages", "queue_max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"audit_export.{name} must be a whole number >= 1")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("audit_export.cert_file and key_file go together")


@dataclass
class PeerConfig:
    origin: str
    url: str
    vkey: str


@dataclass
class FederationConfig:
    discovery: bool = True
    replicate_interval: float = 1.0
    request_timeout: float = 10.0
    # Largest age, in seconds, of a signed node-to-node request.
    max_request_age: int = 300


@dataclass
class NodeConfig:
    origin: str
    config_path: Path
    data_dir: Path
    http: HttpConfig = field(default_factory=HttpConfig)
    dimse: DimseConfig = field(default_factory=DimseConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    consent: ConsentConfig = field(default_factory=ConsentConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    audit_export: AuditExportConfig = field(default_factory=AuditExportConfig)
    peers: list[PeerConfig] = field(default_factory=list)

    @property
    def public_url(self) -> str:
        return (self.http.public_url or f"http://{self.http.listen}").rstrip("/")

    @property
    def key_path(self) -> Path:
        return self.data_dir / "node.key"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown setting {where}.{sorted(unknown)[0]}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"{where} is incomplete: {exc}") from exc


def load_config(path: Path | None = None) -> NodeConfig:
    """Read and validate node.toml; raises ConfigError with one clear sentence."""
    path = (path or default_config_path()).resolve()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no configuration at {path} (run 'imageshare init' or pass -c)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    raw = dict(raw)
    origin = raw.pop("origin", None)
    if not isinstance(origin, str) or not origin or any(c.isspace() for c in origin):
        raise ConfigError(f"{path} needs an origin without spaces")
    data_dir = path.parent / str(raw.pop("data_dir", "."))
    sections: dict[str, Any] = {}
    for name, cls in (
        ("http", HttpConfig),
        ("forward", ForwardConfig),
        ("store", StoreConfig),
        ("consent", ConsentConfig),
        ("ledger", LedgerConfig),
        ("federation", FederationConfig),
        ("dashboard", DashboardConfig),
        ("audit_export", AuditExportConfig),
    ):
        if name in raw:
            sections[name] = _build(cls, raw.pop(name), name)
    if "dimse" in raw:
        dimse_raw = dict(raw.pop("dimse"))
        destinations = [
            _build(DimseDestination, d, "dimse.destinations")
            for d in dimse_raw.pop("destinations", [])
        ]
        callers = [_build(DimseCaller, c, "dimse.callers") for c in dimse_raw.pop("callers", [])]
        sections["dimse"] = _build(
            DimseConfig, {**dimse_raw, "destinations": destinations, "callers": callers}, "dimse"
        )
        _check_dimse_callers(sections["dimse"])
    peers = [_build(PeerConfig, p, "peers") for p in raw.pop("peers", [])]
    if raw:
        raise ConfigError(f"unknown setting {sorted(raw)[0]} in {path}")
    config = NodeConfig(
        origin=origin, config_path=path, data_dir=data_dir.resolve(), peers=peers, **sections
    )
    try:
        config.http.port  # noqa: B018 - validates listen
    except (ValueError, IndexError) as exc:
        raise ConfigError("http.listen must be HOST:PORT") from exc
    config.http.cors_origins = [_cors_origin(o) for o in config.http.cors_origins]
    audit = config.audit_export
    for name in ("ca_file", "cert_file", "key_file"):
        if getattr(audit, name):  # relative to the config file, like data_dir
            setattr(audit, name, str(path.parent / getattr(audit, name)))
    return config


def _check_dimse_callers(dimse: DimseConfig) -> None:
    """Each caller is bound to one IP address, and can pass the title allow-list."""
    titles = {t.strip() for t in dimse.allowed_calling_aes}
    for caller in dimse.callers:
        try:
            ipaddress.ip_address(caller.host)
        except ValueError:
            raise ConfigError(
                f"dimse.callers {caller.ae_title!r}: host must be the IP address its"
                f" associations come from, not {caller.host!r}"
            ) from None
        if titles and caller.ae_title.strip() not in titles:
            raise ConfigError(
                f"dimse.callers {caller.ae_title!r} is not in dimse.allowed_calling_aes,"
                " so its associations would be rejected"
            )


# An origin as a browser sends it: scheme://host[:port] in lower case, nothing else.
_ORIGIN = re.compile(r"https?://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")


def _cors_origin(origin: object) -> str:
    """A configured CORS origin, lower-cased as browsers send it; "*" and "null" refused."""
    text = str(origin).strip().lower()
    if not _ORIGIN.fullmatch(text):
        raise ConfigError(
            f"http.cors_origins: {origin!r} is not an origin like https://viewer.example:3000"
            " (list each viewer's origin; '*' and 'null' are refused)"
        )
    return text


def render_initial_config(origin: str, listen: str, dimse_port: int, ae_title: str) -> str:
    """The node.toml that `imageshare init` writes into a new data directory."""
    return (
        "# ImageShare node configuration; see node.example.toml for every setting.\n"
        f'origin = "{origin}"\n'
        'data_dir = "."\n\n'
        "[http]\n"
        f'listen = "{listen}"\n\n'
        "[dimse]\n"
        f"port = {dimse_port}\n"
        f'ae_title = "{ae_title}"\n'
    )
