"""The node's ledger service: durable appends to its own log and its signed checkpoints.

Built by ``runtime.services.ledger``. This is where the clock is read for entry
times and checkpoint publication; the store and the core never read it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from node.store.ledger import AppendResult, LedgerStore, OwnLog

if TYPE_CHECKING:
    from node.services.runtime import NodeRuntime


class LedgerService:
    """Appends to this node's own log and publishes its checkpoints."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.identity = runtime.identity
        self.store = LedgerStore(runtime.config.data_dir)
        self.own: OwnLog = self.store.own_log(self.identity.origin, self.identity.vkey)
        self.own.group_commit_wait = runtime.config.ledger.group_commit_ms / 1000

    def append(self, kind: str, fields: dict[str, Any]) -> AppendResult:
        """Append an entry stamped with the current time; returns once it is durable.

        Blocking. Raises BadInput if the entry is not well-formed for its kind.
        """
        return self.own.append(kind, fields, int(time.time()))

    async def append_async(self, kind: str, fields: dict[str, Any]) -> AppendResult:
        """``append`` from a coroutine: runs in a worker thread, returns once durable."""
        return await asyncio.to_thread(self.append, kind, fields)

    def checkpoint_note(self) -> str:
        """The latest signed checkpoint note, freshly signed if the log grew since the last."""
        return self.own.publish_checkpoint(self.identity, int(time.time()))

    def close(self) -> None:
        self.store.close()


