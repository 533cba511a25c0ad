"""OHIF with its default configuration against the node and against a real Orthanc (Debian's
orthanc-dicomweb), on the same studies: one per pydicom test file of every transfer
syntax, and its Structured Report. The same OHIF build is served for both, with the same
data source options (thumbnails from the `thumbnail` resource, rendered previews), the
node's at /viewer/ and Orthanc's by a small server in this test in front of Orthanc's
/dicom-web (same origin, so nothing differs but the DICOMweb server).

For each study: does OHIF's study list show it, does the viewer draw it (an image on a
canvas, or a non-image viewport), does its thumbnail come. The node must show at least
what Orthanc's OHIF shows; where it shows more, SHOWN_BY_THE_NODE_ONLY says what and why.
Screenshots of every study on both go to the test's tmp directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest
from aiohttp import web
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.edges.http.viewer import DEFAULT_OHIF_DIR, OHIF_DICOMWEB_OPTIONS, OhifBuild, load_ohif
from tests.support.browser import ChromiumSession, RecordedPage, chromium_session
from tests.support.nodes import NodeProcess, free_port, init_node, wait_until
from tests.support.orthanc import DICOMWEB_PLUGIN, OrthancServer
from tests.test_dicomweb_conformance import FILES
from tests.test_viewer import TOKEN_KEY, require_ohif

# One study per file: the transfer syntax files, and pydicom's Structured Report.
STUDY_FILES = {name: syntax for syntax, name in FILES.items()} | {"test-SR.dcm": "SR"}
# A page counts as loaded when its document is; OHIF's bundles may take long on a busy
# machine, and what it draws is polled for after.
LOADED: dict[str, Any] = {"wait_until": "domcontentloaded", "timeout": 60_000}
# How long OHIF may take to draw one study; a study it cannot draw costs this much.
DRAW_SECONDS = 25.0
ORTHANC_ROOT = "/dicom-web"
# What OHIF shows of a study on the node and not on Orthanc, and why (PS3.18 sections).
NO_THUMBNAIL_RESOURCE = (
    "Orthanc's DICOMweb plugin (1.7, Debian's) has no thumbnail resources (PS3.18"
    " 10.4.1.1.4): the thumbnail OHIF asks for is 404, the node renders it"
)
SHOWN_BY_THE_NODE_ONLY: dict[tuple[str, str], str] = {
    **{
        (name, "thumbnail"): NO_THUMBNAIL_RESOURCE
        for name, syntax in STUDY_FILES.items()
        if syntax != "SR"
    },
    ("image_dfl.dcm", "drawn"): (
        "Orthanc answers 500 to the frame of the deflated instance (WADO-RS frames, PS3.18"
        " 10.4.1.1.2); the node sends its inflated pixels"
    ),
    ("MR_small_bigendian.dcm", "drawn"): (
        "Orthanc sends the big-endian frame labelled Implicit VR Little Endian"
        " (1.2.840.10008.1.2, not a DICOMweb transfer syntax: PS3.18 8.6.2.1), so OHIF"
        " reads its bytes in the wrong order; the node labels it Big Endian, as stored"
    ),
}
# What OHIF 3.13.2 shows of no server's copy, and why.
OHIF_CANNOT_SHOW = {
    ("test-SR.dcm", "drawn"): (
        "OHIF's SR viewport throws on a content item of this report without a Concept Name"
        " Code Sequence ('Cannot destructure property CodeValue'), whichever server sends it"
    ),
    ("test-SR.dcm", "thumbnail"): "a report has no image: OHIF shows no thumbnail image",
}


@dataclass
class Seen:
    """What OHIF showed of one study."""

    listed: bool = False
    drawn: bool = False
    thumbnail: bool = False

    def shown(self) -> set[str]:
        return {name for name in ("listed", "drawn", "thumbnail") if getattr(self, name)}


@dataclass
class Viewers:
    node: NodeProcess
    orthanc_front: str  # OHIF and Orthanc's DICOMweb on one origin
    studies: dict[str, str]  # file name -> its Study Instance UID
    shots: Path
    seen: dict[str, dict[str, Seen]] = field(default_factory=dict)  # server -> file -> Seen


def _orthanc_app_config() -> str:
    """OHIF's configuration for Orthanc: the node's data source options, Orthanc's root."""
    return f"""(function () {{
  var root = location.origin + "{ORTHANC_ROOT}";
  window.config = {{
    routerBasename: "/viewer",
    extensions: [],
    modes: [],
    showStudyList: true,
    defaultDataSourceName: "orthanc",
    dataSources: [{{
      namespace: "@ohif/extension-default.dataSourcesModule.dicomweb",
      sourceName: "orthanc",
      configuration: Object.assign(
        {{ friendlyName: "Orthanc", name: "orthanc" }},
        {{ wadoUriRoot: root, qidoRoot: root, wadoRoot: root }},
        {json.dumps(OHIF_DICOMWEB_OPTIONS)}
      ),
    }}],
  }};
}})();
"""


