"""/patient: the wallet's endpoints, and the staff's enrollment under /admin/api.

Every /patient request is signed by an enrolled, unretired patient key and addressed to
this node's origin (node.edges.http.signed: misaddressed, stale, badly signed and
replayed requests are refused with 401).
A delegate acts for a patient with their own key: the request also names, in its
(signed) query, the patient (``for=<base64url patient key>``) and the delegation it acts
under (``delegation=<hex id>``); node.services.consent.check_delegate decides whether
that delegation gives the power the route needs. Submissions answer with the ledger
entry, an inclusion proof and the signed checkpoint it is proven against, so the wallet
can check that its grant or revocation is on the record. Handlers are thin: the rules
live in node.services.consent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from node.core.base64url import b64_encode, b64url_decode
from node.core.consent import Delegation, Power, decode_grant, decode_revocation
from node.core.notes import Checkpoint, parse_note
from node.core.patient_keys import parse_public_key
from node.core.signed_requests import PATIENT_PREFIX
from node.edges.http import viewer
from node.edges.http.context import runtime_of
from node.edges.http.signed import authenticate
from node.errors import BadInput, Forbidden, PayloadTooLarge
from node.services import consent, links, previews
from node.services.runtime import NodeRuntime

MAX_SUBMISSION_BYTES = 64 * 1024
# Query parameters of a delegate's request: whom it acts for, under which delegation.
ACTING_FOR = "for"
DELEGATION = "delegation"


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app.router.add_get("/patient/studies", list_studies)
    app.router.add_post("/patient/grants", submit_grant)
    app.router.add_post("/patient/revocations", submit_revocation)
    app.router.add_get("/patient/tokens", list_tokens)
    app.router.add_get("/patient/roster", list_roster)
    app.router.add_get("/patient/studies/{ref}/series", list_series)
    app.router.add_get("/patient/studies/{ref}/description", describe_study)
    app.router.add_post("/patient/links", submit_link)
    app.router.add_get("/patient/studies/{ref}/series/{position:[0-9]{1,4}}/preview", preview)
    app.router.add_get("/patient/studies/{ref}/media.zip", download_media)
    app.router.add_get("/patient/studies/{ref}/reports", list_reports)
    app.router.add_get("/patient/studies/{ref}/reports/{instance:[0-9.]{1,64}}.pdf", report_pdf)
    app.router.add_post("/admin/api/enrollments", enroll)
    app.router.add_post("/admin/api/guardians", enroll_guardian)


@dataclass(frozen=True)
class PatientCaller:
    """The patient a signed /patient request acts for, and who signed it."""

    public_key: bytes  # the patient's key here
    body: bytes
    signer_key: bytes  # the patient's own key, or their delegate's
    delegation: Delegation | None  # what a delegate acts under; None for the patient


def _named_delegation(request: web.Request) -> tuple[bytes, bytes] | None:
    """The (patient key, delegation id) a delegate's request names, or None."""
    query = request.rel_url.query
    if DELEGATION not in query and ACTING_FOR not in query:
        return None
    try:
        delegation_id = bytes.fromhex(query.get(DELEGATION, ""))
    except ValueError as exc:
        raise BadInput("delegation is the hex id of a delegation") from exc
    if len(delegation_id) != 32:
        raise BadInput("delegation is the hex id of a delegation")
    return parse_public_key(query.get(ACTING_FOR, "")), delegation_id


async def signed_patient(
    request: web.Request, power: Power | None = None, study: bytes | None = None
) -> PatientCaller:
    """The enrolled patient who signed ``request``, or their delegate acting with
    ``power`` (None: the patient only) over ``study`` (None: the delegation's own scope).
    Raises Unauthorized for an unknown signer, Forbidden for a delegation that does not
    allow the request."""
    runtime = runtime_of(request)
    named = _named_delegation(request)
    chain = None if named is None else consent.recorded_delegation(runtime, named[1])

    def resolve(signer: str) -> bytes | None:
        if not signer.startswith(PATIENT_PREFIX):
            return None
        key = parse_public_key(signer[len(PATIENT_PREFIX) :])
        if named is None:
            return consent.enrolled_key(runtime, key)
        # A delegate is admitted under a recorded delegation to its key from an
        # enrolled, unretired patient key: the one the request names.
        if chain is None or chain.delegate_key != key or chain.patient_key != named[0]:
            return None
        return key if consent.enrolled_key(runtime, chain.patient_key) else None

    # The body is read before its signature can be checked: bound it first.
    if request.method == "POST" and request.content_length is None:
        raise BadInput("a patient request needs a Content-Length")
    if (request.content_length or 0) > MAX_SUBMISSION_BYTES:
        raise PayloadTooLarge("a patient request body is at most 64 KiB")
    caller = await authenticate(
        request,
        resolve,
        runtime.config.federation.max_request_age,
        runtime.services.nonces,
        runtime.config.origin,
        max_body=MAX_SUBMISSION_BYTES,
    )
    if chain is None:
        return PatientCaller(caller.public_key, caller.body, caller.public_key, None)
    if power is None:
        raise Forbidden("only the patient may make this request, not a delegate")
    scope = chain.scope if study is None else (study,)
    await asyncio.to_thread(consent.check_delegate, runtime, chain, power, scope)
    return PatientCaller(chain.patient_key, caller.body, caller.public_key, chain)


