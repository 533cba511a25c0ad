"""DICOMweb routes under /dicomweb: QIDO-RS, WADO-RS and STOW-RS (thin handlers).

The admin bearer token and CORS are enforced by app.py's middlewares. Handlers parse the
request, negotiate the media type, call the DICOMweb service and frame its answer.

Every read route is listed once in READ_ROUTES: /dicomweb mounts them for the admin
token, and node.edges.http.links mounts the same handlers under a share link's root,
where a ReadAccess in the request limits them to the link's studies.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from xml.sax.saxutils import quoteattr

from aiohttp import web

from node.core import atna, dicom_json, dicom_xml
from node.core.rate_limit import SlidingWindowLimit
from node.core.uids import UID_PATTERN
from node.edges.http.context import accepts_body_encodings, runtime_of
from node.edges.http.multipart import (
    StreamedParts,
    parse_accept,
    parse_media_type,
    send_body,
    stream_parts,
)
from node.errors import BadInput, NotAcceptable, NotFound
from node.services import rendering, transcoding
from node.services.dicomweb import DicomWebService, OutgoingPart, UploadPart
from node.services.runtime import NodeRuntime
from node.services.transcoding import DICOM, OCTET_STREAM, Wish, type_matches
from node.store.attributes import BY_KEYWORD, Level
from node.store.instances import InstanceRecord
from node.store.queries import Filter, parse_qido

PREFIX = "/dicomweb"
SERVICE_KEY = web.AppKey("dicomweb", DicomWebService)
READS_AUDITED_KEY = web.AppKey("dicomweb_reads_audited", SlidingWindowLimit)
_UID = "{%s:" + UID_PATTERN + "}"
# Paths below a DICOMweb root.
STUDY_PATH = f"/studies/{_UID % 'study'}"
SERIES_PATH = f"{STUDY_PATH}/series/{_UID % 'series'}"
INSTANCE_PATH = f"{SERIES_PATH}/instances/{_UID % 'instance'}"
STUDY = PREFIX + STUDY_PATH
SERIES = PREFIX + SERIES_PATH
INSTANCE = PREFIX + INSTANCE_PATH
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
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)


def _service(request: web.Request) -> DicomWebService:
    return request.app[SERVICE_KEY]


def _base_url(request: web.Request) -> str:
    return base_url_of(request, _access(request).root_path)


def base_url_of(request: web.Request, root_path: str) -> str:
    """Where clients reach ``root_path`` on this node: the configured public URL, else
    what the client used."""
    configured = runtime_of(request).config.http.public_url
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


# Query parameters of every DICOMweb request that are about the answer's form (PS3.18
# 8.3.3), not search keys.
ANSWER_PARAMETERS = frozenset({"accept", "charset"})
# The character set of every text answer: DICOM JSON is UTF-8 by definition (PS3.18 F.2),
# and the XML is written as UTF-8 too. PS3.18 8.8 names it "UTF-8" or "ISO_IR 192".
_UTF8_NAMES = frozenset({"utf-8", "iso_ir 192"})


def _accepted(request: web.Request) -> str | None:
    """The media ranges the client accepts: the ``accept`` query parameter where given,
    which replaces the Accept header (PS3.18 8.3.3.1), else that header."""
    return request.query.get("accept") or request.headers.get("Accept")


def _check_charset(request: web.Request) -> None:
    """Raises BadInput when the ``charset`` query parameter (PS3.18 8.3.3.2) lists no
    character set the node answers in (UTF-8 only), as 8.3.3.2 asks (400)."""
    listed = request.query.getall("charset", [])
    names = {
        item.split(";")[0].strip().strip('"').lower()
        for value in listed
        for item in value.split(",")
    }
    if listed and not names & _UTF8_NAMES:
        raise BadInput("the charset parameter names no supported character set (UTF-8 only)")


def _dataset_media_type(request: web.Request) -> str:
    """application/dicom+json, or application/dicom+xml (sent as multipart/related, one
    part per dataset, PS3.18 8.7.3.2), as the client accepts (``_accepted``), in a
    character set the ``charset`` parameter allows; raises NotAcceptable or BadInput."""
    _check_charset(request)
    for media in parse_accept(_accepted(request)):
        if any(type_matches(media.type, t) for t in (dicom_json.MEDIA_TYPE, "application/json")):
            return dicom_json.MEDIA_TYPE
        if media.type == dicom_xml.MEDIA_TYPE or (
            media.type == "multipart/related" and media.params.get("type") == dicom_xml.MEDIA_TYPE
        ):
            return dicom_xml.MEDIA_TYPE
    raise NotAcceptable(
        "this resource is available as application/dicom+json or"
        ' multipart/related; type="application/dicom+xml"'
    )


def _xml_parts(
    documents: Sequence[Callable[[], Awaitable[dict[str, Any]]]],
) -> list[OutgoingPart]:
    """One application/dicom+xml part per dataset, each written when it is sent."""

    def body(document: Callable[[], Awaitable[dict[str, Any]]]) -> AsyncIterator[bytes]:
        async def write() -> AsyncIterator[bytes]:
            yield dicom_xml.encode(await document())

        return write()

    return [OutgoingPart(dicom_xml.MEDIA_TYPE, None, partial(body, d)) for d in documents]


# -- QIDO-RS ---------------------------------------------------------------------------


async def _search(request: web.Request, level: Level) -> web.StreamResponse:
    media_type = _dataset_media_type(request)
    query = parse_qido(
        level,
        [(key, value) for key, value in request.query.items() if key not in ANSWER_PARAMETERS],
        study_uid=request.match_info.get("study"),
        series_uid=request.match_info.get("series"),
    )
    access = _access(request)
    if access.studies is not None:
        if not access.studies:
            return _json_response([])
        query.filters.append(Filter(BY_KEYWORD["StudyInstanceUID"], tuple(sorted(access.studies))))
    results, truncated = await _service(request).search(query, _base_url(request))
    runtime_of(request).security_audit.record(
        atna.query, access.who, request.remote or "", "QIDO-RS", len(results)
    )
    sentences = []
    if truncated:  # PS3.18 8.3.4.4
        sentences.append("There are additional results that can be requested")
    if query.ignored:  # PS3.18 8.3.4.1 lets the server ignore keys it cannot match
        sentences.append(
            "The following query keys were not supported and were ignored: "
            + ", ".join(query.ignored)
        )
    warnings = [warning for _, warning in _warnings(request, sentences)]
    if query.fuzzy_asked:  # PS3.18 8.3.4.2
        warnings.append(
            f"299 {request.host}: The fuzzymatching parameter is not supported."
            " Only literal matching has been performed."
        )
    if media_type == dicom_xml.MEDIA_TYPE:
        parts = _xml_parts([partial(_ready, r) for r in results])
        return await stream_parts(request, media_type, parts, [("Warning", w) for w in warnings])
    response = _json_response(results)
    response.enable_compression()  # when the client accepts gzip or deflate
    for warning in warnings:
        response.headers.add("Warning", warning)
    return response


async def _ready(document: dict[str, Any]) -> dict[str, Any]:
    return document


async def search_studies(request: web.Request) -> web.StreamResponse:
    return await _search(request, Level.STUDY)


async def search_series(request: web.Request) -> web.StreamResponse:
    return await _search(request, Level.SERIES)


async def search_instances(request: web.Request) -> web.StreamResponse:
    return await _search(request, Level.INSTANCE)


# -- WADO-RS ---------------------------------------------------------------------------


async def _records(request: web.Request) -> list[InstanceRecord]:
    info = request.match_info
    allowed = _access(request).studies
    if allowed is not None and info["study"] not in allowed:
        raise NotFound("no such study")  # as if absent: a link does not tell what else is here
    return await _service(request).records(info["study"], info.get("series"), info.get("instance"))


def _wishes(request: web.Request, default_part: str) -> list[Wish]:
    """What the client's Accept asks for, as (part media type, transfer syntax) wishes."""
    ranges = [(m.type, m.params) for m in parse_accept(_accepted(request))]
    return transcoding.to_wishes(ranges, default_part)


