"""Viewing and the CD replacement: /viewer/ (OHIF), /viewer-lite/, and PDI media downloads.

- ``GET /viewer/...``        the prebuilt OHIF viewer, with an app-config.js made here; its
                             routes (``/viewer/viewer?StudyInstanceUIDs=``,
                             ``/viewer/dicomwebproxy?url=``) fall back to its index.html.
                             Without OHIF installed, a redirect to /viewer-lite/.
- ``GET /viewer-lite/...``   the light viewer shipped in the package (static/viewer-lite)
- ``GET /admin/api/studies/{study}/media.zip``   a study as IHE PDI media (admin token)
- ``GET /patient/studies/{ref}/media.zip``        the patient's own study (node.edges.http.patient)

Pages are public (they hold no data); every DICOMweb call they make needs its own
credential. Staff sign in to OHIF with the admin token: the app-config.js made here adds
``Authorization: Bearer`` (the token kept in the tab's sessionStorage, as the dashboard
keeps it) to the viewer's same-origin /dicomweb requests only, so no cookie exists for a
cross-site request to ride on. Downloads stream a ZIP made by node.services.pdi_media;
everything that can be refused (an unknown study, a damaged file) is refused before the
first byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from node.core import atna
from node.edges.http.context import runtime_of
from node.edges.http.multipart import send_body
from node.errors import NotFound
from node.services import pdi_media
from node.services.runtime import NodeRuntime

_UID = "{study:[0-9.]{1,64}}"
MEDIA_FILENAME = "imageshare-media.zip"
OHIF_PREFIX = "/viewer"
LITE_PREFIX = "/viewer-lite"
LITE_DIR = Path(__file__).parent / "static" / "viewer-lite"
# Where scripts/setup-env unpacks OHIF in a clone (the repository root's vendor/ohif).
DEFAULT_OHIF_DIR = Path(__file__).resolve().parents[3] / "vendor" / "ohif"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".onnx": "application/octet-stream",
}
# Files of the OHIF build that are not served: its own config (replaced), the hosting
# rules of its demo site, and the service worker (it would cache patient images).
OHIF_SKIPPED = {"app-config.js", "_headers", "_redirects", "serve.json", "sw.js"}
OHIF_SKIPPED |= {"init-service-worker.js"}
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# The light viewer: its own scripts and the node's own DICOMweb only.
LITE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:;"
    " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# How OHIF's dicomweb data source reads a node's DICOMweb, for the node's own /dicomweb
# and for a link's root alike: what the node answers (docs/viewer.md).
OHIF_DICOMWEB_OPTIONS: dict[str, object] = {
    "qidoSupportsIncludeField": True,
    "imageRendering": "wadors",
    "thumbnailRendering": "thumbnail",
    "enableStudyLazyLoad": True,
    "supportsFuzzyMatching": False,
    "supportsWildcard": True,
    "staticWado": False,
    "singlepart": "bulkdata,video",
    "bulkDataURI": {"enabled": True},
    "omitQuotationForMultipartRequest": True,
}
# The OHIF route that opens studies through a dicomwebproxy JSON: the "viewer" mode with
# the "dicomwebproxy" data source (/viewer/dicomwebproxy alone is the study list). That
# data source reads the studies from `studyInstanceUIDs` only (case-sensitive, split on ";").
OHIF_PROXY_VIEWER = OHIF_PREFIX + "/viewer/dicomwebproxy"


def ohif_dicomweb_source(name: str, root: str) -> dict[str, object]:
    """The configuration of OHIF's dicomweb data source for the DICOMweb root ``root``."""
    return {"name": name, "wadoUriRoot": root, "qidoRoot": root, "wadoRoot": root} | (
        OHIF_DICOMWEB_OPTIONS
    )


