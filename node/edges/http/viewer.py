"""Viewing and the CD replacement: /viewer/ (OHIF), /viewer-lite/, and PDI media downloads.

- ``GET /admin/api/studies/{study}/media.zip``   a study as IHE PDI media (admin token)
- ``GET /patient/studies/{ref}/media.zip``        the patient's own study (node.edges.http.patient)

Downloads stream a ZIP made by node.services.pdi_media; everything that can be refused
(an unknown study, a damaged file) is refused before the first byte.
"""

from __future__ import annotations

from aiohttp import web

from node.core import atna
from node.edges.http.app import RUNTIME_KEY
from node.edges.http.multipart import send_body
from node.services import pdi_media
from node.services.runtime import NodeRuntime

_UID = "{study:[0-9.]{1,64}}"
MEDIA_FILENAME = "imageshare-media.zip"


async def send_pdi_media(
    request: web.Request, study_uids: list[str], user: str
) -> web.StreamResponse:
    """Stream ``study_uids`` as PDI media to ``request``'s client, audited as sent to ``user``."""
    runtime = request.app[RUNTIME_KEY]
    media = await pdi_media.plan_pdi_media(runtime.store, study_uids)
    runtime.security_audit.record(
        atna.instances_transferred,
        True,
        user,
        request.remote or "",
        sorted(set(study_uids)),
        len(media.files),
        "PDI media download",
    )
    response = web.StreamResponse(
        headers={
            "Content-Type": pdi_media.MEDIA_TYPE,
            "Content-Disposition": f'attachment; filename="{MEDIA_FILENAME}"',
            # Patient images: never kept by shared caches.
            "Cache-Control": "private, no-store",
        }
    )
    return await send_body(request, response, pdi_media.stream_pdi_zip(runtime.store, media))


async def staff_media(request: web.Request) -> web.StreamResponse:
    """A study as PDI media, for staff (the admin token is checked by app.py)."""
    return await send_pdi_media(request, [request.match_info["study"]], "admin-token")


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app.router.add_get(f"/admin/api/studies/{_UID}/media.zip", staff_media)
