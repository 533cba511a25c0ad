"""The one DICOM UID check, wherever a UID arrives: a file's header, a QIDO-RS or C-FIND
query, a DICOMweb path.

A UID is 1 to 64 characters of ASCII digits and dots (PS3.5 §9.1: the character set and
length). The components are not checked further: PS3.5 forbids leading zeros, but real
archives hold such UIDs, and refusing them would strand those studies.
"""

from __future__ import annotations

import re
from typing import TypeGuard

# ASCII digits only (\d or str.isdigit would also take other scripts' digits, such as
# "٣"). Also the pattern of a UID in a DICOMweb route, which aiohttp matches whole.
UID_PATTERN = "[0-9.]{1,64}"
_UID = re.compile(UID_PATTERN)


def is_uid(value: object) -> TypeGuard[str]:
    """True if ``value`` is a string that follows the UID rule (fullmatch: no trailing newline)."""
    return isinstance(value, str) and _UID.fullmatch(value) is not None
