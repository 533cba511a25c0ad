"""QIDO-RS over the SQLite index: which attributes can be matched and returned, and how.

One table (ATTRIBUTES) says, for every attribute the index knows, its level, where its
value comes from, how it is matched and whether it is returned by default. A query is
parsed from the request's parameters once (QidoQuery.parse, which fails closed with
BadInput) and run as one SQL statement (run_query).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from node.core.dicom_json import keyword_of, parse_tag
from node.errors import BadInput


class Level(IntEnum):
    STUDY = 1
    SERIES = 2
    INSTANCE = 3


class Match(StrEnum):
    UID_LIST = "uid list"  # exact, several values allowed ("a,b", "a\\b" or repeated)
    TEXT = "text"  # exact, or * and ? wildcards; case-sensitive
    TEXT_NOCASE = "text, any case"  # the same, case-insensitive (names, descriptions)
    VALUE_LIST = "value list"  # exact, several values allowed (Modality)
    DATE_RANGE = "date range"  # X, X-Y, -Y, X-
    TIME_RANGE = "time range"
    INTEGER = "integer"
    MODALITIES_IN_STUDY = "any series modality"
    NONE = "not matchable"


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: Level
    sql: str  # SQL expression over the aliases st, se, i
    match: Match
    default: bool = True  # returned without includefield


_SERIES_COUNT = "(SELECT COUNT(*) FROM series x WHERE x.study_instance_uid = st.study_instance_uid)"
_STUDY_INSTANCE_COUNT = (
    "(SELECT COUNT(*) FROM instances x WHERE x.study_instance_uid = st.study_instance_uid)"
)
_MODALITIES = (
    "(SELECT group_concat(DISTINCT x.modality) FROM series x"
    " WHERE x.study_instance_uid = st.study_instance_uid AND x.modality != '')"
)
_SERIES_INSTANCE_COUNT = (
    "(SELECT COUNT(*) FROM instances x WHERE x.series_instance_uid = se.series_instance_uid)"
)

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("StudyInstanceUID", Level.STUDY, "st.study_instance_uid", Match.UID_LIST),
    Attribute("StudyDate", Level.STUDY, "st.study_date", Match.DATE_RANGE),
    Attribute("StudyTime", Level.STUDY, "st.study_time", Match.TIME_RANGE),
    Attribute("AccessionNumber", Level.STUDY, "st.accession_number", Match.TEXT),
    Attribute("ModalitiesInStudy", Level.STUDY, _MODALITIES, Match.MODALITIES_IN_STUDY),
    Attribute(
        "ReferringPhysicianName", Level.STUDY, "st.referring_physician_name", Match.TEXT_NOCASE
    ),
    Attribute("PatientName", Level.STUDY, "st.patient_name", Match.TEXT_NOCASE),
    Attribute("PatientID", Level.STUDY, "st.patient_id", Match.TEXT),
    Attribute(
        "IssuerOfPatientID", Level.STUDY, "st.issuer_of_patient_id", Match.TEXT, default=False
    ),
    Attribute("PatientBirthDate", Level.STUDY, "st.patient_birth_date", Match.DATE_RANGE),
    Attribute("PatientSex", Level.STUDY, "st.patient_sex", Match.TEXT),
    Attribute("StudyID", Level.STUDY, "st.study_id", Match.TEXT),
    Attribute("StudyDescription", Level.STUDY, "st.study_description", Match.TEXT_NOCASE),
    Attribute("NumberOfStudyRelatedSeries", Level.STUDY, _SERIES_COUNT, Match.NONE),
    Attribute("NumberOfStudyRelatedInstances", Level.STUDY, _STUDY_INSTANCE_COUNT, Match.NONE),
    # Every indexed instance is on local disk.
    Attribute("InstanceAvailability", Level.STUDY, "'ONLINE'", Match.NONE),
    Attribute("SeriesInstanceUID", Level.SERIES, "se.series_instance_uid", Match.UID_LIST),
    Attribute("Modality", Level.SERIES, "se.modality", Match.VALUE_LIST),
    Attribute("SeriesNumber", Level.SERIES, "se.series_number", Match.INTEGER),
    Attribute("SeriesDescription", Level.SERIES, "se.series_description", Match.TEXT_NOCASE),
    Attribute("SeriesDate", Level.SERIES, "se.series_date", Match.DATE_RANGE, default=False),
    Attribute("SeriesTime", Level.SERIES, "se.series_time", Match.TIME_RANGE, default=False),
    Attribute("BodyPartExamined", Level.SERIES, "se.body_part_examined", Match.TEXT, False),
    Attribute(
        "PerformedProcedureStepStartDate",
        Level.SERIES,
        "se.performed_procedure_step_start_date",
        Match.DATE_RANGE,
    ),
    Attribute("NumberOfSeriesRelatedInstances", Level.SERIES, _SERIES_INSTANCE_COUNT, Match.NONE),
    Attribute("SOPInstanceUID", Level.INSTANCE, "i.sop_instance_uid", Match.UID_LIST),
    Attribute("SOPClassUID", Level.INSTANCE, "i.sop_class_uid", Match.UID_LIST),
    Attribute("InstanceNumber", Level.INSTANCE, "i.instance_number", Match.INTEGER),
    Attribute("Rows", Level.INSTANCE, "i.rows", Match.INTEGER),
    Attribute("Columns", Level.INSTANCE, "i.columns", Match.INTEGER),
    Attribute("NumberOfFrames", Level.INSTANCE, "i.number_of_frames", Match.INTEGER),
    Attribute("BitsAllocated", Level.INSTANCE, "i.bits_allocated", Match.INTEGER),
    Attribute(
        "AvailableTransferSyntaxUID",
        Level.INSTANCE,
        "i.transfer_syntax_uid",
        Match.UID_LIST,
        default=False,
    ),
)
_BY_KEYWORD = {a.keyword: a for a in ATTRIBUTES}
# Query parameters that are not attribute filters.
# The most results one answer holds; beyond it a Warning header invites paging on.
MAX_RESULTS = 10_000
_CONTROL_PARAMETERS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_INTEGER = re.compile(r"^-?\d{1,10}$")
_UID = re.compile(r"^[0-9.]{1,64}$")


@dataclass(frozen=True)
class Filter:
    attribute: Attribute
    values: tuple[str, ...]


@dataclass
class QidoQuery:
    """A parsed QIDO-RS request: level, scope from the path, filters and paging."""

    level: Level
    study_uid: str | None = None
    series_uid: str | None = None
    filters: list[Filter] = field(default_factory=list)
    returned: list[Attribute] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0

    @classmethod
    def parse(
        cls,
        level: Level,
        params: Iterable[tuple[str, str]],
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> QidoQuery:
        """Parse query parameters (in order, repeats kept).

        Raises BadInput for an unknown parameter or attribute, a filter on a level below
        the query's, a malformed value, limit or offset.
        """
        query = cls(level, study_uid, series_uid)
        values: dict[str, list[str]] = {}
        included: set[str] = set()
        for name, value in params:
            if name in _CONTROL_PARAMETERS:
                if name == "includefield":
                    included.update(_included_keywords(value))
                elif name == "limit":
                    query.limit = _non_negative(name, value)
                elif name == "offset":
                    query.offset = _non_negative(name, value)
                continue
            attribute = _attribute_named(name)
            if attribute.level > level:
                raise BadInput(f"{attribute.keyword} cannot be matched in this query level")
            if attribute.match is Match.NONE:
                raise BadInput(f"{attribute.keyword} cannot be matched")
            if value == "":
                included.add(attribute.keyword)  # universal match: return it, match all
                continue
            values.setdefault(attribute.keyword, []).append(value)
        for keyword, raw_values in values.items():
            attribute = _BY_KEYWORD[keyword]
            query.filters.append(Filter(attribute, _checked_values(attribute, raw_values)))
        query.returned = [
            a
            for a in ATTRIBUTES
            if a.level <= level and (a.default or "all" in included or a.keyword in included)
        ]
        return query


def _attribute_named(name: str) -> Attribute:
    tag = parse_tag(name)
    if tag is None:
        raise BadInput(f"unknown query parameter {name!r}")
    attribute = _BY_KEYWORD.get(keyword_of(tag))
    if attribute is None:
        raise BadInput(f"matching on {keyword_of(tag)} is not supported")
    return attribute


def _included_keywords(value: str) -> set[str]:
    keywords: set[str] = set()
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if item == "all":
            keywords.add("all")
            continue
        tag = parse_tag(item)
        if tag is None:
            raise BadInput(f"includefield names an unknown attribute {item!r}")
        # Attributes the index does not keep are simply not returned.
        keywords.add(keyword_of(tag))
    return keywords


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit() or len(value) > 9:
        raise BadInput(f"{name} must be a non-negative integer")
    return int(value)


def _split(value: str) -> list[str]:
    return [v for v in re.split(r"[,\\]", value) if v]


def _checked_values(attribute: Attribute, raw_values: list[str]) -> tuple[str, ...]:
    keyword, kind = attribute.keyword, attribute.match
    if kind in (Match.UID_LIST, Match.VALUE_LIST, Match.MODALITIES_IN_STUDY):
        values = [v.strip() for raw in raw_values for v in _split(raw)]
        if kind is Match.UID_LIST and not all(_UID.match(v) for v in values):
            raise BadInput(f"{keyword} must be a list of UIDs")
        return tuple(values)
    if len(raw_values) > 1:
        raise BadInput(f"{keyword} may be given only once")
    value = raw_values[0].strip()
    if kind in (Match.DATE_RANGE, Match.TIME_RANGE):
        pattern = _DATE if kind is Match.DATE_RANGE else _TIME
        low, dash, high = value.partition("-")
        bounds = [b for b in (low, high) if b]
        if not bounds or not all(pattern.match(b) for b in bounds):
            raise BadInput(f"{keyword} must be a {kind.value} like 20260101-20260131")
        return (low, dash, high)
    if kind is Match.INTEGER and not _INTEGER.match(value):
        raise BadInput(f"{keyword} must be an integer")
    return (value,)


def _glob(pattern: str) -> str:
    """A DICOM wildcard pattern (* and ?) as an SQLite GLOB pattern."""
    return pattern.replace("[", "[[]")


def _condition(flt: Filter) -> tuple[str, list[Any]]:
    sql, kind, values = flt.attribute.sql, flt.attribute.match, flt.values
    if kind in (Match.UID_LIST, Match.VALUE_LIST):
        return f"{sql} IN ({','.join('?' * len(values))})", list(values)
    if kind is Match.MODALITIES_IN_STUDY:
        marks = ",".join("?" * len(values))
        return (
            "EXISTS (SELECT 1 FROM series m WHERE m.study_instance_uid = st.study_instance_uid"
            f" AND m.modality IN ({marks}))",
            list(values),
        )
    if kind in (Match.DATE_RANGE, Match.TIME_RANGE):
        low, dash, high = values
        if not dash:
            # A time like 12 matches 12xxxx: compare on the given digits only.
            if kind is Match.TIME_RANGE:
                return f"substr({sql}, 1, ?) = ?", [len(low), low]
            return f"{sql} = ?", [low]
        parts: list[str] = [f"{sql} != ''"]
        args: list[Any] = []
        if low:
            parts.append(f"{sql} >= ?")
            args.append(low)
        if high:
            parts.append(f"substr({sql}, 1, ?) <= ?")
            args += [len(high), high]
        return " AND ".join(parts), args
    if kind is Match.INTEGER:
        return f"{sql} = ?", [int(values[0])]
    value = values[0]
    wildcard = "*" in value or "?" in value
    if kind is Match.TEXT_NOCASE:
        sql, value = f"lower({sql})", value.lower()
    if wildcard:
        return f"{sql} GLOB ?", [_glob(value)]
    return f"{sql} = ?", [value]


_FROM = {
    Level.STUDY: "studies st",
    Level.SERIES: "series se JOIN studies st ON st.study_instance_uid = se.study_instance_uid",
    Level.INSTANCE: (
        "instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid"
        " JOIN studies st ON st.study_instance_uid = i.study_instance_uid"
    ),
}
_ORDER = {
    Level.STUDY: "st.study_date, st.study_time, st.study_instance_uid",
    Level.SERIES: "st.study_instance_uid, se.series_number, se.series_instance_uid",
    Level.INSTANCE: "se.series_instance_uid, i.instance_number, i.sop_instance_uid",
}


@dataclass(frozen=True)
class QueryResult:
    rows: list[dict[str, Any]]
    truncated: bool  # MAX_RESULTS cut the answer short of what the client asked for


def run_query(conn: sqlite3.Connection, query: QidoQuery) -> QueryResult:
    """Rows matching the query, each a keyword -> value dict of the returned attributes."""
    columns = ", ".join(f'{a.sql} AS "{a.keyword}"' for a in query.returned)
    where: list[str] = []
    args: list[Any] = []
    if query.study_uid is not None:
        where.append("st.study_instance_uid = ?")
        args.append(query.study_uid)
    if query.series_uid is not None:
        where.append("se.series_instance_uid = ?")
        args.append(query.series_uid)
    for flt in query.filters:
        condition, condition_args = _condition(flt)
        where.append(f"({condition})")
        args += condition_args
    sql = f"SELECT {columns} FROM {_FROM[query.level]}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    wanted = query.limit if query.limit is not None else MAX_RESULTS + 1
    page = min(wanted, MAX_RESULTS + 1)
    sql += f" ORDER BY {_ORDER[query.level]} LIMIT ? OFFSET ?"
    rows = conn.execute(sql, [*args, page, query.offset]).fetchall()
    truncated = len(rows) > MAX_RESULTS
    result = []
    for row in rows[:MAX_RESULTS]:
        record = {a.keyword: row[a.keyword] for a in query.returned}
        if "ModalitiesInStudy" in record:
            modalities = (record["ModalitiesInStudy"] or "").split(",")
            record["ModalitiesInStudy"] = sorted(m for m in modalities if m)
        result.append(record)
    return QueryResult(result, truncated)