def proof_of_entry(runtime: NodeRuntime, index: int) -> dict[str, Any]:
    """The entry at ``index``, its inclusion proof, and the checkpoint that proof is for."""
    ledger = runtime.services.ledger
    note = ledger.checkpoint_note()
    body, _ = parse_note(note)
    size = Checkpoint.parse(body).size
    entry = next(iter(ledger.own.entries(index, index + 1)))
    proof = ledger.own.inclusion_proof(index, size)
    return {
        "index": index,
        "size": size,
        "entry": b64_encode(entry),
        "proof": [b64_encode(h) for h in proof],
        "checkpoint": note,
    }


async def record_signed_document(
    request: web.Request, record: Callable[[NodeRuntime, bytes, bytes], int]
) -> web.Response:
    """Record the document the patient signed as ``request``'s body (``record`` takes the
    runtime, the body and the patient's key, and returns the entry's index) and answer
    with the entry's inclusion proof."""
    runtime = runtime_of(request)
    caller = await signed_patient(request)

    def recorded() -> dict[str, Any]:
        return proof_of_entry(runtime, record(runtime, caller.body, caller.public_key))

    return web.json_response(await asyncio.to_thread(recorded))


async def list_studies(request: web.Request) -> web.Response:
    runtime = runtime_of(request)
    caller = await signed_patient(request, Power.DOWNLOAD)
    studies = await asyncio.to_thread(consent.patient_studies, runtime, caller.public_key)
    scope = None if caller.delegation is None else caller.delegation.scope
    if scope is not None:
        studies = [s for s in studies if b64url_decode(s["ref"], "study reference") in scope]
    return web.json_response({"studies": studies})


async def submit_grant(request: web.Request) -> web.Response:
    runtime = runtime_of(request)
    caller = await signed_patient(request)

    def record() -> dict[str, Any]:
        if decode_grant(caller.body).patient_key != caller.public_key:
            raise Forbidden("a patient may submit only grants signed with their own key")
        recorded = consent.record_grant(runtime, caller.body)
        return {"token_id": recorded.token_id.hex(), **proof_of_entry(runtime, recorded.index)}

    return web.json_response(await asyncio.to_thread(record))


async def submit_revocation(request: web.Request) -> web.Response:
    runtime = runtime_of(request)
    caller = await signed_patient(request, Power.REVOKE)

    def record() -> dict[str, Any]:
        revocation = decode_revocation(caller.body)
        if (revocation.patient_key, revocation.signer_key) != (
            caller.public_key,
            caller.signer_key,
        ):
            raise Forbidden("a revocation is signed by the key that signs the request")
        recorded = consent.record_revocation(runtime, caller.body)
        return {"token_id": recorded.token_id.hex(), **proof_of_entry(runtime, recorded.index)}

    return web.json_response(await asyncio.to_thread(record))


async def submit_link(request: web.Request) -> web.Response:
    """A share link the wallet made: its grant is recorded and proven like any grant."""
    runtime = runtime_of(request)
    caller = await signed_patient(request)

    def record() -> dict[str, Any]:
        try:
            document = json.loads(caller.body)
        except ValueError as exc:
            raise BadInput("a share link is JSON {grant, manifest, passcode, files}") from exc
        recorded = links.create_link(runtime, caller.public_key, document)
        return {"token_id": recorded.token_id.hex(), **proof_of_entry(runtime, recorded.index)}

    return web.json_response(await asyncio.to_thread(record))


async def describe_study(request: web.Request) -> web.Response:
    """One of the patient's studies with its UIDs and series, to describe it in a link."""
    runtime = runtime_of(request)
    caller = await signed_patient(request)
    description = await asyncio.to_thread(
        links.describe_own_study, runtime, caller.public_key, _study_ref(request)
    )
    return web.json_response(description, headers={"Cache-Control": "no-store"})