# The node's OHIF configuration: this node's /dicomweb as the default data source, the
# dicomwebproxy data source for link holders, /viewer as the router base.
_OHIF_APP_CONFIG_TEMPLATE = """\
// Made by the ImageShare node: see docs/viewer.md.
(function () {
  "use strict";
  var TOKEN_KEY = "imageshare.admin-token";
  function adminToken() {
    var token = sessionStorage.getItem(TOKEN_KEY);
    // A link holder (OHIF's dicomwebproxy data source) is never asked for it.
    if (!token && location.pathname.split("/").indexOf("dicomwebproxy") < 0) {
      token = (window.prompt("Admin token of this node (from its admin.token file)") || "").trim();
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
    }
    return token;
  }
  // Only this node's own /dicomweb gets the token; a link's DICOMweb root never does.
  function needsToken(url) {
    var target = new URL(url, location.href);
    return target.origin === location.origin && target.pathname.indexOf("/dicomweb/") === 0;
  }
  var open = XMLHttpRequest.prototype.open, send = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function (method, url) {
    this.imageshareToken = needsToken(url);
    return open.apply(this, arguments);
  };
  XMLHttpRequest.prototype.send = function () {
    var token = this.imageshareToken && adminToken();
    if (token) this.setRequestHeader("Authorization", "Bearer " + token);
    return send.apply(this, arguments);
  };
  var fetchOriginal = window.fetch.bind(window);
  window.fetch = function (input, init) {
    var url = typeof input === "string" || input instanceof URL ? String(input) : input.url;
    var token = needsToken(url) && adminToken();
    if (!token) return fetchOriginal(input, init);
    var request = new Request(input, init);
    request.headers.set("Authorization", "Bearer " + token);
    return fetchOriginal(request);
  };
  var root = location.origin + "/dicomweb";
  window.config = {
    routerBasename: "/viewer",
    extensions: [],
    modes: [],
    customizationService: {},
    showStudyList: true,
    maxNumberOfWebWorkers: 3,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    defaultDataSourceName: "imageshare",
    dataSources: [
      {
        namespace: "@ohif/extension-default.dataSourcesModule.dicomweb",
        sourceName: "imageshare",
        configuration: Object.assign(
          { friendlyName: "This ImageShare node", name: "imageshare" },
          { wadoUriRoot: root, qidoRoot: root, wadoRoot: root },
          __DICOMWEB_OPTIONS__
        ),
      },
      {
        namespace: "@ohif/extension-default.dataSourcesModule.dicomwebproxy",
        sourceName: "dicomwebproxy",
        configuration: { friendlyName: "A shared link's DICOMweb", name: "dicomwebproxy" },
      },
    ],
  };
})();
"""
OHIF_APP_CONFIG = _OHIF_APP_CONFIG_TEMPLATE.replace(
    "__DICOMWEB_OPTIONS__", json.dumps(OHIF_DICOMWEB_OPTIONS)
)


async def send_pdi_media(
    request: web.Request, study_uids: list[str], user: str
) -> web.StreamResponse:
    """Stream ``study_uids`` as PDI media to ``request``'s client, audited as sent to ``user``."""
    runtime = runtime_of(request)
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


@dataclass(frozen=True)
class OhifBuild:
    """An installed OHIF build: its servable files by path, and its rewritten index.html."""

    directory: Path
    files: dict[str, Path]
    index_html: bytes
    csp: str
    worker_csp: str  # of a script fetched as a worker (Sec-Fetch-Dest: worker)


def _inline_script_hashes(page: str) -> list[str]:
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in scripts
    ]


def load_ohif(directory: Path) -> OhifBuild | None:
    """The OHIF build in ``directory``, or None if absent.

    The build must be made for /viewer/ (OHIF's PUBLIC_URL; scripts/setup-env moves the
    registry's build there). Its service worker is left out of its index.html.
    """
    index = directory / "index.html"
    if not index.is_file():
        return None
    files = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and path.suffix in CONTENT_TYPES and name not in OHIF_SKIPPED:
            files[name] = path
    page = index.read_text()
    page = re.sub(r"<script[^>]*init-service-worker\.js[^>]*></script>", "", page)
    # What OHIF needs: its scripts (and WebAssembly codecs), its workers, inline styles
    # (its UI library sets them), images from blobs, and its PDF viewport's <object> of
    # a blob (the Encapsulated PDF it read through /dicomweb); nothing from another origin.
    rest = (
        "; worker-src 'self' blob:; style-src 'self' 'unsafe-inline';"
        " img-src 'self' blob: data:; font-src 'self' data:; connect-src 'self';"
        " manifest-src 'self'; media-src 'self' blob:; object-src 'self' blob:;"
        " frame-src blob:; base-uri 'self';"
        " form-action 'none'; frame-ancestors 'none'"
    )
    csp = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval' " + " ".join(
        _inline_script_hashes(page)
    )
    # A worker runs under the policy its own script is sent with. Cornerstone's JPEG 2000
    # and JPEG-LS decoders (Emscripten, embind) make functions from strings in its decode
    # worker, which has no DOM; the page itself never gets 'unsafe-eval'.
    worker_csp = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval' 'unsafe-eval'"
    return OhifBuild(directory, files, page.encode(), csp + rest, worker_csp + rest)


