"""What every benchmark module shares: the result row and the run context."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One line of BENCHMARKS.md."""

    figure: str  # what is measured, with its unit, e.g. "WADO-RS whole-study retrieve (s)"
    ours: float | str
    orthanc: float | str | None = None  # same figure for Orthanc in the same run, if it compares
    target: str = ""  # e.g. "<= Orthanc", ">= 2000/s"
    met: bool | None = None
    peak_rss_mb: str = ""  # e.g. "node 120; Orthanc 231"
    command: str = ""  # the command that reproduces this row

    @property
    def ratio(self) -> str:
        ours, orthanc = self.ours, self.orthanc
        if isinstance(ours, int | float) and isinstance(orthanc, int | float) and orthanc:
            return f"{ours / orthanc:.2f}"
        return ""


@dataclass
class BenchContext:
    workdir: Path  # scratch space for this run
    quick: bool = False  # smaller workloads, for a smoke run
    shared: dict[str, object] = field(default_factory=dict)  # e.g. the generated study, Orthanc