async def list_tokens(request: web.Request) -> web.Response:
    runtime = runtime_of(request)
    caller = await signed_patient(request, Power.VIEW_LOG)
    tokens = await asyncio.to_thread(
        consent.token_statuses, runtime, caller.public_key, int(time.time())
    )
    return web.json_response({"tokens": tokens})


async def list_roster(request: web.Request) -> web.Response:
    """The federation members a patient may grant to (the wallet's grantee choices)."""
    runtime = runtime_of(request)
    await signed_patient(request)
    own = runtime.config.origin
    members = sorted(m.origin for m in runtime.services.roster.roster if m.origin != own)
    return web.json_response({"custodian": runtime.config.origin, "members": members})


def _study_ref(request: web.Request) -> bytes:
    return b64url_decode(request.match_info["ref"], "study reference", size=32)


async def list_series(request: web.Request) -> web.Response:
    runtime = runtime_of(request)
    caller = await signed_patient(request)
    series = await asyncio.to_thread(
        previews.study_series, runtime, caller.public_key, _study_ref(request)
    )
    return web.json_response({"series": [s.as_json() for s in series]})


async def preview(request: web.Request) -> web.Response:
    """A small PNG of a series' middle image, for the patient who owns the study only."""
    runtime = runtime_of(request)
    caller = await signed_patient(request)
    png = await asyncio.to_thread(
        previews.series_preview,
        runtime,
        caller.public_key,
        _study_ref(request),
        int(request.match_info["position"]),
    )
    # Patient images: never kept by shared caches.
    return web.Response(
        body=png, content_type="image/png", headers={"Cache-Control": "private, no-store"}
    )


async def download_media(request: web.Request) -> web.StreamResponse:
    """One of the patient's own studies as PDI media (a ZIP); their own copy, so no
    consent is needed and nothing is written to the ledger (the security audit has it)."""
    runtime = runtime_of(request)
    caller = await signed_patient(request, Power.DOWNLOAD, _study_ref(request))
    study_uid = await asyncio.to_thread(
        previews.owned_study_uid, runtime, caller.public_key, _study_ref(request)
    )
    return await viewer.send_pdi_media(request, [study_uid], "patient")


async def list_reports(request: web.Request) -> web.Response:
    """The reports of one of the patient's own studies, each as it stands, with its text."""
    runtime = runtime_of(request)
    caller = await signed_patient(request)
    study_uid = await asyncio.to_thread(
        previews.owned_study_uid, runtime, caller.public_key, _study_ref(request)
    )
    reports = await asyncio.to_thread(runtime.services.reports.reading, study_uid)
    return web.json_response({"reports": reports}, headers={"Cache-Control": "private, no-store"})


async def report_pdf(request: web.Request) -> web.Response:
    """A report of one of the patient's own studies, as its PDF."""
    runtime = runtime_of(request)
    caller = await signed_patient(request)
    study_uid = await asyncio.to_thread(
        previews.owned_study_uid, runtime, caller.public_key, _study_ref(request)
    )
    service = runtime.services.reports
    sop_uid = request.match_info["instance"]
    pdf = await asyncio.to_thread(service.document, study_uid, sop_uid)
    # An opinion returned through a link is no longer new once its patient opened it.
    await asyncio.to_thread(service.opinions.mark_seen, sop_uid, time.time())
    return web.Response(
        body=pdf, content_type="application/pdf", headers={"Cache-Control": "private, no-store"}
    )


async def _enrollment_request(request: web.Request) -> tuple[str, str]:
    """The patient id and key text of a desk's JSON {"patient_id", "key"}."""
    try:
        document = await request.json()
        patient_id, key_text = document["patient_id"], document["key"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput('enrollment needs JSON {"patient_id": ..., "key": ...}') from exc
    if not isinstance(patient_id, str) or not isinstance(key_text, str):
        raise BadInput("patient_id and key must be strings")
    return patient_id, key_text


async def enroll(request: web.Request) -> web.Response:
    """Staff enrollment (admin token): JSON {"patient_id", "key"}."""
    runtime = runtime_of(request)
    patient_id, key_text = await _enrollment_request(request)
    public_key = parse_public_key(key_text)
    result = await asyncio.to_thread(consent.enroll_patient, runtime, patient_id, public_key)
    return web.json_response(consent.enroll_result_json(result, public_key))


async def enroll_guardian(request: web.Request) -> web.Response:
    """Staff enrollment of a minor's guardian (admin token): JSON {"patient_id", "key"}."""
    runtime = runtime_of(request)
    patient_id, key_text = await _enrollment_request(request)
    result = await asyncio.to_thread(
        consent.enroll_guardian, runtime, patient_id, parse_public_key(key_text)
    )
    return web.json_response(consent.guardian_result_json(result))
