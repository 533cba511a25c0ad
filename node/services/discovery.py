"""LAN discovery with zeroconf: advertise this node, and learn where roster members are.

The node advertises ``_imageshare._tcp.local.`` with TXT records ``origin``, ``fp`` (the
fingerprint of its key: hex SHA-256 of the public key, first 16 bytes), ``path`` (URL
path prefix, usually empty), ``tls`` (``1`` when it serves HTTPS: the candidate URL is
then ``https://``, and its certificate must verify like any peer's) and ``v=1``. A node
found on the LAN is considered only if its fingerprint and origin are those of a roster
member; anything else is ignored and logged. Advertisements are not authenticated, so
the address is only a *candidate*: this node sends the member a fresh random challenge
at that address (a signed ``POST /p2p/address-proof``) and uses the address only once
the answer is the roster key's signature over the challenge, the member's origin and that URL
(node.core.roster.address_proof_bytes). Until then, and whenever the proof fails, the
roster's static URL is what is used, so a liar on the LAN never receives a token, a
cosignature or a notify meant for the member.

Discovery binds to the interface of the HTTP listen address (loopback nodes find each
other on loopback), or to every interface when the node listens on 0.0.0.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Coroutine
from typing import Any

import aiohttp
import yarl
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from node.core.base64url import b64url_decode
from node.core.roster import CHALLENGE_SIZE, Member, key_fingerprint, verify_address_proof
from node.core.signed_requests import SIGNATURE_SIZE
from node.errors import BadInput, ImageShareError
from node.services.peer_client import node_signed_headers, open_session, read_bounded
from node.services.replication import ReplicationService
from node.services.runtime import NodeRuntime

log = logging.getLogger(__name__)

SERVICE_TYPE = "_imageshare._tcp.local."
INFO_TIMEOUT_MS = 3000
ADDRESS_PROOF_PATH = "/p2p/address-proof"
# A member that has just started may not answer yet: ask again a few times.
PROOF_ATTEMPTS = 3
PROOF_RETRY_SECONDS = 1.0
MAX_PROOF_ANSWER_BYTES = 4096


class ProofFailed(Exception):
    """The node at a candidate address answered, with no valid proof of the member's key."""


class NoAnswer(Exception):
    """The candidate address gave no answer to the challenge (yet): worth asking again."""


