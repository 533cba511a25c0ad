"""DICOMweb routes under /dicomweb: QIDO-RS, WADO-RS and STOW-RS (thin handlers).

The admin bearer token and CORS are enforced by app.py's middlewares. Handlers parse the
request, negotiate the media type, call the DICOMweb service and frame its answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
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
from node.errors import BadInput
from node.services import rendering
from node.services.dicomweb import (
    OCTET_STREAM,
    DicomWebService,
    FrameSet,
    OutgoingPart,
    UploadPart,
)
from node.services.runtime import NodeRuntime
from node.store.attributes import Level
from node.store.instances import InstanceRecord
from node.store.queries import parse_qido

PREFIX = "/dicomweb"
SERVICE_KEY = web.AppKey("dicomweb", DicomWebService)
READS_AUDITED_KEY = web.AppKey("dicomweb_reads_audited", SlidingWindowLimit)
DICOM = "application/dicom"
_UID = "{%s:[0-9.]{1,64}}"
STUDY = f"{PREFIX}/studies/{_UID % 'study'}"
SERIES = f"{STUDY}/series/{_UID % 'series'}"
INSTANCE = f"{SERIES}/instances/{_UID % 'instance'}"


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app[SERVICE_KEY] = DicomWebService(runtime.store)
    app[READS_AUDITED_KEY] = SlidingWindowLimit(1, 60.0)
    router = app.router
    router.add_get(f"{PREFIX}/studies", search_studies)
    router.add_post(f"{PREFIX}/studies", store_instances)
    router.add_get(f"{PREFIX}/series", search_series)
    router.add_get(f"{PREFIX}/instances", search_instances)
    router.add_get(STUDY, retrieve)
    router.add_post(STUDY, store_instances)
    router.add_get(f"{STUDY}/metadata", retrieve_metadata)
    router.add_get(f"{STUDY}/series", search_series)
    router.add_get(f"{STUDY}/instances", search_instances)
    router.add_get(SERIES, retrieve)
    router.add_get(f"{SERIES}/metadata", retrieve_metadata)
    router.add_get(f"{SERIES}/instances", search_instances)
    router.add_get(INSTANCE, retrieve)
    router.add_get(f"{INSTANCE}/metadata", retrieve_metadata)
    router.add_get(f"{INSTANCE}/frames/{{frames}}", retrieve_frames)
    router.add_get(f"{INSTANCE}/bulk/{{tag:[0-9A-Fa-f]{{8}}}}", retrieve_bulk)
    # Rendered and thumbnail resources (PS3.18 Table 10.3-2) at every level.
    for resource in (STUDY, SERIES, INSTANCE, f"{INSTANCE}/frames/{{frames}}"):
        router.add_get(f"{resource}/rendered", retrieve_rendered)
        router.add_get(f"{resource}/thumbnail", retrieve_thumbnail)


def _service(request: web.Request) -> DicomWebService:
    return request.app[SERVICE_KEY]


def _base_url(request: web.Request) -> str:
    """Where clients reach DICOMweb: the configured public URL, else what the client used."""
    configured = request.app[RUNTIME_KEY].config.http.public_url
    if configured:
        return configured.rstrip("/") + PREFIX
    host = request.host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if ":" not in host.rsplit("]", 1)[-1] and sockname:
        host = f"{host}:{sockname[1]}"  # some clients send Host without the port
    return f"{request.scheme}://{host}{PREFIX}"


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
    results, truncated = await _service(request).search(query, _base_url(request))
    request.app[RUNTIME_KEY].security_audit.record(
        atna.query, "admin-token", request.remote or "", "QIDO-RS", len(results)
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
        "admin-token",
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


# -- WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.3, 10.4.1.1.4) -----------


def _rendered_media_type(request: web.Request) -> tuple[str, bool]:
    """The image type to render, and whether the client asked for multipart/related.

    The ``accept`` query parameter, where given, replaces the Accept header (PS3.18
    8.3.3.1). Raises NotAcceptable when no rendered media type is acceptable.
    """
    accept = request.query.get("accept") or request.headers.get("Accept")
    for media in parse_accept(accept):
        if media.type == "multipart/related":
            part_type = media.params.get("type", rendering.JPEG)
            for candidate in rendering.RENDERED_MEDIA_TYPES:
                if type_matches(part_type, candidate):
                    return candidate, True
            continue
        for candidate in rendering.RENDERED_MEDIA_TYPES:
            if type_matches(media.type, candidate):
                return candidate, False
    raise NotAcceptable(
        "rendered images are available as " + ", ".join(rendering.RENDERED_MEDIA_TYPES)
    )


def _warnings(request: web.Request, sentences: list[str]) -> dict[str, str]:
    if not sentences:
        return {}
    return {"Warning": ", ".join(f'299 {request.host} "{s}"' for s in sentences)}


async def _rendering_target(request: web.Request) -> tuple[list[InstanceRecord], list[int] | None]:
    """The instances a rendered or thumbnail resource names, and its frame list if any."""
    frame_list = request.match_info.get("frames")
    numbers = _frame_numbers(frame_list) if frame_list is not None else None
    return await _records(request), numbers


async def retrieve_rendered(request: web.Request) -> web.StreamResponse:
    """One image where the resource holds one frame (and no multipart was asked for); an
    animated GIF for the frames of one instance asked for as image/gif; otherwise
    multipart/related with one image per frame, rendered one at a time."""
    media_type, multipart = _rendered_media_type(request)
    options, ignored = rendering.parse_options(request.query, media_type, thumbnail=False)
    records, numbers = await _rendering_target(request)
    store = _service(request).store
    frames = await asyncio.to_thread(rendering.resource_frames, store, records, numbers)
    _audit_read(request, records, "WADO-RS rendered")
    headers = _warnings(request, ignored)
    if len(frames) == 1 and not multipart:
        image = await asyncio.to_thread(rendering.render_frame, store, frames[0], options)
        return web.Response(body=image, headers={**headers, "Content-Type": media_type})
    if media_type == rendering.GIF and not multipart and len(records) == 1:
        # A multi-frame instance (or its frame list) asked for as image/gif: animated.
        image = await asyncio.to_thread(rendering.render_animation, store, frames, options)
        return web.Response(body=image, headers={**headers, "Content-Type": media_type})

    def part(frame: rendering.FrameRef) -> OutgoingPart:
        async def body() -> AsyncIterator[bytes]:
            yield await asyncio.to_thread(rendering.render_frame, store, frame, options)

        return OutgoingPart(media_type, None, body)

    return await stream_parts(request, media_type, [part(f) for f in frames], headers)


async def retrieve_thumbnail(request: web.Request) -> web.Response:
    """One small image that stands for the study, series, instance or frame."""
    media_type, _ = _rendered_media_type(request)
    options, _ = rendering.parse_options(request.query, media_type, thumbnail=True)
    records, numbers = await _rendering_target(request)
    store = _service(request).store

    def render() -> bytes:
        frame = rendering.representative_frame(store, records, numbers)
        return rendering.render_frame(store, frame, options)

    image = await asyncio.to_thread(render)
    _audit_read(request, records, "WADO-RS thumbnail")
    return web.Response(body=image, headers={"Content-Type": media_type})
