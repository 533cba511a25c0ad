"""The `imageshare` command: one sub-command module per area, assembled here.

Exit status: 0 success, 1 a check failed or a request was refused, 2 usage or
unreachable. Errors are one sentence on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from node.edges.cli import _common

# Each module has register(subparsers); its commands set args.handler.
COMMAND_MODULES = [
    "node_commands",
    "peers_commands",
    "audit_commands",
    "patient_commands",
    "fetch_commands",
    "ledger_commands",
    "key_commands",
    "roster_commands",
    "proof_commands",
    "migrate_commands",
]
# Commands one module registers alone, parsed without importing the others (and the
# DICOM, image and crypto libraries they load): an audit of a federation counts the
# program's own memory in its peak, and a module imported is memory held.
STANDALONE_COMMANDS = {"audit": "audit_commands"}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` alone if it is a standalone one."""
    parser = argparse.ArgumentParser(
        prog="imageshare",
        description="ImageShare node: consented exchange of radiology images between hospitals.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    standalone = STANDALONE_COMMANDS.get(command or "")
    for name in [standalone] if standalone else COMMAND_MODULES:
        _module(name).register(subparsers)
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
    arguments = join_dash_values(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments[0] if arguments else None)
    args = parser.parse_args(arguments)
    return _common.run_handler(args)


if __name__ == "__main__":
    sys.exit(main())
