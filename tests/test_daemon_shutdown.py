"""Shutting down `imageshare run`: the stores close only after every off-loop call is done.

A cancelled task that awaited ``asyncio.to_thread`` leaves its thread running; a SQLite
connection closed under a thread inside a statement crashes the process (a stop on a bad
configuration did so, with nothing on stderr).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from node.edges.daemon import serve
from node.services.runtime import open_runtime
from tests.support.nodes import init_node

# How long the off-loop call waits to be told the stores closed; they must not close.
CLOSE_WAIT_SECONDS = 1.0


def test_stores_close_only_after_a_running_off_loop_ledger_call_returns(tmp_path: Path) -> None:
    made = init_node(tmp_path, "shutdown.example/imageshare")
    runtime = open_runtime(made.config)
    closed = threading.Event()
    close = runtime.close

    def close_and_tell() -> None:
        closed.set()
        close()

    runtime.close = close_and_tell  # type: ignore[method-assign]
    stop = asyncio.Event()
    stopping = threading.Event()
    seen: dict[str, object] = {}

    def ledger_call_still_running_at_shutdown() -> None:
        stopping.wait(10)
        seen["closed_before_call"] = closed.wait(CLOSE_WAIT_SECONDS)
        seen["note"] = runtime.services.ledger.checkpoint_note()

    async def main() -> None:
        async def on_ready() -> None:
            # Started, then abandoned: its thread runs on while the node stops.
            call = asyncio.ensure_future(asyncio.to_thread(ledger_call_still_running_at_shutdown))
            await asyncio.sleep(0)
            call.cancel()
            stopping.set()
            stop.set()

        await serve(runtime, stop, on_ready)
        # The caller's loop keeps a usable default pool after serve returns.
        assert await asyncio.to_thread(lambda: 7) == 7

    asyncio.run(main())
    assert seen["closed_before_call"] is False
    assert str(seen["note"]).startswith("shutdown.example/imageshare\n")
    assert closed.is_set()
