"""`imageshare peers add ORIGIN URL VKEY`, `peers remove ORIGIN`, `peers list`,
`peers confirm-key ORIGIN VKEY`."""

from __future__ import annotations

import argparse
from typing import Any

from node.core import atna
from node.edges.cli._common import EXIT_OK, add_common, config_of, print_json
from node.services.audit_export import local_user, record_once
from node.services.roster import add_peer, load_roster, move_member_key, remove_peer


def register(subparsers: Any) -> None:
    peers = subparsers.add_parser(
        "peers", help="federation roster: the member nodes", description="federation roster"
    )
    actions = peers.add_subparsers(dest="peers_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "add",
        help="add a member node (saved in the data directory's peers.toml)",
        description="add a member node; a running daemon picks it up within seconds",
    )
    add_common(p)
    p.add_argument("origin", help="the member's log origin")
    p.add_argument("url", help="its base URL, or '' to rely on discovery")
    p.add_argument("vkey", help="its verifier key (name+keyid+base64), from its `init`")
    p.set_defaults(handler=cmd_add)

    p = actions.add_parser(
        "remove",
        help="remove a member node added with `peers add`",
        description="remove a member node from peers.toml; a running daemon drops it within"
        " seconds (its mirrored log stays on disk)",
    )
    add_common(p)
    p.add_argument("origin", help="the member's log origin")
    p.set_defaults(handler=cmd_remove)

    p = actions.add_parser(
        "confirm-key",
        help="confirm a member's new key after its compromised-key rotation",
        description="confirm, after checking with the member's operator out of band, the "
        "key a member rotated to because its old key was compromised",
    )
    add_common(p)
    p.add_argument("origin", help="the member's log origin")
    p.add_argument("vkey", help="its new verifier key, as its `key rotate` printed it")
    p.set_defaults(handler=cmd_confirm_key)

    p = actions.add_parser("list", help="list the members", description="list the members")
    add_common(p)
    p.set_defaults(handler=cmd_list)


def cmd_add(args: argparse.Namespace) -> int:
    member = add_peer(config_of(args), args.origin, args.url, args.vkey)
    if args.json:
        print_json(member.as_json())
    else:
        print(f"added {member.origin} ({member.url or 'address by discovery'})")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    config = config_of(args)
    remove_peer(config, args.origin)
    record_once(
        config, atna.configuration_changed, local_user(), "federation member removed", args.origin
    )
    if args.json:
        print_json({"removed": args.origin})
    else:
        print(f"removed {args.origin}")
    return EXIT_OK


def cmd_confirm_key(args: argparse.Namespace) -> int:
    config = config_of(args)
    member = move_member_key(config, args.origin, args.vkey)
    record_once(
        config,
        atna.configuration_changed,
        local_user(),
        "federation member key confirmed",
        member.origin,
    )
    if args.json:
        print_json(member.as_json())
    else:
        print(f"{member.origin} is now pinned to {member.vkey}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    members = [m.as_json() for m in load_roster(config_of(args))]
    if args.json:
        print_json(members)
    elif not members:
        print("no peers")
    else:
        for m in members:
            print(f"{m['origin']}  {m['url'] or '(discovery)'}  {m['vkey']}")
    return EXIT_OK
