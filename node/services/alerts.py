"""Alerts: what needs a person, told once per incident, to a webhook and by e-mail.

An *incident* is a condition that holds: a peer down, a peer's equivocation, the data
directory's disk low, instances the forwarder gave up on, the TLS certificate near its
end, or one raised by another service (break-glass: ``raise_incident``). Every
``[alerts] check_interval`` seconds the conditions are evaluated: a condition that was
not holding opens an incident (a new id) and it is sent once; while it holds the
incident stays open and nothing more is sent; when it no longer holds the incident
closes. The same condition holding again later is a new incident, sent again.

Delivery: a JSON POST to ``webhook_url`` and an e-mail through ``smtp_host``
(STARTTLS unless turned off, a login from ``smtp_credentials_file``). A channel that
fails is retried at the next check until it has the incident: it is sent once, not
lost. The dashboard's status strip shows the open incidents (``open_incidents``).

Privacy: an alert names nodes, sizes and counts, never a patient or a study.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import secrets
import shutil
import smtplib
import ssl
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509

from node.config import AlertsConfig
from node.errors import BadInput, ConfigError
from node.services.periodic import PeriodicTask
from node.services.runtime import NodeRuntime
from node.store.secrets import read_secret

log = logging.getLogger(__name__)

PEER_DOWN = "peer_down"
EQUIVOCATION = "equivocation"
DISK_LOW = "disk_low"
FORWARDING_FAILED = "forwarding_failed"
CERTIFICATE_EXPIRY = "certificate_expiry"
BREAK_GLASS = "break_glass"
KINDS = (PEER_DOWN, EQUIVOCATION, DISK_LOW, FORWARDING_FAILED, CERTIFICATE_EXPIRY, BREAK_GLASS)
WEBHOOK = "webhook"
EMAIL = "email"
SEND_TIMEOUT = 10.0
# A raised incident's text is shown and sent as is: bounded.
MAX_TEXT = 500


def plain_peer_error(raw: str) -> str:
    """A peer's connection error as IT staff read it: what is wrong and what to check."""
    text = raw.lower()
    # aiohttp says "Cannot connect to host H:P ssl:default [Connect call failed ...]" for
    # a closed port, plain HTTP included: that is checked before any TLS wording.
    if "refused" in text or "connect call failed" in text:
        return "nothing answers at its address: the node is stopped, or the port is wrong"
    if "timeout" in text or "timed out" in text:
        return "no answer in time: the node or the network to it is down, or a firewall drops it"
    if "name or service" in text or "getaddrinfo" in text or "nodename" in text:
        return "its host name does not resolve: check the address and DNS"
    if "certificate" in text or "sslerror" in text or "wrong version number" in text:
        return "its TLS certificate is not trusted here: check [http] trusted_ca_file"
    if "401" in text or "403" in text:
        return "it refused this node's signed request: is this node in its roster?"
    if "reset" in text or "disconnect" in text or "closed" in text:
        return "the connection broke off: the node restarted or the network is unstable"
    return "it cannot be reached" + (f" ({raw})" if raw else "")


@dataclass(frozen=True)
class Condition:
    """A condition that holds now: ``kind`` and ``subject`` (e.g. a peer's origin) name it."""

    kind: str
    subject: str
    text: str


@dataclass
class Incident:
    id: str
    kind: str
    subject: str
    text: str
    opened_at: float
    delivered: set[str] = field(default_factory=set)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "subject": self.subject,
            "text": self.text,
            "opened_at": self.opened_at,
        }


def smtp_login(config: AlertsConfig) -> tuple[str, str] | None:
    """The SMTP user and password from ``smtp_credentials_file``; None without one.

    Raises ConfigError for a file others can read or one without two lines.
    """
    if not config.smtp_credentials_file:
        return None
    lines = read_secret(Path(config.smtp_credentials_file)).decode("utf-8").splitlines()
    if len(lines) < 2 or not lines[0]:
        raise ConfigError(
            "alerts.smtp_credentials_file: needs the user on its first line and the"
            " password on its second"
        )
    return lines[0], lines[1]


