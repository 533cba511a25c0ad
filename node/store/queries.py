"""The one DICOM query engine over the index: QIDO-RS, C-FIND and the study list.

The index is SQLite (the embedded default) or a ``Database`` such as PostgreSQL
(node/store/postgres.py): one compiler writes the SQL for both, so the matching rules
and the orders below hold alike on each.

A query is a ``Query``: a level, filters on the attributes of node/store/attributes.py,
the attributes to return and paging. Thin front ends build one: ``parse_qido`` from
QIDO-RS parameters (PS3.18 8.3.4), ``parse_identifier`` from a C-FIND request
identifier (PS3.4 C.4.1.2); both check every value with ``checked_filter``, which fails
closed with BadInput. ``run_query`` compiles a query to one SQL statement and cuts its
answer at MAX_RESULTS.

The matching rules (PS3.4 C.2.2.2), written once for every caller:

- universal: an empty value, or ``*``, matches everything;
- UIDs: exact; a list matches any of its UIDs;
- text and codes: exact, or ``*`` (any run) and ``?`` (one character), case-sensitive
  (C.2.2.2.1, C.2.2.2.4); person names alone match in any letter case, which the
  standard leaves to the implementation for PN;
- dates: ``X``, ``X-Y``, ``-Y``, ``X-``, bounds included (C.2.2.2.5.1); an entity
  without a value matches no range, since there is no date of it to compare (PS3.18
  has ``emptyvaluematching`` to ask for those);
- times: the same, and a value stands for the whole span of its precision (PS3.5 TM
  allows ``HH``, ``HHMM``, ...): ``13`` is 13:00 to 13:59:59.999999, so ``13`` matches
  ``1305`` and ``-130059`` matches ``130059.5``; a single value is the range ``X-X``;
- integers: exact; ModalitiesInStudy: any series of the study has the modality.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from node.core.dicom_json import keyword_of, parse_tag
from node.core.uids import is_uid
from node.errors import BadInput
from node.store.attributes import ATTRIBUTES, BY_KEYWORD, Attribute, Level, Match

# The most results one answer holds. QIDO-RS then says that there are more (a Warning
# header) and the client pages on; C-FIND, which cannot page, is refused.
MAX_RESULTS = 10_000
# The most values one key may list; SQLite refuses statements much larger than this.
MAX_VALUES = 1_000

# ASCII digits only (\d would also accept other scripts' digits); used with fullmatch.
_DATE = re.compile(r"[0-9]{8}")
_TIME = re.compile(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?")
_INTEGER = re.compile(r"-?[0-9]{1,10}")
_NON_NEGATIVE = re.compile(r"[0-9]{1,9}")
# Kinds that QIDO-RS lets a client list ("a,b", "a\b" or the key repeated).
_LISTED = frozenset({Match.UID, Match.CODE, Match.MODALITIES_IN_STUDY})
# The SQL function folding letter case, registered on each connection (SQLite's own
# lower() folds ASCII letters only).
_FOLD = "imageshare_fold"


@dataclass(frozen=True)
class Filter:
    """Entities whose attribute matches any one of the values (each checked already)."""

    attribute: Attribute
    values: tuple[str, ...]


@dataclass(frozen=True)
class WordSearch:
    """Every word appears, in any letter case, within one of the SQL expressions."""

    words: tuple[str, ...]
    searched: tuple[str, ...]


@dataclass
class Query:
    """What to find: a level, filters (all must match), what to return, paging."""

    level: Level
    filters: list[Filter] = field(default_factory=list)
    returned: list[Attribute] = field(default_factory=list)
    words: WordSearch | None = None
    limit: int | None = None
    offset: int = 0
    # QIDO-RS fuzzymatching=true: the engine matches names literally (in any case) only,
    # which PS3.18 8.3.4.2 has the answer say in a Warning.
    fuzzy_asked: bool = False
    # QIDO-RS keys that were not matched (unknown, or not matchable here), in the order
    # given: the answer names them in a Warning.
    ignored: list[str] = field(default_factory=list)


class Database(Protocol):
    """A database server the engine's SQL runs on besides SQLite. Its schema provides
    instr(), group_concat(DISTINCT ...) and imageshare_fold() as SQLite has them, and
    text that compares as SQLite's does (by code point); what it spells otherwise is
    here."""

    def wildcard(self, sql: str, pattern: str) -> tuple[str, str]:
        """A condition matching ``sql`` against a DICOM pattern (``*`` and ``?``), with
        one placeholder, and the argument for it."""
        ...

    def order(self, terms: str) -> str:
        """ORDER BY ``terms`` with empty (NULL) values placed where SQLite places them:
        first when ascending, last when descending."""
        ...

    def fetch(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        """The rows of a statement with ``?`` placeholders; BadInput when the database
        cannot answer it (too many values or terms)."""
        ...


class _Sqlite:
    """An SQLite connection as a Database: the engine's SQL is SQLite's own."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def wildcard(self, sql: str, pattern: str) -> tuple[str, str]:
        return f"{sql} GLOB ?", _glob(pattern)

    def order(self, terms: str) -> str:
        return terms

    def fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        self.conn.create_function(_FOLD, 1, _fold, deterministic=True)
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:  # too many values or terms for SQLite
            raise BadInput(f"query cannot be answered: {exc}") from exc


