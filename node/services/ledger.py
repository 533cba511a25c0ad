"""The node's ledger service: durable appends to its own log and its signed checkpoints.

Built by ``runtime.services.ledger``. This is where the clock is read for entry
times and checkpoint publication; the store and the core never read it.

The key that signs is the one the log says is in force: after ``imageshare key rotate``
appended a key rotation entry (from another process, while this one runs), the next
checkpoint finds the rotation and the service switches the node's identity to the new
key, without a restart (``follow_key_rotation``).

Several daemons of one node (on PostgreSQL) append to its one log; one of them at a time,
the log writer (``node.store.ledger.WriterLock``), runs replication (with witness
collection) and forwarding (``WriterOnly``). The others try to take the lock every
second, so that when the writer dies another takes over within seconds. With the
embedded ledger the one daemon is always the writer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from node.core.entries import EntryBody
from node.core.keys import NodeIdentity
from node.services.periodic import BackgroundService, PeriodicTask
from node.store.backends import open_ledger_store
from node.store.ledger import AppendResult, IntegrityReport, KeyRotated, OwnLog
from node.store.node_keys import load_identity
from node.store.secrets import read_seed

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.services.runtime import NodeRuntime

log = logging.getLogger(__name__)


class LedgerService:
    """Appends to this node's own log and publishes its checkpoints."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.store = open_ledger_store(runtime.config)
        self.own: OwnLog = self.store.own_log(runtime.identity.origin, runtime.identity.vkey)
        self.own.group_commit_wait = runtime.config.ledger.group_commit_ms / 1000
        self.writer_lock = self.store.log_writer_lock()
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

    def is_writer(self) -> bool:
        """True if this daemon is the node's log writer (taking the lock if it is free)."""
        return self.writer_lock.try_take()

    def checkpoint_note(self) -> str:
        """The latest signed checkpoint note, freshly signed if the log grew since the last.

        Any daemon of the node signs one when asked (a patient's receipt needs a checkpoint
        that covers its entry), and never a second, different one of a size: signing takes
        the ledger's writers' lock and reuses the checkpoint stored at the current size.
        """
        try:
            return self.own.publish_checkpoint(self.identity, int(time.time()))
        except KeyRotated:
            self.follow_key_rotation()
            return self.own.publish_checkpoint(self.identity, int(time.time()))

    def close(self) -> None:
        self.writer_lock.release()
        self.store.close()


WRITER_CHECK_INTERVAL = 1.0  # seconds between tries to take the log writer lock


class WriterOnly:
    """A background service (replication, forwarding) run only while this daemon is the
    node's log writer: started when it takes the lock, stopped if it loses it."""

    def __init__(
        self,
        is_writer: Callable[[], bool],  # LedgerService.is_writer: blocking, may take the lock
        service: BackgroundService,
        interval: float = WRITER_CHECK_INTERVAL,
    ) -> None:
        self.is_writer = is_writer
        self.service = service
        self.interval = interval
        self.running = False
        self._watch = PeriodicTask("log-writer", self._follow_the_lock, interval)

    async def start(self) -> None:
        await self._follow_the_lock()  # the sole daemon of a node starts it right away
        await self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()
        if self.running:
            self.running = False
            await self.service.stop()

    async def _follow_the_lock(self) -> None:
        held = await asyncio.to_thread(self.is_writer)
        if held and not self.running:
            await self.service.start()
            self.running = True
        elif not held and self.running:
            log.warning("no longer the node's log writer: stopping %r", self.service)
            self.running = False
            await self.service.stop()


def verify_own_log(config: NodeConfig) -> IntegrityReport:
    """This node's own log checked end to end (`imageshare ledger verify`), offline."""
    identity = NodeIdentity(config.origin, read_seed(config.key_path))
    store = open_ledger_store(config)
    try:
        return store.own_log(identity.origin, identity.vkey).verify(identity.vkey)
    finally:
        store.close()
