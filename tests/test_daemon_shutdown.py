"""Shutting down `imageshare run`: the stores close only after every off-loop call is done.

A cancelled task that awaited ``asyncio.to_thread`` leaves its thread running; a SQLite
connection closed under a thread inside a statement crashes the process (a stop on a bad
configuration did so, with nothing on stderr).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.edges.daemon import serve
from node.samples import make_ct_study
from node.services.runtime import open_runtime
from tests.support.nodes import init_node

# How long the off-loop call waits to be told the stores closed; they must not close.
CLOSE_WAIT_SECONDS = 1.0


def told_when_closed(owner: Any) -> threading.Event:
    """An event set as ``owner.close()`` is called, just before it closes."""
    closed = threading.Event()
    close = owner.close

    def close_and_tell() -> None:
        closed.set()
        close()

    owner.close = close_and_tell
    return closed


def test_stores_close_only_after_a_running_off_loop_ledger_call_returns(tmp_path: Path) -> None:
    made = init_node(tmp_path, "shutdown.example/imageshare")
    runtime = open_runtime(made.config)
    closed = told_when_closed(runtime)
    stop = asyncio.Event()
    started, stopping = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def ledger_call_still_running_at_shutdown() -> None:
        started.set()
        stopping.wait(10)
        seen["closed_before_call"] = closed.wait(CLOSE_WAIT_SECONDS)
        seen["note"] = runtime.services.ledger.checkpoint_note()

    async def main() -> None:
        async def on_ready() -> None:
            # Started, then abandoned: its thread runs on while the node stops.
            call = asyncio.ensure_future(asyncio.to_thread(ledger_call_still_running_at_shutdown))
            deadline = time.monotonic() + 10
            while not started.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
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


def test_a_manifest_build_still_running_ends_before_the_stores_close(tmp_path: Path) -> None:
    made = init_node(tmp_path, "manifest.example/imageshare")
    runtime = open_runtime(made.config)
    transfer = runtime.services.transfer
    closed = told_when_closed(runtime.store)
    started = threading.Event()

    def build_still_running_at_close() -> bool:
        started.set()
        closed_first = closed.wait(CLOSE_WAIT_SECONDS)
        runtime.store.counts()
        return closed_first

    running = transfer._manifests.submit(build_still_running_at_close)
    started.wait(10)
    runtime.close()
    assert running.result(timeout=10) is False
    assert closed.is_set()


def test_stores_close_only_after_a_c_store_being_handled_is_stored(tmp_path: Path) -> None:
    made = init_node(tmp_path, "dimse-stop.example/imageshare")
    study = make_ct_study(tmp_path / "study", series=1, slices=1)
    runtime = open_runtime(made.config)
    closed, started = told_when_closed(runtime), threading.Event()
    commit = runtime.store.commit
    seen: dict[str, object] = {}

    def commit_still_running_at_shutdown(*args: Any, **kwargs: Any) -> Any:
        started.set()
        seen["closed_before_commit"] = closed.wait(CLOSE_WAIT_SECONDS)
        return commit(*args, **kwargs)

    runtime.store.commit = commit_still_running_at_shutdown  # type: ignore[method-assign]

    def send_the_instance() -> None:
        ae = AE(ae_title="SHUTDOWN")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", made.dimse_port, ae_title="IMAGESHARE")
        assert assoc.is_established
        assoc.send_c_store(pydicom.dcmread(study.files[0]))
        assoc.release()

    async def main() -> None:
        async def on_ready() -> None:
            sender = threading.Thread(target=send_the_instance, daemon=True)
            sender.start()
            deadline = time.monotonic() + 10
            while not started.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            stop.set()

        stop = asyncio.Event()
        await serve(runtime, stop, on_ready)

    asyncio.run(main())
    assert started.is_set() and closed.is_set()
    assert seen["closed_before_commit"] is False
    reopened = open_runtime(made.config)
    try:
        assert reopened.store.counts()["instances"] == 1
    finally:
        reopened.close()