async def retrieve(request: web.Request) -> web.StreamResponse:
    records = await _records(request)
    service = _service(request)
    await service.check_files(records)
    parts = await service.instance_parts(records, _wishes(request, DICOM))
    _audit_read(request, records, "WADO-RS")
    return await stream_parts(request, DICOM, parts)


def _audit_read(request: web.Request, records: list[InstanceRecord], via: str) -> None:
    """Audit a WADO-RS read once per client address, study and service a minute: a
    viewer sends one request per frame, which must not flood the bounded audit queue."""
    key = f"{request.remote} {records[0].study_instance_uid} {via}" if records else ""
    if records and request.app[READS_AUDITED_KEY].admit(key, time.monotonic()):
        _audit_transfer(request, True, [r.study_instance_uid for r in records], via)


def _audit_transfer(request: web.Request, sent: bool, study_uids: list[str], via: str) -> None:
    """The security audit message of instances sent or stored over DICOMweb."""
    runtime_of(request).security_audit.record(
        atna.instances_transferred,
        sent,
        _access(request).who,
        request.remote or "",
        sorted(set(study_uids)),
        len(study_uids),
        via,
    )


async def retrieve_metadata(request: web.Request) -> web.StreamResponse:
    media_type = _dataset_media_type(request)
    records = await _records(request)
    if media_type == dicom_xml.MEDIA_TYPE:
        service, base_url = _service(request), _base_url(request)
        documents = [partial(service.instance_metadata, r, base_url) for r in records]
        _audit_read(request, records, "WADO-RS metadata")
        return await stream_parts(request, media_type, _xml_parts(documents))
    body: AsyncIterator[bytes] = _service(request).metadata(records, _base_url(request))
    first = await anext(body)  # errors before this point still get their own status
    _audit_read(request, records, "WADO-RS metadata")
    response = web.StreamResponse(headers={"Content-Type": dicom_json.MEDIA_TYPE})
    response.enable_compression()  # when the client accepts gzip or deflate
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


