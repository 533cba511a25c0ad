"""The custodian's share links: what it keeps of each, none of it a usable secret.

Per link: its grantee (``link:`` + the credential's SHA-256, as the grant names it), the
SHA-256 of its manifest id, the grant's token id, the passcode's Argon2id hash (if any),
the count of wrong passcodes and whether that killed the link, whether its holder may
return an opinion, and the manifest's files
exactly as the wallet encrypted them. Neither the link key, the manifest id, the access
token nor the passcode is stored. The grant itself and its revocation are in the ledger
(node.services.consent); this file is not replicated.

One SQLite file, WAL with synchronous=FULL (a link is acknowledged once committed); or
the same table in PostgreSQL (component "links"), shared by every daemon of the node: a
wrong passcode counts once whichever daemon it reached, and the link dies at the limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.core.shlink import ManifestFile
from node.errors import Conflict
from node.store.pg_sql import StateDatabase, open_pg_database, postgresql_schema, script
from node.store.sqlite import LockedDatabase, Migration

FILE_NAME = "links.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS links (
    grantee TEXT PRIMARY KEY, manifest_digest BLOB NOT NULL UNIQUE,
    token_id BLOB NOT NULL UNIQUE, passcode_hash BLOB, failures INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0, files TEXT NOT NULL) WITHOUT ROWID;
"""
# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
OPINIONS_COLUMN = "ALTER TABLE links ADD COLUMN opinions INTEGER NOT NULL DEFAULT 0;"
MIGRATIONS: tuple[Migration, ...] = (
    SCHEMA,
    # Whether the link's holder may return an opinion (docs/share-links.md).
    OPINIONS_COLUMN,
)
# The same table on PostgreSQL (node/store/postgres.py ``migrate``, component "links").
PG_MIGRATIONS = (script(postgresql_schema(SCHEMA + OPINIONS_COLUMN)),)


@dataclass(frozen=True)
class LinkRecord:
    grantee: str
    manifest_digest: bytes
    token_id: bytes
    passcode_hash: bytes | None
    failures: int
    dead: bool
    files: list[ManifestFile]
    opinions: bool = False  # its holder may return an opinion (POST /links/{token}/opinions)


class LinkStore:
    """The share links of one custodian."""

    def __init__(self, db_path: Path) -> None:
        self._database: StateDatabase = LockedDatabase(db_path, MIGRATIONS)

    def close(self) -> None:
        self._database.close()

    def add(self, record: LinkRecord) -> None:
        """Keep a new link durably; raises Conflict if its grantee or manifest id is taken."""
        files = json.dumps([f.as_json() for f in record.files])
        with self._database.transaction() as db:
            known = db.execute(
                "SELECT token_id FROM links WHERE grantee = ? OR manifest_digest = ?",
                (record.grantee, record.manifest_digest),
            ).fetchone()
            if known is not None:
                if bytes(known[0]) == record.token_id:
                    return  # the same link submitted again
                raise Conflict("a link with that credential or manifest id exists already")
            db.execute(
                "INSERT INTO links (grantee, manifest_digest, token_id, passcode_hash, files,"
                " opinions) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.grantee,
                    record.manifest_digest,
                    record.token_id,
                    record.passcode_hash,
                    files,
                    int(record.opinions),
                ),
            )

    def _row(self, where: str, value: object) -> LinkRecord | None:
        with self._database.connection() as db:
            row = db.execute(
                "SELECT grantee, manifest_digest, token_id, passcode_hash, failures, dead, files,"
                f" opinions FROM links WHERE {where} = ?",
                (value,),
            ).fetchone()
        if row is None:
            return None
        files = [ManifestFile(f["contentType"], f["embedded"]) for f in json.loads(row[6])]
        return LinkRecord(
            row[0],
            bytes(row[1]),
            bytes(row[2]),
            None if row[3] is None else bytes(row[3]),
            int(row[4]),
            bool(row[5]),
            files,
            bool(row[7]),
        )

    def by_manifest(self, manifest_digest: bytes) -> LinkRecord | None:
        return self._row("manifest_digest", manifest_digest)

    def by_grantee(self, grantee: str) -> LinkRecord | None:
        return self._row("grantee", grantee)

    def count_failure(self, grantee: str, limit: int) -> tuple[int, bool]:
        """Count one wrong passcode; the link dies at ``limit``. Returns (failures, dead)."""
        with self._database.transaction() as db:
            db.execute(
                "UPDATE links SET failures = failures + 1,"
                " dead = CASE WHEN failures + 1 >= ? THEN 1 ELSE dead END WHERE grantee = ?",
                (limit, grantee),
            )
            row = db.execute(
                "SELECT failures, dead FROM links WHERE grantee = ?", (grantee,)
            ).fetchone()
        return int(row[0]), bool(row[1])


class PostgresLinkStore(LinkStore):
    """The share links in PostgreSQL, shared by every daemon of the node."""

    def __init__(self, pool: Any) -> None:
        self._database = open_pg_database(pool, PG_MIGRATIONS, "links", "links")
