"""`imageshare fetch TOKEN`: have the local daemon fetch what a grant allows, and wait.

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
        help="a share link (shlink:/... or a URL carrying it), a grant token or its URL",
    )
    p.add_argument("--passcode", default=None, help="the share link's passcode")


def cmd_fetch(args: argparse.Namespace) -> int:
    config = config_of(args)
    if SHLINK_PREFIX in args.token:
        return _fetch_link(config, args)
    job = admin_request(config, "POST", "/admin/api/fetch", {"token": args.token})
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
    return _report(job, args.json)


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
