"""The suite-wide privacy sweep: no PHI or DICOM UID of any test study in any ledger entry.

Every scenario of the test suite leaves its nodes' data directories under pytest's base
temporary directory. After the session, every `index.sqlite` there gives the PHI and UIDs
the nodes held, and every entry of every log in every `ledger.sqlite` (own logs and
mirrors) is searched for each of them, as raw bytes.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Values shorter than this (a sex "F", a series number) are not identifying and would
# match random hash bytes by chance.
MIN_VALUE_LENGTH = 6

_PHI_COLUMNS = {
    "studies": [
        "study_instance_uid",
        "patient_id",
        "patient_name",
        "patient_birth_date",
        "accession_number",
        "referring_physician_name",
    ],
    "series": ["series_instance_uid"],
    "instances": ["sop_instance_uid"],
}


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.Error:
        return []  # a store a test corrupted on purpose, or one never initialised


def phi_values(index_db: Path) -> set[bytes]:
    """PHI and UIDs held in one node's instance index, with a person name's parts."""
    values: set[str] = set()
    for table, columns in _PHI_COLUMNS.items():
        for row in _rows(index_db, f"SELECT {', '.join(columns)} FROM {table}"):
            for value in row:
                if isinstance(value, str):
                    values.add(value)
                    values.update(value.split("^"))
    return {v.encode() for v in values if len(v) >= MIN_VALUE_LENGTH}


def ledger_entries(ledger_db: Path) -> Iterator[tuple[str, int, bytes]]:
    """(origin, index, raw entry) of every log stored in one ledger database."""
    sql = (
        "SELECT logs.origin, entries.idx, entries.data"
        " FROM entries JOIN logs ON logs.id = entries.log"
    )
    for origin, index, data in _rows(ledger_db, sql):
        yield str(origin), int(index), bytes(data)  # type: ignore[call-overload]


@dataclass
class Sweep:
    ledgers: int = 0
    entries: int = 0
    values: int = 0
    findings: list[str] = field(default_factory=list)


def sweep(base: Path) -> Sweep:
    """Search every ledger under ``base`` for every PHI value of every index under it."""
    result = Sweep()
    values: set[bytes] = set()
    for index_db in base.rglob("index.sqlite"):
        values |= phi_values(index_db)
    result.values = len(values)
    for ledger_db in base.rglob("ledger.sqlite"):
        result.ledgers += 1
        rows = list(ledger_entries(ledger_db))
        result.entries += len(rows)
        # Each value is searched once through the whole ledger, then through its entries
        # only where found: every value in an entry is in the joined bytes too.
        joined = b"\x00".join(data for _, _, data in rows)
        for value in values:
            if value not in joined:
                continue
            for origin, index, data in rows:
                if value in data:
                    result.findings.append(
                        f"{ledger_db.parent.name}: log {origin} entry {index} holds {value!r}"
                    )
    return result
