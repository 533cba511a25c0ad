"""Query/Retrieve over the instance index: C-FIND matching and C-GET/C-MOVE selection.

The DIMSE edge hands over the decoded request identifier; this module turns it into one
SQL query over the ``studies``, ``series`` and ``instances`` tables and builds the
response identifiers. Matching follows PS3.4 C.2.2.2: universal (empty or ``*``),
single value, wildcard (``*`` and ``?``), UID list and date/time range. Person names
match case-insensitively. Attributes the index does not hold are returned empty.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from node.errors import BadInput
from node.store.instances import InstanceRecord, InstanceStore


class Level(IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Model(IntEnum):
    """The query/retrieve information model named by the presentation context."""

    PATIENT_ROOT = 0
    STUDY_ROOT = 1


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: Level
    sql: str
    # uid: list match; text: wildcard; name: case-insensitive wildcard; date/time: range;
    # int: exact integer; modalities: any series of the study; derived: returned only.
    kind: str


_ST = "st.study_instance_uid"
_SE = "se.series_instance_uid"
_PATIENT_STUDIES = "(SELECT COUNT(*) FROM studies x WHERE x.patient_id = st.patient_id)"
_PATIENT_SERIES = (
    "(SELECT COUNT(*) FROM series x JOIN studies y ON x.study_instance_uid = y.study_instance_uid"
    " WHERE y.patient_id = st.patient_id)"
)
_PATIENT_INSTANCES = (
    "(SELECT COUNT(*) FROM instances x JOIN studies y"
    " ON x.study_instance_uid = y.study_instance_uid WHERE y.patient_id = st.patient_id)"
)

ATTRIBUTES: dict[str, Attribute] = {
    a.keyword: a
    for a in (
        Attribute("PatientID", Level.PATIENT, "st.patient_id", "text"),
        Attribute("PatientName", Level.PATIENT, "st.patient_name", "name"),
        Attribute("PatientBirthDate", Level.PATIENT, "st.patient_birth_date", "date"),
        Attribute("PatientSex", Level.PATIENT, "st.patient_sex", "text"),
        Attribute("IssuerOfPatientID", Level.PATIENT, "st.issuer_of_patient_id", "text"),
        Attribute("NumberOfPatientRelatedStudies", Level.PATIENT, _PATIENT_STUDIES, "derived"),
        Attribute("NumberOfPatientRelatedSeries", Level.PATIENT, _PATIENT_SERIES, "derived"),
        Attribute("NumberOfPatientRelatedInstances", Level.PATIENT, _PATIENT_INSTANCES, "derived"),
        Attribute("StudyInstanceUID", Level.STUDY, _ST, "uid"),
        Attribute("StudyDate", Level.STUDY, "st.study_date", "date"),
        Attribute("StudyTime", Level.STUDY, "st.study_time", "time"),
        Attribute("AccessionNumber", Level.STUDY, "st.accession_number", "text"),
        Attribute("StudyID", Level.STUDY, "st.study_id", "text"),
        Attribute("StudyDescription", Level.STUDY, "st.study_description", "text"),
        Attribute("ReferringPhysicianName", Level.STUDY, "st.referring_physician_name", "name"),
        Attribute(
            "ModalitiesInStudy",
            Level.STUDY,
            f"(SELECT GROUP_CONCAT(DISTINCT x.modality) FROM series x"
            f" WHERE x.study_instance_uid = {_ST})",
            "modalities",
        ),
        Attribute(
            "NumberOfStudyRelatedSeries",
            Level.STUDY,
            f"(SELECT COUNT(*) FROM series x WHERE x.study_instance_uid = {_ST})",
            "derived",
        ),
        Attribute(
            "NumberOfStudyRelatedInstances",
            Level.STUDY,
            f"(SELECT COUNT(*) FROM instances x WHERE x.study_instance_uid = {_ST})",
            "derived",
        ),
        Attribute("SeriesInstanceUID", Level.SERIES, _SE, "uid"),
        Attribute("Modality", Level.SERIES, "se.modality", "text"),
        Attribute("SeriesNumber", Level.SERIES, "se.series_number", "int"),
        Attribute("SeriesDescription", Level.SERIES, "se.series_description", "text"),
        Attribute("SeriesDate", Level.SERIES, "se.series_date", "date"),
        Attribute("SeriesTime", Level.SERIES, "se.series_time", "time"),
        Attribute("BodyPartExamined", Level.SERIES, "se.body_part_examined", "text"),
        Attribute(
            "PerformedProcedureStepStartDate",
            Level.SERIES,
            "se.performed_procedure_step_start_date",
            "date",
        ),
        Attribute(
            "NumberOfSeriesRelatedInstances",
            Level.SERIES,
            f"(SELECT COUNT(*) FROM instances x WHERE x.series_instance_uid = {_SE})",
            "derived",
        ),
        Attribute("SOPInstanceUID", Level.IMAGE, "i.sop_instance_uid", "uid"),
        Attribute("SOPClassUID", Level.IMAGE, "i.sop_class_uid", "uid"),
        Attribute("InstanceNumber", Level.IMAGE, "i.instance_number", "int"),
        Attribute("Rows", Level.IMAGE, "i.rows", "int"),
        Attribute("Columns", Level.IMAGE, "i.columns", "int"),
        Attribute("NumberOfFrames", Level.IMAGE, "i.number_of_frames", "int"),
        Attribute("BitsAllocated", Level.IMAGE, "i.bits_allocated", "int"),
    )
}

# The unique key of each level (PS3.4 C.2.2.1).
UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

_FROM = {
    Level.PATIENT: "FROM studies st",
    Level.STUDY: "FROM studies st",
    Level.SERIES: "FROM series se JOIN studies st ON st.study_instance_uid = se.study_instance_uid",
    Level.IMAGE: (
        "FROM instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid"
        " JOIN studies st ON st.study_instance_uid = i.study_instance_uid"
    ),
}
_ORDER = {
    Level.PATIENT: " GROUP BY st.patient_id ORDER BY st.patient_id",
    Level.STUDY: " ORDER BY st.study_date, st.study_instance_uid",
    Level.SERIES: " ORDER BY se.series_number, se.series_instance_uid",
    Level.IMAGE: " ORDER BY i.series_instance_uid, i.instance_number, i.sop_instance_uid",
}
# Elements of the request that describe the query itself rather than a key.
_QUERY_TAGS = {Tag("QueryRetrieveLevel"), Tag("SpecificCharacterSet")}


def query_level(identifier: Dataset, model: Model) -> Level:
    """The identifier's QueryRetrieveLevel; raises BadInput if missing or not in the model."""
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        level = Level[raw]
    except KeyError:
        raise BadInput(f"QueryRetrieveLevel {raw or '(missing)'} is not supported") from None
    if model is Model.STUDY_ROOT and level is Level.PATIENT:
        raise BadInput("the Study Root model has no PATIENT level")
    return level


