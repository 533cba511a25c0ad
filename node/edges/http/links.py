"""Share links over HTTP: the SHL manifest, the link-scoped DICOMweb root, its OHIF
configuration, its download, and the share page (thin handlers over node.services.links).

- ``POST /shl/{manifest_id}``                  SHL manifest: ``{recipient, passcode?}`` ->
  ``{"files": [{"contentType", "embedded"}]}``; 401 ``{"error", "remainingAttempts"}`` for
  a wrong passcode; 404 for an unknown, expired, revoked or dead link
- ``GET /links/{access_token}/dicomweb/...``   the read routes of /dicomweb, limited to
  the link's studies, needing no admin token
- ``GET /links/{access_token}/dicomweb.json``  OHIF's dicomwebproxy configuration of it
- ``GET /links/{access_token}/download``       the link's studies as IHE PDI media (ZIP)
- ``POST /links/{access_token}/opinions``      an opinion returned on one of the link's
  studies (a link made with the opinions permission): JSON {study_uid, author, role, pdf
  or text}; 201 with the stored instance
- ``GET /share/``                              the page a link's QR code opens

The access token and manifest id are secrets in the path: refusals are logged with the
route as registered (``{access_token}``), never the path itself (context.log_refusal), and
answers say ``Referrer-Policy: no-referrer`` so that no page passes them on.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

from aiohttp import web

from node.core.reports import parse_opinion
from node.edges.http import dicomweb, viewer, wallet_pages
from node.edges.http.context import log_refusal, runtime_of
from node.edges.http.reports import body_limit, read_bounded
from node.errors import BadInput, PayloadTooLarge
from node.services import links
from node.services.runtime import NodeRuntime

_SECRET = "[A-Za-z0-9_-]{43}"
LINK_ROOT = f"/links/{{access_token:{_SECRET}}}"
MANIFEST = f"/shl/{{manifest_id:{_SECRET}}}"
SHARE_PAGE = "/share"
SHARE_DIR = Path(__file__).parent / "static" / "share"
MAX_MANIFEST_REQUEST = 4096
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    router = app.router
    router.add_post(MANIFEST, manifest)
    router.add_get(f"{LINK_ROOT}/dicomweb.json", ohif_configuration)
    router.add_get(f"{LINK_ROOT}/download", download)
    router.add_get(f"{LINK_ROOT}/reports", reports)
    router.add_post(f"{LINK_ROOT}/opinions", opinion)
    router.add_post("/admin/api/links/fetch", fetch)
    for path, handler in dicomweb.READ_ROUTES:
        router.add_get(f"{LINK_ROOT}/dicomweb{path}", _link_scoped(handler))
    wallet_pages.add_static_pages(app, SHARE_PAGE, SHARE_DIR)
    app.on_response_prepare.append(_no_referrer)


async def _no_referrer(request: web.Request, response: web.StreamResponse) -> None:
    """On response prepare (streamed answers too): a page opened from a link's answer must
    not pass the link's secret path on as its Referer."""
    if request.path.startswith(("/links/", "/shl/")):
        response.headers["Referrer-Policy"] = "no-referrer"


def _link_root_path(access_token: str) -> str:
    return f"/links/{access_token}/dicomweb"


def _link_scoped(handler: dicomweb.Handler) -> dicomweb.Handler:
    """``handler`` limited to the studies of the link whose access token is in the path."""

    @functools.wraps(handler)
    async def scoped(request: web.Request) -> web.StreamResponse:
        runtime = runtime_of(request)
        token = request.match_info["access_token"]
        authorization = await asyncio.to_thread(links.authorize_link, runtime, token)
        request[dicomweb.ACCESS_KEY] = dicomweb.ReadAccess(
            authorization.study_uids, _link_root_path(token), "share-link"
        )
        return await handler(request)

    return scoped


async def manifest(request: web.Request) -> web.Response:
    runtime = runtime_of(request)
    if (request.content_length or 0) > MAX_MANIFEST_REQUEST:
        raise PayloadTooLarge("a manifest request is at most 4 KiB")
    body = await request.content.read(MAX_MANIFEST_REQUEST + 1)
    if len(body) > MAX_MANIFEST_REQUEST:
        raise PayloadTooLarge("a manifest request is at most 4 KiB")
    try:
        files = await asyncio.to_thread(
            links.open_manifest, runtime, request.match_info["manifest_id"], body
        )
    except links.PasscodeRefused as exc:
        log_refusal(request, 401, str(exc))
        return web.json_response(
            {"error": str(exc), "remainingAttempts": exc.remaining}, status=401, headers=NO_STORE
        )
    return web.json_response({"files": [f.as_json() for f in files]}, headers=NO_STORE)


async def ohif_configuration(request: web.Request) -> web.Response:
    """OHIF's dicomwebproxy data source configuration of the link's DICOMweb root."""
    runtime = runtime_of(request)
    token = request.match_info["access_token"]
    await asyncio.to_thread(links.authorize_link, runtime, token)
    root = dicomweb.base_url_of(request, _link_root_path(token))
    server = viewer.ohif_dicomweb_source("ImageShare share link", root)
    return web.json_response({"servers": {"dicomWeb": [server]}}, headers=NO_STORE)


async def fetch(request: web.Request) -> web.Response:
    """Admin API (admin token): import what a share link opens. JSON {"shlink", "passcode"}."""
    runtime = runtime_of(request)
    try:
        document = await request.json()
        shlink, passcode = document["shlink"], document.get("passcode")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInput('a link fetch is JSON {"shlink": ..., "passcode": ...}') from exc
    if not isinstance(shlink, str) or not (passcode is None or isinstance(passcode, str)):
        raise BadInput("shlink and passcode must be strings")
    result = await links.fetch_link(runtime, shlink, passcode)
    root = dicomweb.base_url_of(request, dicomweb.PREFIX)
    return web.json_response(result.as_json(root))


async def reports(request: web.Request) -> web.Response:
    """The link's studies' reports as they stand (an amendment listed over what it
    supersedes): ``{"studies": [{"study_uid", "reports": [...]}]}``."""
    runtime = runtime_of(request)
    authorization = await asyncio.to_thread(
        links.authorize_link, runtime, request.match_info["access_token"]
    )
    service = runtime.services.reports
    studies = []
    for study_uid in sorted(authorization.study_uids):
        found = await asyncio.to_thread(service.study_reports, study_uid)
        studies.append({"study_uid": study_uid, "reports": [r.as_json() for r in found]})
    return web.json_response({"studies": studies}, headers=NO_STORE)


async def opinion(request: web.Request) -> web.Response:
    """An opinion the link's holder returns (201; 200 for one already stored)."""
    runtime = runtime_of(request)
    # The link and its permission first: nobody else makes the node read a body.
    authorization = await asyncio.to_thread(
        links.authorize_opinion, runtime, request.match_info["access_token"]
    )
    max_bytes = runtime.services.reports.max_document_bytes
    body = await read_bounded(request, body_limit(max_bytes))
    submission = await asyncio.to_thread(parse_opinion, body, max_bytes)
    stored = await asyncio.to_thread(links.return_opinion, runtime, authorization, submission)
    status = 201 if stored["outcome"] == "stored" else 200
    return web.json_response(stored, status=status, headers=NO_STORE)


async def download(request: web.Request) -> web.StreamResponse:
    """The link's studies as a PDI ZIP (recorded as a download before a byte is sent)."""
    runtime = runtime_of(request)
    token = request.match_info["access_token"]
    authorization = await asyncio.to_thread(links.authorize_download, runtime, token)
    return await viewer.send_pdi_media(request, sorted(authorization.study_uids), "share link")
