"""`imageshare enroll` (hospital staff) and `imageshare patient ...` (the patient's wallet).

`enroll` asks the running daemon to write the enrollment (POST /admin/api/enrollments
with the admin token), because the daemon is the one writer of the node's log; when no
daemon answers, it opens the node's data directory and writes the entry itself.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from node.core.keys import NodeIdentity
from node.core.patient_keys import parse_public_key
from node.edges.cli._common import (
    EXIT_OK,
    CheckFailed,
    DaemonNotRunning,
    admin_request,
    ca_file_of,
    command,
    config_of,
    print_json,
)
from node.errors import BadInput, ConfigError
from node.services.federation_roster import desk_pin_url, federated
from node.services.peer_client import open_session
from node.services.wallet import (
    PASSPHRASE_ENV,
    REQUEST_TIMEOUT,
    ProofFailed,
    Wallet,
    parse_study_ref,
    parse_token_id,
    wallet_directory,
)
from node.store.secrets import read_seed
from node.store.wallet_files import WalletFiles

# Modules adding more `imageshare patient` commands, each with register_patient(subparsers).
PATIENT_COMMAND_MODULES: list[str] = [
    "node.edges.cli.audit_commands",
    "node.edges.cli.emergency_commands",
    "node.edges.cli.delegation_commands",
]

_DURATION = re.compile(r"^([1-9][0-9]{0,5})([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
T = TypeVar("T")


def register(subparsers: Any) -> None:
    p = command(subparsers, "enroll", cmd_enroll, "bind a patient's key to a local patient (staff)")
    p.add_argument("--patient-id", required=True, metavar="MRN")
    p.add_argument("--key", required=True, metavar="PATIENT_PUBKEY")
    p = command(
        subparsers,
        "enroll-guardian",
        cmd_enroll_guardian,
        "let a guardian's key act for a minor, with every power (staff)",
    )
    p.add_argument("--patient-id", required=True, metavar="MRN", help="the minor's patient id")
    p.add_argument("--key", required=True, metavar="GUARDIAN_PUBKEY")

    patient = subparsers.add_parser(
        "patient", help="the patient's wallet", description="the patient's wallet"
    )
    sub = patient.add_subparsers(dest="patient_command", required=True, metavar="COMMAND")

    def wallet_command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = command(sub, name, handler, help, reaches_nodes=True)
        p.add_argument(
            "--wallet",
            type=Path,
            default=None,
            help="wallet directory (default: $IMAGESHARE_WALLET, else ~/.imageshare-wallet)",
        )
        return p

    wallet_command("keygen", cmd_keygen, "create a new wallet secret")
    p = wallet_command("pubkey", cmd_pubkey, "my public key for a custodian, to enroll there")
    p.add_argument("--custodian", required=True, metavar="URL")
    p = wallet_command("studies", cmd_studies, "my studies at a custodian")
    p.add_argument("--custodian", required=True, metavar="URL")
    p = wallet_command("grant", cmd_grant, "issue a grant and submit it to the custodian")
    p.add_argument("--custodian", required=True, metavar="URL")
    p.add_argument("--to", required=True, metavar="ORIGIN", help="the grantee node's origin")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--all", action="store_true", help="all my studies at the custodian")
    scope.add_argument("--study", nargs="+", metavar="REF", help="study references")
    p.add_argument("--expires", default="7d", help="lifetime: N followed by s, m, h, d or w")
    p = wallet_command("share", cmd_share, "make a SMART Health Link that opens studies")
    p.add_argument("--custodian", required=True, metavar="URL")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--all", action="store_true", help="all my studies at the custodian")
    scope.add_argument(
        "--study",
        nargs="+",
        metavar="REF",
        help="study references (--study=REF for one that starts with -)",
    )
    p.add_argument("--expires", default="7d", help="lifetime: N followed by s, m, h, d or w")
    p.add_argument("--passcode", default=None, help="a passcode the recipient must enter")
    p.add_argument("--label", default="", help="a short text shown with the link (80 at most)")
    p.add_argument(
        "--opinions", action="store_true", help="let the link's holder send an opinion back"
    )
    p = wallet_command("revoke", cmd_revoke, "revoke a token")
    p.add_argument("token_id", metavar="TOKEN_ID")
    p.add_argument("--custodian", required=True, metavar="URL")
    wallet_command("tokens", cmd_tokens, "my tokens and their status")
    p = wallet_command("pin", cmd_pin, "pin the keys the enrollment desk's code names")
    p.add_argument("code", metavar="DESK_CODE", help="<node>/wallet/#custodian=...&federation=...")
    for name in PATIENT_COMMAND_MODULES:
        importlib.import_module(name).register_patient(sub)


# -- enroll ----------------------------------------------------------------------------------


def cmd_enroll(args: argparse.Namespace) -> int:
    config = config_of(args)
    public_key = parse_public_key(args.key)

    def offline(runtime: Any) -> dict[str, Any]:
        from node.services import consent

        result = consent.enroll_patient(runtime, args.patient_id, public_key)
        return consent.enroll_result_json(result, public_key)

    result = _at_the_desk(config, "/admin/api/enrollments", args, offline)
    vkey = NodeIdentity(config.origin, read_seed(config.key_path)).vkey
    result = {**result, "wallet_pin_url": desk_pin_url(config, vkey)}
    if args.json:
        print_json(result)
        return EXIT_OK
    if federated(config):
        print("For the patient's web wallet (pins this hospital's and the federation's keys):")
        print(f"  {result['wallet_pin_url']}")
        _print_qr(result["wallet_pin_url"])
    if result["already_enrolled"]:
        print(f"That key is already enrolled for patient {args.patient_id}.")
    else:
        print(
            f"Enrolled the key for patient {args.patient_id} (log entry {result['index']});"
            f" studies of that patient here: {result['studies']}."
        )
        if not result["studies"]:
            print("  warning: no study of that patient id on this node; is the id right?")
        if result["replaced"]:
            print(f"  retired the previous key {result['replaced']} and its grants")
        # The patient is told who may break the glass until they sign a policy of their own.
        default = str(result.get("emergency_default", "")).replace("_", " ")
        print(f"  emergency access without a signed policy of the patient's: {default}")
    return EXIT_OK


def cmd_enroll_guardian(args: argparse.Namespace) -> int:
    config = config_of(args)
    guardian_key = parse_public_key(args.key)

    def offline(runtime: Any) -> dict[str, Any]:
        from node.services import consent

        made = consent.enroll_guardian(runtime, args.patient_id, guardian_key)
        return consent.guardian_result_json(made)

    result = _at_the_desk(config, "/admin/api/guardians", args, offline)
    if args.json:
        print_json(result)
        return EXIT_OK
    print(
        f"The guardian's key may now act for patient {args.patient_id} with every power"
        f" (log entry {result['index']}). Give the guardian this delegation:"
    )
    print(f"  {result['delegation']}")
    if result["created_minor_key"]:
        print(f"  this node now holds the patient's key {result['minor_key']} for them")
    return EXIT_OK


def _at_the_desk(
    config: Any, path: str, args: argparse.Namespace, offline: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """A desk request ({"patient_id", "key"}) sent to the daemon, or done here by
    ``offline(runtime)`` only when no daemon serves this data directory."""
    body = {"patient_id": args.patient_id, "key": args.key}
    try:
        return admin_request(config, "POST", path, body, timeout=60)
    except DaemonNotRunning:
        # Only a refused connection means no daemon: anything else may be a busy daemon,
        # and a second writer beside it would fork the log.
        from node.services.runtime import open_runtime

        runtime = open_runtime(config)
        try:
            return offline(runtime)
        finally:
            runtime.close()


# -- the wallet ------------------------------------------------------------------------------


def _passphrase(prompt: str, confirm: bool = False) -> bytes | None:
    """$IMAGESHARE_WALLET_PASSPHRASE, else a prompt on a terminal, else None."""
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass(prompt)
    if confirm and first and getpass.getpass("Repeat the passphrase: ") != first:
        raise BadInput("the passphrases do not match")
    return first.encode() or None


def open_wallet(args: argparse.Namespace) -> Wallet:
    """The wallet named by ``--wallet``, asking for its passphrase if it is encrypted."""
    directory = wallet_directory(args.wallet)
    files = WalletFiles(directory)
    passphrase = _passphrase("Wallet passphrase: ") if files.is_encrypted() else None
    return Wallet.open(directory, passphrase)


def run_wallet_action(
    args: argparse.Namespace, action: Callable[[aiohttp.ClientSession], Awaitable[T]]
) -> T:
    """Run one wallet action with a session to custodians (trusting ``--ca-file``),
    mapping proof failures to a failed check."""

    async def main() -> T:
        async with open_session(ca_file_of(args), REQUEST_TIMEOUT) as session:
            return await action(session)

    try:
        return asyncio.run(main())
    except ProofFailed as exc:
        raise CheckFailed(str(exc)) from exc


def _print_qr(text: str) -> None:
    import qrcode

    qr = qrcode.QRCode(border=1, error_correction=qrcode.constants.ERROR_CORRECT_L)
    qr.add_data(text)
    qr.make(fit=True)
    qr.print_ascii(out=sys.stdout, invert=True)


def cmd_keygen(args: argparse.Namespace) -> int:
    directory = wallet_directory(args.wallet)
    if WalletFiles(directory).exists():
        raise ConfigError(f"a wallet already exists in {directory}; refusing to replace it")
    passphrase = _passphrase("New wallet passphrase (empty for none): ", confirm=True)
    Wallet.create(directory, passphrase)
    if args.json:
        print_json({"wallet": str(directory), "encrypted": passphrase is not None})
    else:
        sealed = "sealed with a passphrase" if passphrase else "NOT passphrase-protected"
        print(f"Created a wallet in {directory} ({sealed}). Keep a backup of it.")
    return EXIT_OK


def cmd_pubkey(args: argparse.Namespace) -> int:
    wallet = open_wallet(args)
    custodian = run_wallet_action(args, lambda session: wallet.custodian(session, args.custodian))
    key = wallet.key_for(custodian.origin).public_key_text
    if args.json:
        print_json({"pubkey": key, "custodian": custodian.origin})
    else:
        print(f"My key for {custodian.origin} (show it at the enrollment desk):")
        print(f"  {key}")
        _print_qr(key)
    return EXIT_OK


def cmd_pin(args: argparse.Namespace) -> int:
    wallet = open_wallet(args)
    custodian = run_wallet_action(args, lambda session: wallet.pin_desk_code(session, args.code))
    federation = wallet.files.load_state()["custodians"][custodian.origin].get("federation")
    if args.json:
        print_json(
            {"custodian": custodian.origin, "vkey": custodian.vkey, "federation": federation}
        )
    else:
        print(f"pinned {custodian.origin}: log key {custodian.vkey}")
        if federation:
            print(f"  federation key {federation}: only the roster's members witness its log")
    return EXIT_OK


def cmd_studies(args: argparse.Namespace) -> int:
    wallet = open_wallet(args)
    studies = run_wallet_action(args, lambda session: wallet.studies(session, args.custodian))
    if args.json:
        print_json({"studies": studies})
        return EXIT_OK
    if not studies:
        print("No studies.")
    for s in studies:
        print(
            f"{s['ref']}  {s['date'] or '-':8}  {','.join(s['modalities']) or '-':6}"
            f"  {s['instances']:5} images  {s['description']}"
        )
    return EXIT_OK


def _when(unix_time: int) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%d %H:%M UTC")


def parse_lifetime(text: str) -> int:
    """Seconds in a lifetime like 30m, 12h, 7d or 2w; raises BadInput otherwise."""
    match = _DURATION.match(text.strip())
    if not match:
        raise BadInput("--expires takes a number followed by s, m, h, d or w (e.g. 7d)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def cmd_grant(args: argparse.Namespace) -> int:
    lifetime = parse_lifetime(args.expires)
    scope = None if args.all else tuple(parse_study_ref(r) for r in args.study)
    wallet = open_wallet(args)
    record = run_wallet_action(
        args, lambda session: wallet.grant(session, args.custodian, args.to, scope, lifetime)
    )
    if args.json:
        print_json({k: record[k] for k in ("token", "token_id", "url")})
        return EXIT_OK
    print(f"Granted {args.to} access until {_when(record['expires'])};")
    print(f"recorded in {record['custodian']}'s log at entry {record['index']} (proof checked).")
    print(f"token id: {record['token_id']}")
    print(f"token:    {record['token']}")
    print(f"URL:      {record['url']}")
    _print_qr(record["url"])
    return EXIT_OK


def cmd_share(args: argparse.Namespace) -> int:
    lifetime = parse_lifetime(args.expires)
    scope = None if args.all else tuple(parse_study_ref(r) for r in args.study)
    if args.passcode is not None and not 1 <= len(args.passcode) <= 256:
        raise BadInput("--passcode takes 1 to 256 characters")
    wallet = open_wallet(args)
    link = run_wallet_action(
        args,
        lambda session: wallet.share(
            session, args.custodian, scope, lifetime, args.passcode, args.label, args.opinions
        ),
    )
    if args.json:
        print_json({k: link[k] for k in ("shlink", "url", "link_id")})
        return EXIT_OK
    print(
        f"Shared until {_when(link['expires'])}; recorded at entry {link['index']} (proof checked)."
    )
    print(f"link id:  {link['link_id']}  (revoke with `imageshare patient revoke` and this id)")
    print(f"link:     {link['shlink']}")
    print(f"open:     {link['url']}")
    _print_qr(link["url"])
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    token_id = parse_token_id(args.token_id)
    wallet = open_wallet(args)
    result = run_wallet_action(
        args, lambda session: wallet.revoke(session, args.custodian, token_id)
    )
    if args.json:
        print_json(result)
    else:
        print(f"Revoked {result['token_id']} (log entry {result['index']}, proof checked).")
    return EXIT_OK


def cmd_tokens(args: argparse.Namespace) -> int:
    wallet = open_wallet(args)
    tokens = run_wallet_action(args, wallet.tokens)
    if args.json:
        print_json({"tokens": tokens})
        return EXIT_OK
    if not tokens:
        print("No tokens.")
    for t in tokens:
        checked = "" if t.get("checked") else "  (custodian not reached)"
        print(
            f"{t['token_id'][:16]}  {t['status']:8}  to {t['grantee']}"
            f"  at {t['custodian']}  until {_when(t['expires'])}{checked}"
        )
    return EXIT_OK
