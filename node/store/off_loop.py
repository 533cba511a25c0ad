"""Blocking store calls from asyncio: the one way a coroutine runs one.

Every store method blocks (disk, SQLite). A coroutine runs it in a worker thread, so the
event loop keeps serving; the stores keep a read connection per thread (WAL lets those
reads run beside the writer and beside each other) or serialise behind their own lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def run_off_loop(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run the blocking ``call`` in a worker thread and return its result.

    Cancelling the caller does not stop a call that has started: it runs to its end (so a
    store call is never cut halfway), and its result is dropped.
    """
    return await asyncio.to_thread(call, *args, **kwargs)
