"""pydicom's test files copied into a test's directory, ready to import."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.data import get_testdata_file


def copy_pydicom_samples(names: tuple[str, ...], directory: Path) -> dict[str, Path]:
    """Copy each of pydicom's test files ``names`` into ``directory``: name -> copy."""
    directory.mkdir(parents=True, exist_ok=True)
    copies = {}
    for name in names:
        source = get_testdata_file(name)
        assert isinstance(source, str), f"pydicom has no test file {name}"
        copies[name] = directory / name
        shutil.copyfile(source, copies[name])
    return copies
