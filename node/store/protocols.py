"""What services see of the instance store: a Protocol that every backend implements.

The embedded backend is ``SqliteInstanceStore`` (``node/store/instances.py``: Part 10
files on local disk, the index in SQLite). A second backend (a database server and an
object store, shared by several daemons of one node) implements the same methods; no
service knows which one it has. So the methods are named by what a service needs, not by
SQL, and nothing in a signature is a backend's type.

Every method blocks (disk, database). Services call them from worker threads, never on
the event loop; ``off_loop`` is the one way an asyncio caller runs one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, ParamSpec, Protocol, TypeVar, runtime_checkable

from pydicom.dataset import FileDataset

from node.store.dicom_header import InflateLimits
from node.store.instances import (
    Arrival,
    IndexedSeries,
    IngestResult,
    InstanceRecord,
    StagedInstance,
    StagingFile,
)
from node.store.queries import Filter, Query, QueryResult, StudyPage

P = ParamSpec("P")
T = TypeVar("T")


@runtime_checkable
class InstanceStore(Protocol):
    """The node's DICOM instances: durable files and their index (see instances.py for
    the durability rule every backend keeps: acknowledged means flushed and committed)."""

    inflate_limits: InflateLimits
    max_instance_bytes: int  # the largest instance (or bulk data part) accepted
    tmp_dir: Path  # local scratch space on the store's volume, for spooling uploads

    async def off_loop(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking store call away from the event loop and return its result."""
        ...

    # -- ingest ------------------------------------------------------------------------

    def stage(self, source: IO[bytes], declared_size: int | None = None) -> StagedInstance:
        """Receive a stream into staging, hashed and header-checked (BadInput,
        PayloadTooLarge, StorageFull); nothing is left behind on failure."""
        ...

    def stage_bytes(self, data: bytes) -> StagedInstance:
        """``stage`` for an instance already in memory."""
        ...

    def open_staging(self) -> StagingFile:
        """A staging file to fill chunk by chunk, then ``finish`` into a StagedInstance."""
        ...

    def discard(self, staged: Iterable[StagedInstance]) -> None:
        """Drop staged instances that will not be committed."""
        ...

    def commit(self, staged: Sequence[StagedInstance], source: str = "local") -> list[IngestResult]:
        """Make staged instances durable and indexed in one batch; one result each, in
        order (an instance already indexed is a duplicate)."""
        ...

    # -- the index ---------------------------------------------------------------------

    def instances(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[InstanceRecord]:
        """Instances of a study (or one series, or one instance) in a stable order;
        NotFound when nothing matches."""
        ...

    def instance(self, sop_instance_uid: str) -> InstanceRecord:
        """One instance; NotFound if it is not indexed."""
        ...

    def study_row(self, study_uid: str) -> dict[str, Any]:
        """A study's indexed attributes and the store's columns (source, created_at) by
        column name; NotFound if it is not indexed."""
        ...

    def counts(self) -> dict[str, int]:
        """How many studies, series, instances and bytes the store holds."""
        ...

    def study_uids(self) -> list[str]:
        """Every indexed study's Study Instance UID."""
        ...

    def patient_ids(self) -> list[str]:
        """Every distinct non-empty Patient ID of the indexed studies."""
        ...

    def studies_of_patient(
        self, patient_id: str, unless_source_starts_with: str | None = None
    ) -> list[str]:
        """The Study Instance UIDs of a patient's studies by study date then UID, without
        those whose source starts with ``unless_source_starts_with``."""
        ...

    def series_of_study(self, study_uid: str) -> list[IndexedSeries]:
        """A study's series by series number, then UID (empty if it has none)."""
        ...

    def instance_count(self, study_uid: str) -> int:
        """How many instances of the study are indexed."""
        ...

    def digests_present(self, digests: Sequence[str]) -> set[str]:
        """Which of these SHA-256 digests (hex) belong to an indexed instance."""
        ...

    def studies_with_digests(self, digests: Sequence[str]) -> list[str]:
        """The distinct studies holding an instance with one of these digests (hex)."""
        ...

    def arrivals_after(self, position: int, limit: int) -> list[Arrival]:
        """At most ``limit`` instances indexed after ``position``, in indexing order."""
        ...

    # -- queries (node/store/queries.py: the one query engine) --------------------------

    def search(self, query: Query) -> QueryResult:
        """The rows matching a parsed QIDO-RS or C-FIND query, capped at MAX_RESULTS;
        BadInput if the backend cannot answer it."""
        ...

    def instance_uids_matching(self, filters: Sequence[Filter]) -> list[str]:
        """Every SOP Instance UID the filters match, in the stable order; not capped."""
        ...

    def study_list(self, page: StudyPage) -> tuple[int, list[dict[str, Any]]]:
        """The dashboard's study list: how many studies match the words and filters,
        and one page of them in ``order`` (queries.STUDY_LIST_ORDERS)."""
        ...

    # -- stored files ------------------------------------------------------------------

    def read_dataset(
        self,
        record: InstanceRecord,
        defer_size: int | None = None,
        stop_before_pixels: bool = False,
    ) -> FileDataset:
        """A stored instance as a pydicom dataset, within the inflate limits."""
        ...

    def read_to_pixels(self, record: InstanceRecord, defer_size: int) -> tuple[FileDataset, int]:
        """A stored instance read up to its pixel data, and that element's file offset."""
        ...

    def iter_file_chunks(self, record: InstanceRecord) -> Iterator[bytes]:
        """A stored instance's bytes, in chunks."""
        ...

    def close(self) -> None:
        """Release the store's connections."""
        ...
