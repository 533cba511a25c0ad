"""`imageshare audit URL...`: verify the federation's ledger from the outside.

An auditor is not a node: no configuration is needed (-c is accepted and ignored).
Exit 0 clean, 1 any violation, 2 a node unreachable.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from node.core.audit_rules import RULES
from node.edges.cli._common import command, print_json
from node.services.audit import DEFAULT_RECEIPT_GRACE, AuditReport, run_audit
from node.services.audit_state import AuditState


def register(subparsers: Any) -> None:
    p = command(
        subparsers,
        "audit",
        cmd_audit,
        "verify every log the given nodes serve: signatures, chain, roots, views, consent",
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


def cmd_audit(args: argparse.Namespace) -> int:
    state = AuditState(args.state) if args.state is not None else None
    report = run_audit(
        args.urls, state, int(time.time()), max(0, args.receipt_grace), args.timeout
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
