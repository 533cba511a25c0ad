"""`imageshare patient delegate | delegations | grant-as-delegate`: acting for someone else.

The patient delegates powers to another person's key (their wallet's key for the same
custodian, from `imageshare patient pubkey`) and can list their delegations; a revoked
delegation is a revoked id (`imageshare patient revoke DELEGATION_ID`). The delegate's
wallet signs grants carrying the delegation and hands them to the grantee, whose fetch
presents them (docs/consent.md § Delegation).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from node.core.consent import Power, parse_token_text
from node.core.patient_keys import parse_public_key
from node.edges.cli._common import EXIT_OK, command, print_json
from node.errors import BadInput
from node.services.wallet import parse_study_ref


def _wallet_command(sub: Any, name: str, handler: Any, help: str) -> Any:
    p = command(sub, name, handler, help, reaches_nodes=True)
    p.add_argument(
        "--wallet",
        type=Path,
        default=None,
        help="wallet directory (default: $IMAGESHARE_WALLET, else ~/.imageshare-wallet)",
    )
    return p


def _scope_arguments(p: Any) -> None:
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--all", action="store_true", help="all my studies at the custodian")
    scope.add_argument("--study", nargs="+", metavar="REF", help="study references")


def register_patient(sub: Any) -> None:
    """Add the delegation commands to `imageshare patient`."""
    p = _wallet_command(sub, "delegate", cmd_delegate, "let another person's key act for me")
    p.add_argument("--custodian", required=True, metavar="URL")
    p.add_argument("--to-key", required=True, metavar="PUBKEY", help="their key there")
    _scope_arguments(p)
    p.add_argument(
        "--powers",
        default="grant,view_log",
        help=f"comma-separated, of {', '.join(p.value for p in Power)} (default grant,view_log)",
    )
    p.add_argument("--expires", default="365d", help="lifetime: N followed by s, m, h, d or w")
    p = _wallet_command(sub, "delegations", cmd_delegations, "my delegations and their status")
    p.add_argument("--custodian", required=True, metavar="URL")
    p = _wallet_command(
        sub, "grant-as-delegate", cmd_grant_as_delegate, "as a delegate: grant for the patient"
    )
    p.add_argument("delegation", metavar="DELEGATION", help="the delegation the patient gave")
    p.add_argument("--to", required=True, metavar="ORIGIN", help="the grantee node's origin")
    _scope_arguments(p)
    p.add_argument("--expires", default="7d", help="lifetime: N followed by s, m, h, d or w")


def _powers(text: str) -> tuple[Power, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = {p.value for p in Power}
    if not names or any(name not in known for name in names):
        raise BadInput(f"--powers takes some of {', '.join(sorted(known))}, comma-separated")
    return tuple(Power(name) for name in names)


def cmd_delegate(args: argparse.Namespace) -> int:
    from node.edges.cli.patient_commands import open_wallet, parse_lifetime, run_wallet_action

    lifetime = parse_lifetime(args.expires)
    scope = None if args.all else tuple(parse_study_ref(r) for r in args.study)
    delegate_key = parse_public_key(args.to_key)
    powers = _powers(args.powers)
    wallet = open_wallet(args)
    result = run_wallet_action(
        args,
        lambda session: wallet.delegate(
            session, args.custodian, delegate_key, scope, powers, lifetime
        ),
    )
    if args.json:
        print_json(result)
        return EXIT_OK
    print(f"Delegated {', '.join(p.value for p in powers)} (log entry {result['index']}, proof")
    print("checked). Give the delegate this delegation; revoke its id to end it.")
    print(f"delegation id: {result['delegation_id']}")
    print(f"delegation:    {result['delegation']}")
    return EXIT_OK


def cmd_delegations(args: argparse.Namespace) -> int:
    from node.edges.cli.patient_commands import open_wallet, run_wallet_action

    wallet = open_wallet(args)
    listed = run_wallet_action(args, lambda session: wallet.delegations(session, args.custodian))
    if args.json:
        print_json({"delegations": listed})
        return EXIT_OK
    for d in listed:
        print(
            f"{d['delegation_id'][:16]}  {d['status']:8}  {d['delegate']}  {','.join(d['powers'])}"
        )
    if not listed:
        print("No delegations at this custodian.")
    return EXIT_OK


def cmd_grant_as_delegate(args: argparse.Namespace) -> int:
    from node.edges.cli.patient_commands import open_wallet, parse_lifetime

    lifetime = parse_lifetime(args.expires)
    scope = None if args.all else tuple(parse_study_ref(r) for r in args.study)
    wallet = open_wallet(args)
    record = wallet.grant_as_delegate(parse_token_text(args.delegation), args.to, scope, lifetime)
    if args.json:
        print_json(record)
        return EXIT_OK
    print(f"Granted {args.to} for the patient; give it to {args.to} to fetch.")
    print(f"token id: {record['token_id']}")
    print(f"token:    {record['token']}")
    return EXIT_OK
