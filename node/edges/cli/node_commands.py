"""`imageshare init`, `run` and `import`."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from node.config import is_ae_title, parse_listen, render_initial_config
from node.core.keys import NodeIdentity
from node.core.origins import NODE_ORIGIN_RULE, is_node_origin, origin_host
from node.edges.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    ProgressBar,
    command,
    config_of,
    print_json,
)
from node.errors import ConfigError
from node.services.certificates import (
    CertificateAuthority,
    issue_server_certificate,
    load_ca,
    make_ca,
)
from node.services.ingest import import_files, iter_files
from node.services.runtime import open_runtime
from node.store.secrets import write_secret, write_seed


def register(subparsers: Any) -> None:
    p = command(
        subparsers, "init", cmd_init, "create a new node: data dir, key, admin token, node.toml"
    )
    p.add_argument("data_dir", type=Path)
    p.add_argument(
        "--origin", required=True, help="the node's unique log origin, e.g. ucsf.example/imageshare"
    )
    p.add_argument("--http", default="127.0.0.1:8600", metavar="HOST:PORT")
    p.add_argument("--dimse-port", type=int, default=11112)
    p.add_argument("--ae-title", default="IMAGESHARE")
    p.add_argument(
        "--tls-self-signed",
        action="store_true",
        help="serve HTTPS with a certificate from a new CA (or from --tls-ca), for a test or"
        " a lab; peers pin the CA (DATA_DIR/tls/ca.pem)",
    )
    p.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        metavar="CA_PEM",
        help="with --tls-self-signed: sign with this existing CA (e.g. another node's"
        " tls/ca.pem), so that the nodes of a lab share one; its key from --tls-ca-key",
    )
    p.add_argument(
        "--tls-ca-key",
        type=Path,
        default=None,
        metavar="KEY_PEM",
        help="the private key of --tls-ca (default: ca-key.pem beside it)",
    )

    p = command(subparsers, "run", cmd_run, "run the node daemon", json_output=False)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")

    p = command(subparsers, "import", cmd_import, "import DICOM files and directories (recursive)")
    p.add_argument("paths", nargs="+", type=Path)


def cmd_init(args: argparse.Namespace) -> int:
    if not is_node_origin(args.origin):
        raise ConfigError(f"--origin {args.origin!r} is not a node origin ({NODE_ORIGIN_RULE})")
    try:
        parse_listen(args.http)
    except ValueError as exc:
        raise ConfigError(f"--http {exc}") from None
    if not 0 < args.dimse_port < 65536:
        raise ConfigError("--dimse-port must be a port from 1 to 65535")
    if not is_ae_title(args.ae_title):
        raise ConfigError("--ae-title must be 1-16 printable characters without backslash")
    if (args.tls_ca or args.tls_ca_key) and not args.tls_self_signed:
        raise ConfigError("--tls-ca and --tls-ca-key go with --tls-self-signed")
    lab_ca = None
    if args.tls_ca is not None:  # checked before anything is written
        key = args.tls_ca_key or args.tls_ca.with_name("ca-key.pem")
        lab_ca = CertificateAuthority(args.tls_ca.resolve(), key.resolve())
        load_ca(lab_ca)
    data_dir: Path = args.data_dir.resolve()
    config_path = data_dir / "node.toml"
    if config_path.exists() or (data_dir / "node.key").exists():
        raise ConfigError(f"{data_dir} already holds a node; refusing to overwrite it")
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    identity = NodeIdentity.generate(args.origin)
    admin_token = secrets.token_urlsafe(32)
    write_seed(data_dir / "node.key", identity.seed)
    write_secret(data_dir / "admin.token", admin_token.encode() + b"\n")
    https = _self_signed_https(args, data_dir, lab_ca) if args.tls_self_signed else {}
    write_secret(
        config_path,
        render_initial_config(
            args.origin, args.http, args.dimse_port, args.ae_title.strip(), https
        ).encode(),
    )
    result = {
        "origin": args.origin,
        "vkey": identity.vkey,
        "config": str(config_path),
        "http": args.http,
        "admin_token": admin_token,
    }
    if args.json:
        print_json(result)
    else:
        print(f"Created node {args.origin} in {data_dir}")
        print(f"  verifier key: {identity.vkey}")
        print(f"  config:       {config_path}")
        print(f"  URL:          {https.get('public_url') or f'http://{args.http}'}")
        if https:
            ca_file = data_dir / https["trusted_ca_file"]
            print(f"  pinned CA:    {ca_file} (give it to peers and wallets)")
        print(f"  admin token:  {admin_token}")
        print(f"Start it with: imageshare run -c {config_path}")
    return EXIT_OK


def _self_signed_https(
    args: argparse.Namespace, data_dir: Path, lab_ca: CertificateAuthority | None
) -> dict[str, str]:
    """Make DATA_DIR/tls: the CA (new, or a copy of ``lab_ca``'s certificate), the node's
    certificate and key; returns the [http] settings that use them."""
    host, port = parse_listen(args.http)
    names = [origin_host(args.origin), host, "localhost", "127.0.0.1"]
    hosts = [n for n in names if n and n not in ("0.0.0.0", "::", "[::]")]
    tls_dir = data_dir / "tls"
    tls_dir.mkdir(mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    if lab_ca is None:
        ca = make_ca(tls_dir, f"ImageShare lab CA ({args.origin})", now)
    else:
        ca = lab_ca
        shutil.copyfile(ca.cert_file, tls_dir / "ca.pem")
    issue_server_certificate(ca, hosts, tls_dir / "cert.pem", tls_dir / "key.pem", now)
    # Listening on every interface, peers reach it by the origin's host name.
    public_host = host if host in hosts else hosts[0]
    return {
        "public_url": f"https://{public_host}:{port}",
        "cert_file": "tls/cert.pem",
        "key_file": "tls/key.pem",
        "trusted_ca_file": "tls/ca.pem",
    }


def cmd_run(args: argparse.Namespace) -> int:
    from node.edges.daemon import serve

    runtime = open_runtime(config_of(args))
    asyncio.run(serve(runtime))
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    config = config_of(args)
    for path in args.paths:
        if not path.exists():
            raise ConfigError(f"{path} does not exist")
    files = list(iter_files(args.paths))
    runtime = open_runtime(config)
    bar = ProgressBar(len(files), "importing")
    try:
        summary = import_files(
            runtime.store,
            files,
            batch_size=config.store.batch_size,
            on_file=lambda _p: bar.advance(),
        )
    finally:
        bar.close()
        runtime.close()
    if args.json:
        print_json(summary.as_json())
    else:
        print(
            f"{summary.stored} stored, {summary.duplicate} duplicate, "
            f"{len(summary.rejected)} rejected ({len(summary.studies)} studies, "
            f"{summary.bytes_stored / 1e6:.1f} MB)"
        )
        for path, reason in summary.rejected:
            print(f"  rejected {path}: {reason}", file=sys.stderr)
    return (
        EXIT_FAILED if summary.rejected and not (summary.stored or summary.duplicate) else EXIT_OK
    )
