"""`imageshare fetch TOKEN`: have the local daemon fetch what a grant allows, and wait.

`imageshare fetch --emergency --patient-id ID --reason ETREAT|BTG [--note TEXT]
[--custodian ORIGIN]` is break-glass (docs/consent.md): the daemon signs one emergency
request per custodian asked (POST /admin/api/emergency) and fetches what each serves.

The daemon is the single writer of its store and ledger, so the command asks it through
the admin API (POST /admin/api/fetch with the admin token from the data directory) and
polls the job (GET /admin/api/transfers/{id}) until it ends. Exit 0 fetched, 1 refused
(the rule is printed) or failed, 2 the daemon or the custodian could not be reached. A
refusal the custodian did not sign for this request is not the custodian's: the daemon
reports it as an unverified answer (the custodian not reached, exit 2) without its text.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from node.config import NodeConfig
from node.core.emergency import REASONS
from node.core.shlink import SHLINK_PREFIX
from node.edges.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ProgressBar,
    admin_request,
    command,
    config_of,
    fail,
    print_json,
)

POLL_INTERVAL = 0.2
# A link's studies are read in one admin request: allow for a large study.
LINK_FETCH_TIMEOUT = 3600.0


def register(subparsers: Any) -> None:
    p = command(
        subparsers,
        "fetch",
        cmd_fetch,
        "fetch the studies a patient's grant allows from their custodian",
    )
    p.add_argument(
        "token",
        metavar="SHLINK_OR_TOKEN",
        nargs="?",
        help="a share link (shlink:/... or a URL carrying it), a grant token or its URL",
    )
    p.add_argument("--passcode", default=None, help="the share link's passcode")
    p.add_argument(
        "--emergency",
        action="store_true",
        help="break-glass: fetch a patient's studies without a token, where their policy allows",
    )
    p.add_argument("--patient-id", default=None, help="with --emergency: the custodian's id")
    p.add_argument(
        "--reason", choices=sorted(REASONS), default=None, help="with --emergency: ETREAT or BTG"
    )
    p.add_argument("--note", default="", help="with --emergency: why (only the custodian reads it)")
    p.add_argument(
        "--custodian",
        default=None,
        metavar="ORIGIN",
        help="with --emergency: the member to ask (default: every member)",
    )


def cmd_fetch(args: argparse.Namespace) -> int:
    config = config_of(args)
    if args.emergency:
        return _fetch_emergency(config, args)
    if args.token is None:
        fail("fetch needs a token or a share link, or --emergency --patient-id ID --reason CODE")
        return EXIT_USAGE
    if SHLINK_PREFIX in args.token:
        return _fetch_link(config, args)
    job = admin_request(config, "POST", "/admin/api/fetch", {"token": args.token})
    return _report(_follow(config, job), args.json)


def _follow(config: NodeConfig, job: dict[str, Any]) -> dict[str, Any]:
    """Poll a fetch job until it ends, with a progress bar; returns its last state."""
    bar: ProgressBar | None = None
    try:
        while job["state"] == "running":
            if bar is None and job["instances_total"]:
                bar = ProgressBar(job["instances_total"], "fetching")
            if bar is not None:
                bar.advance(job["instances_done"] - bar.done)
            time.sleep(POLL_INTERVAL)
            job = admin_request(config, "GET", f"/admin/api/transfers/{job['id']}")
        if bar is not None:
            bar.advance(job["instances_done"] - bar.done)
    finally:
        if bar is not None:
            bar.close()
    return job


def _fetch_emergency(config: NodeConfig, args: argparse.Namespace) -> int:
    """Break-glass: one job per custodian asked; exit 0 if any fetched the patient's studies."""
    if args.token is not None or args.patient_id is None or args.reason is None:
        fail("--emergency takes --patient-id ID and --reason CODE, and no token")
        return EXIT_USAGE
    body = {"patient_id": args.patient_id, "reason": args.reason, "note": args.note}
    if args.custodian:
        body["custodian"] = args.custodian
    started = admin_request(config, "POST", "/admin/api/emergency", body)
    jobs = [_follow(config, job) for job in started["jobs"]]
    done = [job for job in jobs if job["state"] == "done"]
    if args.json:
        print_json({"fetches": jobs, "fetched": len(done)})
        return EXIT_OK if done else EXIT_FAILED
    for job in jobs:
        if job["state"] == "done":
            print(f"{job['custodian']}: fetched {job['instances_total']} instances (break-glass)")
            for study in job["studies"]:
                print(f"  study {study['study_uid']}: {study['dicomweb_url']}")
        elif job["state"] == "refused":
            rule = job["rule"]
            fail(f"{job['custodian']} refused the emergency request ({rule}): {job['error']}")
        else:
            fail(f"the emergency fetch from {job['custodian']} failed: {job['error']}")
    return EXIT_OK if done else EXIT_FAILED


def _fetch_link(config: NodeConfig, args: argparse.Namespace) -> int:
    """A share link: the daemon reads it through the link's DICOMweb root, then answers."""
    result = admin_request(
        config,
        "POST",
        "/admin/api/links/fetch",
        {"shlink": args.token, "passcode": args.passcode},
        timeout=LINK_FETCH_TIMEOUT,
    )
    if args.json:
        print_json(result)
        return EXIT_OK
    print(
        f"Fetched {result['instances']} instances ({result['bytes'] / 1e6:.1f} MB) from"
        f" {result['custodian']} by a share link; {result['duplicate']} were already here."
    )
    for study in result["studies"]:
        print(f"  study {study['study_uid']}: {study['dicomweb_url']}")
    return EXIT_OK


def _report(job: dict[str, Any], as_json: bool) -> int:
    if job["state"] == "refused":
        fail(f"{job['custodian']} refused the token ({job['rule']}): {job['error']}")
        return EXIT_FAILED
    if job["state"] != "done":
        fail(f"the fetch from {job['custodian']} failed: {job['error']}")
        return EXIT_USAGE if job["unreachable"] else EXIT_FAILED
    studies = job["studies"]
    result: dict[str, Any] = {
        "instances": job["instances_total"],
        "bytes": job["bytes_total"],
        "custodian": job["custodian"],
        "token_id": job["token_id"],
        "studies": studies,
        "dicomweb_url": studies[0]["dicomweb_url"] if len(studies) == 1 else None,
    }
    if len(studies) == 1:
        result["study_uid"] = studies[0]["study_uid"]
    if as_json:
        print_json(result)
        return EXIT_OK
    print(
        f"Fetched {job['instances_received']} of {job['instances_total']} instances"
        f" ({job['bytes_received'] / 1e6:.1f} MB on the wire) from {job['custodian']}"
        f" in {job['seconds']:.1f} s; the rest were already here."
        if job["instances_received"] < job["instances_total"]
        else f"Fetched {job['instances_total']} instances ({job['bytes_total'] / 1e6:.1f} MB)"
        f" from {job['custodian']} in {job['seconds']:.1f} s."
    )
    for study in studies:
        print(f"  study {study['study_uid']}: {study['dicomweb_url']}")
    return EXIT_OK
