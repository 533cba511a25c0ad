"""kill -9 during a burst of concurrent appends loses no acknowledged entry, on the
ledger the node's node.toml names (SQLite, or PostgreSQL in the scale-out run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from node.config import load_config
from node.core.entries import Grant
from node.core.keys import NodeIdentity
from node.store.backends import open_ledger_store
from node.store.secrets import read_seed
from tests.support.nodes import NodeProcess

# Appends from many threads and prints each acknowledged (index, leaf hash), flushed,
# only after append() returned: whatever is printed was acknowledged as durable.
APPENDER = """
import sys, threading
from pathlib import Path
from node.config import load_config
from node.core.entries import Grant
from node.store.backends import open_ledger_store

own = open_ledger_store(load_config(Path(sys.argv[1]))).own_log(sys.argv[2])
out = threading.Lock()

def work(thread):
    i = 0
    while True:
        result = own.append(Grant(token=f"{thread}-{i}".encode()), 1700000000)
        with out:
            sys.stdout.write(f"{result.index} {result.leaf_hash.hex()}\\n")
            sys.stdout.flush()
        i += 1

for t in range(12):
    threading.Thread(target=work, args=(t,), daemon=True).start()
threading.Event().wait()
"""


def burst_then_kill(node: NodeProcess, acknowledged_before_kill: int) -> dict[int, str]:
    child = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(node.config), node.origin],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stdout is not None
    acknowledged: dict[int, str] = {}
    deadline = time.monotonic() + 60
    try:
        while len(acknowledged) < acknowledged_before_kill:
            line = child.stdout.readline()
            assert line, "the appender died before being killed"
            index, leaf = line.split()
            acknowledged[int(index)] = leaf
            assert time.monotonic() < deadline, "appends are far too slow"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    # Lines already written to the pipe before the kill were acknowledged too.
    for line in child.stdout.read().splitlines():
        index, leaf = line.split()
        acknowledged[int(index)] = leaf
    assert child.returncode == -signal.SIGKILL
    return acknowledged


class TestKillDuringAppends:
    def test_no_acknowledged_entry_is_lost_and_the_log_verifies(
        self, node_factory: Callable[..., NodeProcess]
    ) -> None:
        node = node_factory()
        identity = NodeIdentity(node.origin, read_seed(node.data_dir / "node.key"))
        for round_ in range(2):  # the second burst resumes on the log the first one left
            acknowledged = burst_then_kill(node, 600)
            store = open_ledger_store(load_config(node.config))
            try:
                own = store.own_log(identity.origin, identity.vkey)
                size = own.size()
                assert max(acknowledged) < size
                assert len(acknowledged) == len(set(acknowledged))
                for index, leaf in acknowledged.items():
                    assert own.leaf_hash(index).hex() == leaf, (round_, index)
                own.publish_checkpoint(identity, 1_700_000_100)
                # Appending resumes after a crash, from the last durable entry.
                assert own.append(Grant(token=b"after"), 1).index == size
            finally:
                store.close()
            result = node.cli("ledger", "verify", "--json")
            assert '"ok": true' in result.stdout
