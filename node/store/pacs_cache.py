"""Studies retrieved from the hospital's PACS, kept under a size limit (docs/pacs.md).

Apart from the instance store on purpose: a cached study is a copy of what the PACS
holds, not something the node was sent, so it is never listed as the node's own, never
forwarded, and may be dropped at any time it is not being served. Kept in
``pacs-cache/`` under the data directory::

    cache.sqlite   studies(study_uid, complete, bytes, last_used)
                   instances(study_uid, sop_uid, digest, size)
                   listed(study_uid, patient_id, date, description, modalities,
                          instances, listed_at): the PACS's last answer per patient
    <digest>.dcm   the instances, each exactly as the PACS sent it

An instance is fsynced and renamed into place before its row commits, so a row always
names a whole file, and a manifest may name it as soon as its row is there. ``complete``
is set once every instance the PACS listed is held; a retrieve cut off part way leaves
the instances it got, and the next retrieve adds the rest.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from node.store.instances import StagedInstance, fsync_path
from node.store.sqlite import Migration, open_database

DIRECTORY_NAME = "pacs-cache"
FILE_NAME = "cache.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    complete INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_lru ON studies (last_used);
CREATE TABLE IF NOT EXISTS instances (
    study_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (study_uid, sop_uid)
);
CREATE INDEX IF NOT EXISTS instances_digest ON instances (digest);
"""
# The studies the PACS listed, so that a consent check after a restart while the PACS
# is down is judged by its last answer (modalities joined by backslashes, as in DICOM).
_LISTED = """
CREATE TABLE IF NOT EXISTS listed (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    date TEXT NOT NULL,
    description TEXT NOT NULL,
    modalities TEXT NOT NULL,
    instances INTEGER NOT NULL,
    listed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS listed_by_patient ON listed (patient_id);
"""
# Schema versions (node/store/sqlite.py): position n upgrades version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (_SCHEMA, _LISTED)


@dataclass(frozen=True)
class PacsStudy:
    """A study as the PACS lists it (the patient's own id, never sent on)."""

    study_uid: str
    patient_id: str
    date: str
    description: str
    modalities: tuple[str, ...]
    instances: int


@dataclass(frozen=True)
class CachedInstance:
    """One cached instance: what a manifest names and where its bytes are."""

    sop_instance_uid: str
    digest: str
    size: int
    path: Path


@dataclass(frozen=True)
class CacheUsage:
    studies: int
    complete: int
    bytes: int


