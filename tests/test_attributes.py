"""The indexed attributes are declared once: the header, the index and the queries follow."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest

from node.errors import BadInput
from node.samples import make_ct_study
from node.services.ingest import import_files
from node.store.attributes import ATTRIBUTES, INDEXED, TABLES, UNIQUE_KEYS, Level
from node.store.dicom_header import InflateLimits, parse_header
from node.store.instances import SCHEMA, SqliteInstanceStore
from node.store.queries import parse_qido

LIMITS = InflateLimits(max_bytes=1024**3, max_ratio=100.0)
# Values for the attributes make_ct_study leaves out.
EXTRA = {
    "IssuerOfPatientID": "HOSPITAL-A",
    "SeriesDate": "20260102",
    "SeriesTime": "101500",
    "BodyPartExamined": "CHEST",
    "PerformedProcedureStepStartDate": "20260103",
    "PerformedProcedureStepStartTime": "101500",
    "TimezoneOffsetFromUTC": "+0100",
    "NumberOfFrames": "1",
}


def test_every_declared_attribute_is_read_from_the_file_and_kept_in_its_column(
    tmp_path: Path,
) -> None:
    study = make_ct_study(tmp_path / "in", series=1, slices=1, rows=8, columns=8)
    path = study.files[0]
    ds = pydicom.dcmread(path)
    for keyword, value in EXTRA.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    header = parse_header(path, LIMITS)
    assert parse_header(path.read_bytes(), LIMITS) == header  # the check of a file in memory
    store = SqliteInstanceStore(tmp_path / "data")
    try:
        import_files(store, [path])
        for attribute in INDEXED:
            if attribute.keyword == "AvailableTransferSyntaxUID":
                expected: object = str(ds.file_meta.TransferSyntaxUID)
            else:
                raw = ds[attribute.keyword].value
                expected = int(raw) if attribute.integer else str(raw)
            assert expected not in ("", None), attribute.keyword  # every one is exercised
            assert header.values[attribute.column or ""] == expected, attribute.keyword
            table = TABLES[attribute.level]
            key = UNIQUE_KEYS[max(lv for lv in Level if TABLES[lv] == table)]
            row = store.reader.execute(
                f"SELECT {attribute.column} FROM {table} WHERE {key.column} = ?",
                (header.values[key.column or ""],),
            ).fetchone()
            assert row[0] == expected, attribute.keyword
        [found] = store.search(parse_qido(Level.INSTANCE, [("includefield", "all")])).rows
        assert {a.keyword for a in ATTRIBUTES} <= set(found)
    finally:
        store.close()


def test_the_same_value_bytes_are_read_as_each_file_s_character_set_says(
    tmp_path: Path,
) -> None:
    study = make_ct_study(tmp_path / "in", series=1, slices=2, rows=8, columns=8)
    name = "M\u00fcller^J\u00fcrgen".encode()  # the same bytes in both files
    expected = {}
    for path, charset, codec in zip(
        study.files, ("ISO_IR 100", "ISO_IR 192"), ("latin-1", "utf-8"), strict=True
    ):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = charset
        ds.PatientName = expected[path] = name.decode(codec)
        ds.save_as(path)
    assert expected[study.files[0]] != expected[study.files[1]]
    for _ in range(2):  # a value read once is read the same again
        for path in study.files:
            assert parse_header(path.read_bytes(), LIMITS).values["patient_name"] == expected[path]


def test_an_indexed_value_longer_than_any_real_one_is_refused(tmp_path: Path) -> None:
    study = make_ct_study(tmp_path / "in", series=1, slices=1, rows=8, columns=8)
    path = study.files[0]
    ds = pydicom.dcmread(path)
    ds.StudyDescription = "x" * 70_000  # longer than LO's 16-bit length: written as UN
    ds.save_as(path)
    for source in (path, path.read_bytes()):
        with pytest.raises(BadInput, match="StudyDescription"):
            parse_header(source, LIMITS)


def test_the_index_tables_have_a_column_for_every_indexed_attribute(tmp_path: Path) -> None:
    store = SqliteInstanceStore(tmp_path / "data")
    try:
        for table, spec in SCHEMA.items():
            on_disk = {r[1] for r in store.reader.execute(f"PRAGMA table_info({table})")}
            assert on_disk == set(spec["columns"])
            declared = {a.column for a in INDEXED if TABLES[a.level] == table}
            assert declared <= on_disk
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "data" / "index.sqlite") as conn:
        pks = conn.execute("SELECT name FROM pragma_table_info('series') WHERE pk").fetchall()
    assert pks == [("series_instance_uid",)]


def test_an_index_made_before_an_attribute_was_declared_gains_its_column(
    tmp_path: Path,
) -> None:
    store = SqliteInstanceStore(tmp_path / "data")
    store.close()
    with sqlite3.connect(tmp_path / "data" / "index.sqlite") as conn:
        conn.execute("ALTER TABLE series DROP COLUMN performed_procedure_step_start_time")
        conn.execute("PRAGMA user_version = 1")  # written before the attribute was declared
    conn.close()
    store = SqliteInstanceStore(tmp_path / "data")
    try:
        query = parse_qido(Level.SERIES, [("PerformedProcedureStepStartTime", "10-11")])
        assert store.search(query).rows == []
    finally:
        store.close()
