"""The hospital's PACS as a source of studies: listing and retrieving on demand (docs/pacs.md).

The node does not copy the archive. A patient's studies in the PACS are found by a C-FIND
(or QIDO-RS) on the patient's id and listed beside the local ones, under the same study
references. When a grant's transfer asks for a study held only in the PACS, it is
retrieved (C-GET, or WADO-RS one instance at a time) into the bounded cache of
node/store/pacs_cache.py in a background thread, and the transfer is served from there
as the instances land: each manifest names only instances cached whole, with digests, and
says how many are still to come (a partial manifest, node/core/manifest.py), so the
grantee's first bytes flow while the retrieve runs. A retrieve cut off part way is
finished by the next one; the grantee is never done with a study still pending.

Everything from the PACS is outside input: UIDs must be UIDs before they go into a query
or a URL, answers are read within bounds, every instance passes the instance store's
header check (``stage``), and an answer for another patient or study is dropped.
Every method blocks; callers run them in worker threads.
"""

from __future__ import annotations

import contextlib
import email.message
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from node.errors import ImageShareError
from node.services.dimse_transport import (
    CONNECT_TIMEOUT_SECONDS,
    LOW_LATENCY_HANDLERS,
    MAX_PDU_BYTES,
    client_tls_args,
    mark_dimse_activity,
)
from node.store.pacs_cache import CachedInstance, PacsCache, PacsStudy

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from node.config import PacsConfig
    from node.services.runtime import NodeRuntime
    from node.store.protocols import InstanceStore

log = logging.getLogger(__name__)

# A listing is asked of the PACS again after this long; until then (and whenever the PACS
# cannot be reached) the stored last answer stands, so a consent check is not a C-FIND
# each time.
LISTING_SECONDS = 30.0
# Bounds on what one answer of the PACS may hold; more fails closed.
MAX_STUDIES_OF_PATIENT = 1000
MAX_INSTANCES_OF_STUDY = 100_000
MAX_JSON_BYTES = 64 * 1024 * 1024
# Multipart framing around one instance of a WADO-RS answer.
MAX_FRAMING_BYTES = 64 * 1024
# A transfer's studies stay in the cache this long after its manifest, for the grantee's
# first request for instances (the stream itself holds them while it runs).
OPEN_PIN_SECONDS = 600.0
MAX_REMEMBERED_PATIENTS = 10_000
# Studies retrieved from the PACS at once; more wait their turn.
MAX_RETRIEVES = 2
# Longest wait of a transfer's open for more of a study being retrieved; then the manifest
# names what is held (the grantee opens again for the rest).
PARTIAL_WAIT_SECONDS = 10.0
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
# C-FIND and QIDO treat these as wildcards: such a patient id would match other patients.
_WILDCARDS = set("*?\\%_")


class PacsUnavailable(ImageShareError):
    """The PACS could not be reached, or failed, or answered out of bounds."""

    http_status = 503


@dataclass(frozen=True)
class PacsInstance:
    series_uid: str
    sop_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class PacsPart:
    """What of a PACS study a transfer can send now: instances cached whole, and how many
    more the PACS is still delivering (0 once the study is cached whole)."""

    instances: list[CachedInstance]
    pending: int


class _Retrieval:
    """One running retrieve of a study into the cache, watched by the transfers waiting
    for its instances (and by the dashboard)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.listed: int | None = None  # instances the PACS lists, once it has answered
        self.held = 0  # of those, instances in the cache
        self.finished = False
        self.error: str | None = None
        # Per token: how many instances its last manifest named (the next must name twice).
        self.named: dict[bytes, int] = {}


# Called with each received instance's Part 10 bytes; raises if it is not one to keep.
Keep = Callable[[bytes], None]


class _Backend(Protocol):
    description: str

    def find_studies(self, patient_id: str) -> list[PacsStudy]: ...

    def find_instances(self, study_uid: str) -> list[PacsInstance]: ...

    def retrieve(self, study_uid: str, missing: list[PacsInstance], keep: Keep) -> None: ...


def is_uid(value: str) -> bool:
    """True if ``value`` is a DICOM UID (digits and dots, at most 64 characters)."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


def _first(values: Any) -> str:
    return str(values[0]) if isinstance(values, list) and values else ""


