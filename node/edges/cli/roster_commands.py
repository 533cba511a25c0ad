"""`imageshare roster keygen|sign` (the federation operator), `roster fetch|verify|show`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from node.core.keys import NodeIdentity
from node.core.roster_document import RosterDocument
from node.edges.cli._common import (
    EXIT_OK,
    CheckFailed,
    ca_file_of,
    command,
    config_of,
    print_json,
)
from node.errors import BadInput, ImageShareError
from node.services.federation_roster import (
    check_held_roster,
    create_federation_key,
    current_roster,
    fetch_roster,
    load_federation_key,
    read_member_list,
    sign_next_version,
)
from node.store.federation_state import replace_file
from node.store.secrets import read_seed


def register(subparsers: Any) -> None:
    roster = subparsers.add_parser(
        "roster", help="the federation's signed roster", description="the signed roster"
    )
    actions = roster.add_subparsers(dest="roster_command", required=True, metavar="ACTION")

    p = command(actions, "keygen", cmd_keygen, "create a federation key (the operator's)")
    p.add_argument("--federation", required=True, help="the federation's name (an origin)")
    p.add_argument("--key", type=Path, required=True, help="the new key file (mode 0600)")

    p = command(
        actions,
        "sign",
        cmd_sign,
        "append the next roster version, from a TOML member list, to the roster log",
    )
    p.add_argument("--federation", required=True, help="the federation's name")
    p.add_argument("--key", type=Path, required=True, help="the federation key this version names")
    p.add_argument("--members", type=Path, required=True, help="TOML: threshold, [[members]]")
    p.add_argument("--log", type=Path, required=True, help="the roster log's directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="write the bundle here")
    p.add_argument("--valid-days", type=int, default=365, help="validity period (365)")
    p.add_argument(
        "--previous-key", type=Path, default=None, help="the old federation key, to change keys"
    )
    p.add_argument(
        "--member-key",
        action="append",
        default=[],
        metavar="ORIGIN=FILE",
        help="a member's node key signing for a threshold (the old federation key is lost)",
    )

    p = command(
        actions, "fetch", cmd_fetch, "take the roster log from a URL or bundle", reaches_nodes=True
    )
    p.add_argument("source", nargs="?", default=None, help="a member's URL or a bundle file")

    command(actions, "verify", cmd_verify, "re-verify the roster held from the federation key")
    command(actions, "show", cmd_show, "print the roster version in force here")


def cmd_keygen(args: argparse.Namespace) -> int:
    identity = create_federation_key(args.key, args.federation)
    if args.json:
        print_json({"federation": identity.origin, "vkey": identity.vkey})
    else:
        print(identity.vkey)
    return EXIT_OK


def _member_key(spec: str) -> NodeIdentity:
    origin, sep, path = spec.partition("=")
    if not sep or not origin or not path:
        raise BadInput("--member-key takes ORIGIN=FILE")
    return NodeIdentity(origin, read_seed(Path(path)))


def cmd_sign(args: argparse.Namespace) -> int:
    if not 1 <= args.valid_days <= 3650:
        raise BadInput("--valid-days must be between 1 and 3650")
    key = load_federation_key(args.key, args.federation)
    previous = (
        load_federation_key(args.previous_key, args.federation) if args.previous_key else None
    )
    members, threshold = read_member_list(args.members)
    signed = sign_next_version(
        args.log,
        key,
        members,
        threshold,
        int(time.time()),
        args.valid_days,
        previous_key=previous,
        member_keys=tuple(_member_key(spec) for spec in args.member_key),
    )
    replace_file(args.output, signed.bundle)
    if args.json:
        print_json({**signed.document.as_json(), "bundle": str(args.output)})
    else:
        print(f"signed roster version {signed.document.version} of {key.origin}: {args.output}")
    return EXIT_OK


def _print_document(document: RosterDocument, as_json: bool) -> None:
    if as_json:
        print_json(document.as_json())
        return
    print(f"{document.federation} roster version {document.version}")
    print(f"  valid {document.not_before} .. {document.not_after}; key {document.key}")
    print(f"  threshold {document.threshold} of {len(document.members)} members")
    for m in document.members:
        print(f"  {m.origin}  {m.url or '(discovery)'}  {','.join(m.roles) or '-'}  {m.vkey}")


def cmd_fetch(args: argparse.Namespace) -> int:
    document = fetch_roster(config_of(args), args.source, ca_file_of(args))
    _print_document(document, args.json)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        document = check_held_roster(config_of(args))
    except ImageShareError as exc:
        raise CheckFailed(f"the roster does not verify: {exc}") from exc
    _print_document(document, args.json)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    document = current_roster(config_of(args))
    if document is None:
        raise BadInput("this node holds no roster (no [federation] key, or no fetch yet)")
    _print_document(document, args.json)
    return EXIT_OK
