"""Query/Retrieve over the instance index: the C-FIND answers and C-GET/C-MOVE selection.

The DIMSE edge hands over the decoded request identifier; this module reads its level
and the keys to return, lets the one query engine (``node/store/queries.py``, which
holds the matching rules of PS3.4 C.2.2.2 for every caller) find the matches, and
builds the response identifiers. Requested keys the index does not hold are returned
empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.errors import BadInput, PayloadTooLarge
from node.store.attributes import UNIQUE_KEYS, Level
from node.store.instances import InstanceRecord
from node.store.protocols import InstanceStore
from node.store.queries import (
    MAX_RESULTS,
    checked_filter,
    identifier_values,
    parse_identifier,
)


class Model(IntEnum):
    """The query/retrieve information model named by the presentation context."""

    PATIENT_ROOT = 0
    STUDY_ROOT = 1


# QueryRetrieveLevel values (PS3.4 C.6): the instance level is called IMAGE.
_LEVELS = {
    "PATIENT": Level.PATIENT,
    "STUDY": Level.STUDY,
    "SERIES": Level.SERIES,
    "IMAGE": Level.INSTANCE,
}
_LEVEL_NAMES = {level: name for name, level in _LEVELS.items()}
# Elements of the request that describe the query itself rather than a key.
_QUERY_TAGS = {Tag("QueryRetrieveLevel"), Tag("SpecificCharacterSet")}


def query_level(identifier: Dataset, model: Model) -> Level:
    """The identifier's QueryRetrieveLevel; raises BadInput if missing or not in the model."""
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    level = _LEVELS.get(raw)
    if level is None:
        raise BadInput(f"QueryRetrieveLevel {raw or '(missing)'} is not supported")
    if model is Model.STUDY_ROOT and level is Level.PATIENT:
        raise BadInput("the Study Root model has no PATIENT level")
    return level


def find(store: InstanceStore, identifier: Dataset, model: Model) -> Iterator[Dataset]:
    """Yield one response identifier per match of a C-FIND request identifier.

    Every key of the request is returned: with the indexed value when the index holds
    it at or above the query level, empty otherwise. Raises BadInput for an invalid
    level or key value, PayloadTooLarge (A700) when more than MAX_RESULTS match.
    """
    level = query_level(identifier, model)
    requested = [e.keyword for e in identifier if e.tag not in _QUERY_TAGS and e.keyword]
    # The unique keys of the level and those above it are always returned.
    for above in Level:
        applies = above <= level and not (model is Model.STUDY_ROOT and above is Level.PATIENT)
        if applies and UNIQUE_KEYS[above].keyword not in requested:
            requested.append(UNIQUE_KEYS[above].keyword)
    found = store.search(parse_identifier(identifier, level, requested))
    if found.truncated:
        raise PayloadTooLarge(f"over {MAX_RESULTS} matches; narrow the query")
    for row in found.rows:
        yield _response(identifier, level, requested, row)


def _response(
    identifier: Dataset, level: Level, requested: list[str], row: dict[str, object]
) -> Dataset:
    response = Dataset()
    response.SpecificCharacterSet = "ISO_IR 192"  # the index holds Unicode text
    response.QueryRetrieveLevel = _LEVEL_NAMES[level]
    for keyword in requested:
        if keyword in row:
            setattr(response, keyword, row[keyword])
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

    Raises BadInput when the identifier lacks the unique key of its level or a key
    value is malformed.
    """
    level = query_level(identifier, model)
    filters = []
    for above in Level:
        if above > level:
            break
        key = UNIQUE_KEYS[above]
        flt = checked_filter(key, identifier_values(identifier, key.keyword))
        if flt is None and above is level:
            raise BadInput(f"a {_LEVEL_NAMES[level]} level retrieve needs {key.keyword}")
        if flt is not None:
            filters.append(flt)
    uids = store.instance_uids_matching(filters)
    return [store.instance(uid) for uid in uids]