async def retrieve_frames(request: web.Request) -> web.StreamResponse:
    numbers = _frame_numbers(request.match_info["frames"])
    records = await _records(request)
    wishes = _wishes(request, OCTET_STREAM)
    frames = await _service(request).frames(records[0], numbers, wishes)
    _audit_read(request, records, "WADO-RS frames")
    return await stream_parts(request, frames.media_type, frames.parts)


async def retrieve_bulk(request: web.Request) -> web.StreamResponse:
    records = await _records(request)
    location = dicom_json.parse_bulk_path(request.match_info["location"])
    if location is None:
        raise NotFound("no such bulk data")
    frames = await _service(request).bulk(records[0], location, _wishes(request, OCTET_STREAM))
    _audit_read(request, records, "WADO-RS bulk data")
    return await stream_parts(request, frames.media_type, frames.parts)


# -- STOW-RS ---------------------------------------------------------------------------


async def _upload_parts(parts: StreamedParts) -> AsyncIterator[UploadPart]:
    async for part in parts:
        declared = part.headers.get("Content-Type")
        content_type = parts.part_type_of(part) if declared else ""
        location = part.headers.get("Content-Location", "")
        yield UploadPart(content_type, partial(parts.read_chunk, part), location)


@accepts_body_encodings("gzip", "deflate")
async def store_instances(request: web.Request) -> web.Response:
    study_uid = request.match_info.get("study")
    runtime = runtime_of(request)
    declared = parse_media_type(request.headers.get("Content-Type", ""))
    # Instances as files (application/dicom), or datasets in the JSON model with their
    # bulk data in further parts (PS3.18 10.5.1.2.2).
    as_json = declared.params.get("type", "").lower() == dicom_json.MEDIA_TYPE
    parts = StreamedParts(
        request,
        dicom_json.MEDIA_TYPE if as_json else DICOM,
        runtime.config.http.max_body_bytes,
        runtime.config.store.max_inflation_ratio,
    )
    service = _service(request)
    store = service.store_json_upload if as_json else service.store_upload
    report = await store(_upload_parts(parts), study_uid)
    if not report.stored and not report.failed:
        raise BadInput("the multipart body holds no parts")
    if report.stored:
        _audit_transfer(request, False, [r.study_instance_uid for r in report.stored], "STOW-RS")
    base_url = _base_url(request)
    response = _json_response(report.as_json(base_url), report.status)
    if study_url := report.study_url(base_url):
        # Where what was stored can be retrieved (PS3.18 10.5.3).
        response.headers["Content-Location"] = study_url
        response.headers["Location"] = study_url
    return response


# -- WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.3, 10.4.1.1.4) -----------


def _rendered_media_type(request: web.Request) -> tuple[str, bool]:
    """The image type to render, and whether the client asked for multipart/related.

    Raises NotAcceptable when no rendered media type is acceptable.
    """
    for media in parse_accept(_accepted(request)):
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


# What a quoted header value cannot carry as is.
_HEADER_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _warnings(request: web.Request, sentences: list[str]) -> list[tuple[str, str]]:
    """Warning headers, one a sentence. A sentence may echo the query (an ignored key), so
    what a quoted header value cannot hold (controls, quotes, backslashes, non-ASCII)
    becomes '?': the answer is sent, never cut for an unsendable header."""
    return [("Warning", f'299 {request.host} "{_HEADER_UNSAFE.sub("?", s)}"') for s in sentences]


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
    elif media_type == rendering.GIF and not multipart and len(records) == 1:
        # A multi-frame instance (or its frame list) asked for as image/gif: animated.
        image = await asyncio.to_thread(rendering.render_animation, store, frames, options)
    else:
        image = None
    if image is not None:
        response = web.Response(body=image, content_type=media_type)
        for name, value in headers:
            response.headers.add(name, value)
        return response

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


