"""The federation's signed roster: its log, signed by the operator, taken in by nodes.

Two sides:

- The federation operator (`imageshare roster sign`) keeps the roster log: a ledger log
  (node.store.ledger, its own directory) whose origin is the federation's name, whose
  entries are ``roster`` versions (and a ``key_rotation`` where the federation key
  changes), and whose checkpoints the federation key in force signs. Every version ever
  published is in it, so a node cannot be shown a private one without the log showing
  two histories.
- A node with ``[federation] key`` keeps a verified mirror of that log in
  ``DATA_DIR/federation-roster/`` and takes its members from the newest version
  (``roster fetch``); it serves the mirror read-only (node.edges.http.roster_api), so
  wallets and auditors get the chain from any member. ``roster.note`` in the data
  directory is the newest verified version, which the live roster reloads when it changes.

A roster log travels as a *bundle* (a file) or over HTTP: the log's signed checkpoint and
its entries. Whatever the source, ``accept_roster_log`` checks everything before storing:
the entries chain, the roster versions chain from the pinned federation key, the
checkpoint is signed by the key the newest version names, and the log extends the one held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from node.config import NodeConfig
from node.core.encoding import canonical_decode, canonical_encode
from node.core.entries import EntryBody, KeyRotation, RosterVersion, decode_entry
from node.core.key_rotation import sign_rotation
from node.core.keys import NodeIdentity, parse_verifier_key
from node.core.notes import Checkpoint, parse_note, verify_note
from node.core.origins import log_id
from node.core.roster_document import (
    RosterDocument,
    RosterMember,
    check_successor,
    make_roster_member,
    open_roster,
    parse_roster_body,
    sign_roster,
    verify_roster_chain,
)
from node.errors import BadInput, ConfigError, Conflict, ImageShareError, PeerUnreachable
from node.services.peer_client import CONNECTION_ERRORS, describe, open_session, read_bounded
from node.services.periodic import PeriodicTask
from node.store.federation_state import replace_file
from node.store.ledger import LedgerStore, StoredLog
from node.store.secrets import read_seed, write_seed

log = logging.getLogger(__name__)

ROSTER_DIR = "federation-roster"
CURRENT_FILE = "roster.note"
MAX_BUNDLE_BYTES = 16 * 1024 * 1024
MAX_VERSIONS = 4096
ENTRY_PAGE = 1000
MAX_CHECKPOINT_BYTES = 64 * 1024
DAY = 86400


def federated(config: NodeConfig) -> bool:
    """True if the node takes its members from a signed roster (``[federation] key``)."""
    return bool(config.federation.key)


# ---- reading a roster log ------------------------------------------------------------------


def roster_notes(entries: list[bytes]) -> list[bytes]:
    """The roster notes among a roster log's entries, in order; BadInput for another kind."""
    notes = []
    for index, raw in enumerate(entries):
        entry = decode_entry(raw)
        if isinstance(entry.body, RosterVersion):
            notes.append(entry.body.note)
        elif not isinstance(entry.body, KeyRotation):
            raise BadInput(f"roster log entry {index} is a {entry.kind} entry")
    return notes


def _all_entries(log: StoredLog) -> list[bytes]:
    return log.entries(0, log.size())


def check_roster_log_bytes(entries: list[bytes]) -> None:
    """BadInput once a roster log read so far is larger than a bundle may be."""
    if sum(len(e) for e in entries if isinstance(e, bytes)) > MAX_BUNDLE_BYTES:
        raise BadInput(f"a roster log is at most {MAX_BUNDLE_BYTES} bytes")


def encode_bundle(checkpoint: str, entries: list[bytes]) -> bytes:
    """A roster log as one file: msgpack ``{"checkpoint": note, "entries": [bytes]}``."""
    return canonical_encode({"checkpoint": checkpoint, "entries": entries})


def decode_bundle(data: bytes) -> tuple[str, list[bytes]]:
    """The checkpoint and entries of a bundle; BadInput if it is not one, or too large."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BadInput(f"a roster bundle is at most {MAX_BUNDLE_BYTES} bytes")
    value = canonical_decode(data)
    if not isinstance(value, dict) or set(value) != {"checkpoint", "entries"}:
        raise BadInput("a roster bundle is a map of checkpoint and entries")
    checkpoint, entries = value["checkpoint"], value["entries"]
    if not isinstance(checkpoint, str) or not isinstance(entries, list):
        raise BadInput("a roster bundle's checkpoint is text and its entries a list")
    if len(entries) > 2 * MAX_VERSIONS or not all(isinstance(e, bytes) for e in entries):
        raise BadInput("a roster bundle's entries are at most 8192 byte strings")
    return checkpoint, entries


# ---- the operator's side -------------------------------------------------------------------


def load_federation_key(path: Path, federation: str) -> NodeIdentity:
    """The federation key (a 0600 seed file) under the federation's name."""
    try:
        return NodeIdentity(federation, read_seed(path))
    except FileNotFoundError as exc:
        raise ConfigError(f"no federation key file at {path}") from exc