def _ohif_dir(runtime: NodeRuntime) -> Path:
    configured = runtime.config.viewer.ohif_dir
    return Path(configured) if configured else DEFAULT_OHIF_DIR


def _lite_files() -> dict[str, tuple[bytes, str]]:
    return {
        path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
        for path in sorted(LITE_DIR.iterdir())
        if path.is_file() and path.suffix in CONTENT_TYPES
    }


def add_routes(app: web.Application, runtime: NodeRuntime) -> None:
    app.router.add_get(f"/admin/api/studies/{_UID}/media.zip", staff_media)
    lite = _lite_files()

    async def lite_page(request: web.Request) -> web.Response:
        found = lite.get(request.match_info.get("name") or "index.html")
        if found is None:
            raise NotFound("no such viewer file")
        body, content_type = found
        headers = {**COMMON_HEADERS, "Content-Security-Policy": LITE_CSP}
        return web.Response(
            body=body,
            headers={**headers, "Content-Type": content_type, "Cache-Control": "no-cache"},
        )

    async def to_lite(request: web.Request) -> web.Response:
        study = request.query.get("StudyInstanceUIDs", "").split(",")[0]
        target = f"{LITE_PREFIX}/" + (
            f"?study={study}" if re.fullmatch(r"[0-9.]{1,64}", study) else ""
        )
        raise web.HTTPFound(target)

    async def to_slash(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect(request.path + "/")

    app.router.add_get(LITE_PREFIX, to_slash)
    app.router.add_get(LITE_PREFIX + "/", lite_page)
    app.router.add_get(LITE_PREFIX + "/{name:[A-Za-z0-9._-]+}", lite_page)
    app.router.add_get(OHIF_PREFIX, to_slash)
    ohif = load_ohif(_ohif_dir(runtime))
    if ohif is None:
        app.router.add_get(OHIF_PREFIX + "/{tail:.*}", to_lite)
        return

    async def ohif_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["tail"]
        path = ohif.files.get(name)
        as_worker = request.headers.get("Sec-Fetch-Dest") == "worker"
        csp = ohif.worker_csp if as_worker and name.endswith(".js") and path else ohif.csp
        # One bundle may be fetched as a page script and as a worker: caches keep both.
        headers = {**COMMON_HEADERS, "Content-Security-Policy": csp, "Vary": "Sec-Fetch-Dest"}
        if name == "app-config.js":
            return web.Response(
                text=OHIF_APP_CONFIG,
                headers={**headers, "Cache-Control": "no-cache"},
                content_type="text/javascript",
            )
        if path is not None:  # only the files found at start: no request path reaches the disk
            content_type = CONTENT_TYPES[path.suffix]
            # Bundles are named by their content hash; everything else revalidates.
            cache = "public, max-age=31536000, immutable" if ".bundle." in name else "no-cache"
            return web.FileResponse(
                path, headers={**headers, "Content-Type": content_type, "Cache-Control": cache}
            )
        segments = name.split("/")
        if (
            "." in segments[-1]
            or any(s in ("", ".", "..") for s in segments[:-1])
            or not re.fullmatch(r"[A-Za-z0-9._~/-]*", name)
        ):
            # No such file, or a path that is no route of OHIF's (an empty, "." or ".."
            # segment, a byte outside its route names, as in /viewer/%2fetc%2fpasswd or
            # /viewer/%00): refused, not answered with the app.
            raise NotFound("no such viewer file")
        # One of OHIF's own routes (its router runs in the page): the app itself.
        return web.Response(
            body=ohif.index_html,
            headers={
                **headers,
                "Content-Type": CONTENT_TYPES[".html"],
                "Cache-Control": "no-cache",
            },
        )

    app.router.add_get(OHIF_PREFIX + "/{tail:.*}", ohif_file)
