"""What every sub-command shares: the common flags, output, and error-to-exit mapping."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.config import NodeConfig, load_config
from node.errors import (
    BadInput,
    ConfigError,
    Forbidden,
    ImageShareError,
    NotFound,
    PeerUnreachable,
    Unauthorized,
)
from node.services.peer_client import error_document, error_for_status
from node.services.tls import own_certificate_context
from node.store.secrets import read_secret

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


CA_FILE_ENV = "IMAGESHARE_CA_FILE"


class DaemonNotRunning(PeerUnreachable):
    """Nothing listens at the node's own HTTP address: its daemon is not running."""


class CheckFailed(ImageShareError):
    """A verification found a problem (exit 1)."""


def add_common(
    parser: argparse.ArgumentParser, json_output: bool = True, reaches_nodes: bool = False
) -> None:
    """-c/--config, --json, and for commands that call other nodes (``reaches_nodes``)
    --ca-file."""
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="node.toml (default: $IMAGESHARE_CONFIG, else ./node.toml)",
    )
    if json_output:
        parser.add_argument("--json", action="store_true", help="print one JSON document")
    if not reaches_nodes:
        return
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="trust only this CA (PEM) for https:// nodes"
        f" (default: ${CA_FILE_ENV}, else the system's CAs)",
    )


def command(
    subparsers: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help: str,
    json_output: bool = True,
    reaches_nodes: bool = False,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=help)
    add_common(parser, json_output, reaches_nodes)
    parser.set_defaults(handler=handler)
    return parser


def config_of(args: argparse.Namespace) -> NodeConfig:
    return load_config(args.config)


def ca_file_of(args: argparse.Namespace) -> str:
    """The CA file to trust for https:// nodes: --ca-file, else $IMAGESHARE_CA_FILE, else
    "" (the system's CAs)."""
    chosen = getattr(args, "ca_file", None) or os.environ.get(CA_FILE_ENV) or ""
    return str(Path(chosen).expanduser()) if chosen else ""


def own_daemon_url(config: NodeConfig) -> str:
    """Where this machine reaches the node's own daemon: its listen address (loopback for
    a wildcard), over https when the node serves TLS."""
    host, _, port = config.http.listen.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    scheme = "https" if config.http.tls else "http"
    return f"{scheme}://{host}:{port}"


def admin_request(
    config: NodeConfig, method: str, path: str, body: Any = None, timeout: float = 30
) -> Any:
    """One JSON call to the node's own admin API with its admin token.

    Over TLS the daemon must present exactly the node's own certificate. Raises
    DaemonNotRunning if nothing listens, PeerUnreachable if it does not answer, and the
    error of its status (peer_client.error_for_status) for a refusal.
    """
    base = own_daemon_url(config)
    token = read_secret(config.admin_token_path).decode().strip()
    request = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    context = own_certificate_context(config.http.cert_file) if config.http.tls else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        message = error_document(exc.read()).get("error") or str(exc.code)
        raise error_for_status(exc.code, f"the node refused: {message}") from exc
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"the node's daemon does not answer at {base} (is `imageshare run` up?)"
            ) from exc
        raise PeerUnreachable(f"the node's daemon did not answer at {base}: {reason}") from exc


def print_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def fail(message: str) -> None:
    sys.stderr.write(f"imageshare: {message.rstrip('.')}.\n")


def exit_code_for(exc: ImageShareError) -> int:
    if isinstance(exc, ConfigError | PeerUnreachable):
        return EXIT_USAGE
    if isinstance(exc, CheckFailed | Forbidden | Unauthorized | NotFound | BadInput):
        return EXIT_FAILED
    return EXIT_FAILED


def run_handler(args: argparse.Namespace) -> int:
    # Everything the node writes (studies, index, ledger, keys) is for this user alone.
    os.umask(0o077)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except ImageShareError as exc:
        fail(str(exc))
        return exit_code_for(exc)
    except KeyboardInterrupt:
        fail("interrupted")
        return EXIT_FAILED
    except OSError as exc:
        fail(f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc))
        return EXIT_USAGE


class ProgressBar:
    """A one-line progress bar on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(self, total: int, label: str, unit: str = "") -> None:
        self.total = max(total, 1)
        self.label = label
        self.unit = unit
        self.done = 0
        self.enabled = sys.stderr.isatty()

    def advance(self, step: int = 1) -> None:
        self.done += step
        if self.enabled:
            width = 30
            filled = int(width * min(self.done, self.total) / self.total)
            sys.stderr.write(
                f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                f"{self.done}/{self.total}{self.unit}"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
