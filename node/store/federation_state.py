"""What federation keeps on disk: the roster file, and the proofs of equivocation.

``peers.toml`` in the data directory holds the members added with ``imageshare peers
add`` (the same ``[[peers]]`` tables as node.toml); the daemon re-reads it when it
changes. ``federation.sqlite`` holds equivocations: pairs of validly signed, inconsistent
checkpoints of one log, kept forever as the proof that its node misbehaved.
"""

from __future__ import annotations

import json
import os
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from node.core.roster import Member, make_member
from node.errors import ConfigError, ImageShareError
from node.store.sqlite import connect_durable

ROSTER_FILE = "peers.toml"
STATE_FILE = "federation.sqlite"


def roster_path(data_dir: Path) -> Path:
    return data_dir / ROSTER_FILE


def read_roster_file(path: Path) -> list[Member]:
    """Members listed in a peers.toml; empty if absent; raises ConfigError if malformed."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return []
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name} is not valid TOML: {exc}") from exc
    members = []
    for entry in raw.get("peers", []):
        if not isinstance(entry, dict) or set(entry) - {"origin", "url", "vkey"}:
            raise ConfigError(f"{path.name}: each [[peers]] needs only origin, url and vkey")
        try:
            members.append(
                make_member(str(entry["origin"]), str(entry.get("url", "")), str(entry["vkey"]))
            )
        except (KeyError, ImageShareError) as exc:
            raise ConfigError(f"{path.name}: bad peer entry: {exc}") from exc
    return members


def write_roster_file(path: Path, members: list[Member]) -> None:
    """Replace peers.toml atomically and durably (write, fsync, rename, fsync dir)."""
    # JSON string literals are valid TOML basic strings for the printable text we accept.
    text = "# Federation members added with `imageshare peers add`.\n" + "".join(
        f"\n[[peers]]\norigin = {json.dumps(m.origin)}\nurl = {json.dumps(m.url)}\n"
        f"vkey = {json.dumps(m.vkey)}\n"
        for m in members
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class Equivocation:
    """Two checkpoints of one log, both validly signed by its key, that cannot both hold."""

    log_id: str
    origin: str
    note_a: str
    note_b: str
    reason: str
    detected_at: int

    def as_json(self) -> dict[str, object]:
        return {
            "log_id": self.log_id,
            "origin": self.origin,
            "notes": [self.note_a, self.note_b],
            "reason": self.reason,
            "detected_at": self.detected_at,
        }


class FederationState:
    """Durable equivocation proofs (WAL, synchronous=FULL)."""

    def __init__(self, db_path: Path) -> None:
        self._lock = threading.Lock()
        self._db = connect_durable(db_path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS equivocations ("
            " log_id TEXT NOT NULL, origin TEXT NOT NULL, note_a TEXT NOT NULL,"
            " note_b TEXT NOT NULL, reason TEXT NOT NULL, detected_at INTEGER NOT NULL,"
            " PRIMARY KEY (log_id, note_a, note_b))"
        )

    def record_equivocation(self, proof: Equivocation) -> bool:
        """Keep the proof durably; False if this pair was already recorded."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO equivocations VALUES (?, ?, ?, ?, ?, ?)",
                (
                    proof.log_id,
                    proof.origin,
                    proof.note_a,
                    proof.note_b,
                    proof.reason,
                    proof.detected_at,
                ),
            )
            return cursor.rowcount == 1

    def equivocations(self) -> list[Equivocation]:
        with self._lock:
            rows = self._db.execute(
                "SELECT log_id, origin, note_a, note_b, reason, detected_at"
                " FROM equivocations ORDER BY detected_at, log_id"
            ).fetchall()
        return [Equivocation(*row) for row in rows]

    def equivocating_logs(self) -> set[str]:
        """Log IDs whose new entries are no longer accepted."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT log_id FROM equivocations").fetchall()
        return {row[0] for row in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