def _database(conn: sqlite3.Connection | Database) -> Database:
    return _Sqlite(conn) if isinstance(conn, sqlite3.Connection) else conn


@dataclass(frozen=True)
class QueryResult:
    rows: list[dict[str, Any]]
    truncated: bool  # more entities match than this answer holds (the limit, or MAX_RESULTS)


# -- checking values (one rule for every front end) -----------------------------------


def checked_filter(attribute: Attribute, values: Sequence[str]) -> Filter | None:
    """The filter matching ``attribute`` against any of ``values``; None when universal.

    Raises BadInput when the attribute cannot be matched, a value is malformed for its
    kind (dates, times, integers, UIDs), or there are more than MAX_VALUES values.
    """
    cleaned = [v.strip() for v in values if v.strip()]
    if not cleaned or cleaned == ["*"]:
        return None
    keyword, kind = attribute.keyword, attribute.match
    if kind is Match.NONE:
        raise BadInput(f"{keyword} cannot be matched")
    if len(cleaned) > MAX_VALUES:
        raise BadInput(f"{keyword} may list at most {MAX_VALUES} values")
    for value in cleaned:
        if kind is Match.UID and not is_uid(value):
            raise BadInput(f"{keyword} must be a list of UIDs")
        if kind is Match.INTEGER and not _INTEGER.fullmatch(value):
            raise BadInput(f"{keyword} must be an integer")
        if kind in (Match.DATE, Match.TIME):
            pattern = _DATE if kind is Match.DATE else _TIME
            low, _, high = value.partition("-")
            bounds = [b for b in (low, high) if b]
            if not bounds or not all(pattern.fullmatch(b) for b in bounds):
                example = "20260101-20260131" if kind is Match.DATE else "0800-1230"
                raise BadInput(f"{keyword} must be a {kind.value} or range like {example}")
    return Filter(attribute, tuple(cleaned))


# -- the QIDO-RS front end ---------------------------------------------------------------

# Query parameters that are not attribute filters.
_CONTROL_PARAMETERS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