def create_federation_key(path: Path, federation: str) -> NodeIdentity:
    """A new federation key in a new 0600 file; Conflict if the file exists."""
    if path.exists():
        raise Conflict(f"{path} exists; refusing to replace a federation key")
    identity = NodeIdentity.generate(federation)
    write_seed(path, identity.seed)
    return identity


def read_member_list(path: Path) -> tuple[list[RosterMember], int]:
    """Members and threshold from the operator's TOML (``threshold = k``, ``[[members]]``
    with origin, vkey, url, roles); raises ConfigError naming what is wrong."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"the member list {path.name} cannot be read: {exc}") from exc
    threshold = raw.get("threshold", 0)
    if not isinstance(threshold, int) or isinstance(threshold, bool):
        raise ConfigError("the member list's threshold must be an integer")
    members = []
    for entry in raw.get("members", []):
        if not isinstance(entry, dict) or set(entry) - {"origin", "vkey", "url", "roles"}:
            raise ConfigError("each [[members]] has only origin, vkey, url and roles")
        try:
            roles = entry.get("roles", [])
            if not isinstance(roles, list):
                raise BadInput("roles must be a list of names")
            members.append(
                make_roster_member(
                    str(entry["origin"]),
                    str(entry["vkey"]),
                    map(str, roles),
                    str(entry.get("url", "")),
                )
            )
        except (KeyError, ImageShareError) as exc:
            raise ConfigError(f"the member list has a bad member: {exc}") from exc
    return sorted(members, key=lambda m: m.origin), threshold


@dataclass(frozen=True)
class SignedVersion:
    """What `roster sign` did: the version appended and the log's new bundle."""

    document: RosterDocument
    note: str
    bundle: bytes


def sign_next_version(
    log_dir: Path,
    key: NodeIdentity,
    members: list[RosterMember],
    threshold: int,
    now: int,
    valid_days: int,
    previous_key: NodeIdentity | None = None,
    member_keys: tuple[NodeIdentity, ...] = (),
) -> SignedVersion:
    """Append the next roster version, signed by ``key`` (the federation key it names), to
    the roster log in ``log_dir`` and sign the log's new checkpoint with it.

    A version after the first must chain (node.core.roster_document): ``key`` is the
    previous version's key, or ``previous_key`` is (a routine key change), or
    ``member_keys`` make up the previous version's threshold (the old key is lost). The
    roster log's own key moves with a key_rotation entry. Raises BadInput/Unauthorized if
    the version would not chain; nothing is written then.
    """
    log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = LedgerStore(log_dir)
    try:
        log = store.own_log(key.origin, key.vkey if not _has_entries(store, key.origin) else "")
        notes = roster_notes(_all_entries(log))
        previous = open_roster(notes[-1])[0] if notes else None
        document = RosterDocument(
            federation=key.origin,
            version=previous.version + 1 if previous else 1,
            not_before=now,
            not_after=now + valid_days * DAY,
            key=key.vkey,
            threshold=threshold,
            members=tuple(members),
        )
        extra = [k for k in (previous_key, *member_keys) if k is not None]
        note = sign_roster(document, [key, *extra])
        bodies: list[EntryBody] = []
        if previous is not None:
            check_successor(previous, note)
            old_public = parse_verifier_key(previous.key).public_key
            if old_public != key.public_key:
                routine = previous_key is not None and previous_key.public_key == old_public
                bodies.append(sign_rotation(previous_key if routine else None, key, old_public))
        bodies.append(RosterVersion(note.encode()))
        log.append_many([(body, now) for body in bodies])
        checkpoint = log.publish_checkpoint(key, now)
        return SignedVersion(document, note, encode_bundle(checkpoint, _all_entries(log)))
    finally:
        store.close()


def _has_entries(store: LedgerStore, origin: str) -> bool:
    return any(info.origin == origin and info.size > 0 for info in store.logs())


# ---- a node's side ---------------------------------------------------------------------------


