"""Bulk import of DICOM files from disk, through the store's one durable path."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from node.errors import BadInput, PayloadTooLarge
from node.store.instances import IngestResult, Outcome, StagedInstance
from node.store.protocols import InstanceStore


@dataclass
class ImportSummary:
    stored: int = 0
    duplicate: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)
    bytes_stored: int = 0

    def count(self, result: IngestResult) -> None:
        self.studies.add(result.study_instance_uid)
        if result.outcome is Outcome.STORED:
            self.stored += 1
            self.bytes_stored += result.size
        else:
            self.duplicate += 1

    def as_json(self) -> dict[str, object]:
        return {
            "stored": self.stored,
            "duplicate": self.duplicate,
            "rejected": [{"path": p, "reason": r} for p, r in self.rejected],
            "studies": len(self.studies),
            "bytes_stored": self.bytes_stored,
        }


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under the given files and directories, in a stable order."""
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def import_files(
    store: InstanceStore,
    files: Iterable[Path],
    batch_size: int = 64,
    on_file: Callable[[Path], None] | None = None,
    on_commit: Callable[[list[IngestResult]], None] | None = None,
) -> ImportSummary:
    """Import files, committing every ``batch_size`` instances in one durable step.

    A file that is not acceptable DICOM is rejected with its reason; the rest go on.
    ``on_commit`` is called with the results of each durable batch (forwarding hooks).
    """
    summary = ImportSummary()
    batch: list[StagedInstance] = []

    def flush() -> None:
        if batch:
            results = store.commit(batch)
            for result in results:
                summary.count(result)
            if on_commit is not None:
                on_commit(results)
            batch.clear()

    try:
        for path in files:
            try:
                with open(path, "rb") as f:
                    batch.append(store.stage(f, declared_size=os.fstat(f.fileno()).st_size))
            except (BadInput, PayloadTooLarge) as exc:
                summary.rejected.append((str(path), str(exc)))
            except (PermissionError, IsADirectoryError, FileNotFoundError) as exc:
                summary.rejected.append((str(path), exc.strerror or str(exc)))
            if on_file is not None:
                on_file(path)
            if len(batch) >= batch_size:
                flush()
        flush()
    finally:
        store.discard(batch)
    return summary
