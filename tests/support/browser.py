"""Headless Chromium for browser tests: Debian's chromium driven by Playwright.

Never downloads a browser (no `playwright install`): it launches the system's
/usr/bin/chromium with a fresh profile. Without chromium the tests skip, except in CI
(env CI set) where they fail, so that CI never passes by skipping them.

Usage::

    with chromium_session("dashboard") as browser:
        page = browser.new_page()
        page.goto(url)
        page.shot("login")                  # test-artifacts/dashboard/login.png
        assert page.foreign_requests(url) == []
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest

from tests.support.nodes import wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
DEFAULT_TIMEOUT_MS = 15_000
# The most pixels brighter than black on any 2D canvas matching a selector: a viewer drew.
CANVAS_INK = """(selector) => {
  let best = 0;
  for (const canvas of document.querySelectorAll(selector)) {
    const context = canvas.getContext("2d");
    if (!context || !canvas.width || !canvas.height) continue;
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let lit = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i] + data[i + 1] + data[i + 2] > 30) lit++;
    best = Math.max(best, lit);
  }
  return best;
}"""


def axe_script() -> str:
    """axe-core's browser script, as the axe-playwright-python package bundles it."""
    import axe_playwright_python

    return (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text()


def require_chromium() -> Path:
    """The chromium binary; skips the test if it is absent outside CI, fails in CI."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing in CI (scripts/setup-env installs it)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    raise AssertionError("unreachable")


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass
class RecordedPage:
    """A Playwright page whose every request is recorded, with a screenshot helper."""

    page: Any  # playwright.sync_api.Page
    artifacts: Path
    requests: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        # goto, locator, fill, click...: the page's own API.
        return getattr(self.page, name)

    def shot(self, name: str) -> Path:
        """A full-page screenshot kept as ``test-artifacts/<session>/<name>.png``."""
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def wait_for_ink(self, message: str, pixels: int = 500, timeout: float = 90) -> int:
        """Wait until some canvas of the page has more than ``pixels`` lit pixels."""

        def lit() -> int:
            count = int(self.page.evaluate(CANVAS_INK, "canvas"))
            return count if count > pixels else 0

        return int(wait_until(lit, timeout=timeout, interval=0.5, message=message))

    def accessibility_violations(self) -> list[str]:
        """What axe-core (every rule it runs by default) finds wrong on the page as it
        is now: one line per violation, with the elements it names."""
        if not self.page.evaluate("typeof window.axe === 'object'"):
            self.page.evaluate(axe_script())
        results = self.page.evaluate(
            "axe.run(document, {resultTypes: ['violations']})"
            ".then((r) => r.violations.map((v) => v.id + ': ' + v.help + ' ' +"
            " JSON.stringify(v.nodes.map((n) => n.target))))"
        )
        return [str(line) for line in results]

    def horizontal_overflow(self) -> int:
        """How many CSS pixels the page is wider than its viewport (0: it fits)."""
        return int(
            self.page.evaluate(
                "Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
                " - window.innerWidth"
            )
        )

    def foreign_requests(self, *allowed_urls: str) -> list[str]:
        """Every recorded request to an origin other than those of ``allowed_urls``
        (data: and blob: URLs stay in the page and are not requests to anyone)."""
        allowed = {origin_of(u) for u in allowed_urls}
        return [
            u
            for u in self.requests
            if not u.startswith(("data:", "blob:")) and origin_of(u) not in allowed
        ]


@dataclass
class ChromiumSession:
    """One headless Chromium with a fresh profile; pages share its (empty) storage."""

    context: Any  # playwright.sync_api.BrowserContext
    artifacts: Path

    def new_page(self) -> RecordedPage:
        page = self.context.new_page()
        page.set_default_timeout(DEFAULT_TIMEOUT_MS)
        recorded = RecordedPage(page, self.artifacts)
        page.on("request", lambda request: recorded.requests.append(request.url))
        return recorded


@contextlib.contextmanager
def chromium_session(
    name: str,
    viewport: tuple[int, int] = (1280, 900),
    service_workers: Literal["allow", "block"] = "block",
) -> Iterator[ChromiumSession]:
    """Launch headless Chromium (skips or fails per require_chromium); screenshots go to
    ``test-artifacts/<name>/`` at the repository root. ``service_workers="allow"`` lets an
    installable app (the wallet) register its worker."""
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    artifacts = ARTIFACTS / name
    artifacts.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="imageshare-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(executable),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": viewport[0], "height": viewport[1]},
                service_workers=service_workers,
            )
            try:
                yield ChromiumSession(context, artifacts)
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