def _values(identifier: Dataset, keyword: str) -> list[str] | None:
    """The key's value(s), or None for universal matching (absent, empty or ``*``)."""
    tag = Tag(keyword)
    element = identifier.get(tag)  # by tag: the element itself
    if element is None or element.VR == "SQ":
        return None
    try:
        value = element.value
    except Exception as exc:  # a value pydicom cannot decode is a malformed request
        raise BadInput(f"unreadable value of {keyword} in the request") from exc
    if value is None or value == "":
        return None
    values = [str(v) for v in value] if isinstance(value, MultiValue | list) else [str(value)]
    values = [v.strip() for v in values]
    if not any(values) or values == ["*"]:
        return None
    return values


def _glob(pattern: str) -> str:
    # DICOM wildcards are GLOB's * and ?; a literal [ must not start a character class.
    return pattern.replace("[", "[[]")


def _condition(attribute: Attribute, values: list[str]) -> tuple[str, list[object]]:
    column = attribute.sql
    if attribute.kind == "uid":
        return f"{column} IN ({','.join('?' * len(values))})", list(values)
    if attribute.kind == "modalities":
        marks = ",".join("?" * len(values))
        return (
            f"EXISTS (SELECT 1 FROM series x WHERE x.study_instance_uid = {_ST}"
            f" AND x.modality IN ({marks}))",
            list(values),
        )
    if attribute.kind == "int":
        try:
            numbers = [int(v) for v in values]
        except ValueError:
            raise BadInput(f"{attribute.keyword} must be an integer") from None
        return f"{column} IN ({','.join('?' * len(numbers))})", list(numbers)
    value = values[0]
    if attribute.kind in ("date", "time") and "-" in value and len(values) == 1:
        low, _, high = value.partition("-")
        parts: list[str] = []
        args: list[object] = []
        if low:
            parts.append(f"{column} >= ?")
            args.append(low)
        if high:
            # A time range's upper bound covers every finer value it starts (1300 < 130059).
            parts.append(f"{column} <= ?")
            args.append(high + ("999999"[len(high) :] if attribute.kind == "time" else ""))
        return " AND ".join(parts) or "1", args
    folded = attribute.kind == "name"
    target = f"UPPER({column})" if folded else column
    clauses: list[str] = []
    args = []
    for item in values:
        item = item.upper() if folded else item
        if "*" in item or "?" in item:
            clauses.append(f"{target} GLOB ?")
            args.append(_glob(item))
        else:
            clauses.append(f"{target} = ?")
            args.append(item)
    return "(" + " OR ".join(clauses) + ")", args