# -- Retrieve Capabilities (PS3.18 8.9) -----------------------------------------------------

WADL = "application/vnd.sun.wadl+xml"
# A route template's variables as WADL writes them: "{study:[0-9.]{1,64}}" -> "{study}".
_VARIABLE = re.compile(r"\{(\w+):(?:[^{}]|\{[^{}]*\})*\}")


async def retrieve_capabilities(request: web.Request) -> web.Response:
    """The service's resources, methods and media types as a WADL document, made from the
    route table below so that it always tells what the node answers."""
    by_path: dict[str, list[Route]] = {}
    for route in ROUTES:
        if route.method != "OPTIONS":
            by_path.setdefault(_VARIABLE.sub(r"{\1}", route.path[len(PREFIX) + 1 :]), []).append(
                route
            )
    resources = "".join(
        f"<resource path={quoteattr(path)}>"
        + "".join(
            f"<method name={quoteattr(r.method)}><response>"
            + "".join(f"<representation mediaType={quoteattr(m)}/>" for m in r.media_types)
            + "</response></method>"
            for r in routes
        )
        + "</resource>"
        for path, routes in by_path.items()
    )
    document = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<application xmlns="http://wadl.dev.java.net/2009/02">'
        f"<resources base={quoteattr(_base_url(request) + '/')}>{resources}</resources>"
        "</application>"
    )
    return web.Response(body=document.encode(), content_type=WADL, charset="utf-8")


@dataclass(frozen=True)
class Route:
    """One DICOMweb route and the media types its answers come in."""

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    media_types: tuple[str, ...] = ()


_DATASETS = (dicom_json.MEDIA_TYPE, f'multipart/related; type="{dicom_xml.MEDIA_TYPE}"')
_INSTANCES = (f'multipart/related; type="{DICOM}"',)
_FRAMES = (
    f'multipart/related; type="{OCTET_STREAM}"',
    *(
        f'multipart/related; type="{m}"'
        for m in sorted(set(transcoding.FRAME_MEDIA_TYPES.values()))
    ),
)
_STORED = (dicom_json.MEDIA_TYPE,)
_BULK = f"{INSTANCE}/bulk/{{location:[0-9A-Fa-f]{{8}}(/[0-9]+/[0-9A-Fa-f]{{8}})*}}"

# Every DICOMweb route, in one list (other DICOMweb resources add their rows here).
ROUTES: list[Route] = [
    Route("OPTIONS", PREFIX, retrieve_capabilities, (WADL,)),
    Route("OPTIONS", f"{PREFIX}/", retrieve_capabilities, (WADL,)),
    Route("GET", f"{PREFIX}/studies", search_studies, _DATASETS),
    Route("POST", f"{PREFIX}/studies", store_instances, _STORED),
    Route("GET", f"{PREFIX}/series", search_series, _DATASETS),
    Route("GET", f"{PREFIX}/instances", search_instances, _DATASETS),
    Route("GET", STUDY, retrieve, _INSTANCES),
    Route("POST", STUDY, store_instances, _STORED),
    Route("GET", f"{STUDY}/metadata", retrieve_metadata, _DATASETS),
    Route("GET", f"{STUDY}/series", search_series, _DATASETS),
    Route("GET", f"{STUDY}/instances", search_instances, _DATASETS),
    Route("GET", SERIES, retrieve, _INSTANCES),
    Route("GET", f"{SERIES}/metadata", retrieve_metadata, _DATASETS),
    Route("GET", f"{SERIES}/instances", search_instances, _DATASETS),
    Route("GET", INSTANCE, retrieve, _INSTANCES),
    Route("GET", f"{INSTANCE}/metadata", retrieve_metadata, _DATASETS),
    Route("GET", f"{INSTANCE}/frames/{{frames}}", retrieve_frames, _FRAMES),
    Route("GET", _BULK, retrieve_bulk, (f'multipart/related; type="{OCTET_STREAM}"',)),
    # Rendered and thumbnail resources (PS3.18 Table 10.3-2) at every level.
    *(
        Route("GET", f"{resource}/{kind}", handler, rendering.RENDERED_MEDIA_TYPES)
        for resource in (STUDY, SERIES, INSTANCE, f"{INSTANCE}/frames/{{frames}}")
        for kind, handler in (("rendered", retrieve_rendered), ("thumbnail", retrieve_thumbnail))
    ),
]

# Every read route, below a DICOMweb root (mounted under /dicomweb and under share links).
READ_ROUTES: tuple[tuple[str, Handler], ...] = tuple(
    (route.path[len(PREFIX) :], route.handler) for route in ROUTES if route.method == "GET"
)
