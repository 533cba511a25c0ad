"""A process that works on a PostgreSQL ledger, as one daemon of a node would, for the
tests of several daemons sharing it (tests/test_ledger_postgres.py).

    python -m tests.support.ledger_process append DSN ORIGIN SEED_HEX TAG COUNT THREADS
        appends COUNT entries from THREADS threads; prints "INDEX LEAF_HEX" for each
        append once it is acknowledged (durable), then "done"
    python -m tests.support.ledger_process writer DSN
        tries to take the log writer lock every 0.1 s; prints "held" once it holds it
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from node.core.entries import Grant
from node.core.keys import NodeIdentity
from node.store.pg_ledger import LogWriterLock, PostgresLedgerStore
from node.store.postgres import PostgresSettings

_print_lock = threading.Lock()


def _say(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def append(dsn: str, origin: str, seed_hex: str, tag: str, count: int, threads: int) -> None:
    identity = NodeIdentity(origin, bytes.fromhex(seed_hex))
    store = PostgresLedgerStore(PostgresSettings(dsn, pool_size=threads + 1))
    own = store.own_log(identity.origin, identity.vkey)

    def one(i: int) -> None:
        result = own.append(Grant(token=f"{tag}-{i}".encode()), 1)
        _say(f"{result.index} {result.leaf_hash.hex()}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))
    own.publish_checkpoint(identity, 2)
    store.close()
    _say("done")


def writer(dsn: str) -> None:
    lock = LogWriterLock(dsn)
    while not lock.try_take():
        time.sleep(0.1)
    _say("held")
    while lock.try_take():  # held until the process is killed
        time.sleep(0.1)
    _say("lost")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "append":
        dsn, origin, seed_hex, tag, count, threads = args
        append(dsn, origin, seed_hex, tag, int(count), int(threads))
    else:
        writer(args[0])