class _Dimse:
    """C-FIND and C-GET against the PACS's Query/Retrieve SCP (Study Root)."""

    def __init__(self, config: PacsConfig, calling_ae: str) -> None:
        self.config = config
        self.calling_ae = calling_ae
        self.description = f"{config.ae_title.strip()} at {config.host}:{config.port}"
        self.tls_args = client_tls_args(config, config.host, "[pacs]")

    @contextlib.contextmanager
    def _association(
        self, contexts: list[Any], roles: list[Any] | None = None, handlers: list[Any] | None = None
    ) -> Iterator[Any]:
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = CONNECT_TIMEOUT_SECONDS
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.timeout
        assoc = ae.associate(
            self.config.host,
            self.config.port,
            contexts=contexts,
            ae_title=self.config.ae_title,
            max_pdu=MAX_PDU_BYTES,
            ext_neg=roles,
            evt_handlers=LOW_LATENCY_HANDLERS + (handlers or []),
            tls_args=self.tls_args,
        )
        if not assoc.is_established:
            raise PacsUnavailable(f"the PACS {self.description} did not accept an association")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _find(self, query: Dataset, limit: int) -> list[Dataset]:
        found: list[Dataset] = []
        with self._association([build_context(StudyRootQueryRetrieveInformationModelFind)]) as a:
            for status, identifier in a.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                code = status.get("Status") if status else None
                if code is None:
                    raise PacsUnavailable(f"the PACS {self.description} stopped answering a C-FIND")
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    found.append(identifier)
                    if len(found) > limit:
                        raise PacsUnavailable(f"the PACS answered more than {limit} matches")
                elif code != 0x0000:
                    raise PacsUnavailable(f"the PACS answered a C-FIND with status 0x{code:04X}")
        return found

    def find_studies(self, patient_id: str) -> list[PacsStudy]:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = patient_id
        for keyword in ("StudyInstanceUID", "StudyDate", "StudyDescription", "ModalitiesInStudy"):
            setattr(query, keyword, "")
        query.NumberOfStudyRelatedInstances = None
        studies = []
        for found in self._find(query, MAX_STUDIES_OF_PATIENT):
            modalities = found.get("ModalitiesInStudy") or []
            if isinstance(modalities, str):
                modalities = [modalities]
            count = found.get("NumberOfStudyRelatedInstances")
            studies.append(
                PacsStudy(
                    str(found.get("StudyInstanceUID", "")),
                    str(found.get("PatientID", "")),
                    str(found.get("StudyDate", "")),
                    str(found.get("StudyDescription", "")),
                    tuple(str(m) for m in modalities),
                    int(count) if count not in (None, "") else 0,
                )
            )
        return studies

    def find_instances(self, study_uid: str) -> list[PacsInstance]:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.SOPInstanceUID = ""
        query.SOPClassUID = ""
        return [
            PacsInstance(
                str(found.get("SeriesInstanceUID", "")),
                str(found.get("SOPInstanceUID", "")),
                str(found.get("SOPClassUID", "")),
            )
            for found in self._find(query, MAX_INSTANCES_OF_STUDY)
        ]

    def retrieve(self, study_uid: str, missing: list[PacsInstance], keep: Keep) -> None:
        classes = sorted({item.sop_class_uid for item in missing})
        if len(classes) > 127:  # one association holds at most 128 presentation contexts
            raise PacsUnavailable("the study has more SOP classes than one association holds")
        contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
        contexts += [build_context(uid, list(AllTransferSyntaxes)) for uid in classes]
        roles = [build_role(uid, scp_role=True) for uid in classes]
        failures: list[str] = []

        def on_store(event: Event) -> int:
            mark_dimse_activity()
            try:
                keep(event.encoded_dataset())
            except Exception as exc:
                failures.append(str(exc))
                return 0xA700
            return 0x0000

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        last: int | None = None
        with self._association(contexts, roles, [(evt.EVT_C_STORE, on_store)]) as assoc:
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                last = status.get("Status") if status else None
                if last is None:
                    break
        if failures:
            raise PacsUnavailable(f"an instance from the PACS was not kept: {failures[0]}")
        if last is None:
            raise PacsUnavailable(f"the PACS {self.description} broke off the C-GET")
        if last not in (0x0000, 0xB000):
            raise PacsUnavailable(f"the PACS answered the C-GET with status 0x{last:04X}")


