"""`imageshare patient emergency-policy`: who may break the glass for me at a custodian.

Without a choice it shows the policy in force (mine, or the federation default); with
``--any-member``, ``--members ORIGIN...`` or ``--never`` it signs a new policy, submits
it, and checks the custodian's proof that its ``emergency_policy`` entry is in the log.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from node.core.emergency import Choice
from node.edges.cli._common import EXIT_OK, command, print_json


def register_patient(sub: Any) -> None:
    """Add `emergency-policy` to the `imageshare patient` commands."""
    p = command(
        sub,
        "emergency-policy",
        cmd_emergency_policy,
        "show or set who may access my studies in an emergency (break-glass)",
        reaches_nodes=True,
    )
    p.add_argument("--custodian", required=True, metavar="URL")
    p.add_argument(
        "--wallet",
        type=Path,
        default=None,
        help="wallet directory (default: $IMAGESHARE_WALLET, else ~/.imageshare-wallet)",
    )
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--any-member", action="store_true", help="any member of the federation")
    choice.add_argument("--members", nargs="+", metavar="ORIGIN", help="only these members")
    choice.add_argument("--never", action="store_true", help="no one, ever")


def cmd_emergency_policy(args: argparse.Namespace) -> int:
    from node.edges.cli.patient_commands import open_wallet, run_wallet_action

    wallet = open_wallet(args)
    if args.any_member or args.members or args.never:
        members = tuple(args.members or ())
        choice = (
            Choice.ANY_MEMBER
            if args.any_member
            else Choice.NAMED_MEMBERS
            if members
            else Choice.NEVER
        )
        result = run_wallet_action(
            args,
            lambda session: wallet.set_emergency_policy(session, args.custodian, choice, members),
        )
        verb = "Set"
    else:
        result = run_wallet_action(
            args, lambda session: wallet.emergency_policy(session, args.custodian)
        )
        verb = "In force"
    if args.json:
        print_json(result)
        return EXIT_OK
    who = {
        "any_member": "any member of the federation",
        "named_members": "only " + ", ".join(result.get("members", [])),
        "never": "no one",
    }[result["choice"]]
    where = f" (log entry {result['index']}, proof checked)" if verb == "Set" else ""
    default = ""
    if result.get("default"):
        default = " (the federation default: you have signed no policy)"
    print(f"{verb}: in an emergency, {who} may fetch your studies{where}{default}.")
    return EXIT_OK