SESSION = web.AppKey("session", aiohttp.ClientSession)


def _orthanc_front(build: OhifBuild, orthanc: OrthancServer) -> web.Application:
    """OHIF's files and routes (as the node serves them) and Orthanc's DICOMweb, proxied."""
    config = _orthanc_app_config()

    async def dicomweb(request: web.Request) -> web.StreamResponse:
        session = request.app[SESSION]
        headers = {k: v for k, v in request.headers.items() if k.lower() in {"accept"}}
        async with session.get(orthanc.url + request.path_qs, headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name in ("Content-Type", "Warning"):
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(65536):
                await response.write(chunk)
            await response.write_eof()
            return response

    async def ohif(request: web.Request) -> web.Response:
        name = request.match_info["tail"]
        if name == "app-config.js":
            return web.Response(text=config, content_type="text/javascript")
        path = build.files.get(name)
        if path is not None:
            return web.FileResponse(path)  # type: ignore[return-value]
        return web.Response(body=build.index_html, content_type="text/html")

    async def session_context(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession()
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_context)
    app.router.add_get(ORTHANC_ROOT + "/{tail:.*}", dicomweb)
    app.router.add_get("/viewer/{tail:.*}", ohif)
    return app


@dataclass
class ServedInThread:
    """An aiohttp application on loopback, run by its own event loop in a thread."""

    app: web.Application
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app)
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", self.port)
            self.loop.run_until_complete(site.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(30), "the OHIF front for Orthanc did not start"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def viewers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewers]:
    require_ohif()
    if shutil.which("Orthanc") is None or not DICOMWEB_PLUGIN.exists():
        pytest.fail("Orthanc with its DICOMweb plugin is needed (scripts/setup-env installs it)")
    build = load_ohif(DEFAULT_OHIF_DIR)
    assert build is not None
    base = tmp_path_factory.mktemp("viewer-parity")
    files = base / "in"
    files.mkdir()
    studies = {}
    for name in STUDY_FILES:
        source = get_testdata_file(name)
        assert isinstance(source, str), name
        ds = pydicom.dcmread(source)
        # Several files share UIDs: each becomes a study of its own, named in the list.
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDescription = f"parity {name}"
        ds.save_as(files / name, enforce_file_format=True)
        studies[name] = str(ds.StudyInstanceUID)
    node = init_node(base, "parity.example/imageshare")
    node.cli("import", str(files))
    orthanc = OrthancServer(base / "orthanc")  # as Debian ships it (see the conformance test)
    node.start()
    front = None
    try:
        orthanc.start()
        for path in sorted(files.iterdir()):
            orthanc.request("POST", "/instances", path.read_bytes())
        front = ServedInThread(_orthanc_front(build, orthanc))
        shots = base / "screenshots"
        shots.mkdir()
        viewers = Viewers(node, front.url, studies, shots)
        with chromium_session("viewer-parity") as session:
            viewers.seen = {
                "node": _look(session, node.url, viewers, "node", node.admin_token),
                "orthanc": _look(session, front.url, viewers, "orthanc", None),
            }
        (shots / "seen.json").write_text(
            json.dumps({k: {n: asdict(v) for n, v in s.items()} for k, s in viewers.seen.items()})
        )
        yield viewers
    finally:
        if front is not None:
            front.stop()
        orthanc.stop()
        node.stop()


# What OHIF shows of the study open in its viewer: the most lit pixels on a canvas of its
# viewports, and whether a thumbnail image of the study browser has loaded.
VIEWER_STATE = """() => {
  let ink = 0;
  for (const canvas of document.querySelectorAll('[data-cy="viewport-grid"] canvas')) {
    const context = canvas.getContext("2d", {willReadFrequently: true});
    if (!context || !canvas.width || !canvas.height) continue;
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let lit = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i] + data[i + 1] + data[i + 2] > 30) lit++;
    ink = Math.max(ink, lit);
  }
  const thumbnail = [...document.querySelectorAll('[data-cy="study-browser-thumbnail"] img')]
    .some((img) => img.complete && img.naturalWidth > 0);
  return {ink, thumbnail};
}"""
INK_PIXELS = 500  # lit pixels that make a drawn image rather than overlay text
# After the image is drawn (or OHIF reported an error), how long the rest may take.
GRACE_SECONDS = 2.5


