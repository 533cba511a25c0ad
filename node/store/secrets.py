"""Secret files in the data directory: written once, mode 0600, never logged."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from node.errors import ConfigError


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and ``data``, durably; refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_secret(path: Path) -> bytes:
    """Read a secret file, refusing one that others can read."""
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"missing secret file {path.name} in the data directory") from exc
    if mode & 0o077:
        raise ConfigError(f"{path.name} must not be readable by others (chmod 600 it)")
    return data


def write_seed(path: Path, seed: bytes) -> None:
    write_secret(path, base64.b64encode(seed) + b"\n")


def read_seed(path: Path) -> bytes:
    try:
        seed = base64.b64decode(read_secret(path).strip(), validate=True)
    except ValueError as exc:
        raise ConfigError(f"{path.name} is not a base64 key") from exc
    if len(seed) != 32:
        raise ConfigError(f"{path.name} does not hold a 32-byte key")
    return seed
