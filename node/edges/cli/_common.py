"""What every sub-command shares: the common flags, output, and error-to-exit mapping."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
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
    Unauthorized,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class Unreachable(ImageShareError):
    """A node or peer could not be reached (exit 2)."""


class CheckFailed(ImageShareError):
    """A verification found a problem (exit 1)."""


def add_common(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="node.toml (default: $IMAGESHARE_CONFIG, else ./node.toml)",
    )
    if json_output:
        parser.add_argument("--json", action="store_true", help="print one JSON document")


def command(
    subparsers: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help: str,
    json_output: bool = True,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=help)
    add_common(parser, json_output)
    parser.set_defaults(handler=handler)
    return parser


def config_of(args: argparse.Namespace) -> NodeConfig:
    return load_config(args.config)


def print_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def fail(message: str) -> None:
    sys.stderr.write(f"imageshare: {message.rstrip('.')}.\n")


def exit_code_for(exc: ImageShareError) -> int:
    if isinstance(exc, ConfigError | Unreachable):
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
