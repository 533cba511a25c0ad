"""LAN discovery with zeroconf: advertise this node, and learn where roster members are.

The node advertises ``_imageshare._tcp.local.`` with TXT records ``origin``, ``fp`` (the
fingerprint of its key: hex SHA-256 of the public key, first 16 bytes), ``path`` (URL
path prefix, usually empty) and ``v=1``. A node found on the LAN is used only if its
fingerprint and origin are those of a roster member: then its address becomes that
member's learned URL. Anything else is ignored and logged. Discovery only finds
addresses; every byte fetched from them is still verified against the roster key, so a
liar on the LAN can at worst make a member unreachable through that address (the static
URL, if configured, is still tried).

Discovery binds to the interface of the HTTP listen address (loopback nodes find each
other on loopback), or to every interface when the node listens on 0.0.0.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket

from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from node.core.roster import key_fingerprint
from node.services.replication import ReplicationService, replication_of
from node.services.runtime import NodeRuntime

log = logging.getLogger(__name__)

SERVICE_TYPE = "_imageshare._tcp.local."
INFO_TIMEOUT_MS = 3000


class DiscoveryService:
    """Advertise this node and feed members' LAN addresses to the roster."""

    def __init__(self, runtime: NodeRuntime, replication: ReplicationService) -> None:
        self.runtime = runtime
        self.replication = replication
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._pending: set[asyncio.Task[None]] = set()
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
            properties={"origin": origin, "fp": self.fingerprint, "path": "", "v": "1"},
            server=f"imageshare-{self.fingerprint[:16]}.local.",
        )

    async def start(self) -> None:
        interfaces, addresses = self._interfaces()
        self._zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(
            self._zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )
        # Registering probes the LAN for about a second; the node serves meanwhile.
        task = asyncio.ensure_future(self._advertise(addresses))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

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

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            task = asyncio.ensure_future(self._resolve(name))
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
        if self.replication.roster.learn_url(
            member.origin, f"http://{addresses[0]}:{info.port}{path}"
        ):
            self.replication.wake(member.origin)


def discovery_service(runtime: NodeRuntime) -> DiscoveryService | None:
    """The daemon's factory: a DiscoveryService unless [federation] discovery = false."""
    if not runtime.config.federation.discovery:
        return None
    return DiscoveryService(runtime, replication_of(runtime))