def parse_qido(
    level: Level,
    params: Iterable[tuple[str, str]],
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Query:
    """A QIDO-RS search at ``level`` from its query parameters (in order, repeats kept)
    and the study and series named in its path.

    A key that names no attribute, or one that cannot be matched at this level, is not
    matched and is listed in ``Query.ignored`` (PS3.18 lets the server ignore it and
    say so). Raises BadInput for a malformed value, limit, offset or fuzzymatching.
    """
    query = Query(level)
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
            elif value not in ("true", "false"):
                raise BadInput("fuzzymatching must be true or false")
            else:
                query.fuzzy_asked = value == "true"
            continue
        attribute = _matchable(name, level, value)
        if attribute is None:
            if name not in query.ignored:
                query.ignored.append(name)
            continue
        if value == "":
            included.add(attribute.keyword)  # universal match: return it, match all
        values.setdefault(attribute.keyword, []).append(value)
    for keyword, given in values.items():
        attribute = BY_KEYWORD[keyword]
        if attribute.match in _LISTED:
            given = [v for raw in given for v in re.split(r"[,\\]", raw)]
        elif len(given) > 1:
            raise BadInput(f"{keyword} may be given only once")
        flt = checked_filter(attribute, given)
        if flt is not None:
            query.filters.append(flt)
    for keyword, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
        if uid is not None:
            query.filters.append(Filter(BY_KEYWORD[keyword], (uid,)))
    query.returned = [
        a
        for a in ATTRIBUTES
        if a.level <= level and (a.default or "all" in included or a.keyword in included)
    ]
    return query


def _matchable(name: str, level: Level, value: str) -> Attribute | None:
    """The attribute a QIDO-RS key matches at ``level``; None when it names none, the
    index does not keep it, or it cannot be matched there (an empty value only asks for
    the attribute to be returned, which any returned attribute allows)."""
    tag = parse_tag(name)
    attribute = None if tag is None else BY_KEYWORD.get(keyword_of(tag))
    if attribute is None or attribute.level > level:
        return None
    if attribute.match is Match.NONE and value.strip() not in ("", "*"):
        return None
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
    if not _NON_NEGATIVE.fullmatch(value):
        raise BadInput(f"{name} must be a non-negative integer")
    return int(value)


# -- the C-FIND front end ----------------------------------------------------------------


def parse_identifier(identifier: Dataset, level: Level, returned: Iterable[str]) -> Query:
    """The query of a C-FIND request identifier at ``level``, returning the attributes
    named in ``returned`` that the index holds at or above that level.

    Keys of levels below the query's are not matched.
    Raises BadInput for a value that cannot be decoded or is malformed for its key.
    """
    query = Query(level)
    for element in identifier:
        attribute = BY_KEYWORD.get(element.keyword or "")
        if attribute is None or attribute.level > level:
            continue
        flt = checked_filter(attribute, _element_values(element))
        if flt is not None:
            query.filters.append(flt)
    query.returned = [
        BY_KEYWORD[k] for k in returned if k in BY_KEYWORD and BY_KEYWORD[k].level <= level
    ]
    return query


def identifier_values(identifier: Dataset, keyword: str) -> list[str]:
    """The values of one key of a request identifier ([] when absent or empty)."""
    element = identifier.get(Tag(keyword))  # by tag: the element itself
    return [] if element is None else _element_values(element)


def _element_values(element: DataElement) -> list[str]:
    if element.VR == "SQ":
        return []
    try:
        value = element.value
    except Exception as exc:  # a value pydicom cannot decode is a malformed request
        raise BadInput(f"unreadable value of {element.keyword} in the request") from exc
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list):
        return [str(v) for v in value]
    return [str(value)]


# -- compiling and running -----------------------------------------------------------------


def _glob(pattern: str) -> str:
    """A DICOM wildcard pattern (* and ?) as an SQLite GLOB pattern: [ is literal."""
    return pattern.replace("[", "[[]")


def _fold(value: str | int | float | None) -> str | int | float | None:
    return value.lower() if isinstance(value, str) else value


def _text_condition(
    db: Database, sql: str, kind: Match, values: tuple[str, ...]
) -> tuple[str, list[Any]]:
    if kind is Match.PERSON_NAME:
        sql, values = f"{_FOLD}({sql})", tuple(v.lower() for v in values)
    exact = [v for v in values if "*" not in v and "?" not in v]
    wildcards = [db.wildcard(sql, v) for v in values if v not in exact]
    parts = [condition for condition, _ in wildcards]
    if exact:
        parts.append(f"{sql} IN ({','.join('?' * len(exact))})")
    return "(" + " OR ".join(parts) + ")", [*(arg for _, arg in wildcards), *exact]


def _range_condition(sql: str, value: str) -> tuple[str, list[Any]]:
    low, dash, high = value.partition("-")
    if not dash:
        high = low  # a single value is the range of its own precision
    parts: list[str] = [f"{sql} != ''"]
    args: list[Any] = []
    if low:
        parts.append(f"{sql} >= ?")
        args.append(low)
    if high:
        # Compared on the bound's digits only: -1300 includes 130059.
        parts.append(f"substr({sql}, 1, ?) <= ?")
        args += [len(high), high]
    return "(" + " AND ".join(parts) + ")", args


