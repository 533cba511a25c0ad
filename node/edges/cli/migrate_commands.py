"""`imageshare migrate --to postgresql`: move a stopped node to PostgreSQL and an
S3-compatible object store, verified before node.toml is switched."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from node.config import default_config_path
from node.edges.cli._common import EXIT_OK, CheckFailed, command, print_json


def register(subparsers: Any) -> None:
    p = command(
        subparsers,
        "migrate",
        cmd_migrate,
        "move a stopped node to PostgreSQL and an S3-compatible object store, verified"
        " (counts, digests, every object read back, ledger verify) before node.toml switches",
    )
    p.add_argument("--to", required=True, choices=["postgresql"], help="the backend to move to")
    p.add_argument(
        "--settings",
        required=True,
        type=Path,
        metavar="FILE",
        help='a TOML file holding the [store] tables to move to (backend = "postgresql",'
        " dsn, [store.objects]); they replace node.toml's",
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    from node.services.migrate import MigrationUnverified, migrate_to_postgresql

    config_path = args.config or default_config_path()
    quiet = args.json
    try:
        report = migrate_to_postgresql(
            config_path,
            args.settings,
            progress=None if quiet else lambda message: print(message, file=sys.stderr),
        )
    except MigrationUnverified as exc:
        raise CheckFailed(str(exc)) from exc
    if args.json:
        print_json(report.as_json())
    else:
        for table in report.tables:
            print(f"{table.table}: {table.rows} rows, sha256 {table.digest[:16]}... equal")
        print(
            f"{report.objects} instance files ({report.object_bytes} bytes) in the bucket,"
            f" each read back and checked; own log of {report.ledger_size} entries verified"
        )
        print("ok")
    return EXIT_OK
