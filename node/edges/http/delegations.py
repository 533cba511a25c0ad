"""Delegation routes: a patient delegates powers to another person's key.

- ``POST /patient/delegations``  (signed by the patient) the patient-signed delegation;
  answers a proof of its ``delegation`` entry, like a grant (docs/consent.md)
- ``GET  /patient/delegations``  (signed) ``{"delegations": [{"delegation_id" (hex),
  "delegate" (base64url key), "powers", "scope", "expires", "index", "status"}]}``

A delegation is ended by revoking its id (``POST /patient/revocations``). Handlers are
thin: the rules live in node.core.consent and node.services.consent.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from node.edges.http.context import runtime_of
from node.edges.http.patient import record_signed_document, signed_patient
from node.services import consent
from node.services.runtime import NodeRuntime


async def submit_delegation(request: web.Request) -> web.Response:
    return await record_signed_document(request, consent.record_delegation)


async def list_delegations(request: web.Request) -> web.Response:
    runtime = runtime_of(request)
    caller = await signed_patient(request)
    listed = await asyncio.to_thread(consent.delegation_statuses, runtime, caller.public_key)
    return web.json_response({"delegations": listed})


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app.router.add_post("/patient/delegations", submit_delegation)
    app.router.add_get("/patient/delegations", list_delegations)
