"""Share with anyone, end to end in headless Chromium: the web wallet makes a link at phone
size, a browser that never saw the wallet opens it, and OHIF draws the study through the
link's DICOMweb root (its dicomwebproxy data source); no request carries the link's key or
fragment, and the patient's `patient log` shows the view, proven.

Custodian A holds the patient's study; B witnesses A's log (the patient log's proof needs
a cosignature by another node). Screenshots go to test-artifacts/share-viewer/.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from node.samples import make_ct_study
from tests.support.browser import chromium_session
from tests.support.nodes import init_node, peer_each_other, run_cli, wait_until
from tests.support.web_wallet import share_in_web_wallet
from tests.test_share_links import patient
from tests.test_viewer import require_ohif

PHONE = (390, 844)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("share-viewer")
    a = init_node(base, "a.example/imageshare")
    b = init_node(base, "b.example/imageshare")
    peer_each_other(a, b)
    make_ct_study(base / "ct", series=2, slices=3, patient_id="MRN-ANNA", seed=7)
    a.cli("import", str(base / "ct"))
    a.start()
    b.start()
    wallet = base / "wallet"
    patient(wallet, "keygen")
    key = patient(wallet, "pubkey", "--custodian", a.url)["pubkey"]
    a.cli("enroll", "--patient-id", "MRN-ANNA", "--key", key)
    (study,) = patient(wallet, "studies", "--custodian", a.url)["studies"]
    try:
        yield {"a": a, "b": b, "wallet": wallet, "study": study}
    finally:
        a.stop()
        b.stop()


def test_a_doctor_opens_a_web_wallet_link_in_ohif_and_the_patient_log_proves_the_view(
    federation: dict[str, Any],
) -> None:
    require_ohif()
    a, b, wallet = federation["a"], federation["b"], federation["wallet"]
    with chromium_session("share-viewer", viewport=PHONE) as browser:
        page = browser.new_page()  # the patient's phone
        url, token_id = share_in_web_wallet(
            page, a.url, wallet / "seed.json", federation["study"]["ref"], "Dr X", "2718"
        )
        page.shot("1-patient-made-the-link")
    assert url.startswith(f"{a.url}/share/#shlink:/")
    fragment = url.split("#", 1)[1]
    payload = fragment.removeprefix("shlink:/")
    key = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["key"]

    sent: list[str] = []
    answers: list[tuple[int, str]] = []
    # The doctor's browser: a fresh profile that never saw the wallet.
    with chromium_session("share-viewer-doctor", viewport=PHONE) as browser:
        page = browser.new_page()

        def record(request: Any) -> None:
            body = (request.post_data_buffer or b"").decode(errors="replace")
            sent.append(" ".join([request.url, json.dumps(dict(request.headers)), body]))

        page.on("request", record)
        page.on("response", lambda r: answers.append((r.status, r.url)))
        page.goto(url)  # what the QR code opens
        page.wait_for_selector("#passcode-form:not([hidden])")
        page.fill("#passcode", "2718")
        page.click("#passcode-button")
        page.wait_for_selector("#studies:not([hidden])")
        page.shot("2-share-page")
        page.click("#study-list li a")
        page.wait_for_ink("OHIF to draw the shared study")
        page.shot("3-ohif-draws-the-study")
        assert page.url.startswith(f"{a.url}/viewer/viewer/dicomwebproxy?url=")
        assert page.foreign_requests(a.url) == []

    # OHIF read the study through the link's root only, and every answer it had was good.
    link_reads = [u for _, u in answers if "/links/" in u and "/dicomweb/" in u]
    assert any("/frames/" in u for u in link_reads), link_reads
    assert not [(s, u) for s, u in answers if s >= 400 and not u.endswith("favicon.ico")]
    assert not [u for _, u in answers if "/dicomweb/" in u and "/links/" not in u]
    # The fragment and the key stayed in the browsers.
    assert sent
    for request in sent:
        assert key not in request and "shlink:" not in request and payload not in request

    def viewed() -> dict[str, Any] | None:
        result = run_cli(
            "patient", "log", a.url, b.url, "--wallet", str(wallet), "--json", check=False
        )
        if result.returncode != 0:
            return None
        log: dict[str, Any] = json.loads(result.stdout)
        mine = [e for e in log["events"] if e["token_id"] == token_id]
        return log if any(e.get("link_access") == "view" for e in mine) else None

    log = wait_until(viewed, timeout=30, interval=0.5, message="the view in the patient log")
    mine = [e for e in log["events"] if e["token_id"] == token_id]
    assert [e["link_access"] for e in mine] == ["manifest", "view"]
    assert all(e["kind"] == "access" and e["proof"]["proven"] for e in mine)
    # The link was made on the phone: its label lives in that wallet, not in this one.
    text = run_cli("patient", "log", a.url, b.url, "--wallet", str(wallet)).stdout
    assert "viewed by a link made in another wallet on " in text