def parse_desk_pin(url: str) -> tuple[str, str, str | None]:
    """The custodian's base URL, log vkey and federation vkey (or None) in a desk code."""
    address, _, fragment = url.partition("#")
    base, found, _ = address.rpartition("/wallet/")
    pins = urllib.parse.parse_qs(fragment)
    custodian = pins.get("custodian", [""])[0]
    if not found or not base.startswith(("http://", "https://")) or not custodian:
        raise BadInput("a desk code is <node>/wallet/#custodian=<vkey>[&federation=<vkey>]")
    federation = pins.get("federation", [None])[0]
    parse_verifier_key(custodian)
    if federation is not None:
        parse_verifier_key(federation)
    return base, custodian, federation


def desk_pin_url(config: NodeConfig, custodian_vkey: str) -> str:
    """What the enrollment desk's code opens: the web wallet, told this node's log key and
    the federation key to pin (docs/wallet-web.md § Pinning)."""
    pins = {"custodian": custodian_vkey}
    if federated(config):
        pins["federation"] = config.federation.key
    return f"{config.public_url}/wallet/#{urllib.parse.urlencode(pins)}"


def _roster_store(config: NodeConfig) -> LedgerStore:
    directory = config.data_dir / ROSTER_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    return LedgerStore(directory)


def current_path(config: NodeConfig) -> Path:
    return config.data_dir / CURRENT_FILE


def current_roster(config: NodeConfig) -> RosterDocument | None:
    """The newest verified roster version this node holds, or None before the first fetch."""
    try:
        text = current_path(config).read_text()
    except FileNotFoundError:
        return None
    body, _ = parse_note(text)
    return parse_roster_body(body)


def held_roster_log(config: NodeConfig) -> tuple[str | None, list[bytes]]:
    """The roster log this node holds: its checkpoint note and entries (None, [] if none)."""
    document = current_roster(config)
    if document is None:
        return None, []
    store = _roster_store(config)
    try:
        log = store.log_by_id(log_id(document.federation))
        if log is None:
            return None, []
        return log.checkpoint_note(), _all_entries(log)
    finally:
        store.close()


def verify_roster_log(
    pinned_key: str, checkpoint: str, entries: list[bytes]
) -> list[RosterDocument]:
    """The roster versions a whole roster log proves from ``pinned_key`` (pure checks).

    Raises BadInput/Unauthorized unless the versions chain from the pinned key and the
    checkpoint is signed by the key the newest version names, over exactly these entries.
    """
    if len(entries) > 2 * MAX_VERSIONS:
        raise BadInput("a roster log holds at most 8192 entries")
    documents = verify_roster_chain(roster_notes(entries), pinned_key)
    newest = documents[-1]
    signed = verify_note(checkpoint, newest.key)
    if signed.size != len(entries):
        raise BadInput(
            f"the roster checkpoint is of size {signed.size}, not the {len(entries)} entries given"
        )
    return documents


def accept_roster_log(config: NodeConfig, checkpoint: str, entries: list[bytes]) -> RosterDocument:
    """Verify a roster log (all of it) and keep it; returns the newest version.

    Refuses (BadInput/Unauthorized/Conflict, nothing stored) a log that does not chain
    from ``[federation] key``, whose checkpoint the newest version's key did not sign, or
    that does not extend the roster log held (a different history: the roster forked).
    """
    if not federated(config):
        raise ConfigError("[federation] key is not set: this node runs without a federation")
    documents = verify_roster_log(config.federation.key, checkpoint, entries)
    newest = documents[-1]
    first = parse_roster_body(parse_note(roster_notes(entries)[0])[0])
    store = _roster_store(config)
    try:
        mirror = store.mirror(newest.federation, first.key)
        held = mirror.size()
        if held > len(entries):
            raise Conflict(
                f"this node holds {held} roster log entries; the log offered has {len(entries)}"
            )
        mirror.extend(entries[held:], checkpoint, newest.key)
    finally:
        store.close()
    newest_note = roster_notes(entries)[-1]
    with contextlib.suppress(FileNotFoundError):
        if current_path(config).read_bytes() == newest_note:
            return newest  # nothing new: the live roster need not reload
    replace_file(current_path(config), newest_note)
    return newest