class _DicomWeb:
    """QIDO-RS and WADO-RS against the PACS's DICOMweb server."""

    def __init__(self, config: PacsConfig, max_instance_bytes: int) -> None:
        self.base = config.dicomweb_url.rstrip("/")
        self.timeout = config.timeout
        self.max_instance_bytes = max_instance_bytes
        self.description = urllib.parse.urlsplit(self.base).netloc
        self.headers: dict[str, str] = {}
        if config.dicomweb_auth_header:
            name, _, value = config.dicomweb_auth_header.partition(":")
            self.headers[name.strip()] = value.strip()

    def _get(self, path: str, accept: str, limit: int) -> tuple[bytes, str]:
        request = urllib.request.Request(
            self.base + path, headers={**self.headers, "Accept": accept}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read(limit + 1)
                content_type = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise PacsUnavailable(
                f"the PACS at {self.description} answered HTTP {exc.code}"
            ) from None
        except (OSError, ValueError) as exc:
            raise PacsUnavailable(f"the PACS at {self.description} is unreachable: {exc}") from None
        if len(body) > limit:
            raise PacsUnavailable(f"the PACS's answer is over {limit} bytes")
        return body, content_type

    def _json(self, path: str, limit: int) -> list[dict[str, Any]]:
        body, _ = self._get(path, "application/dicom+json", MAX_JSON_BYTES)
        try:
            document = json.loads(body) if body else []
        except ValueError:
            raise PacsUnavailable("the PACS answered a query with malformed JSON") from None
        if not isinstance(document, list) or not all(isinstance(d, dict) for d in document):
            raise PacsUnavailable("the PACS answered a query with something other than a list")
        if len(document) > limit:
            raise PacsUnavailable(f"the PACS answered more than {limit} matches")
        return document

    @staticmethod
    def _value(item: dict[str, Any], tag: str) -> Any:
        element = item.get(tag)
        return element.get("Value") if isinstance(element, dict) else None

    def find_studies(self, patient_id: str) -> list[PacsStudy]:
        query = urllib.parse.urlencode(
            [("PatientID", patient_id)]
            + [("includefield", tag) for tag in ("00081030", "00080061", "00201208")]
        )
        studies = []
        for item in self._json(f"/studies?{query}", MAX_STUDIES_OF_PATIENT):
            count = _first(self._value(item, "00201208"))
            modalities = self._value(item, "00080061") or []
            studies.append(
                PacsStudy(
                    _first(self._value(item, "0020000D")),
                    _first(self._value(item, "00100020")),
                    _first(self._value(item, "00080020")),
                    _first(self._value(item, "00081030")),
                    tuple(str(m) for m in modalities if isinstance(m, str)),
                    int(count) if count.isdigit() else 0,
                )
            )
        return studies

    def find_instances(self, study_uid: str) -> list[PacsInstance]:
        items = self._json(
            f"/studies/{study_uid}/instances?includefield=0020000E", MAX_INSTANCES_OF_STUDY
        )
        return [
            PacsInstance(
                _first(self._value(item, "0020000E")),
                _first(self._value(item, "00080018")),
                _first(self._value(item, "00080016")),
            )
            for item in items
        ]

    def retrieve(self, study_uid: str, missing: list[PacsInstance], keep: Keep) -> None:
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        for item in missing:
            path = f"/studies/{study_uid}/series/{item.series_uid}/instances/{item.sop_uid}"
            body, content_type = self._get(
                path, accept, self.max_instance_bytes + MAX_FRAMING_BYTES
            )
            keep(single_part(body, content_type))


def single_part(body: bytes, content_type: str) -> bytes:
    """The one body part of a multipart/related answer (RFC 2046); PacsUnavailable unless
    the answer is exactly that: a delimiter, part headers, the part, the close delimiter."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/related" or not isinstance(boundary, str):
        raise PacsUnavailable("the PACS's WADO-RS answer is not multipart/related")
    delimiter = b"--" + boundary.encode("ascii", "replace")
    start = body.find(delimiter + b"\r\n")
    headers_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    if start < 0 or headers_end < 0 or headers_end - start > MAX_FRAMING_BYTES:
        raise PacsUnavailable("the PACS's WADO-RS answer has no well-formed part")
    end = body.find(b"\r\n" + delimiter, headers_end + 4)
    if end < 0 or not body[end + 2 + len(delimiter) :].startswith(b"--"):
        raise PacsUnavailable("the PACS's WADO-RS answer is not one whole part")
    return body[headers_end + 4 : end]


class PacsSource:
    """The configured PACS: listings, on-demand retrieves into the cache, the link state."""

    def __init__(self, runtime: NodeRuntime) -> None:
        config = runtime.config.pacs
        self.config = config
        self.store: InstanceStore = runtime.store
        self.cache = PacsCache(runtime.config.data_dir)
        self.backend: _Backend = (
            _Dimse(config, runtime.config.dimse.ae_title)
            if config.ae_title
            else _DicomWeb(config, runtime.config.store.max_instance_bytes)
        )
        self._lock = threading.Lock()
        # When each patient's studies were last asked of the PACS (the answers are stored).
        self._asked: dict[str, float] = {}
        self._retrievals: dict[str, _Retrieval] = {}
        self._pins: dict[bytes, tuple[frozenset[str], float]] = {}
        self._streams: dict[str, int] = {}
        self.link_state = "unknown"
        self.link_error = ""
        self.link_checked_at: float | None = None
        self.retrieves = 0
        self._retriever = ThreadPoolExecutor(MAX_RETRIEVES, thread_name_prefix="pacs-retrieve")

    def close(self) -> None:
        self._retriever.shutdown(wait=True, cancel_futures=True)
        self.cache.close()

    def _note(self, error: str = "") -> None:
        self.link_state = "down" if error else "up"
        self.link_error = error
        self.link_checked_at = time.time()

    # -- listing -------------------------------------------------------------------------

    def studies_of_patient(self, patient_id: str) -> list[PacsStudy]:
        """The patient's studies in the PACS (exactly this patient id): asked of the PACS
        when the last answer is older than LISTING_SECONDS, else (and whenever the PACS
        cannot be reached, even after a restart) its last answer, kept in the cache's
        database."""
        if not patient_id or _WILDCARDS & set(patient_id):
            return []  # a wildcard would match other patients' studies
        with self._lock:
            asked = self._asked.get(patient_id)
        if asked is not None and time.monotonic() - asked < LISTING_SECONDS:
            return self.cache.listing(patient_id)
        try:
            found = self.backend.find_studies(patient_id)
        except (PacsUnavailable, OSError, ValueError, RuntimeError) as exc:
            self._note(str(exc))
            log.warning("listing a patient's studies in the PACS failed: %s", exc)
            studies = self.cache.listing(patient_id)
        else:
            self._note()
            studies = [s for s in found if s.patient_id == patient_id and is_uid(s.study_uid)]
            self.cache.replace_listing(patient_id, studies)
        with self._lock:
            # Failed or not, asked again only after LISTING_SECONDS: a PACS that hangs
            # must not hold up every consent check (one a second while a study streams).
            self._asked.pop(patient_id, None)
            if len(self._asked) >= MAX_REMEMBERED_PATIENTS:
                self._asked.pop(next(iter(self._asked)))
            self._asked[patient_id] = time.monotonic()
        return studies

    def study(self, study_uid: str) -> PacsStudy | None:
        """A study seen in a listing of the PACS (now or before a restart), or None."""
        return self.cache.listed_study(study_uid)

    # -- on demand -----------------------------------------------------------------------

    def instances_to_send(self, study_uid: str, token_id: bytes) -> PacsPart:
        """What of a study listed in the PACS can be sent now to the transfer of
        ``token_id``, kept in the cache for it.

        A study cached whole is all of it. Otherwise its retrieve is started (or joined)
        and this waits, at most PARTIAL_WAIT_SECONDS, until the cache holds twice the
        instances this token's last manifest named (at least one), or the retrieve ends:
        the part is then the instances held so far, each whole and with its digest, and
        how many more the PACS is still to deliver. Empty if the study is not one the PACS
        listed. Raises PacsUnavailable with the reason when the retrieve fails (what
        arrived stays cached, and the next retrieve adds only the rest).
        """
        if self.study(study_uid) is None and self.cache.complete_instances(study_uid) is None:
            return PacsPart([], 0)
        self._pin(token_id, study_uid)
        try:
            return self._part(study_uid, token_id)
        except BaseException:
            self._unpin(token_id, study_uid)  # no transfer will stream what was not sent
            raise

    def _part(self, study_uid: str, token_id: bytes) -> PacsPart:
        cached = self.cache.complete_instances(study_uid)
        if cached is not None:
            return PacsPart(cached, 0)
        retrieval = self._retrieval(study_uid)
        with retrieval.changed:
            wanted = max(1, 2 * retrieval.named.get(token_id, 0))
            retrieval.changed.wait_for(
                lambda: retrieval.finished or wanted <= retrieval.held < (retrieval.listed or 0),
                timeout=PARTIAL_WAIT_SECONDS,
            )
            finished, error, listed = retrieval.finished, retrieval.error, retrieval.listed
        if error is not None:
            raise PacsUnavailable(error)
        if finished:
            cached = self.cache.complete_instances(study_uid)
            if cached is None:  # cannot be while pinned; never serve less than the study
                raise PacsUnavailable("the retrieved study left the cache before it was sent")
            return PacsPart(cached, 0)
        held = self.cache.instances_held(study_uid)
        if listed is None:
            described = self.study(study_uid)
            listed = described.instances if described is not None else 0
        with retrieval.changed:
            retrieval.named[token_id] = len(held)
        return PacsPart(held, max(1, listed - len(held)))

    def _retrieval(self, study_uid: str) -> _Retrieval:
        """The running retrieve of a study, started now if none runs."""
        with self._lock:
            retrieval = self._retrievals.get(study_uid)
            if retrieval is None:
                retrieval = self._retrievals[study_uid] = _Retrieval()
                self._retriever.submit(self._run_retrieval, study_uid, retrieval)
        return retrieval

    def prefetch(self, study_uids: list[str]) -> None:
        """Start retrieving, in the background, those of the studies that are listed in the
        PACS and neither held by the instance store nor cached whole ([pacs] prefetch)."""
        for uid in study_uids:
            if (
                self.study(uid) is not None
                and self.store.instance_count(uid) == 0
                and self.cache.complete_instances(uid) is None
            ):
                self._retrieval(uid)

    def _run_retrieval(self, study_uid: str, retrieval: _Retrieval) -> None:
        error: str | None = None
        try:
            self._retrieve(study_uid, retrieval)
        except PacsUnavailable as exc:  # the transfers waiting for it say why
            error = str(exc)
            log.warning("retrieving a study from the PACS failed: %s", exc)
        except Exception as exc:  # a worker thread: whatever it was, the waiters must hear
            log.exception("retrieving a study from the PACS failed")
            error = f"retrieving from the PACS failed: {exc}"
        finally:
            with retrieval.changed:
                partly_sent = list(retrieval.named)
            # The transfers sent part of it come back for the rest: held for them, even a
            # study larger than the whole cache is not dropped before they have it.
            for token_id in partly_sent if error is None else []:
                self._pin(token_id, study_uid)
            with self._lock:
                self._retrievals.pop(study_uid, None)
            with retrieval.changed:
                retrieval.finished, retrieval.error = True, error
                retrieval.changed.notify_all()
        kept = self._kept()
        if error is None:
            kept.add(study_uid)  # just retrieved (a prefetch, say): it goes at a later eviction
        self.cache.evict(self.config.cache_bytes, kept)

    def _retrieve(self, study_uid: str, retrieval: _Retrieval) -> None:
        started = time.monotonic()
        try:
            listed = self.backend.find_instances(study_uid)
            wanted = {i.sop_uid: i for i in listed if is_uid(i.sop_uid) and is_uid(i.series_uid)}
            if not wanted or len(wanted) != len(listed):
                raise PacsUnavailable("the PACS lists no valid instances for the study")
            held = self.cache.held(study_uid)
            with retrieval.changed:
                retrieval.listed, retrieval.held = len(wanted), len(held & set(wanted))
                retrieval.changed.notify_all()
            missing = [item for uid, item in wanted.items() if uid not in held]
            if missing:
                self.backend.retrieve(
                    study_uid, missing, self._keeper(study_uid, wanted, retrieval)
                )
            still = set(wanted) - self.cache.held(study_uid)
            if still:
                raise PacsUnavailable(
                    f"the PACS delivered {len(wanted) - len(still)} of {len(wanted)} instances"
                )
        except PacsUnavailable as exc:
            self._note(str(exc))
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            self._note(str(exc))
            raise PacsUnavailable(f"retrieving from the PACS failed: {exc}") from exc
        self._note()
        self.cache.mark_complete(study_uid)
        self.retrieves += 1
        log.info(
            "retrieved a study of %d instances from the PACS in %.1f s",
            len(wanted),
            time.monotonic() - started,
        )

    def _keeper(
        self, study_uid: str, wanted: dict[str, PacsInstance], retrieval: _Retrieval
    ) -> Keep:
        def keep(data: bytes) -> None:
            staged = self.store.stage_bytes(data)  # the one header check, within limits
            try:
                if staged.header.study_instance_uid != study_uid:
                    raise PacsUnavailable("the PACS sent an instance of another study")
                if staged.header.sop_instance_uid not in wanted:
                    raise PacsUnavailable("the PACS sent an instance it did not list")
                added = self.cache.put(study_uid, staged)
            finally:
                staged.tmp_path.unlink(missing_ok=True)
            if added:  # whole, fsynced and indexed: a manifest may name it now
                with retrieval.changed:
                    retrieval.held += 1
                    retrieval.changed.notify_all()

        return keep

    # -- what may not be evicted ---------------------------------------------------------

    def _pin(self, token_id: bytes, study_uid: str) -> None:
        now = time.monotonic()
        with self._lock:
            studies, _ = self._pins.get(token_id, (frozenset(), 0.0))
            self._pins[token_id] = (studies | {study_uid}, now + OPEN_PIN_SECONDS)
            for key, (_, until) in list(self._pins.items()):
                if until < now:
                    del self._pins[key]

    def _unpin(self, token_id: bytes, study_uid: str) -> None:
        with self._lock:
            studies, until = self._pins.get(token_id, (frozenset(), 0.0))
            if studies - {study_uid}:
                self._pins[token_id] = (studies - {study_uid}, until)
            else:
                self._pins.pop(token_id, None)

    def release(self, token_id: bytes, study_uids: list[str]) -> list[str]:
        """A revoked token's studies that no live grant needs: drop those cached, except
        any a retrieve or another transfer still holds (the size limit takes them later).
        Returns the dropped studies."""
        with self._lock:
            self._pins.pop(token_id, None)
        kept = self._kept()
        return [uid for uid in study_uids if uid not in kept and self.cache.drop(uid)]

    def _kept(self) -> set[str]:
        now = time.monotonic()
        with self._lock:
            kept = set(self._streams) | set(self._retrievals)
            for studies, until in self._pins.values():
                if until >= now:
                    kept |= studies
        return kept

    @contextlib.contextmanager
    def serving(self, token_id: bytes) -> Iterator[None]:
        """Hold the cached studies of a transfer while its instances stream; at the end
        they may be evicted again."""
        with self._lock:
            studies, _ = self._pins.pop(token_id, (frozenset(), 0.0))
            for uid in studies:
                self._streams[uid] = self._streams.get(uid, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for uid in studies:
                    self._streams[uid] -= 1
                    if not self._streams[uid]:
                        del self._streams[uid]
            if studies:
                self.cache.evict(self.config.cache_bytes, self._kept())

    # -- the dashboard -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The PACS link and the cache, for /admin/api/status."""
        usage = self.cache.usage()
        with self._lock:
            running = list(self._retrievals.items())
        retrieving = []
        for study_uid, retrieval in running:
            with retrieval.changed:
                retrieving.append(
                    {
                        "study_uid": study_uid,
                        "instances_listed": retrieval.listed,
                        "instances_held": retrieval.held,
                    }
                )
        return {
            "enabled": True,
            "via": "dimse" if self.config.ae_title else "dicomweb",
            "pacs": self.backend.description,
            "link": self.link_state,
            "last_error": self.link_error,
            "checked_at": self.link_checked_at,
            "retrieves": self.retrieves,
            "retrieving": retrieving,
            "prefetch": self.config.prefetch,
            "cache": {
                "studies": usage.studies,
                "complete": usage.complete,
                "bytes": usage.bytes,
                "limit_bytes": self.config.cache_bytes,
                "held_for_transfers": len(self._kept()),
            },
        }


@contextlib.contextmanager
def serving_from_cache(runtime: NodeRuntime, token_id: bytes) -> Iterator[None]:
    """``PacsSource.serving`` when a PACS is configured, else nothing."""
    source = runtime.services.pacs
    if source is None:
        yield
        return
    with source.serving(token_id):
        yield
