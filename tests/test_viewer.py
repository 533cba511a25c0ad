"""/viewer/ (OHIF) and /viewer-lite/ against a real node: how they are served, and in
headless Chromium that staff see a study's images in OHIF and that the light viewer at
phone size shows every image of a series by scrolling, with window presets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests

from node.edges.http.viewer import DEFAULT_OHIF_DIR, load_ohif
from node.samples import SyntheticStudy, make_ct_study
from tests.support.browser import ChromiumSession, RecordedPage, chromium_session
from tests.support.nodes import NodeProcess, init_node, wait_until

SLICES = 5
TOKEN_KEY = "imageshare.admin-token"
PHONE = (390, 844)


def ohif_installed() -> bool:
    return (DEFAULT_OHIF_DIR / "index.html").is_file()


def require_ohif() -> None:
    """Skip without OHIF installed, except in CI (env CI set), where that fails."""
    if ohif_installed():
        return
    if os.environ.get("CI"):
        pytest.fail("OHIF is missing in CI (scripts/setup-env installs it)")
    pytest.skip("OHIF is not installed (scripts/setup-env with IMAGESHARE_NEED_OHIF=1)")


def _ramp_study(directory: Path) -> SyntheticStudy:
    """One CT series whose slices are ramps (not noise), so windows visibly differ."""
    study = make_ct_study(directory, series=1, slices=SLICES, rows=64, columns=64)
    for position, path in enumerate(study.files):
        ds = pydicom.dcmread(path)
        ramp = np.linspace(0, 2000, 64) + 40 * position  # -1024 .. about 1000 HU
        ds.PixelData = np.tile(ramp, (64, 1)).astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return study


@dataclass
class Viewing:
    node: NodeProcess
    study: SyntheticStudy


@pytest.fixture(scope="module")
def viewing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewing]:
    base = tmp_path_factory.mktemp("viewer")
    node = init_node(base, "viewer.example/imageshare")
    study = _ramp_study(base / "in")
    node.cli("import", str(base / "in"))
    node.start()
    try:
        yield Viewing(node, study)
    finally:
        node.stop()


def get(node: NodeProcess, path: str) -> requests.Response:
    return requests.get(node.url + path, timeout=30, allow_redirects=False)


class TestServedOhif:
    def test_the_index_is_moved_under_viewer_with_a_policy_and_no_service_worker(
        self, viewing: Viewing
    ) -> None:
        require_ohif()
        response = get(viewing.node, "/viewer/")
        assert response.status_code == 200
        page = response.text
        assert 'window.PUBLIC_URL="/viewer/"' in page
        assert 'src="/viewer/app-config.js"' in page and 'src="/app' not in page
        assert "init-service-worker" not in page
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "connect-src 'self'" in policy and "unsafe-eval'" not in policy.replace(
            "wasm-unsafe-eval'", ""
        )

    def test_only_a_script_fetched_as_a_worker_may_make_code_from_strings(
        self, viewing: Viewing
    ) -> None:
        # Cornerstone's JPEG 2000 and JPEG-LS decoders need it in their worker (without,
        # OHIF draws no such image: tests/test_viewer_parity.py); the page never gets it.
        require_ohif()
        bundle = next(name for name in sorted(os.listdir(DEFAULT_OHIF_DIR)) if ".bundle." in name)
        as_script = get(viewing.node, f"/viewer/{bundle}")
        as_worker = requests.get(
            f"{viewing.node.url}/viewer/{bundle}", headers={"Sec-Fetch-Dest": "worker"}, timeout=30
        )
        assert as_script.content == as_worker.content
        script_policy = as_script.headers["Content-Security-Policy"]
        worker_policy = as_worker.headers["Content-Security-Policy"]
        assert "'unsafe-eval'" not in script_policy and "'unsafe-eval'" in worker_policy
        assert "connect-src 'self'" in worker_policy and "default-src 'none'" in worker_policy
        assert as_worker.headers["Vary"] == as_script.headers["Vary"] == "Sec-Fetch-Dest"
        page = requests.get(
            f"{viewing.node.url}/viewer/", headers={"Sec-Fetch-Dest": "worker"}, timeout=30
        )
        assert "'unsafe-eval'" not in page.headers["Content-Security-Policy"]

    def test_the_config_is_the_nodes_own(self, viewing: Viewing) -> None:
        require_ohif()
        config = get(viewing.node, "/viewer/app-config.js").text
        assert 'routerBasename: "/viewer"' in config
        assert 'defaultDataSourceName: "imageshare"' in config
        assert "dataSourcesModule.dicomwebproxy" in config
        assert 'location.origin + "/dicomweb"' in config

    def test_ohif_routes_fall_back_to_the_app_and_unknown_files_are_404(
        self, viewing: Viewing
    ) -> None:
        require_ohif()
        route = get(viewing.node, f"/viewer/viewer?StudyInstanceUIDs={viewing.study.study_uid}")
        assert route.status_code == 200 and "app-config.js" in route.text
        assert get(viewing.node, "/viewer/dicomwebproxy?url=x").status_code == 200
        assert get(viewing.node, "/viewer/no-such-bundle.js").status_code == 404
        assert get(viewing.node, "/viewer/sw.js").status_code == 404
        assert get(viewing.node, "/viewer/%2e%2e/%2e%2e/node.key").status_code == 404

    def test_without_ohif_the_viewer_sends_to_the_light_viewer(self, tmp_path: Path) -> None:
        assert load_ohif(tmp_path) is None
        node = init_node(tmp_path, "bare.example/imageshare")
        node.append_config('[viewer]\nohif_dir = "no-ohif-here"')
        node.start()
        try:
            response = get(node, "/viewer/viewer?StudyInstanceUIDs=1.2.3")
            assert response.status_code == 302
            assert response.headers["Location"] == "/viewer-lite/?study=1.2.3"
            hostile = get(node, "/viewer/viewer?StudyInstanceUIDs=javascript:alert(1)")
            assert hostile.headers["Location"] == "/viewer-lite/"
        finally:
            node.stop()

    def test_the_light_viewer_is_served_with_a_same_origin_policy(self, viewing: Viewing) -> None:
        response = get(viewing.node, "/viewer-lite/")
        assert response.status_code == 200 and "app.js" in response.text
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy
        assert get(viewing.node, "/viewer-lite/app.js").status_code == 200
        assert get(viewing.node, "/viewer-lite/%2e%2e").status_code == 404
        assert get(viewing.node, "/viewer-lite/no-such.js").status_code == 404


# -- in the browser ----------------------------------------------------------------------


def signed_in(session: ChromiumSession, node: NodeProcess) -> RecordedPage:
    """A page of a tab in which staff already gave the admin token (as on the dashboard)."""
    page = session.new_page()
    page.add_init_script(f"sessionStorage.setItem({TOKEN_KEY!r}, {node.admin_token!r})")
    return page


CANVAS_DIGEST = """() => {
  const canvas = document.getElementById("image");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0;
  for (let i = 0; i < data.length; i += 4) sum = (sum * 31 + data[i]) % 1000000007;
  return sum;
}"""


class TestInTheBrowser:
    def test_staff_open_a_study_in_ohif_and_see_its_images(self, viewing: Viewing) -> None:
        require_ohif()
        with chromium_session("viewer") as session:
            page = signed_in(session, viewing.node)
            page.goto(
                f"{viewing.node.url}/viewer/viewer?StudyInstanceUIDs={viewing.study.study_uid}"
            )
            page.wait_for_ink("OHIF to draw the study's image")
            page.shot("ohif-study")
            assert page.foreign_requests(viewing.node.url) == []

    def test_the_light_viewer_scrolls_through_every_image_and_presets_change_pixels(
        self, viewing: Viewing
    ) -> None:
        with chromium_session("viewer", viewport=PHONE) as session:
            page = signed_in(session, viewing.node)
            page.goto(f"{viewing.node.url}/viewer-lite/?study={viewing.study.study_uid}")
            canvas = page.locator("#image")

            def shown(index: int) -> Any:
                return canvas.get_attribute("data-index") == str(index)

            wait_until(lambda: shown(0), timeout=30, message="the first image")
            assert page.locator("#series button").count() == 1
            wait_until(
                lambda: page.evaluate("document.querySelector('#series img').naturalWidth") > 0,
                message="the series thumbnail",
            )
            page.shot("lite-first")
            digests = {page.evaluate(CANVAS_DIGEST)}
            page.locator("#stage").focus()
            for index in range(1, SLICES):
                page.keyboard.press("ArrowDown")
                wait_until(lambda i=index: shown(i), message=f"image {index + 1}")
                digests.add(page.evaluate(CANVAS_DIGEST))
            assert len(digests) == SLICES  # every slice drawn, each different
            assert page.locator("#position").text_content() == f"{SLICES} / {SLICES}"
            page.mouse.move(PHONE[0] / 2, 300)
            page.mouse.wheel(0, -100)
            wait_until(lambda: shown(SLICES - 2), message="the wheel to scroll back")
            before = page.evaluate(CANVAS_DIGEST)
            page.get_by_role("button", name="Lung").click()
            wait_until(
                lambda: canvas.get_attribute("data-window") == "-600,1500",
                message="the lung window",
            )
            assert page.evaluate(CANVAS_DIGEST) != before
            page.shot("lite-lung")
            assert page.foreign_requests(viewing.node.url) == []
