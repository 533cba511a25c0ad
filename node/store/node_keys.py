"""The node's signing key on disk, across rotations: current, next, and retired keys.

    node.key              the key in force (mode 0600)
    node.key.next         a new key between its creation and the end of its rotation
    retired-keys/KEYID.key  every key rotated away from, kept (0600, in a 0700 directory)
                          so an operator can still prove what it signed; never used to
                          sign again

A rotation (``imageshare key rotate``) writes ``node.key.next`` durably, appends the
``key_rotation`` entry to the log, then moves ``node.key`` into ``retired-keys/`` and
``node.key.next`` into its place. The log's entry is the point of no return: a crash
before it leaves the old key in force (the unused next key is discarded by the next
attempt), a crash after it is finished by whoever next loads the key (``load_identity``),
because the log, not the files, says which key is in force.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from node.core.keys import NodeIdentity
from node.errors import ConfigError
from node.store.instances import fsync_path
from node.store.secrets import read_seed, write_seed

NEXT_KEY_FILE = "node.key.next"
RETIRED_DIR = "retired-keys"
_LOCK_FILE = "node.key.lock"


@contextlib.contextmanager
def _key_lock(key_path: Path) -> Iterator[None]:
    """Held while key files move, so the CLI and a running daemon never interleave."""
    fd = os.open(key_path.parent / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create_next_key(key_path: Path, origin: str) -> NodeIdentity:
    """A fresh key, durably written as ``node.key.next`` (an unused earlier one is replaced)."""
    next_path = key_path.parent / NEXT_KEY_FILE
    with _key_lock(key_path):
        next_path.unlink(missing_ok=True)
        identity = NodeIdentity.generate(origin)
        write_seed(next_path, identity.seed)
        fsync_path(key_path.parent)
    return identity


def retired_keys(key_path: Path, origin: str) -> list[NodeIdentity]:
    """The keys this node rotated away from, as kept in ``retired-keys/``."""
    retired = key_path.parent / RETIRED_DIR
    if not retired.is_dir():
        return []
    return [NodeIdentity(origin, read_seed(p)) for p in sorted(retired.glob("*.key"))]


def _install_next(key_path: Path, origin: str, public_key: bytes) -> NodeIdentity:
    """Retire ``node.key`` and put ``node.key.next`` (which must hold ``public_key``) in place."""
    next_path = key_path.parent / NEXT_KEY_FILE
    try:
        new = NodeIdentity(origin, read_seed(next_path))
    except ConfigError as exc:
        raise ConfigError(
            "the ledger names a new node key that is not in the data directory "
            f"({NEXT_KEY_FILE}: {exc})"
        ) from exc
    if new.public_key != public_key:
        raise ConfigError(f"{NEXT_KEY_FILE} does not hold the key the ledger rotated to")
    retired = key_path.parent / RETIRED_DIR
    retired.mkdir(mode=0o700, exist_ok=True)
    old = NodeIdentity(origin, read_seed(key_path))
    os.replace(key_path, retired / f"{old.key_id.hex()}-{old.public_key.hex()[:16]}.key")
    os.replace(next_path, key_path)
    fsync_path(retired)
    fsync_path(key_path.parent)
    return new


def load_identity(key_path: Path, origin: str, key_in_force: bytes | None) -> NodeIdentity:
    """The node's identity holding ``key_in_force`` (the log's current key; None: any).

    Finishes a rotation the log records but the key files do not yet show. Raises
    ConfigError if the key in force is in neither file.
    """
    current = NodeIdentity(origin, read_seed(key_path))
    if key_in_force is None or current.public_key == key_in_force:
        return current
    with _key_lock(key_path):
        current = NodeIdentity(origin, read_seed(key_path))  # another process may have moved it
        if current.public_key == key_in_force:
            return current
        return _install_next(key_path, origin, key_in_force)


def finish_rotation(key_path: Path, origin: str, new_key: bytes) -> NodeIdentity:
    """After the log recorded the rotation to ``new_key``: make it the node's key."""
    return load_identity(key_path, origin, new_key)
