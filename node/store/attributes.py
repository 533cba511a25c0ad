"""The attributes the instance index knows: declared once, here.

One table (ATTRIBUTES) says, for every attribute, its query/retrieve level, the index
column that holds it (or the SQL that computes it), how a query matches it and whether
QIDO-RS returns it by default. Everything else is derived from this table:

- ``node/store/dicom_header.py`` reads exactly these attributes into an InstanceHeader;
- ``node/store/instances.py`` builds the index tables' columns from them;
- ``node/store/queries.py`` matches and returns them for QIDO-RS, C-FIND and the
  dashboard's study list.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Level(IntEnum):
    """Query/retrieve levels (PS3.4 C.6). Patient and study attributes share one table."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    INSTANCE = 3


class Match(StrEnum):
    """How a query value is matched (PS3.4 C.2.2.2); see queries.py for the SQL."""

    UID = "list of UIDs"  # exact; several values allowed
    TEXT = "text"  # exact, or * and ? wildcards; case-sensitive
    CODE = "code"  # as TEXT; several values allowed (Modality)
    PERSON_NAME = "person name"  # as TEXT, in any letter case
    DATE = "date"  # X, X-Y, -Y, X- (YYYYMMDD)
    TIME = "time"  # the same with HH[MM[SS[.F]]]; a value stands for its whole precision
    INTEGER = "integer"  # exact; several values allowed in C-FIND
    MODALITIES_IN_STUDY = "any series modality"
    NONE = "returned only"


# The table each level's attributes live in, and its alias in every query's SQL.
TABLES = {
    Level.PATIENT: "studies",
    Level.STUDY: "studies",
    Level.SERIES: "series",
    Level.INSTANCE: "instances",
}
ALIASES = {"studies": "st", "series": "se", "instances": "i"}


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: Level
    match: Match
    column: str | None = None  # the index column holding it, in the level's table
    computed: str | None = None  # otherwise: SQL over the aliases st, se, i
    default: bool = True  # QIDO-RS returns it without includefield

    @property
    def sql(self) -> str:
        """The SQL expression of the attribute's value in a query over st, se and i."""
        if self.computed is not None:
            return self.computed
        return f"{ALIASES[TABLES[self.level]]}.{self.column}"

    @property
    def integer(self) -> bool:
        """Whether the index keeps it as an integer (IS and US values) rather than text."""
        return self.match is Match.INTEGER


_SERIES_OF_STUDY = (
    "(SELECT COUNT(*) FROM series x WHERE x.study_instance_uid = st.study_instance_uid)"
)
_INSTANCES_OF_STUDY = (
    "(SELECT COUNT(*) FROM instances x WHERE x.study_instance_uid = st.study_instance_uid)"
)
_MODALITIES = (
    "(SELECT group_concat(DISTINCT x.modality) FROM series x"
    " WHERE x.study_instance_uid = st.study_instance_uid AND x.modality != '')"
)
_INSTANCES_OF_SERIES = (
    "(SELECT COUNT(*) FROM instances x WHERE x.series_instance_uid = se.series_instance_uid)"
)
_STUDIES_OF_PATIENT = "(SELECT COUNT(*) FROM studies x WHERE x.patient_id = st.patient_id)"
_SERIES_OF_PATIENT = (
    "(SELECT COUNT(*) FROM series x JOIN studies y ON x.study_instance_uid = y.study_instance_uid"
    " WHERE y.patient_id = st.patient_id)"
)
_INSTANCES_OF_PATIENT = (
    "(SELECT COUNT(*) FROM instances x JOIN studies y"
    " ON x.study_instance_uid = y.study_instance_uid WHERE y.patient_id = st.patient_id)"
)

