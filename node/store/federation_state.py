"""What federation keeps on disk: the roster file, and the proofs of equivocation.

``peers.toml`` in the data directory holds the members added with ``imageshare peers
add`` (the same ``[[peers]]`` tables as node.toml); the daemon re-reads it when it
changes. ``federation.sqlite`` holds equivocations: verified proofs (two validly signed,
inconsistent checkpoints of one log and the hashes that show it, node.core.equivocation),
kept forever as the proof that its node misbehaved; and, for selective mirroring, the
members this node deals with (whose logs it mirrors), how far its own log was read for
them, and the latest verified checkpoint of each log it does not mirror. On PostgreSQL
(component "federation") the same tables serve every daemon of the node.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.core.equivocation import EquivocationProof
from node.core.merkle import HASH_SIZE
from node.core.roster import Member, make_member
from node.errors import ConfigError, ImageShareError
from node.store.pg_sql import StateDatabase, open_pg_database, script
from node.store.sqlite import LockedDatabase, Migration, add_missing_columns

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
    """Replace peers.toml atomically and durably."""
    # JSON string literals are valid TOML basic strings for the printable text we accept.
    text = "# Federation members added with `imageshare peers add`.\n" + "".join(
        f"\n[[peers]]\norigin = {json.dumps(m.origin)}\nurl = {json.dumps(m.url)}\n"
        f"vkey = {json.dumps(m.vkey)}\n"
        for m in members
    )
    replace_file(path, text.encode())


def replace_file(path: Path, data: bytes) -> None:
    """Replace a federation file atomically and durably (write, fsync, rename, fsync dir), 0600."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
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
    """A verified equivocation proof, why it holds, and when this node first had it."""

    proof: EquivocationProof
    reason: str
    detected_at: int

    @property
    def log_id(self) -> str:
        return self.proof.log_id

    @property
    def origin(self) -> str:
        return self.proof.origin

    def as_json(self) -> dict[str, object]:
        """The wire form of node.core.equivocation, with the reason and time."""
        return {**self.proof.as_json(), "reason": self.reason, "detected_at": self.detected_at}