def _condition(db: Database, flt: Filter) -> tuple[str, list[Any]]:
    sql, kind, values = flt.attribute.sql, flt.attribute.match, flt.values
    if kind is Match.UID:
        return f"{sql} IN ({','.join('?' * len(values))})", list(values)
    if kind is Match.INTEGER:
        return f"{sql} IN ({','.join('?' * len(values))})", [int(v) for v in values]
    if kind in (Match.DATE, Match.TIME):
        conditions = [_range_condition(sql, v) for v in values]
        return (
            "(" + " OR ".join(c for c, _ in conditions) + ")",
            [a for _, args in conditions for a in args],
        )
    if kind is Match.MODALITIES_IN_STUDY:
        inner, args = _text_condition(db, "m.modality", Match.CODE, values)
        return (
            "EXISTS (SELECT 1 FROM series m"
            f" WHERE m.study_instance_uid = st.study_instance_uid AND {inner})",
            args,
        )
    return _text_condition(db, sql, kind, values)


def _words_condition(search: WordSearch) -> tuple[str, list[Any]]:
    parts: list[str] = []
    args: list[Any] = []
    for word in search.words:
        parts.append(
            "(" + " OR ".join(f"instr({_FOLD}({s}), ?) > 0" for s in search.searched) + ")"
        )
        args += [word.lower()] * len(search.searched)
    return " AND ".join(parts), args


_FROM = {
    Level.PATIENT: "studies st",
    Level.STUDY: "studies st",
    Level.SERIES: "series se JOIN studies st ON st.study_instance_uid = se.study_instance_uid",
    Level.INSTANCE: (
        "instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid"
        " JOIN studies st ON st.study_instance_uid = i.study_instance_uid"
    ),
}
_ORDER = {
    Level.PATIENT: "st.patient_id",
    Level.STUDY: "st.study_date, st.study_time, st.study_instance_uid",
    Level.SERIES: "st.study_instance_uid, se.series_number, se.series_instance_uid",
    Level.INSTANCE: "se.series_instance_uid, i.instance_number, i.sop_instance_uid",
}


def compile_query(
    db: Database, query: Query, extra_columns: Sequence[str] = (), order: str | None = None
) -> tuple[str, list[Any]]:
    """The SQL statement (without LIMIT) and its arguments that answer ``query``, in the
    SQL of ``db``.

    ``extra_columns`` adds store columns that are no DICOM attribute (the study list's
    arrival time and origin); ``order`` replaces the level's stable order.
    """
    grouped = query.level is Level.PATIENT
    columns = [
        # A patient is the group of its studies: any study's value stands for it.
        f'{"MAX(" + a.sql + ")" if grouped and a.column else a.sql} AS "{a.keyword}"'
        for a in query.returned
    ]
    select = ", ".join([*columns, *extra_columns]) or "1"
    where: list[str] = []
    args: list[Any] = []
    for flt in query.filters:
        condition, condition_args = _condition(db, flt)
        where.append(condition)
        args += condition_args
    if query.words is not None and query.words.words:
        condition, condition_args = _words_condition(query.words)
        where.append(condition)
        args += condition_args
    sql = f"SELECT {select} FROM {_FROM[query.level]}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if grouped:
        sql += " GROUP BY st.patient_id"
    sql += " ORDER BY " + db.order(_ORDER[query.level] if order is None else order)
    return sql, args


def run_query(
    conn: sqlite3.Connection | Database,
    query: Query,
    extra_columns: Sequence[str] = (),
    order: str | None = None,
) -> QueryResult:
    """Rows matching the query, each a name -> value dict of the returned attributes
    (ModalitiesInStudy as a sorted list) and extra columns: at most the query's limit and
    at most MAX_RESULTS of them, and whether more match than that.

    Raises BadInput when the database cannot run the query (too many values).
    """
    db = _database(conn)
    sql, args = compile_query(db, query, extra_columns, order)
    page = MAX_RESULTS if query.limit is None else min(query.limit, MAX_RESULTS)
    # One row more than the page tells whether more match (PS3.18 8.3.4.4).
    rows = db.fetch(sql + " LIMIT ? OFFSET ?", [*args, page + 1, query.offset])
    result = []
    for row in rows[:page]:
        record = dict(row)
        if "ModalitiesInStudy" in record:
            modalities = (record["ModalitiesInStudy"] or "").split(",")
            record["ModalitiesInStudy"] = sorted(m for m in modalities if m)
        result.append(record)
    return QueryResult(result, truncated=len(rows) > page)


