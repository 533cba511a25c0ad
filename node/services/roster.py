"""The live roster of a running node: node.toml [[peers]] plus peers.toml, plus learned URLs.

`imageshare peers add` writes peers.toml; the daemon notices the change (by modification
time, checked at most once a second) and reloads, so a member can be added without a
restart. Discovery records the URLs it learns for members here; they are tried before
the static ones because they are the freshest.
"""

from __future__ import annotations

import logging
import os
import time

from node.config import NodeConfig
from node.core.roster import Member, Roster, make_member, normalize_url
from node.errors import BadInput, ConfigError, ImageShareError
from node.services.runtime import NodeRuntime
from node.store.federation_state import read_roster_file, roster_path, write_roster_file

log = logging.getLogger(__name__)

RELOAD_CHECK_INTERVAL = 1.0


def configured_members(config: NodeConfig) -> list[Member]:
    """Members from node.toml; raises ConfigError for a malformed entry."""
    members = []
    for peer in config.peers:
        try:
            members.append(make_member(peer.origin, peer.url, peer.vkey))
        except ImageShareError as exc:
            raise ConfigError(f"node.toml [[peers]] {peer.origin}: {exc}") from exc
    return members


def load_roster(config: NodeConfig) -> Roster:
    """node.toml's members, then peers.toml's (which win for the same origin)."""
    return Roster(
        config.origin,
        [*configured_members(config), *read_roster_file(roster_path(config.data_dir))],
    )


def add_peer(config: NodeConfig, origin: str, url: str, vkey: str) -> Member:
    """Persist a member in peers.toml; raises BadInput for a bad entry or a changed key."""
    member = make_member(origin, url, vkey)
    if origin == config.origin:
        raise BadInput("a node cannot be its own peer")
    current = load_roster(config).get(origin)
    if current is not None and current.vkey != member.vkey:
        raise BadInput(f"{origin} is already a member with another key; refusing to replace it")
    path = roster_path(config.data_dir)
    listed = [m for m in read_roster_file(path) if m.origin != origin]
    write_roster_file(path, [*listed, member])
    return member


class RosterService:
    """The current roster, reloaded when peers.toml changes, and URLs learned at run time."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._path = roster_path(config.data_dir)
        self._stamp = self._file_stamp()
        self._roster = load_roster(config)
        self._checked_at = time.monotonic()
        self._learned: dict[str, str] = {}

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    @property
    def roster(self) -> Roster:
        """The roster, re-read first if peers.toml changed; a broken file keeps the old one."""
        now = time.monotonic()
        if now - self._checked_at >= RELOAD_CHECK_INTERVAL:
            self._checked_at = now
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._roster = load_roster(self.config)
                    log.info("roster reloaded: %d members", len(self._roster))
                except ConfigError as exc:
                    log.error("keeping the previous roster: %s", exc)
        return self._roster

    def public_key_of_signer(self, signer: str) -> bytes | None:
        """For signed-request authentication: a member node's key, else None."""
        return self.roster.public_key_of_signer(signer)

    def learn_url(self, origin: str, url: str) -> bool:
        """Record an address found for a member; True if it is new."""
        url = normalize_url(url)
        if self.roster.get(origin) is None or not url or self._learned.get(origin) == url:
            return False
        self._learned[origin] = url
        log.info("learned address of %s: %s", origin, url)
        return True

    def urls_of(self, member: Member) -> list[str]:
        """Where to reach a member, best first: the learned URL, then the static one."""
        urls = [self._learned.get(member.origin, ""), member.url]
        return list(dict.fromkeys(u for u in urls if u))


def roster_of(runtime: NodeRuntime) -> RosterService:
    """The node's one RosterService (created on first use)."""
    service = runtime.services.get("roster")
    if service is None:
        service = runtime.services["roster"] = RosterService(runtime.config)
    return service