class IncidentBook:
    """Which incidents are open: one per condition while it holds, a new one each time
    it starts to hold again."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], Incident] = {}

    def open_incidents(self) -> list[dict[str, Any]]:
        """The incidents open now, oldest first."""
        return [i.as_json() for i in sorted(self._open.values(), key=lambda i: i.opened_at)]

    def update(self, holding: list[Condition], now: float, channels: set[str]) -> list[Incident]:
        """Open incidents for conditions that newly hold, close those that ended; the
        open incidents some of ``channels`` has not been sent yet."""
        current = {(c.kind, c.subject): c for c in holding}
        for key in list(self._open):
            if key not in current:
                incident = self._open.pop(key)
                log.info("alert closed: %s %s", incident.kind, incident.subject)
        for key, condition in current.items():
            if key not in self._open:
                self._open[key] = Incident(
                    secrets.token_hex(8), condition.kind, condition.subject, condition.text, now
                )
                log.warning("alert: %s", condition.text)
        return [i for i in self._open.values() if not channels <= i.delivered]


class AlertService:
    """The incidents of one node and their delivery; started by the daemon."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.config = runtime.config.alerts
        self.book = IncidentBook()
        # Raised incidents and when each ends by itself (None: at ``close_incident``).
        self._raised: dict[tuple[str, str], tuple[Condition, float | None]] = {}
        self._loop = PeriodicTask("alerts", self.check, self.config.check_interval)
        self._certificate: tuple[float, datetime.datetime] | None = None
        self.last_check: float | None = None

    # -- the conditions -------------------------------------------------------------------

    def conditions(self) -> list[Condition]:
        """Every condition that holds now. Blocking (reads disk and the forward queue)."""
        found: list[Condition] = []
        services = self.runtime.services
        federation = services.replication.status()
        for peer in federation["peers"]:
            if peer["reachable"] is False and peer["failures"] >= self.config.peer_down_rounds:
                problem = plain_peer_error(peer["last_error"])
                found.append(
                    Condition(PEER_DOWN, peer["origin"], f"{peer['origin']} is down: {problem}")
                )
        for proof in federation["equivocations"]:
            found.append(
                Condition(
                    EQUIVOCATION,
                    proof["origin"],
                    f"{proof['origin']} showed two different histories of its log"
                    " (equivocation): its new entries are refused",
                )
            )
        percent = disk_percent_used(self.runtime.config.data_dir)
        if percent >= self.config.disk_full_percent:
            found.append(
                Condition(DISK_LOW, "data", f"the data directory's disk is {percent}% full")
            )
        forwarder = services.forwarder
        if forwarder is not None:
            failed = forwarder.status()["failed"]
            if failed:
                found.append(
                    Condition(
                        FORWARDING_FAILED,
                        "forward",
                        f"{failed} instance(s) could not be forwarded to the PACS, after"
                        " every retry",
                    )
                )
        days = self.certificate_days_left()
        if days is not None and days <= self.config.certificate_days:
            text = (
                "this node's TLS certificate has expired"
                if days < 0
                else f"this node's TLS certificate expires in {days} day(s)"
            )
            found.append(Condition(CERTIFICATE_EXPIRY, "http", text))
        now = time.time()
        for key, (condition, until) in list(self._raised.items()):
            if until is not None and now >= until:
                self._raised.pop(key, None)
            else:
                found.append(condition)
        return found

    def certificate_days_left(self) -> int | None:
        """Whole days until the HTTPS certificate expires; None without TLS. Blocking."""
        http = self.runtime.config.http
        if not http.tls:
            return None
        path = Path(http.cert_file)
        try:
            stamp = path.stat().st_mtime
            if self._certificate is None or self._certificate[0] != stamp:
                loaded = x509.load_pem_x509_certificate(path.read_bytes())
                self._certificate = (stamp, loaded.not_valid_after_utc)
        except (OSError, ValueError) as exc:
            log.warning("alerts: cannot read the TLS certificate %s: %s", path, exc)
            return None
        left = self._certificate[1] - datetime.datetime.now(datetime.UTC)
        return left.days

    # -- incidents ----------------------------------------------------------------------

    def raise_incident(
        self, kind: str, subject: str, text: str, until: float | None = None
    ) -> None:
        """Open an incident from another service (break-glass); it is sent at the next
        check and stays open until ``close_incident`` or the epoch time ``until``.
        Raising it again while open changes nothing. Raises BadInput for an unknown kind."""
        if kind not in KINDS:
            raise BadInput(f"unknown alert kind {kind!r}")
        self._raised[(kind, subject)] = (Condition(kind, subject, text[:MAX_TEXT]), until)

    def raise_break_glass(
        self,
        request_id: bytes,
        requester: str,
        reason: str,
        until: float,
        custodian: str | None = None,
    ) -> None:
        """The ``break_glass`` incident of one served emergency request, open while its
        access window lasts; at the requester, ``custodian`` names who served it.

        Names the requester, its reason code and the request's id: never the patient.
        """
        text = f"Emergency access to a patient's studies by {requester} (reason {reason})"
        if custodian is not None:
            text += f", served by {custodian}"
        self.raise_incident(BREAK_GLASS, request_id.hex(), text, until)

    def close_incident(self, kind: str, subject: str) -> None:
        """Close an incident ``raise_incident`` opened (at the next check)."""
        self._raised.pop((kind, subject), None)

    def open_incidents(self) -> list[dict[str, Any]]:
        """The incidents open now, oldest first."""
        return self.book.open_incidents()

    def channels(self) -> set[str]:
        wanted = set()
        if self.config.webhook_url:
            wanted.add(WEBHOOK)
        if self.config.smtp_host:
            wanted.add(EMAIL)
        return wanted

    async def check(self) -> None:
        """Evaluate every condition and send what is new."""
        holding = await asyncio.to_thread(self.conditions)
        self.last_check = time.time()
        for incident in self.book.update(holding, self.last_check, self.channels()):
            for channel in self.channels() - incident.delivered:
                try:
                    await self._send(channel, self._message(incident.as_json(), "open"))
                except (OSError, aiohttp.ClientError, smtplib.SMTPException, ConfigError) as exc:
                    log.warning("alert %s not sent by %s (retried): %s", incident.id, channel, exc)
                else:
                    incident.delivered.add(channel)

    async def send_test(self) -> dict[str, str]:
        """A test alert to every configured channel: each channel's outcome in words."""
        incident = {
            "id": "test",
            "kind": "test",
            "subject": "test",
            "text": "a test alert from the dashboard: alerts reach you",
            "opened_at": time.time(),
        }
        outcome: dict[str, str] = {}
        for channel in sorted(self.channels()):
            try:
                await self._send(channel, self._message(incident, "test"))
            except (OSError, aiohttp.ClientError, smtplib.SMTPException, ConfigError) as exc:
                outcome[channel] = f"not sent: {exc}"
            else:
                outcome[channel] = "sent"
        return outcome

    # -- delivery -----------------------------------------------------------------------

    def _message(self, incident: dict[str, Any], state: str) -> dict[str, Any]:
        return {
            "node": self.runtime.config.origin,
            "state": state,
            "dashboard": self.runtime.config.public_url + "/admin",
            **incident,
        }

    async def _send(self, channel: str, message: dict[str, Any]) -> None:
        if channel == WEBHOOK:
            timeout = aiohttp.ClientTimeout(total=SEND_TIMEOUT)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(self.config.webhook_url, json=message) as response,
            ):
                if response.status >= 300:
                    raise aiohttp.ClientError(f"the webhook answered {response.status}")
        else:
            await asyncio.to_thread(self._mail, message)

    def _mail(self, message: dict[str, Any]) -> None:
        config = self.config
        mail = EmailMessage()
        mail["From"] = config.smtp_from
        mail["To"] = ", ".join(config.smtp_to)
        prefix = "Test" if message["state"] == "test" else "Alert"
        mail["Subject"] = f"[ImageShare {message['node']}] {prefix}: {message['kind']}"
        opened = datetime.datetime.fromtimestamp(message["opened_at"], datetime.UTC)
        mail.set_content(
            f"{message['text'][0].upper()}{message['text'][1:]}.\n\n"
            f"Node: {message['node']}\nSince: {opened:%Y-%m-%d %H:%M} UTC\n"
            f"Incident: {message['id']}\nDashboard: {message['dashboard']}\n"
            "What it means and what to do: docs/dashboard.md, section Alerts.\n"
        )
        login = smtp_login(config)
        with smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=SEND_TIMEOUT) as smtp:
            if config.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if login is not None:
                smtp.login(*login)
            smtp.send_message(mail)

    # -- the background loop --------------------------------------------------------------

    async def start(self) -> None:
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()


def disk_percent_used(path: os.PathLike[str] | str) -> int:
    """How full the disk holding ``path`` is, in whole percent."""
    disk = shutil.disk_usage(path)
    return round(100 * (disk.total - disk.free) / disk.total) if disk.total else 0
