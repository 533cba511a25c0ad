"""DICOMweb routes under /dicomweb: QIDO-RS, WADO-RS and STOW-RS (thin handlers).

The admin bearer token and CORS are enforced by app.py's middlewares. Handlers parse the
request, negotiate the media type, call the DICOMweb service and frame its answer.

Every read route is listed once in READ_ROUTES: /dicomweb mounts them for the admin
token, and node.edges.http.links mounts the same handlers under a share link's root,
where a ReadAccess in the request limits them to the link's studies.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial

from aiohttp import web

from node.core import atna, dicom_json
from node.core.rate_limit import SlidingWindowLimit
from node.edges.http.app import RUNTIME_KEY, accepts_body_encodings
from node.edges.http.multipart import (
    NotAcceptable,
    StreamedParts,
    parse_accept,
    send_body,
    stream_parts,
    type_matches,
)
from node.errors import BadInput, NotFound
from node.services.dicomweb import OCTET_STREAM, DicomWebService, FrameSet, UploadPart
from node.services.runtime import NodeRuntime
from node.store.attributes import BY_KEYWORD, Level
from node.store.instances import InstanceRecord
from node.store.queries import Filter, parse_qido

PREFIX = "/dicomweb"
SERVICE_KEY = web.AppKey("dicomweb", DicomWebService)
READS_AUDITED_KEY = web.AppKey("dicomweb_reads_audited", SlidingWindowLimit)
DICOM = "application/dicom"
_UID = "{%s:[0-9.]{1,64}}"
# Paths below a DICOMweb root.
STUDY_PATH = f"/studies/{_UID % 'study'}"
SERIES_PATH = f"{STUDY_PATH}/series/{_UID % 'series'}"
INSTANCE_PATH = f"{SERIES_PATH}/instances/{_UID % 'instance'}"
STUDY = PREFIX + STUDY_PATH
ACCESS_KEY = "imageshare.dicomweb_access"  # request key: the ReadAccess of a request
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ReadAccess:
    """What a DICOMweb read may see: every study (None, the admin token) or a set of them,
    the path of the root it came in by (retrieve URLs point back to it), and who asks."""

    studies: frozenset[str] | None
    root_path: str
    who: str


ADMIN_ACCESS = ReadAccess(None, PREFIX, "admin-token")


def _access(request: web.Request) -> ReadAccess:
    access = request.get(ACCESS_KEY, ADMIN_ACCESS)
    assert isinstance(access, ReadAccess)
    return access


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app[SERVICE_KEY] = DicomWebService(runtime.store)
    app[READS_AUDITED_KEY] = SlidingWindowLimit(1, 60.0)
    router = app.router
    for path, handler in READ_ROUTES:
        router.add_get(PREFIX + path, handler)
    router.add_post(f"{PREFIX}/studies", store_instances)
    router.add_post(STUDY, store_instances)


def _service(request: web.Request) -> DicomWebService:
    return request.app[SERVICE_KEY]


def _base_url(request: web.Request) -> str:
    return base_url_of(request, _access(request).root_path)


def base_url_of(request: web.Request, root_path: str) -> str:
    """Where clients reach ``root_path`` on this node: the configured public URL, else
    what the client used."""
    configured = request.app[RUNTIME_KEY].config.http.public_url
    if configured:
        return configured.rstrip("/") + root_path
    host = request.host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if ":" not in host.rsplit("]", 1)[-1] and sockname:
        host = f"{host}:{sockname[1]}"  # some clients send Host without the port
    return f"{request.scheme}://{host}{root_path}"


def _json_response(document: object, status: int = 200) -> web.Response:
    # Exactly "application/dicom+json", without a charset: some clients compare it verbatim.
    response = web.Response(body=dicom_json.encode(document), status=status)
    response.headers["Content-Type"] = dicom_json.MEDIA_TYPE
    return response


def _require_json(request: web.Request) -> None:
    for media in parse_accept(request.headers.get("Accept")):
        if any(type_matches(media.type, t) for t in (dicom_json.MEDIA_TYPE, "application/json")):
            return
    raise NotAcceptable("this resource is available as application/dicom+json only")


# -- QIDO-RS ---------------------------------------------------------------------------


async def _search(request: web.Request, level: Level) -> web.Response:
    _require_json(request)
    query = parse_qido(
        level,
        request.query.items(),
        study_uid=request.match_info.get("study"),
        series_uid=request.match_info.get("series"),
    )
    access = _access(request)
    if access.studies is not None:
        if not access.studies:
            return _json_response([])
        query.filters.append(Filter(BY_KEYWORD["StudyInstanceUID"], tuple(sorted(access.studies))))
    results, truncated = await _service(request).search(query, _base_url(request))
    request.app[RUNTIME_KEY].security_audit.record(
        atna.query, access.who, request.remote or "", "QIDO-RS", len(results)
    )
    response = _json_response(results)
    if truncated:
        response.headers.add(
            "Warning", f'299 {request.host} "There are additional results that can be requested"'
        )
    if query.fuzzy_asked:  # PS3.18 8.3.4.2
        response.headers.add(
            "Warning",
            f"299 {request.host}: The fuzzymatching parameter is not supported."
            " Only literal matching has been performed.",
        )
    return response


async def search_studies(request: web.Request) -> web.Response:
    return await _search(request, Level.STUDY)


async def search_series(request: web.Request) -> web.Response:
    return await _search(request, Level.SERIES)


async def search_instances(request: web.Request) -> web.Response:
    return await _search(request, Level.INSTANCE)


# -- WADO-RS ---------------------------------------------------------------------------


async def _records(request: web.Request) -> list[InstanceRecord]:
    info = request.match_info
    allowed = _access(request).studies
    if allowed is not None and info["study"] not in allowed:
        raise NotFound("no such study")  # as if absent: a link does not tell what else is here
    return await _service(request).records(info["study"], info.get("series"), info.get("instance"))


def _accepts_dicom(request: web.Request, transfer_syntaxes: set[str]) -> bool:
    """Whether Accept allows multipart application/dicom in the stored transfer syntaxes.

    Without a transfer-syntax parameter, instances are sent as stored (never transcoded).
    """
    for media in parse_accept(request.headers.get("Accept")):
        if media.type == "multipart/related":
            if not type_matches(media.params.get("type", DICOM), DICOM):
                continue
            wanted = media.params.get("transfer-syntax")
            if wanted in (None, "*") or transfer_syntaxes == {wanted}:
                return True
        elif type_matches(media.type, "multipart/related"):
            return True
    return False


async def retrieve(request: web.Request) -> web.StreamResponse:
    records = await _records(request)
    if not _accepts_dicom(request, {r.transfer_syntax_uid for r in records}):
        raise NotAcceptable(
            'instances are sent only as stored: multipart/related; type="application/dicom"'
            " with transfer-syntax=* or the stored transfer syntax"
        )
    service = _service(request)
    await service.check_files(records)
    _audit_read(request, records, "WADO-RS")
    return await stream_parts(request, DICOM, [service.file_part(r) for r in records])


def _audit_read(request: web.Request, records: list[InstanceRecord], via: str) -> None:
    """Audit a WADO-RS read once per client address, study and service a minute: a
    viewer sends one request per frame, which must not flood the bounded audit queue."""
    key = f"{request.remote} {records[0].study_instance_uid} {via}" if records else ""
    if records and request.app[READS_AUDITED_KEY].admit(key, time.monotonic()):
        _audit_transfer(request, True, [r.study_instance_uid for r in records], via)


def _audit_transfer(request: web.Request, sent: bool, study_uids: list[str], via: str) -> None:
    """The security audit message of instances sent or stored over DICOMweb."""
    request.app[RUNTIME_KEY].security_audit.record(
        atna.instances_transferred,
        sent,
        _access(request).who,
        request.remote or "",
        sorted(set(study_uids)),
        len(study_uids),
        via,
    )


async def retrieve_metadata(request: web.Request) -> web.StreamResponse:
    _require_json(request)
    records = await _records(request)
    body: AsyncIterator[bytes] = _service(request).metadata(records, _base_url(request))
    first = await anext(body)  # errors before this point still get their own status
    _audit_read(request, records, "WADO-RS metadata")
    response = web.StreamResponse(headers={"Content-Type": dicom_json.MEDIA_TYPE})
    return await send_body(request, response, _prepend(first, body))


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",")]
    except ValueError as exc:
        raise BadInput("frame list must be comma-separated numbers like 1,2,3") from exc
    if not numbers or any(n < 1 for n in numbers) or len(numbers) > 10000:
        raise BadInput("frame numbers start at 1")
    return numbers


def _frame_media_type(request: web.Request, frames: FrameSet) -> str:
    """The part media type the client accepts for these frames; raises NotAcceptable."""
    for media in parse_accept(request.headers.get("Accept")):
        if media.type != "multipart/related":
            if type_matches(media.type, "multipart/related"):
                return frames.media_type
            continue
        wanted_type = media.params.get("type", OCTET_STREAM)
        wanted_syntax = media.params.get("transfer-syntax")
        if wanted_syntax is None:
            # Without a transfer syntax, octet-stream means Explicit VR Little Endian.
            wanted_syntax = "1.2.840.10008.1.2.1" if wanted_type == OCTET_STREAM else "*"
        if wanted_syntax not in ("*", frames.transfer_syntax):
            continue
        if type_matches(wanted_type, frames.media_type):
            return frames.media_type
        if wanted_type == OCTET_STREAM:
            return OCTET_STREAM  # compressed frames, labelled with their transfer syntax
    raise NotAcceptable(
        f"these frames are available only as {frames.media_type};"
        f" transfer-syntax={frames.transfer_syntax}"
    )


async def _send_frames(request: web.Request, frames: FrameSet) -> web.StreamResponse:
    media_type = _frame_media_type(request, frames)
    if media_type != frames.media_type:
        labelled = f"{media_type}; transfer-syntax={frames.transfer_syntax}"
        parts = [replace(p, content_type=labelled) for p in frames.parts]
        frames = FrameSet(media_type, frames.transfer_syntax, parts)
    return await stream_parts(request, media_type, frames.parts)


async def retrieve_frames(request: web.Request) -> web.StreamResponse:
    numbers = _frame_numbers(request.match_info["frames"])
    records = await _records(request)
    frames = await _service(request).frames(records[0], numbers)
    _audit_read(request, records, "WADO-RS frames")
    return await _send_frames(request, frames)


async def retrieve_bulk(request: web.Request) -> web.StreamResponse:
    records = await _records(request)
    tag = int(request.match_info["tag"], 16)
    frames = await _service(request).bulk(records[0], tag)
    _audit_read(request, records, "WADO-RS bulk data")
    if not frames.transfer_syntax:
        return await stream_parts(request, OCTET_STREAM, frames.parts)
    return await _send_frames(request, frames)


# -- STOW-RS ---------------------------------------------------------------------------


async def _upload_parts(parts: StreamedParts) -> AsyncIterator[UploadPart]:
    async for part in parts:
        declared = part.headers.get("Content-Type")
        content_type = parts.part_type_of(part) if declared else ""
        yield UploadPart(content_type, partial(parts.read_chunk, part))


@accepts_body_encodings("gzip", "deflate")
async def store_instances(request: web.Request) -> web.Response:
    study_uid = request.match_info.get("study")
    runtime = request.app[RUNTIME_KEY]
    parts = StreamedParts(
        request,
        DICOM,
        runtime.config.http.max_body_bytes,
        runtime.config.store.max_inflation_ratio,
    )
    report = await _service(request).store_upload(_upload_parts(parts), study_uid)
    if not report.stored and not report.failed:
        raise BadInput("the multipart body holds no parts")
    if report.stored:
        _audit_transfer(request, False, [r.study_instance_uid for r in report.stored], "STOW-RS")
    return _json_response(report.as_json(_base_url(request)), report.status)


# Every read route, below a DICOMweb root (mounted under /dicomweb and under share links).
READ_ROUTES: tuple[tuple[str, Handler], ...] = (
    ("/studies", search_studies),
    ("/series", search_series),
    ("/instances", search_instances),
    (STUDY_PATH, retrieve),
    (f"{STUDY_PATH}/metadata", retrieve_metadata),
    (f"{STUDY_PATH}/series", search_series),
    (f"{STUDY_PATH}/instances", search_instances),
    (SERIES_PATH, retrieve),
    (f"{SERIES_PATH}/metadata", retrieve_metadata),
    (f"{SERIES_PATH}/instances", search_instances),
    (INSTANCE_PATH, retrieve),
    (f"{INSTANCE_PATH}/metadata", retrieve_metadata),
    (f"{INSTANCE_PATH}/frames/{{frames}}", retrieve_frames),
    (f"{INSTANCE_PATH}/bulk/{{tag:[0-9A-Fa-f]{{8}}}}", retrieve_bulk),
)
