"""`imageshare key rotate [--compromised]`: replace this node's signing key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from node.edges.cli._common import EXIT_OK, command, config_of, print_json
from node.services.node_key import rotate_node_key


def register(subparsers: Any) -> None:
    key = subparsers.add_parser("key", help="this node's signing key")
    commands = key.add_subparsers(dest="key_command", required=True, metavar="COMMAND")
    p = command(
        commands,
        "rotate",
        cmd_rotate,
        "rotate the node key: a key_rotation entry in the log, the old key retired",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="the node's data directory (its node.toml), instead of -c",
    )
    p.add_argument(
        "--compromised",
        action="store_true",
        help="the old key is not trusted to sign; members confirm the new key by hand",
    )


def cmd_rotate(args: argparse.Namespace) -> int:
    if args.data is not None and args.config is None:
        args.config = args.data / "node.toml"
    done = rotate_node_key(config_of(args), compromised=args.compromised)
    if args.json:
        print_json(done.as_json())
    else:
        print(f"rotated the key of {done.origin} at entry {done.index} ({done.reason})")
        print(f"  new verifier key: {done.vkey}")
        if done.reason == "compromised":
            print(
                "  each member's operator must confirm it: "
                f"imageshare peers confirm-key {done.origin} {done.vkey}"
            )
    return EXIT_OK