class PacsCache:
    """The cache's files and table; every method blocks (call it off the event loop)."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / DIRECTORY_NAME
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = open_database(self.directory / FILE_NAME, MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def path_of(self, digest: str) -> Path:
        return self.directory / f"{digest}.dcm"

    def held(self, study_uid: str) -> set[str]:
        """The SOP Instance UIDs of the study already cached (complete or not)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT sop_uid FROM instances WHERE study_uid = ?", (study_uid,)
            ).fetchall()
        return {row[0] for row in rows}

    def put(self, study_uid: str, staged: StagedInstance) -> bool:
        """Make a staged instance of ``study_uid`` durable in the cache (the staged file
        is moved, never copied); an instance already held is dropped. True if it was
        new."""
        sop_uid = staged.header.sop_instance_uid
        target = self.path_of(staged.digest)
        with open(staged.tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staged.tmp_path, target)
        fsync_path(self.directory)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                inserted = self._conn.execute(
                    "INSERT OR IGNORE INTO instances (study_uid, sop_uid, digest, size)"
                    " VALUES (?, ?, ?, ?)",
                    (study_uid, sop_uid, staged.digest, staged.size),
                ).rowcount
                self._conn.execute(
                    "INSERT INTO studies (study_uid, last_used) VALUES (?, ?)"
                    " ON CONFLICT (study_uid) DO NOTHING",
                    (study_uid, time.time()),
                )
                if inserted:
                    self._conn.execute(
                        "UPDATE studies SET bytes = bytes + ? WHERE study_uid = ?",
                        (staged.size, study_uid),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return bool(inserted)

    def mark_complete(self, study_uid: str) -> None:
        """Record that every instance the PACS lists for the study is held."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO studies (study_uid, complete, last_used) VALUES (?, 1, ?)"
                " ON CONFLICT (study_uid)"
                " DO UPDATE SET complete = 1, last_used = excluded.last_used",
                (study_uid, time.time()),
            )

    def complete_instances(self, study_uid: str) -> list[CachedInstance] | None:
        """The instances of a completely cached study in UID order (and it counts as just
        used), or None if the study is not cached whole."""
        with self._lock:
            row = self._conn.execute(
                "SELECT complete FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            if row is None or not row[0]:
                return None
            self._conn.execute(
                "UPDATE studies SET last_used = ? WHERE study_uid = ?", (time.time(), study_uid)
            )
            return self._instances_locked(study_uid)

    def instances_held(self, study_uid: str) -> list[CachedInstance]:
        """The instances of the study cached so far (whole or not), in UID order."""
        with self._lock:
            return self._instances_locked(study_uid)

    def _instances_locked(self, study_uid: str) -> list[CachedInstance]:
        rows = self._conn.execute(
            "SELECT sop_uid, digest, size FROM instances WHERE study_uid = ? ORDER BY sop_uid",
            (study_uid,),
        ).fetchall()
        return [
            CachedInstance(uid, digest, size, self.path_of(digest)) for uid, digest, size in rows
        ]

    def evict(self, limit_bytes: int, keep: Iterable[str]) -> list[str]:
        """Drop least recently used studies until the cache holds at most ``limit_bytes``,
        never one in ``keep`` (being retrieved or served); returns the dropped studies."""
        kept = set(keep)
        dropped: list[str] = []
        with self._lock:
            total = self._conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM studies").fetchone()[0]
            for study_uid, size in self._conn.execute(
                "SELECT study_uid, bytes FROM studies ORDER BY last_used"
            ).fetchall():
                if total <= limit_bytes:
                    break
                if study_uid in kept:
                    continue
                self._drop_locked(study_uid)
                dropped.append(study_uid)
                total -= size
        return dropped

    def drop(self, study_uid: str) -> bool:
        """Drop a study from the cache (its listing stays); False if it held none."""
        with self._lock:
            held = self._conn.execute(
                "SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            if held is not None:
                self._drop_locked(study_uid)
        return held is not None

    def _drop_locked(self, study_uid: str) -> None:
        digests = [
            row[0]
            for row in self._conn.execute(
                "SELECT digest FROM instances WHERE study_uid = ?", (study_uid,)
            )
        ]
        # The rows go first: a crash between leaves files no row names, never the reverse.
        self._conn.execute("BEGIN IMMEDIATE")
        self._conn.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
        self._conn.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
        self._conn.execute("COMMIT")
        for digest in digests:
            shared = self._conn.execute(
                "SELECT 1 FROM instances WHERE digest = ? LIMIT 1", (digest,)
            ).fetchone()
            if shared is None:
                self.path_of(digest).unlink(missing_ok=True)

    def replace_listing(self, patient_id: str, studies: Iterable[PacsStudy]) -> None:
        """Keep the PACS's answer for a patient in place of the last one: a study it no
        longer lists for them is no longer theirs here."""
        rows = [
            (s.study_uid, patient_id, s.date, s.description, "\\".join(s.modalities), s.instances)
            for s in studies
        ]
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("DELETE FROM listed WHERE patient_id = ?", (patient_id,))
                self._conn.executemany(
                    "INSERT OR REPLACE INTO listed (study_uid, patient_id, date, description,"
                    " modalities, instances, listed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(*row, now) for row in rows],
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def listing(self, patient_id: str) -> list[PacsStudy]:
        """The PACS's last answer for a patient, in the order it answered."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_LISTED_COLUMNS} FROM listed WHERE patient_id = ? ORDER BY rowid",
                (patient_id,),
            ).fetchall()
        return [_listed_study(row) for row in rows]

    def listed_study(self, study_uid: str) -> PacsStudy | None:
        """A study as the PACS last listed it, or None."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_LISTED_COLUMNS} FROM listed WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        return None if row is None else _listed_study(row)

    def usage(self) -> CacheUsage:
        """How many studies (and whole ones) and bytes the cache holds."""
        with self._lock:
            studies, complete, size = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(complete), 0), COALESCE(SUM(bytes), 0) FROM studies"
            ).fetchone()
        return CacheUsage(int(studies), int(complete), int(size))


_LISTED_COLUMNS = "study_uid, patient_id, date, description, modalities, instances"


def _listed_study(row: tuple[str, str, str, str, str, int]) -> PacsStudy:
    uid, patient_id, date, description, modalities, instances = row
    return PacsStudy(
        uid,
        patient_id,
        date,
        description,
        tuple(modalities.split("\\")) if modalities else (),
        instances,
    )
