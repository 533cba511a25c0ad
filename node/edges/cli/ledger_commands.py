"""`imageshare ledger verify`: check this node's own stored log end to end."""

from __future__ import annotations

import argparse
from typing import Any

from node.core.keys import NodeIdentity
from node.edges.cli._common import EXIT_OK, CheckFailed, command, config_of, print_json
from node.store.backends import open_ledger_store
from node.store.secrets import read_seed


def register(subparsers: Any) -> None:
    ledger = subparsers.add_parser("ledger", help="the node's consent ledger")
    commands = ledger.add_subparsers(dest="ledger_command", required=True, metavar="COMMAND")
    command(
        commands,
        "verify",
        cmd_verify,
        "check this node's own log: entries, hash chain, stored hashes, latest checkpoint",
    )


def cmd_verify(args: argparse.Namespace) -> int:
    config = config_of(args)
    identity = NodeIdentity(config.origin, read_seed(config.key_path))
    store = open_ledger_store(config)
    try:
        report = store.own_log(identity.origin, identity.vkey).verify(identity.vkey)
    finally:
        store.close()
    if args.json:
        print_json(report.as_json())
    else:
        checkpoint = (
            f"checkpoint at size {report.checkpoint_size}"
            if report.checkpoint_size is not None
            else "no checkpoint signed yet"
        )
        print(f"{report.origin}: {report.checked} of {report.size} entries checked, {checkpoint}")
        for problem in report.problems:
            print(f"  {problem.message}")
    if not report.ok:
        first = report.problems[0]
        where = f" at entry {report.first_bad_index}" if report.first_bad_index is not None else ""
        raise CheckFailed(f"the ledger does not verify{where}: {first.message}")
    if not args.json:
        print("ok")
    return EXIT_OK