def _create_equivocations(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS equivocations ("
        " log_id TEXT NOT NULL, origin TEXT NOT NULL, note_a TEXT NOT NULL,"
        " note_b TEXT NOT NULL, reason TEXT NOT NULL, detected_at INTEGER NOT NULL,"
        " prefix_root BLOB, consistency BLOB NOT NULL DEFAULT x'',"
        " PRIMARY KEY (log_id, note_a, note_b))"
    )
    # A table from before proofs were self-contained lacks their last two columns.
    add_missing_columns(
        conn,
        "equivocations",
        {"prefix_root": "BLOB", "consistency": "BLOB NOT NULL DEFAULT x''"},
    )


def _create_mirroring(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS dealings (origin TEXT PRIMARY KEY, since INTEGER NOT NULL)"
    )
    # One row: the size of this node's own log already read for dealings.
    conn.execute("CREATE TABLE IF NOT EXISTS dealings_scanned (size INTEGER NOT NULL)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS checkpoints ("
        " log_id TEXT PRIMARY KEY, origin TEXT NOT NULL, size INTEGER NOT NULL,"
        " note TEXT NOT NULL, source TEXT NOT NULL)"
    )


# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (_create_equivocations, _create_mirroring)

# The same tables on PostgreSQL (node/store/postgres.py ``migrate``, component
# "federation"). A B-tree key holds at most a few kilobytes and a note may hold up to a
# mebibyte, so a pair of notes is unique by its digests (``notes_digest``, PostgreSQL's
# alone, derived from the notes), never by the notes themselves: a peer cannot make its
# proof unrecordable by padding its notes.
PG_MIGRATIONS = (
    script(
        """
        -- Immutable as declared: a database's encoding is fixed when it is created.
        CREATE OR REPLACE FUNCTION imageshare_note_digest(note text) RETURNS bytea
            LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT sha256(convert_to(note, 'UTF8')) $$;
        CREATE TABLE IF NOT EXISTS equivocations (
            log_id TEXT COLLATE "C" NOT NULL, origin TEXT NOT NULL, note_a TEXT NOT NULL,
            note_b TEXT NOT NULL, reason TEXT NOT NULL, detected_at BIGINT NOT NULL,
            prefix_root BYTEA, consistency BYTEA NOT NULL DEFAULT ''::bytea,
            notes_digest BYTEA GENERATED ALWAYS AS (
                imageshare_note_digest(note_a) || imageshare_note_digest(note_b)) STORED,
            UNIQUE (log_id, notes_digest));
        CREATE TABLE IF NOT EXISTS dealings (origin TEXT PRIMARY KEY, since BIGINT NOT NULL);
        CREATE TABLE IF NOT EXISTS dealings_scanned (size BIGINT NOT NULL);
        CREATE TABLE IF NOT EXISTS checkpoints (
            log_id TEXT PRIMARY KEY, origin TEXT NOT NULL, size BIGINT NOT NULL,
            note TEXT NOT NULL, source TEXT NOT NULL);
        """
    ),
)


class FederationState:
    """Durable equivocation proofs (WAL, synchronous=FULL)."""

    def __init__(self, db_path: Path) -> None:
        # Replication handles StorageFailed like its other failures (never sqlite3's).
        self._database: StateDatabase = LockedDatabase(db_path, MIGRATIONS, node_errors=True)

    def record_equivocation(self, found: Equivocation) -> bool:
        """Keep the proof durably; False if this pair of notes was already recorded."""
        proof = found.proof
        with self._database.connection() as db:
            # No conflict target: the key of a pair of notes is each engine's own.
            cursor = db.execute(
                "INSERT INTO equivocations (log_id, origin, note_a, note_b, reason, detected_at,"
                " prefix_root, consistency) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (
                    proof.log_id,
                    proof.origin,
                    proof.notes[0],
                    proof.notes[1],
                    found.reason,
                    found.detected_at,
                    proof.prefix_root,
                    b"".join(proof.consistency),
                ),
            )
            return cursor.rowcount == 1

    def equivocations(self) -> list[Equivocation]:
        """Every proof kept, oldest first."""
        with self._database.connection() as db:
            rows = db.execute(
                "SELECT origin, note_a, note_b, prefix_root, consistency, reason, detected_at"
                " FROM equivocations ORDER BY detected_at, log_id"
            ).fetchall()
        found = []
        for origin, note_a, note_b, prefix_root, consistency, reason, detected_at in rows:
            hashes = tuple(
                bytes(consistency[i : i + HASH_SIZE]) for i in range(0, len(consistency), HASH_SIZE)
            )
            root = None if prefix_root is None else bytes(prefix_root)
            proof = EquivocationProof(origin, (note_a, note_b), root, hashes)
            found.append(Equivocation(proof, reason, detected_at))
        return found

    def equivocating_logs(self) -> set[str]:
        """Log IDs whose new entries are no longer accepted."""
        with self._database.connection() as db:
            rows = db.execute("SELECT DISTINCT log_id FROM equivocations").fetchall()
        return {row[0] for row in rows}

    # ---- selective mirroring ---------------------------------------------------------------

    def add_dealings(self, origins: set[str], scanned_size: int | None, now: int) -> set[str]:
        """Keep ``origins`` as members dealt with (and, if given, the own log's size read
        for them), durably in one transaction; returns those that are new."""
        with self._database.transaction() as db:
            new = {
                origin
                for origin in sorted(origins)
                if db.execute(
                    "INSERT INTO dealings (origin, since) VALUES (?, ?)"
                    " ON CONFLICT (origin) DO NOTHING",
                    (origin, now),
                ).rowcount
                == 1
            }
            if scanned_size is not None:
                db.execute("DELETE FROM dealings_scanned")
                db.execute("INSERT INTO dealings_scanned (size) VALUES (?)", (scanned_size,))
        return new

    def dealings(self) -> set[str]:
        with self._database.connection() as db:
            return {row[0] for row in db.execute("SELECT origin FROM dealings")}

    def dealings_scanned(self) -> int:
        """The size of this node's own log already read for dealings (0: none)."""
        with self._database.connection() as db:
            row = db.execute("SELECT size FROM dealings_scanned").fetchone()
        return 0 if row is None else int(row[0])

    def keep_checkpoint(self, log_id: str, origin: str, size: int, note: str, source: str) -> None:
        """Keep the latest verified checkpoint of a log not mirrored here (replacing it),
        and the URL of the log's API that served it (which can prove its tree)."""
        with self._database.connection() as db:
            db.execute(
                "INSERT INTO checkpoints (log_id, origin, size, note, source)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (log_id) DO UPDATE"
                " SET size=excluded.size, note=excluded.note, source=excluded.source",
                (log_id, origin, size, note, source),
            )

    def checkpoint(self, log_id: str) -> tuple[str, str] | None:
        """The latest verified checkpoint note kept of a log not mirrored here and where it
        was served, or None."""
        with self._database.connection() as db:
            row = db.execute(
                "SELECT note, source FROM checkpoints WHERE log_id=?", (log_id,)
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def close(self) -> None:
        self._database.close()


class PostgresFederationState(FederationState):
    """The federation's tables in PostgreSQL, shared by the daemons of the node."""

    def __init__(self, pool: Any) -> None:
        self._database = open_pg_database(pool, PG_MIGRATIONS, "federation", "federation")
