"""The node's ledger service: durable appends to its own log and its signed checkpoints.

Built by ``runtime.services.ledger``. This is where the clock is read for entry
times and checkpoint publication; the store and the core never read it.

The key that signs is the one the log says is in force: after ``imageshare key rotate``
appended a key rotation entry (from another process, while this one runs), the next
checkpoint finds the rotation and the service switches the node's identity to the new
key, without a restart (``follow_key_rotation``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from node.core.entries import EntryBody
from node.core.keys import NodeIdentity
from node.store.backends import open_ledger_store
from node.store.ledger import AppendResult, KeyRotated, OwnLog
from node.store.node_keys import load_identity

if TYPE_CHECKING:
    from node.services.runtime import NodeRuntime

log = logging.getLogger(__name__)


class LedgerService:
    """Appends to this node's own log and publishes its checkpoints."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.store = open_ledger_store(runtime.config)
        self.own: OwnLog = self.store.own_log(runtime.identity.origin, runtime.identity.vkey)
        self.own.group_commit_wait = runtime.config.ledger.group_commit_ms / 1000
        self._identity_lock = threading.Lock()
        self.follow_key_rotation()

    @property
    def identity(self) -> NodeIdentity:
        return self.runtime.identity

    def follow_key_rotation(self) -> bool:
        """Make the node's identity the key the log has in force; True if it changed.

        Raises ConfigError if the log rotated to a key the data directory does not hold.
        """
        with self._identity_lock:
            chain = self.own.key_chain()
            if chain is None or chain.current_key == self.runtime.identity.public_key:
                return False
            config = self.runtime.config
            identity = load_identity(config.key_path, config.origin, chain.current_key)
            self.runtime.identity = identity
            log.warning("node key rotated: now signing as %s", identity.vkey)
            return True

    def append(self, body: EntryBody) -> AppendResult:
        """Append an entry holding ``body``, stamped with the current time; returns once
        it is durable.

        Blocking. Raises BadInput if the entry is not well-formed for its kind.
        """
        return self.own.append(body, int(time.time()))

    def append_many(self, bodies: Sequence[EntryBody]) -> list[AppendResult]:
        """Append entries holding ``bodies`` in order, in one commit, all or none."""
        if not bodies:
            return []  # no transaction (and no fsync) for nothing to write
        now = int(time.time())
        return self.own.append_many([(body, now) for body in bodies])

    async def append_async(self, body: EntryBody) -> AppendResult:
        """``append`` from a coroutine: runs in a worker thread, returns once durable."""
        return await asyncio.to_thread(self.append, body)

    def checkpoint_note(self) -> str:
        """The latest signed checkpoint note, freshly signed if the log grew since the last."""
        try:
            return self.own.publish_checkpoint(self.identity, int(time.time()))
        except KeyRotated:
            self.follow_key_rotation()
            return self.own.publish_checkpoint(self.identity, int(time.time()))

    def close(self) -> None:
        self.store.close()