def _look(
    session: ChromiumSession, origin: str, viewers: Viewers, server: str, token: str | None
) -> dict[str, Seen]:
    """Open OHIF's study list, then each study, on one server; what it showed of each."""
    page = session.new_page()
    if token is not None:
        page.add_init_script(f"sessionStorage.setItem({TOKEN_KEY!r}, {token!r})")
    seen = {name: Seen() for name in viewers.studies}
    # The viewer gave up on the study: OHIF logs its error boundary taking over the page,
    # or the server refused the frame it asked for.
    gave_up: list[str] = []
    page.page.on("console", lambda m: gave_up.append(m.text) if "Error Boundary" in m.text else 0)
    # A thumbnail the server refused will not come: no need to wait for it.
    no_thumbnail: list[str] = []

    def refused(response: Any) -> None:
        if response.status >= 400 and "/frames/" in response.url:
            gave_up.append(response.url)
        if response.status >= 400 and response.url.split("?")[0].endswith("/thumbnail"):
            no_thumbnail.append(response.url)

    page.page.on("response", refused)
    page.goto(f"{origin}/viewer/", **LOADED)

    def listed() -> set[str]:
        text = page.evaluate("() => document.body.innerText")
        return {name for name in viewers.studies if f"parity {name}" in text}

    with contextlib.suppress(AssertionError):  # fewer listed: recorded below
        wait_until(lambda: len(listed()) == len(viewers.studies), timeout=DRAW_SECONDS)
    for name in listed():
        seen[name].listed = True
    _shot(page, viewers.shots / f"{server}-study-list.png")
    for name, study in viewers.studies.items():
        gave_up.clear()
        no_thumbnail.clear()
        page.goto(f"{origin}/viewer/viewer?StudyInstanceUIDs={study}", **LOADED)
        seen[name].drawn, seen[name].thumbnail = _watch(page, gave_up, no_thumbnail)
        _shot(page, viewers.shots / f"{server}-{name}.png")
    page.close()
    return seen


def _watch(page: RecordedPage, gave_up: list[str], no_thumbnail: list[str]) -> tuple[bool, bool]:
    """Whether the viewer draws the study's image, and shows its thumbnail, in time (or
    until it gives up)."""
    deadline = time.monotonic() + DRAW_SECONDS
    drawn = thumbnail = False
    while time.monotonic() < deadline:
        state = page.evaluate(VIEWER_STATE)
        drawn, thumbnail = drawn or state["ink"] > INK_PIXELS, thumbnail or state["thumbnail"]
        if drawn and (thumbnail or no_thumbnail):
            break
        if drawn or gave_up:  # an error may be of one part only: a little longer
            deadline = min(deadline, time.monotonic() + GRACE_SECONDS)
        time.sleep(0.3)
    return drawn, thumbnail


def _shot(page: RecordedPage, path: Path) -> None:
    page.page.screenshot(path=str(path))


def test_ohif_shows_on_the_node_every_study_orthancs_ohif_shows(viewers: Viewers) -> None:
    missing = [
        f"{name}: {what} on Orthanc, not on the node"
        for name in viewers.studies
        for what in viewers.seen["orthanc"][name].shown() - viewers.seen["node"][name].shown()
    ]
    assert not missing, "\n".join(missing)


def test_ohif_lists_draws_and_thumbnails_every_study_on_the_node(viewers: Viewers) -> None:
    not_shown = {
        (name, what)
        for name, seen in viewers.seen["node"].items()
        for what in {"listed", "drawn", "thumbnail"} - seen.shown()
    }
    assert not_shown == set(OHIF_CANNOT_SHOW), sorted(not_shown)


def test_what_only_the_node_shows_is_explained(viewers: Viewers) -> None:
    more = {
        (name, what)
        for name in viewers.studies
        for what in viewers.seen["node"][name].shown() - viewers.seen["orthanc"][name].shown()
    }
    assert more == set(SHOWN_BY_THE_NODE_ONLY), sorted(more)
