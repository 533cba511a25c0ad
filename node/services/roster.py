"""The live roster of a running node: node.toml [[peers]] plus peers.toml (or, in a
federation, the verified roster: node.services.federation_roster), plus learned URLs.

`imageshare peers add` writes peers.toml; the daemon notices the change (by modification
time, checked at most once a second) and reloads, so a member can be added without a
restart. Discovery records the addresses it finds for members here, first as
*candidates*: anyone on the LAN can advertise a member's origin and fingerprint. A
candidate becomes a learned URL only once the member has proven its key at it (a signed
challenge, see DiscoveryService); learned URLs are tried before the static ones because
they are the freshest. ``urls_of`` is the one place that picks where to reach a member.
"""

from __future__ import annotations

import logging
import os
import time

from node.config import NodeConfig
from node.core import atna
from node.core.roster import Member, Roster, make_member, normalize_url
from node.core.roster_document import RosterDocument, members_of
from node.errors import BadInput, ConfigError, ImageShareError
from node.services.audit_export import local_user, record_once
from node.services.federation_roster import current_roster, federated, roster_file_stamp
from node.store.federation_state import read_roster_file, roster_path, write_roster_file

log = logging.getLogger(__name__)

RELOAD_CHECK_INTERVAL = 1.0
# Unproven addresses kept per member (a liar on the LAN can advertise many).
MAX_CANDIDATES = 8
# An address whose proof failed is not challenged again sooner than this, however often
# it is advertised.
RETRY_REJECTED_AFTER = 60.0


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
    """node.toml's members, then peers.toml's (which win for the same origin).

    In a federation (``[federation] key``) the members are the verified roster's; a hand
    entry only gives a URL for a member it names with the same key, any other is left out.
    """
    hand = [*configured_members(config), *read_roster_file(roster_path(config.data_dir))]
    if not federated(config):
        return Roster(config.origin, hand)
    document = current_roster(config)
    named = {m.origin: m for m in members_of(document, config.origin)} if document else {}
    for member in hand:
        listed = named.get(member.origin)
        if listed is None or listed.vkey != member.vkey:
            log.warning("%s is left out: %s", member.origin, _not_in_roster(document, member))
        elif member.url:
            named[member.origin] = member
    return Roster(config.origin, named.values())


def _not_in_roster(document: RosterDocument | None, member: Member) -> str:
    if document is None:
        return "this node holds no federation roster yet (imageshare roster fetch)"
    return (
        f"roster version {document.version} of {document.federation} does not name "
        f"{member.origin} with that key; only the federation's roster makes a node a peer"
    )


def add_peer(config: NodeConfig, origin: str, url: str, vkey: str) -> Member:
    """Persist a member in peers.toml; raises BadInput for a bad entry or a changed key."""
    member = make_member(origin, url, vkey)
    if origin == config.origin:
        raise BadInput("a node cannot be its own peer")
    if federated(config):
        document = current_roster(config)
        named = document.member(origin) if document else None
        if named is None or named.vkey != member.vkey:
            raise BadInput(f"{origin} is refused: {_not_in_roster(document, member)}")
    current = load_roster(config).get(origin)
    if current is not None and current.vkey != member.vkey:
        raise BadInput(f"{origin} is already a member with another key; refusing to replace it")
    path = roster_path(config.data_dir)
    listed = [m for m in read_roster_file(path) if m.origin != origin]
    write_roster_file(path, [*listed, member])
    record_once(config, atna.configuration_changed, local_user(), "federation member added", origin)
    return member


def remove_peer(config: NodeConfig, origin: str) -> None:
    """Remove a member from peers.toml (a running daemon drops it within seconds). The
    caller records the configuration change for the security audit.

    Raises BadInput if it is not a member, or if node.toml lists it (remove it there).
    """
    if any(m.origin == origin for m in configured_members(config)):
        raise BadInput(f"{origin} is listed in node.toml's [[peers]]: remove it there")
    path = roster_path(config.data_dir)
    listed = read_roster_file(path)
    if not any(m.origin == origin for m in listed):
        raise BadInput(f"{origin} is not a member")
    write_roster_file(path, [m for m in listed if m.origin != origin])


def move_member_key(config: NodeConfig, origin: str, vkey: str) -> Member:
    """Persist a member's new key in peers.toml, keeping its URL; BadInput if not a member.

    Two callers: replication, once the member's log proved a rotation to ``vkey`` (both
    keys signed it), and an operator confirming a compromised-key rotation by hand
    (`imageshare peers confirm-key`), which is what lets replication follow it.
    """
    if federated(config):
        raise BadInput("in a federation a member's key moves only through a new roster version")
    current = load_roster(config).get(origin)
    if current is None:
        raise BadInput(f"{origin} is not a member")
    member = make_member(origin, current.url, vkey)
    if member.vkey != current.vkey:
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
        self._learned: dict[str, str] = {}  # origin -> the URL last proven by the member
        self._candidates: dict[str, list[str]] = {}  # origin -> found, not proven (yet)
        self._rejected: dict[tuple[str, str], float] = {}  # (origin, url) -> when it failed

    def _file_stamp(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """What changes when peers.toml or the federation roster is replaced."""
        try:
            stat = os.stat(self._path)
            own: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            own = None
        return own, roster_file_stamp(self.config)

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

    def add_candidate(self, origin: str, url: str) -> bool:
        """Record an address found for a member, unused until proven; True if it needs a
        proof (a member's address, new, not already proven)."""
        url = normalize_url(url)
        if self.roster.get(origin) is None or not url or self._learned.get(origin) == url:
            return False
        candidates = self._candidates.setdefault(origin, [])
        failed_at = self._rejected.get((origin, url))
        if url in candidates or (
            failed_at is not None and time.monotonic() - failed_at < RETRY_REJECTED_AFTER
        ):
            return False
        candidates.append(url)
        del candidates[:-MAX_CANDIDATES]
        log.info("found a candidate address of %s: %s (to be proven)", origin, url)
        return True

    def confirm_url(self, origin: str, url: str) -> bool:
        """The member proved its key at candidate ``url``: use it from now on."""
        url = normalize_url(url)
        candidates = self._candidates.get(origin, [])
        if self.roster.get(origin) is None or url not in candidates:
            return False
        candidates.remove(url)
        self._learned[origin] = url
        log.info("learned address of %s: %s (the member proved its key there)", origin, url)
        return True

    def reject_candidate(self, origin: str, url: str) -> None:
        """A candidate's proof failed: drop it; it may be offered again after a while."""
        url = normalize_url(url)
        candidates = self._candidates.get(origin, [])
        if url in candidates:
            candidates.remove(url)
        self._rejected[(origin, url)] = time.monotonic()
        while len(self._rejected) > MAX_CANDIDATES * max(len(self.roster), 1):
            del self._rejected[next(iter(self._rejected))]

    def candidates_of(self, member: Member) -> list[str]:
        """Addresses found for a member whose proof is pending (never used)."""
        return list(self._candidates.get(member.origin, []))

    def rejected_of(self, member: Member) -> list[str]:
        """Addresses advertised for a member where it could not prove its key lately."""
        return [url for (origin, url) in self._rejected if origin == member.origin]

    def urls_of(self, member: Member) -> list[str]:
        """Where to reach a member, best first: the URL it proved, then the static one.

        Every client of a member (replication, cosignatures, notify, fetch) picks its URL
        here, so an unproven address is never used.
        """
        urls = [self._learned.get(member.origin, ""), member.url]
        return list(dict.fromkeys(u for u in urls if u))