def _where(identifier: Dataset, level: Level, keys: list[str]) -> tuple[str, list[object]]:
    clauses: list[str] = []
    args: list[object] = []
    for keyword in keys:
        attribute = ATTRIBUTES[keyword]
        if attribute.level > level or attribute.kind == "derived":
            continue
        values = _values(identifier, keyword)
        if values is None:
            continue
        clause, clause_args = _condition(attribute, values)
        clauses.append(clause)
        args.extend(clause_args)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _response_value(attribute: Attribute, value: object) -> object:
    if value is None:
        return None
    if attribute.kind == "modalities":
        return [m for m in str(value).split(",") if m]
    if attribute.kind in ("int", "derived"):
        return int(value)  # type: ignore[call-overload]
    return value


def find(store: InstanceStore, identifier: Dataset, model: Model) -> Iterator[Dataset]:
    """Yield one response identifier per match of a C-FIND request identifier.

    Every key of the request is returned: with the indexed value when the index holds
    it at or above the query level, empty otherwise. Raises BadInput for an invalid
    level or key value.
    """
    level = query_level(identifier, model)
    requested = [e.keyword for e in identifier if e.tag not in _QUERY_TAGS and e.keyword]
    # The unique keys of the level and those above it are always returned.
    for above in Level:
        applies = above <= level and not (model is Model.STUDY_ROOT and above is Level.PATIENT)
        if applies and UNIQUE_KEYS[above] not in requested:
            requested.append(UNIQUE_KEYS[above])
    returned = [k for k in requested if k in ATTRIBUTES and ATTRIBUTES[k].level <= level]
    where, args = _where(identifier, level, [k for k in requested if k in ATTRIBUTES])
    grouped = level is Level.PATIENT
    select = ", ".join(
        f"{'MAX(' if grouped and ATTRIBUTES[k].kind != 'derived' else ''}{ATTRIBUTES[k].sql}"
        f"{')' if grouped and ATTRIBUTES[k].kind != 'derived' else ''} AS {k}"
        for k in returned
    )
    sql = f"SELECT {select} {_FROM[level]}{where}{_ORDER[level]}"
    try:
        rows = store.reader.execute(sql, args).fetchall()
    except sqlite3.Error as exc:
        raise BadInput(f"query cannot be answered: {exc}") from exc
    for row in rows:
        yield _response(identifier, level, requested, row)


def _response(identifier: Dataset, level: Level, requested: list[str], row: sqlite3.Row) -> Dataset:
    response = Dataset()
    response.SpecificCharacterSet = "ISO_IR 192"  # the index holds Unicode text
    response.QueryRetrieveLevel = level.name
    for keyword in requested:
        attribute = ATTRIBUTES.get(keyword)
        if attribute is not None and attribute.level <= level:
            setattr(response, keyword, _response_value(attribute, row[keyword]))
    for element in identifier:
        if element.tag in _QUERY_TAGS or element.tag in response:
            continue
        # Keys the index does not hold are returned with no value (PS3.4 C.2.2.1.2).
        response.add_new(element.tag, element.VR, [] if element.VR == "SQ" else None)
    return response


def select_for_retrieve(
    store: InstanceStore, identifier: Dataset, model: Model
) -> list[InstanceRecord]:
    """The instances a C-GET or C-MOVE identifier names, by the unique keys of its levels.

    Raises BadInput when the identifier lacks the unique key of its level.
    """
    level = query_level(identifier, model)
    if _values(identifier, UNIQUE_KEYS[level]) is None:
        raise BadInput(f"a {level.name} level retrieve needs {UNIQUE_KEYS[level]}")
    keys = [UNIQUE_KEYS[lv] for lv in Level if lv <= level]
    where, args = _where(identifier, level, keys)
    sql = f"SELECT i.sop_instance_uid {_FROM[Level.IMAGE]}{where}{_ORDER[Level.IMAGE]}"
    uids = [row[0] for row in store.reader.execute(sql, args)]
    return [store.instance(uid) for uid in uids]