class DiscoveryService:
    """Advertise this node and feed members' LAN addresses to the roster."""

    def __init__(self, runtime: NodeRuntime, replication: ReplicationService) -> None:
        self.runtime = runtime
        self.replication = replication
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.fingerprint = key_fingerprint(runtime.identity.public_key)

    def _interfaces(self) -> tuple[InterfaceChoice | list[str], list[str]]:
        """Where to listen for mDNS, and the addresses to advertise."""
        host = self.runtime.config.http.host
        if host in ("0.0.0.0", ""):
            found = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
            addresses = sorted({str(info[4][0]) for info in found}) or ["127.0.0.1"]
            return InterfaceChoice.All, addresses
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            host = socket.gethostbyname(host)
        return [host], [host]

    def _service_info(self, addresses: list[str]) -> ServiceInfo:
        origin = self.runtime.config.origin
        # Instance names are at most 63 bytes; the fingerprint keeps them unique.
        label = "".join(c if c.isalnum() or c in "-." else "-" for c in origin)[:40]
        return ServiceInfo(
            SERVICE_TYPE,
            f"{label}-{self.fingerprint[:12]}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in addresses],
            port=self.runtime.config.http.port,
            properties={
                "origin": origin,
                "fp": self.fingerprint,
                "path": "",
                "tls": "1" if self.runtime.config.http.tls else "0",
                "v": "1",
            },
            server=f"imageshare-{self.fingerprint[:16]}.local.",
        )

    async def start(self) -> None:
        interfaces, addresses = self._interfaces()
        timeout = self.runtime.config.federation.request_timeout
        self._session = open_session(
            self.runtime.config.http.trusted_ca_file,
            aiohttp.ClientTimeout(total=timeout, connect=timeout),
        )
        self._zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(
            self._zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )
        # Registering probes the LAN for about a second; the node serves meanwhile.
        self._spawn(self._advertise(addresses))

    async def _advertise(self, addresses: list[str]) -> None:
        assert self._zeroconf is not None
        try:
            await self._zeroconf.async_register_service(self._service_info(addresses))
        except Exception:
            log.exception("discovery: could not advertise on %s", addresses)
            return
        log.info("discovery: advertising %s on %s", SERVICE_TYPE, addresses)

    async def stop(self) -> None:
        for task in list(self._pending):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zeroconf is not None:
            # Goodbye packets are a courtesy (records expire anyway): never hold up shutdown.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._zeroconf.async_unregister_all_services(), 0.5)
            await self._zeroconf.async_close()
        if self._session is not None:
            await self._session.close()

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            self._spawn(self._resolve(name))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _resolve(self, name: str) -> None:
        assert self._zeroconf is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        with contextlib.suppress(Exception):
            if not await info.async_request(self._zeroconf.zeroconf, INFO_TIMEOUT_MS):
                return
            self.found(info)

    def found(self, info: ServiceInfo) -> None:
        """Use an advertised node's address if it is a roster member; ignore it otherwise."""
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in (info.properties or {}).items()
        }
        origin, fingerprint = props.get("origin", ""), props.get("fp", "")
        if fingerprint == self.fingerprint:
            return  # ourselves
        member = self.replication.roster.roster.by_fingerprint(fingerprint)
        if member is None or member.origin != origin:
            if self.replication.ignored_by_discovery.get(info.name) != origin:
                log.warning(
                    "discovery: ignoring %s (origin %r): its key is not in the roster",
                    info.name,
                    origin,
                )
            self.replication.ignored_by_discovery[info.name] = origin
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or not info.port:
            return
        path = props.get("path", "").rstrip("/")
        if path and not path.startswith("/"):
            return
        scheme = "https" if props.get("tls") == "1" else "http"
        url = f"{scheme}://{addresses[0]}:{info.port}{path}"
        if self.replication.roster.add_candidate(member.origin, url):
            self._spawn(self._prove(member, url))

    async def _prove(self, member: Member, url: str) -> None:
        """Challenge the member at a candidate address; use the address only if it proves
        the member's key there."""
        roster = self.replication.roster
        for attempt in range(1, PROOF_ATTEMPTS + 1):
            try:
                await self.challenge(member, url)
            except ProofFailed as exc:
                log.warning(
                    "discovery: %s advertised as %s did not prove its key: %s; not used",
                    url,
                    member.origin,
                    exc,
                )
                break
            except NoAnswer as exc:
                if attempt == PROOF_ATTEMPTS:
                    log.info("discovery: %s (%s) did not answer: %s", url, member.origin, exc)
                    break
                await asyncio.sleep(PROOF_RETRY_SECONDS * attempt)
                continue
            if roster.confirm_url(member.origin, url):
                self.replication.wake(member.origin)
            return
        roster.reject_candidate(member.origin, url)

    async def challenge(self, member: Member, url: str) -> None:
        """Ask ``url`` to prove it holds ``member``'s key; raises ProofFailed if the answer
        is no valid proof, NoAnswer if there is none (unreachable, or not 200: a member
        that is starting, or has not yet added this node to its roster)."""
        assert self._session is not None
        challenge = os.urandom(CHALLENGE_SIZE)
        body = json.dumps({"challenge": challenge.hex(), "url": url}).encode()
        target = yarl.URL(url + ADDRESS_PROOF_PATH)
        identity = self.runtime.identity
        headers = node_signed_headers(identity, "POST", target, body, member.origin)
        try:
            post = self._session.post(target, data=body, headers=headers, allow_redirects=False)
            async with post as response:
                if response.status != 200:
                    raise NoAnswer(f"it answered {response.status}")
                # A proof is a small JSON document with a declared length: read no more.
                if not 0 < (response.content_length or 0) <= MAX_PROOF_ANSWER_BYTES:
                    raise ProofFailed("its answer is not a short JSON document")
                answer = await read_bounded(response, MAX_PROOF_ANSWER_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError, ImageShareError) as exc:
            raise NoAnswer(str(exc) or type(exc).__name__) from exc
        try:
            document = json.loads(answer)
            signature = b64url_decode(str(document["signature"]), "signature", size=SIGNATURE_SIZE)
        except (ValueError, KeyError, TypeError, BadInput) as exc:
            raise ProofFailed('its answer is not {"signature": base64url}') from exc
        if not verify_address_proof(member, url, challenge, signature):
            raise ProofFailed("the signature is not the roster key's")


def discovery_service(runtime: NodeRuntime) -> DiscoveryService | None:
    """The daemon's factory: a DiscoveryService unless [federation] discovery = false."""
    if not runtime.config.federation.discovery:
        return None
    return DiscoveryService(runtime, runtime.services.replication)