def count_matches(conn: sqlite3.Connection | Database, query: Query) -> int:
    """How many entities of the query's level match it, regardless of paging and cap."""
    db = _database(conn)
    sql, args = compile_query(db, Query(query.level, query.filters, [], query.words))
    return int(db.fetch(f"SELECT COUNT(*) AS n FROM ({sql}) AS matched", args)[0]["n"])


def matching_instance_uids(
    conn: sqlite3.Connection | Database, filters: Sequence[Filter]
) -> list[str]:
    """The SOP Instance UIDs of every instance the filters match, in the stable order.

    Not capped: a retrieve sends every instance it names.
    """
    query = Query(Level.INSTANCE, list(filters), [BY_KEYWORD["SOPInstanceUID"]])
    db = _database(conn)
    sql, args = compile_query(db, query)
    return [row["SOPInstanceUID"] for row in db.fetch(sql, args)]


# -- the dashboard's study list front end ----------------------------------------------------

# What the study list shows of a study, by the names its page uses.
_STUDY_LIST_ATTRIBUTES = {
    "study_instance_uid": "StudyInstanceUID",
    "patient_name": "PatientName",
    "patient_id": "PatientID",
    "patient_birth_date": "PatientBirthDate",
    "study_date": "StudyDate",
    "study_description": "StudyDescription",
    "accession_number": "AccessionNumber",
    "series": "NumberOfStudyRelatedSeries",
    "instances": "NumberOfStudyRelatedInstances",
    "modalities": "ModalitiesInStudy",
}
_STUDY_LIST_SEARCHED = (
    *(
        BY_KEYWORD[k].sql
        for k in (
            "PatientName",
            "PatientID",
            "AccessionNumber",
            "StudyDescription",
            "StudyDate",
            "StudyInstanceUID",
        )
    ),
    "st.source",
)
_STUDY_LIST_EXTRAS = (
    "st.source AS source",
    "st.created_at AS created_at",
    "(SELECT COALESCE(SUM(x.size), 0) FROM instances x"
    " WHERE x.study_instance_uid = st.study_instance_uid) AS bytes",
)


# The dashboard's orders of the study list, by name; the UID last makes every order total.
STUDY_LIST_ORDERS = {
    "arrival": "st.created_at DESC, st.study_instance_uid",
    "date": f"{BY_KEYWORD['StudyDate'].sql} DESC, st.created_at DESC, st.study_instance_uid",
    "date_oldest": f"{BY_KEYWORD['StudyDate'].sql}, st.created_at, st.study_instance_uid",
    "patient": f"{BY_KEYWORD['PatientName'].sql}, st.created_at DESC, st.study_instance_uid",
}


@dataclass(frozen=True)
class StudyPage:
    """One page of the dashboard's study list: ``limit`` studies from ``offset``, in
    ``order`` (a STUDY_LIST_ORDERS name), of those matching the words and filters."""

    words: tuple[str, ...]
    limit: int
    offset: int = 0
    filters: tuple[Filter, ...] = ()
    order: str = "arrival"


def study_list(
    conn: sqlite3.Connection | Database, page: StudyPage
) -> tuple[int, list[dict[str, Any]]]:
    """The dashboard's study list: how many studies match, and the page asked, each with
    where it came from and its size.

    A study matches when every word appears, in any letter case, in its patient name,
    patient ID, accession number, description, date, UID or origin, and every filter
    (checked_filter: a date range, a modality) matches.
    """
    query = Query(
        Level.STUDY,
        filters=list(page.filters),
        returned=[BY_KEYWORD[k] for k in _STUDY_LIST_ATTRIBUTES.values()],
        words=WordSearch(page.words, _STUDY_LIST_SEARCHED),
        limit=page.limit,
        offset=page.offset,
    )
    found = run_query(conn, query, _STUDY_LIST_EXTRAS, order=STUDY_LIST_ORDERS[page.order])
    rows = []
    for row in found.rows:
        listed = {name: row[keyword] for name, keyword in _STUDY_LIST_ATTRIBUTES.items()}
        listed["modalities"] = ",".join(listed["modalities"])
        rows.append({**listed, **{k: row[k] for k in ("source", "created_at", "bytes")}})
    return count_matches(conn, query), rows
