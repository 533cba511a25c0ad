"""One background loop of the daemon: a step run every ``interval`` seconds until stopped.

A step that raises is logged and tried again at the next interval, so that one bad round
(a peer down, a disk briefly unreadable) never ends the loop for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)


class BackgroundService(Protocol):
    """Something `imageshare run` keeps running beside the HTTP server (DIMSE, replication...)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class PeriodicTask:
    """Runs ``step`` now and then every ``interval`` seconds, between start and stop."""

    def __init__(self, name: str, step: Callable[[], Awaitable[None]], interval: float) -> None:
        self.name = name
        self.step = step
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:
                log.exception(
                    "%s: this round failed; trying again in %s s", self.name, self.interval
                )
            await asyncio.sleep(self.interval)
