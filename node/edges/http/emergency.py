"""Break-glass routes: the patient's emergency policy and the staff's emergency fetch.

- ``GET  /patient/emergency-policy``   (signed by the patient) the policy in force for the
  key: ``{"choice", "members", "default"}`` (+ ``"index", "issued_at"`` for a signed one)
- ``POST /patient/emergency-policy``   (signed) the patient-signed policy bytes; answers a
  proof of its ``emergency_policy`` entry, like a grant (docs/consent.md)
- ``POST /admin/api/emergency``        JSON ``{"patient_id", "reason", "note"?,
  "custodian"?}``: start one emergency fetch per custodian (every other member if none
  is named); 202 ``{"jobs": [fetch job, ...]}``
- ``GET  /admin/api/emergency``        ``{"served": [...], "fetched": [...]}``: break-glass
  events this node served (its ``break_glass`` entries) and its emergency fetches

Handlers are thin: the rules live in node.core.emergency and node.services.emergency.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from node.edges.http.context import runtime_of
from node.edges.http.patient import record_signed_document, signed_patient
from node.errors import BadInput
from node.services import emergency
from node.services.runtime import NodeRuntime


async def get_policy(request: web.Request) -> web.Response:
    runtime = runtime_of(request)
    caller = await signed_patient(request)
    return web.json_response(
        await asyncio.to_thread(emergency.policy_json, runtime, caller.public_key)
    )


async def submit_policy(request: web.Request) -> web.Response:
    return await record_signed_document(request, emergency.record_policy)


def _text(document: dict[str, Any], name: str, required: bool) -> str:
    value = document.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadInput(f"{name} must be a string")
    return value


async def start_emergency(request: web.Request) -> web.Response:
    try:
        document = await request.json()
    except ValueError as exc:
        raise BadInput("an emergency fetch body is JSON") from exc
    if not isinstance(document, dict):
        raise BadInput('an emergency fetch body is JSON {"patient_id", "reason", ...}')
    custodian = _text(document, "custodian", required=False)
    jobs = runtime_of(request).services.transfer.start_emergency_fetch(
        [custodian] if custodian else [],
        _text(document, "patient_id", required=True),
        _text(document, "reason", required=True),
        _text(document, "note", required=False),
    )
    return web.json_response({"jobs": [job.as_json() for job in jobs]}, status=202)


async def list_emergencies(request: web.Request) -> web.Response:
    runtime = runtime_of(request)
    served = await asyncio.to_thread(emergency.break_glass_json, runtime)
    fetches = runtime.services.transfer.transfers_json()["fetches"]
    fetched = [job for job in fetches if job.get("emergency")]
    return web.json_response({"served": served, "fetched": fetched})


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app.router.add_get("/patient/emergency-policy", get_policy)
    app.router.add_post("/patient/emergency-policy", submit_policy)
    app.router.add_post("/admin/api/emergency", start_emergency)
    app.router.add_get("/admin/api/emergency", list_emergencies)
