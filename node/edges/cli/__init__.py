"""The `imageshare` command: one sub-command module per area, assembled here.

Exit status: 0 success, 1 a check failed or a request was refused, 2 usage or
unreachable. Errors are one sentence on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from node.edges.cli import (
    _common,
    audit_commands,
    fetch_commands,
    key_commands,
    ledger_commands,
    migrate_commands,
    node_commands,
    patient_commands,
    peers_commands,
    proof_commands,
    roster_commands,
)

# Each module has register(subparsers); its commands set args.handler.
COMMAND_MODULES = [node_commands, peers_commands, audit_commands, patient_commands]
COMMAND_MODULES.append(fetch_commands)
COMMAND_MODULES.append(ledger_commands)
COMMAND_MODULES.append(key_commands)
COMMAND_MODULES.append(roster_commands)
COMMAND_MODULES.append(proof_commands)
COMMAND_MODULES.append(migrate_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imageshare",
        description="ImageShare node: consented exchange of radiology images between hospitals.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


# Options whose values may begin with "-" (a base64url key does, one time in 64), which
# argparse would otherwise take for an option of their own.
DASH_VALUE_OPTIONS = frozenset({"--key"})


def join_dash_values(argv: Sequence[str]) -> list[str]:
    """Turn ``--key -abc`` into ``--key=-abc`` for the options in DASH_VALUE_OPTIONS."""
    joined: list[str] = []
    pending: str | None = None
    for arg in argv:
        if pending is not None:
            joined.append(f"{pending}={arg}")
            pending = None
        elif arg in DASH_VALUE_OPTIONS:
            pending = arg
        else:
            joined.append(arg)
    if pending is not None:
        joined.append(pending)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    return _common.run_handler(args)


if __name__ == "__main__":
    sys.exit(main())
