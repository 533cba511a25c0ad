"""One UID rule: a file's header and a query (QIDO-RS and C-FIND share the query parser)
accept and refuse the same UIDs."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from node.core.uids import is_uid
from node.errors import BadInput
from node.samples import make_ct_study
from node.store.attributes import Level
from node.store.dicom_header import InflateLimits, parse_header
from node.store.queries import parse_qido

ACCEPTED = ["1", "1.2.840.10008.5.1.4.1.1.2", "2.25." + "9" * 59, "1.02.3"]
REFUSED = [
    "",
    "1." + "2" * 63,  # 65 characters
    "1.2.3a",
    "1.2.٣",  # a digit of another script
    "1.2 .3",
    "1.2.3\n",  # "$" in a regex would let this one through
    "1,2",
    "1.2/3",
]


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    study = make_ct_study(tmp_path_factory.mktemp("uid"), series=1, slices=1, rows=8, columns=8)
    return study.files[0]


def _header_takes(sample_file: Path, tmp_path: Path, uid: str) -> bool:
    ds = pydicom.dcmread(sample_file)
    ds.StudyInstanceUID = uid
    path = tmp_path / "one.dcm"
    ds.save_as(path)
    try:
        header = parse_header(path, InflateLimits(max_bytes=1 << 20, max_ratio=100.0))
    except BadInput:
        return False
    assert header.study_instance_uid == uid
    return True


def _query_takes(uid: str) -> bool:
    try:
        parse_qido(Level.STUDY, [("StudyInstanceUID", uid)])
    except BadInput:
        return False
    return True


@pytest.mark.parametrize("uid", ACCEPTED + REFUSED)
def test_header_and_query_follow_the_one_uid_rule(
    sample_file: Path, tmp_path: Path, uid: str
) -> None:
    expected = uid in ACCEPTED
    assert is_uid(uid) == expected
    # In a query an empty value matches all, a comma lists UIDs and spaces around a
    # value are dropped: those are query syntax, not UIDs.
    if uid.strip() == uid and uid and "," not in uid:
        assert _query_takes(uid) == expected
    # pydicom strips a UI value's whitespace and writes only what its character set holds.
    if uid.strip() == uid and uid.isascii():
        assert _header_takes(sample_file, tmp_path, uid) == expected
