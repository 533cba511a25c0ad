"""Reports from the RIS (admin token): post one, list a study's.

- ``POST /admin/api/reports[?study=UID]``  a FHIR R4 DiagnosticReport (``application/fhir+json``
  or ``application/json``) or an HL7 v2 ORU^R01 (``x-application/hl7-v2+er7`` or
  ``text/plain``); ``study`` names the study where the report does not (it must agree
  where both do). 201 with the stored instance, 200 for a report already stored.
- ``GET  /admin/api/reports?study=UID``    the study's reports as they stand, each with
  the versions it superseded.
- ``GET  /admin/api/opinions[?study=UID]``  opinions returned through share links, newest
  first, each with ``accepted`` (null while held from PACS).
- ``POST /admin/api/opinions/{uid}/accept`` staff accept one: it is forwarded to PACS.

The paths sit under /admin/api, which app.py guards with the admin token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from aiohttp import web

from node.core.reports import FHIR_JSON, HL7_V2, parse_fhir_report, parse_hl7_report
from node.core.uids import is_uid
from node.edges.http.context import runtime_of
from node.errors import BadInput, NotFound, PayloadTooLarge
from node.services.runtime import NodeRuntime
from node.store.instances import Outcome

NO_STORE = {"Cache-Control": "no-store"}
_FHIR_TYPES = frozenset({FHIR_JSON, "application/json"})
_HL7_TYPES = frozenset({HL7_V2, "text/plain"})
# Room beside the base64 document for the rest of a report (JSON or HL7 segments).
_ENVELOPE_BYTES = 1024 * 1024


def _study_parameter(request: web.Request) -> str | None:
    study = request.query.get("study")
    if study is not None and not is_uid(study):
        raise BadInput("study must be a Study Instance UID")
    return study


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The whole request body, PayloadTooLarge past ``limit`` bytes (read no further)."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    body = bytearray()
    while chunk := await request.content.read(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    return bytes(body)


def body_limit(max_document_bytes: int) -> int:
    """A request carrying a document of at most ``max_document_bytes`` in base64."""
    return max_document_bytes * 4 // 3 + _ENVELOPE_BYTES


async def submit(request: web.Request) -> web.Response:
    runtime = runtime_of(request)
    service = runtime.services.reports
    media_type = request.content_type.lower()
    if media_type not in _FHIR_TYPES | _HL7_TYPES:
        raise BadInput(
            "a report is a FHIR DiagnosticReport (application/fhir+json) or an HL7 v2"
            " ORU^R01 (x-application/hl7-v2+er7)"
        )
    study = _study_parameter(request)
    body = await read_bounded(request, body_limit(service.max_document_bytes))
    parse = parse_fhir_report if media_type in _FHIR_TYPES else parse_hl7_report
    submission = await asyncio.to_thread(parse, body, service.max_document_bytes)
    if study is not None:
        if submission.study_uid is not None and submission.study_uid != study:
            raise BadInput("the report concerns another study than the one named by study")
        submission = dataclasses.replace(submission, study_uid=study)
    stored = await asyncio.to_thread(service.submit, submission)
    status = 201 if stored.outcome is Outcome.STORED else 200
    return web.json_response(stored.as_json(), status=status, headers=NO_STORE)


async def listing(request: web.Request) -> web.Response:
    study = _study_parameter(request)
    if study is None:
        raise BadInput("name the study: ?study=UID")
    service = runtime_of(request).services.reports
    reports = await asyncio.to_thread(service.study_reports, study)
    return web.json_response(
        {"study_uid": study, "reports": [r.as_json() for r in reports]}, headers=NO_STORE
    )


async def opinions(request: web.Request) -> web.Response:
    study = _study_parameter(request)
    service = runtime_of(request).services.reports
    found = await asyncio.to_thread(service.opinion_listing, study)
    return web.json_response({"opinions": found}, headers=NO_STORE)


async def accept_opinion(request: web.Request) -> web.Response:
    """Staff accept an opinion: from now on the forwarder sends it to PACS."""
    runtime = runtime_of(request)
    sop_uid = request.match_info["uid"]
    service = runtime.services.reports
    states = {s.sop_instance_uid: s for s in await asyncio.to_thread(service.opinions.states)}
    state = states.get(sop_uid)
    if state is None:
        raise NotFound("no opinion has that SOP Instance UID")
    await asyncio.to_thread(service.opinions.accept, sop_uid, time.time())
    if runtime.services.forwarder is not None and state.accepted is None:
        await asyncio.to_thread(
            runtime.services.forwarder.release, sop_uid, state.study_instance_uid
        )
    return web.json_response({"sop_instance_uid": sop_uid, "accepted": True}, headers=NO_STORE)


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app.router.add_post("/admin/api/reports", submit)
    app.router.add_get("/admin/api/reports", listing)
    app.router.add_get("/admin/api/opinions", opinions)
    app.router.add_post("/admin/api/opinions/{uid:[0-9.]{1,64}}/accept", accept_opinion)