async def fetch_roster_log(url: str, timeout: float, ca_file: str) -> tuple[str, list[bytes]]:
    """The roster log a member at ``url`` serves (unverified); PeerUnreachable, BadInput."""
    base = url.rstrip("/") + "/federation/roster/log"
    session_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with open_session(ca_file, session_timeout) as session:
            async with session.get(base + "/checkpoint") as response:
                if response.status != 200:
                    raise PeerUnreachable(f"{url} serves no roster log ({response.status})")
                checkpoint = (await read_bounded(response, MAX_CHECKPOINT_BYTES)).decode()
            size = _checkpoint_size(checkpoint)
            entries: list[bytes] = []
            while len(entries) < size:
                query = {"start": str(len(entries)), "end": str(size)}
                async with session.get(base + "/entries", params=query) as response:
                    if response.status != 200:
                        raise PeerUnreachable(f"{url} roster entries answered {response.status}")
                    page = canonical_decode(await read_bounded(response, MAX_BUNDLE_BYTES))
                if not isinstance(page, list) or not page or len(page) > ENTRY_PAGE:
                    raise BadInput(f"{url} served a malformed page of roster entries")
                entries += page
                check_roster_log_bytes(entries)
            return checkpoint, entries[:size]
    except CONNECTION_ERRORS as exc:
        raise PeerUnreachable(f"cannot reach {url}: {describe(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise BadInput(f"{url} served a roster checkpoint that is not text") from exc


def _checkpoint_size(checkpoint: str) -> int:
    body, _ = parse_note(checkpoint)
    size = Checkpoint.parse(body).size
    if size > 2 * MAX_VERSIONS:
        raise BadInput("a roster log holds at most 8192 entries")
    return size


def fetch_roster(
    config: NodeConfig, source: str | None = None, ca_file: str = ""
) -> RosterDocument:
    """Fetch the roster log from ``source`` (a URL, or a bundle file), else from
    ``[federation] roster_url`` / ``roster_file``, and accept it (accept_roster_log)."""
    source = source or config.federation.roster_url or config.federation.roster_file
    if not source:
        raise ConfigError("give a roster URL or file, or set [federation] roster_url")
    if source.startswith(("http://", "https://")):
        checkpoint, entries = asyncio.run(
            fetch_roster_log(
                source, config.federation.request_timeout, ca_file or config.http.trusted_ca_file
            )
        )
    else:
        path = Path(source)
        try:
            with path.open("rb") as file:
                data = file.read(MAX_BUNDLE_BYTES + 1)
        except OSError as exc:
            raise BadInput(f"cannot read the roster bundle {path}: {exc.strerror}") from exc
        checkpoint, entries = decode_bundle(data)
    return accept_roster_log(config, checkpoint, [bytes(e) for e in entries])


def check_held_roster(config: NodeConfig, now: int | None = None) -> RosterDocument:
    """Re-verify the roster log held from the pinned key; raises if it fails or the newest
    version is outside its validity period."""
    checkpoint, entries = held_roster_log(config)
    if checkpoint is None:
        raise BadInput("this node holds no roster yet: run `imageshare roster fetch`")
    newest = verify_roster_log(config.federation.key, checkpoint, entries)[-1]
    moment = int(time.time()) if now is None else now
    if not newest.is_current(moment):
        raise BadInput(
            f"roster version {newest.version} is valid from {newest.not_before} to "
            f"{newest.not_after}, not now"
        )
    return newest


def roster_file_stamp(config: NodeConfig) -> tuple[int, int] | None:
    """What changes when a new roster version is accepted (for the live roster's reload)."""
    try:
        stat = os.stat(current_path(config))
    except FileNotFoundError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


class HeldRosterLog:
    """The running node's read-only view of the roster log it holds (for its routes).

    The store stays open; `roster fetch` (another process) extends it, and every read
    goes to SQLite, so the view follows without a restart.
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._store: LedgerStore | None = None

    def log(self) -> StoredLog | None:
        """The roster log held, or None (no federation, or nothing fetched yet)."""
        document = current_roster(self.config) if federated(self.config) else None
        if document is None:
            return None
        if self._store is None:
            self._store = _roster_store(self.config)
        return self._store.log_by_id(log_id(document.federation))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


class RosterRefresher:
    """The daemon's background fetch of the roster log from ``[federation] roster_url``,
    every ``roster_refresh`` seconds; a failure is logged and tried again next time."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._loop = PeriodicTask("roster", self.refresh, config.federation.roster_refresh)

    async def start(self) -> None:
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def refresh(self) -> None:
        """Fetch the roster log once; a failure is logged, and the next round tries again."""
        try:
            newest = await asyncio.to_thread(fetch_roster, self.config)
            log.debug("roster version %d of %s held", newest.version, newest.federation)
        except ImageShareError as exc:
            log.warning("roster fetch from %s failed: %s", self.config.federation.roster_url, exc)


def roster_refresher(config: NodeConfig) -> RosterRefresher | None:
    """The daemon's factory: a RosterRefresher in a federation with a roster_url."""
    if not federated(config) or not config.federation.roster_url:
        return None
    return RosterRefresher(config)
