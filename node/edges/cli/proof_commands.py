"""`imageshare proof export` and `imageshare proof verify`: C2SP tlog-proof files.

export reads a custodian's public ledger API and writes the proof of one grant,
revocation or access (node.services.proof_export); verify checks a file offline, with
the log's key and the witnesses' keys given on the command line (node.core.proof_file).
Exit 0 verified, 1 the file does not verify, 2 usage or a node unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from node.core.notes import parse_vkey
from node.core.proof_file import parse_tlog_proof, verify_tlog_proof
from node.edges.cli._common import EXIT_OK, CheckFailed, ca_file_of, command, print_json
from node.errors import BadInput, Unauthorized
from node.services.peer_client import open_session
from node.services.proof_export import PROVABLE_KINDS, export_proof


def register(subparsers: Any) -> None:
    proof = subparsers.add_parser("proof", help="C2SP tlog-proof files of ledger entries")
    commands = proof.add_subparsers(dest="proof_command", required=True, metavar="COMMAND")
    export = command(
        commands,
        "export",
        cmd_export,
        "write the tlog-proof of a grant, revocation or access in a custodian's log",
        json_output=False,
        reaches_nodes=True,
    )
    export.add_argument("token_id", nargs="?", metavar="TOKEN_ID", help="the token id (hex)")
    export.add_argument("--custodian", required=True, metavar="URL", help="the custodian node")
    export.add_argument(
        "--kind", choices=sorted(PROVABLE_KINDS), default="grant", help="which entry of the token"
    )
    export.add_argument("--index", type=int, metavar="N", help="the entry at this index instead")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    export.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    verify = command(
        commands, "verify", cmd_verify, "verify a tlog-proof file offline", json_output=True
    )
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.add_argument("--log-key", required=True, metavar="VKEY", help="the log's key")
    verify.add_argument(
        "--witness", action="append", default=[], metavar="VKEY", help="a witness's key"
    )
    verify.add_argument(
        "--threshold",
        type=int,
        default=None,
        metavar="K",
        help="how many of the witnesses must have cosigned (default: 1 if any is given)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    token_id = None
    if args.index is None:
        try:
            token_id = bytes.fromhex(args.token_id or "")
        except ValueError:
            token_id = b""
        if len(token_id) != 32:
            raise BadInput("TOKEN_ID is 64 hex digits (or give --index)")

    async def export() -> bytes:
        timeout = aiohttp.ClientTimeout(total=args.timeout)
        async with open_session(ca_file_of(args), timeout) as session:
            proof = await export_proof(session, args.custodian, token_id, args.kind, args.index)
        return proof.encode()

    data = asyncio.run(export())
    temporary = args.output.with_name(args.output.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, args.output)
    print(f"wrote {args.output}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    witnesses = [parse_vkey(vkey) for vkey in args.witness]
    threshold = args.threshold if args.threshold is not None else min(1, len(witnesses))
    try:
        proof = parse_tlog_proof(args.file.read_bytes())
        verified = verify_tlog_proof(proof, parse_vkey(args.log_key), witnesses, threshold)
    except (BadInput, Unauthorized) as exc:
        raise CheckFailed(f"{args.file} does not verify: {exc}") from exc
    result = {
        "origin": verified.checkpoint.origin,
        "index": verified.index,
        "kind": verified.entry.kind,
        "time": verified.entry.time,
        "checkpoint_size": verified.checkpoint.size,
        "cosigners": verified.cosigners,
    }
    if args.json:
        print_json(result)
    else:
        witnessed = ", ".join(verified.cosigners) or "no witness"
        sys.stdout.write(
            f"ok: {verified.entry.kind} at index {verified.index} of {verified.checkpoint.origin}"
            f" (checkpoint size {verified.checkpoint.size}, cosigned by {witnessed})\n"
        )
    return EXIT_OK
