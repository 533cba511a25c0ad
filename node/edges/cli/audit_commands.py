"""`imageshare audit URL...` and `imageshare patient log URL...`: the ledger seen from outside.

Neither an auditor nor a patient is a node: no configuration is needed (-c is accepted
and ignored). audit: exit 0 clean, 1 any violation, 2 a node unreachable. patient log:
exit 0 every event proven, 1 something unproven, 2 a node unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from node.core.audit_rules import RULES
from node.core.entries import Access, BreakGlass, Contribution, Denial, Grant
from node.edges.cli._common import ca_file_of, command, print_json
from node.services.audit import DEFAULT_RECEIPT_GRACE, AuditReport, run_audit
from node.services.audit_state import AuditState
from node.services.peer_client import open_session

if TYPE_CHECKING:
    from node.services.patient_log import PatientLog


def register(subparsers: Any) -> None:
    p = command(
        subparsers,
        "audit",
        cmd_audit,
        "verify every log the given nodes serve: signatures, chain, roots, views, consent",
        reaches_nodes=True,
    )
    p.add_argument("urls", nargs="+", metavar="URL", help="node base URLs, e.g. http://host:8600")
    p.add_argument(
        "--state",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the last verified checkpoint of each log here; flags rollbacks and forks",
    )
    p.add_argument(
        "--receipt-grace",
        type=int,
        default=DEFAULT_RECEIPT_GRACE,
        metavar="SECONDS",
        help="how long an access may wait for its receipt (and back) before it is a violation",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument(
        "--federation-key",
        default=None,
        metavar="VKEY",
        help="the federation key the roster logs served must chain from",
    )


def cmd_audit(args: argparse.Namespace) -> int:
    state = AuditState(args.state) if args.state is not None else None
    report = run_audit(
        args.urls,
        state,
        int(time.time()),
        max(0, args.receipt_grace),
        args.timeout,
        ca_file_of(args),
        args.federation_key,
    )
    if args.json:
        print_json(report.as_json())
    else:
        sys.stdout.write(render_report(report))
    return report.exit_status


def render_report(report: AuditReport) -> str:
    """The human report: one block per log, then every violation, then the verdict."""
    lines = []
    for log in report.logs:
        state = "verified" if log.verified else "NOT VERIFIED"
        lines.append(f"log {log.origin}  size {log.size}  {state}")
        if log.counts:
            counts = ", ".join(f"{kind} {n}" for kind, n in log.counts.items())
            lines.append(f"  entries: {counts}")
        if log.cosignatures:
            cosigners = ", ".join(f"{c.name} ({c.status})" for c in log.cosignatures)
            lines.append(f"  cosigned by: {cosigners}")
        else:
            lines.append("  cosigned by: nobody")
        lines.append(f"  served by: {', '.join(log.sources)}")
        lines.append(f"  entries read from the nodes: {log.entries_read}")
    for b in report.break_glass:
        flag = "FLAGGED " if b.problems else ""
        policy = "federation default" if b.default_policy else f"patient's {b.policy}"
        lines.append(
            f"{flag}BREAK-GLASS in {b.log} at #{b.index}: {b.requester} ({b.reason}),"
            f" {b.studies} studies, policy {policy}; review"
        )
    for reason in report.unreachable:
        lines.append(f"UNREACHABLE {reason}")
    for v in report.violations:
        where = f"#{v.index}" if v.index is not None else "-"
        via = f" (via {v.source})" if v.source else ""
        lines.append(f"VIOLATION {v.rule} in {v.log} at {where}: {v.detail}{via}")
    if report.violations:
        rules = sorted({v.rule for v in report.violations})
        lines.append(f"{len(report.violations)} violation(s): {', '.join(rules)}")
        lines.extend(f"  {rule}: {RULES.get(rule, '')}" for rule in rules)
    elif report.unreachable:
        lines.append("incomplete: some nodes were unreachable")
    else:
        lines.append(f"clean: {len(report.logs)} log(s) verified")
    return "\n".join(lines) + "\n"


# -- imageshare patient log -----------------------------------------------------------------


def register_patient(sub: Any) -> None:
    """Add `log` to the `imageshare patient` commands."""
    p = command(
        sub,
        "log",
        cmd_patient_log,
        "every access and denial of my studies, proven",
        reaches_nodes=True,
    )
    p.add_argument("urls", nargs="+", metavar="URL", help="node base URLs to read the logs from")
    p.add_argument(
        "--wallet",
        type=Path,
        default=None,
        help="wallet directory (default: $IMAGESHARE_WALLET, else ~/.imageshare-wallet)",
    )


def cmd_patient_log(args: argparse.Namespace) -> int:
    # Here, not above: `imageshare audit` runs without the wallet's libraries (its memory).
    from node.edges.cli.patient_commands import open_wallet
    from node.services.patient_log import read_patient_log

    wallet = open_wallet(args)

    async def read() -> PatientLog:
        timeout = aiohttp.ClientTimeout(total=60)
        async with open_session(ca_file_of(args), timeout) as session:
            return await read_patient_log(session, wallet, args.urls)

    log = asyncio.run(read())
    if args.json:
        print_json(log.as_json())
    else:
        sys.stdout.write(render_patient_log(log))
    return log.exit_status


def _link_name(details: dict[str, object]) -> str:
    # A link made in another wallet of the same seed (the web wallet) has no label here.
    label = details["link"]
    return f"the link '{label}'" if label else "a link made in another wallet"


def render_patient_log(log: PatientLog) -> str:
    """One line per event, break-glass first, then oldest first, with how it is proven."""
    lines = []
    for e in log.events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.time))
        if e.kind == Access.kind and "link" in e.details:
            verb = {"manifest": "opened", "view": "viewed", "download": "downloaded"}.get(
                str(e.details["link_access"]), "read"
            )
            what = f"{verb} by {_link_name(e.details)} on {when} UTC (study {e.details['study']})"
        elif e.kind == Access.kind:
            what = (
                f"{e.details['grantee']} received {e.details['instances']} images "
                f"({e.details['bytes']} bytes) of study {e.details['study']}"
            )
        elif e.kind == Denial.kind and "link" in e.details:
            what = f"{_link_name(e.details)} was refused ({e.details['rule']})"
        elif e.kind == Denial.kind:
            what = f"{e.details['requester']} was refused ({e.details['rule']})"
        elif e.kind == Contribution.kind:
            what = f"{_link_name(e.details)} returned an opinion (study {e.details['study']})"
        elif e.kind == Grant.kind:
            what = (
                f"your delegate {str(e.details['delegate'])[:12]}... granted"
                f" {e.details['grantee']} ({e.details['scope']})"
            )
        elif e.kind == BreakGlass.kind:
            studies = e.details["studies"]
            count = len(studies) if isinstance(studies, list) else 0
            what = (
                f"EMERGENCY ACCESS by {e.details['requester']} ({e.details['reason']}) to"
                f" {count} studies, under the policy {e.details['policy']}"
            )
        else:
            what = "you revoked the token"
        proof = e.proof
        if proof.proven:
            witnesses = ", ".join(proof.cosigners)
            how = f"proven: in checkpoint {proof.checkpoint_size}, cosigned by {witnesses}"
        else:
            missing = [
                name
                for name, ok in (
                    ("log signature", proof.log_signature),
                    ("inclusion", proof.inclusion),
                    ("cosignature", bool(proof.cosigners)),
                )
                if not ok
            ]
            how = f"NOT PROVEN (missing: {', '.join(missing)})"
        flag = "FLAGGED  " if e.flagged else ""
        lines.append(
            f"{flag}{when}Z  {e.custodian} #{e.index}  token {e.token_id.hex()[:16]}  {what}"
            f"\n    {how}"
        )
    if not log.events:
        lines.append("No access or denial of your tokens is recorded.")
    lines.extend(f"PROBLEM {p}" for p in log.problems)
    return "\n".join(lines) + "\n"