_P, _ST, _SE, _IN = Level.PATIENT, Level.STUDY, Level.SERIES, Level.INSTANCE

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("PatientID", _P, Match.TEXT, "patient_id"),
    Attribute("PatientName", _P, Match.PERSON_NAME, "patient_name"),
    Attribute("PatientBirthDate", _P, Match.DATE, "patient_birth_date"),
    Attribute("PatientSex", _P, Match.TEXT, "patient_sex"),
    Attribute("IssuerOfPatientID", _P, Match.TEXT, "issuer_of_patient_id", default=False),
    Attribute(
        "NumberOfPatientRelatedStudies", _P, Match.NONE, computed=_STUDIES_OF_PATIENT, default=False
    ),
    Attribute(
        "NumberOfPatientRelatedSeries", _P, Match.NONE, computed=_SERIES_OF_PATIENT, default=False
    ),
    Attribute(
        "NumberOfPatientRelatedInstances",
        _P,
        Match.NONE,
        computed=_INSTANCES_OF_PATIENT,
        default=False,
    ),
    Attribute("StudyInstanceUID", _ST, Match.UID, "study_instance_uid"),
    Attribute("StudyDate", _ST, Match.DATE, "study_date"),
    Attribute("StudyTime", _ST, Match.TIME, "study_time"),
    Attribute("AccessionNumber", _ST, Match.TEXT, "accession_number"),
    Attribute("StudyID", _ST, Match.TEXT, "study_id"),
    Attribute("StudyDescription", _ST, Match.TEXT, "study_description"),
    Attribute("ReferringPhysicianName", _ST, Match.PERSON_NAME, "referring_physician_name"),
    Attribute("ModalitiesInStudy", _ST, Match.MODALITIES_IN_STUDY, computed=_MODALITIES),
    Attribute("NumberOfStudyRelatedSeries", _ST, Match.NONE, computed=_SERIES_OF_STUDY),
    Attribute("NumberOfStudyRelatedInstances", _ST, Match.NONE, computed=_INSTANCES_OF_STUDY),
    # Returned only: as a query key PS3.18 8.3.4.1 gives it a meaning (the zone of the
    # dates and times asked for) that the index does not implement.
    Attribute("TimezoneOffsetFromUTC", _ST, Match.NONE, "timezone_offset_from_utc"),
    # Every indexed instance is on local disk.
    Attribute("InstanceAvailability", _ST, Match.NONE, computed="'ONLINE'"),
    Attribute("SeriesInstanceUID", _SE, Match.UID, "series_instance_uid"),
    Attribute("Modality", _SE, Match.CODE, "modality"),
    Attribute("SeriesNumber", _SE, Match.INTEGER, "series_number"),
    Attribute("SeriesDescription", _SE, Match.TEXT, "series_description"),
    Attribute("SeriesDate", _SE, Match.DATE, "series_date", default=False),
    Attribute("SeriesTime", _SE, Match.TIME, "series_time", default=False),
    Attribute("BodyPartExamined", _SE, Match.TEXT, "body_part_examined", default=False),
    Attribute(
        "PerformedProcedureStepStartDate", _SE, Match.DATE, "performed_procedure_step_start_date"
    ),
    Attribute(
        "PerformedProcedureStepStartTime", _SE, Match.TIME, "performed_procedure_step_start_time"
    ),
    Attribute("NumberOfSeriesRelatedInstances", _SE, Match.NONE, computed=_INSTANCES_OF_SERIES),
    Attribute("SOPInstanceUID", _IN, Match.UID, "sop_instance_uid"),
    Attribute("SOPClassUID", _IN, Match.UID, "sop_class_uid"),
    Attribute("InstanceNumber", _IN, Match.INTEGER, "instance_number"),
    Attribute("Rows", _IN, Match.INTEGER, "rows"),
    Attribute("Columns", _IN, Match.INTEGER, "columns"),
    Attribute("NumberOfFrames", _IN, Match.INTEGER, "number_of_frames"),
    Attribute("BitsAllocated", _IN, Match.INTEGER, "bits_allocated"),
    # Read from the file meta information's TransferSyntaxUID.
    Attribute("AvailableTransferSyntaxUID", _IN, Match.UID, "transfer_syntax_uid", default=False),
)
BY_KEYWORD = {a.keyword: a for a in ATTRIBUTES}
# The attributes kept in an index column, in declaration order.
INDEXED = tuple(a for a in ATTRIBUTES if a.column is not None)

# The unique key of each level (PS3.4 C.2.2.1); each level's table is keyed by it, and
# the tables below it hold the keys of the levels above.
UNIQUE_KEYS = {
    Level.PATIENT: BY_KEYWORD["PatientID"],
    Level.STUDY: BY_KEYWORD["StudyInstanceUID"],
    Level.SERIES: BY_KEYWORD["SeriesInstanceUID"],
    Level.INSTANCE: BY_KEYWORD["SOPInstanceUID"],
}
