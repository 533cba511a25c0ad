"""The phone wallet web app in headless Chromium against real nodes: the patient's story.

Custodian A and grantee B run as real node processes. The patient creates a key in the
browser served by A, is enrolled at A's desk by `imageshare enroll`, sees their studies
with previews, grants one to B, B fetches with `imageshare fetch` and the browser-made
token, the patient sees the access (proven in the browser), revokes, and sees B's
refusal. Screenshots at phone size go to test-artifacts/wallet/.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import pydicom
import pytest
import qrcode
import qrcode.util
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from node.core.consent import decode_grant, parse_token_text
from node.core.encoding import canonical_encode
from node.core.patient_keys import PatientKey, parse_public_key
from node.core.signed_requests import check_signature, parse_headers
from node.errors import BadInput
from node.samples import SyntheticStudy, make_ct_study
from node.services.previews import render_preview
from node.services.wallet import Wallet
from node.store.dicom_header import InflateLimits
from tests.support.browser import chromium_session
from tests.support.nodes import NodeProcess, init_node, wait_until
from tests.support.patients import signed_headers
from tests.support.vectors import rfc6962_vectors
from tests.support.web_wallet import confirm as _confirm
from tests.support.web_wallet import restore_wallet as _restore
from tests.support.web_wallet import wait_for_screen as _ready

PHONE = (390, 844)
PASSPHRASE = "correct horse battery"
MRN = "MRN-WALLET-1"
CLI_MRN = "MRN-WALLET-2"
# The default limits of a node.
LIMITS = InflateLimits(max_bytes=1024**3, max_ratio=100.0)


@dataclass
class Hospitals:
    base: Path
    a: NodeProcess
    b: NodeProcess
    study: SyntheticStudy


def _peer(node: NodeProcess) -> str:
    return f'[[peers]]\norigin = "{node.origin}"\nurl = "{node.url}"\nvkey = "{node.vkey}"\n'


def _real_ct(directory: Path, patient_id: str) -> None:
    """pydicom's bundled CT slice, made one of ``patient_id``'s studies (a real image)."""
    dataset = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    dataset.PatientID = patient_id
    dataset.StudyDescription = "CT HEAD"
    directory.mkdir(parents=True, exist_ok=True)
    dataset.save_as(directory / "ct_small.dcm")


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hospitals]:
    base = tmp_path_factory.mktemp("wallet")
    a = init_node(base, "a.example/imageshare", "a")
    b = init_node(base, "b.example/imageshare", "b")
    settings = "[federation]\ndiscovery = false\nreplicate_interval = 0.3\n"
    a.append_config(settings + _peer(b))
    b.append_config(settings + _peer(a))
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(NodeProcess.start, [a, b]))
        study = make_ct_study(base / "studies" / "chest", series=2, slices=3, patient_id=MRN)
        _real_ct(base / "studies" / "head", MRN)
        make_ct_study(base / "studies" / "other", series=1, slices=1, patient_id=CLI_MRN)
        a.cli("import", str(base / "studies"))
        yield Hospitals(base, a, b, study)
    finally:
        a.stop()
        b.stop()


def _tab(page: Any, screen: str) -> None:
    page.click(f'#tabs button[data-screen="{screen}"]')
    _ready(page, screen)


def _create_key(page: Any, url: str) -> str:
    """Create a wallet and put the backup off ("Later"): the key as the Key screen shows it."""
    page.goto(url + "/wallet/")
    _ready(page, "setup")
    page.fill("#create-passphrase", PASSPHRASE)
    page.fill("#create-passphrase2", PASSPHRASE)
    page.click("#create-button")
    _ready(page, "backup")
    page.click("#backup-later")
    _ready(page, "key")
    return str(page.text_content("#pubkey")).strip()


def _fits_and_passes_axe(page: Any, name: str) -> None:
    """The screen as it is now: no horizontal overflow, nothing axe-core objects to, and
    a screenshot kept."""
    page.shot(name)
    assert page.horizontal_overflow() <= 0, f"{name} is wider than the screen"
    assert page.accessibility_violations() == [], name


def _wallet_screens_at(page: Any, name: str) -> None:
    """Every tab of an unlocked wallet, plus the lost-phone page, checked as above."""
    for screen in ["key", "studies", "tokens", "activity", "safety", "proof"]:
        _tab(page, screen)
        assert page.get_attribute(f'#tabs button[data-screen="{screen}"]', "aria-current") == "page"
        _fits_and_passes_axe(page, f"{name}-{screen}")
    _tab(page, "key")
    page.click("#screen-key a.lost-link")
    _ready(page, "lost")
    _fits_and_passes_axe(page, f"{name}-lost")
    page.click("#lost-back")
    _ready(page, "key")


def _python_qr(text: str, version: int, mask: int) -> list[str]:
    qr = qrcode.QRCode(
        version=version,
        error_correction=qrcode.constants.ERROR_CORRECT_L,
        border=0,
        mask_pattern=mask,
    )
    qr.add_data(qrcode.util.QRData(text.encode(), mode=qrcode.util.MODE_8BIT_BYTE))
    qr.make(fit=False)
    return ["".join("1" if cell else "0" for cell in row) for row in qr.get_matrix()]


def _browser_qr(page: Any, text: str, mask: int) -> dict[str, Any]:
    return dict(
        page.evaluate(
            """async ([text, mask]) => {
                const { encodeQr } = await import("/wallet/qr.js");
                const qr = encodeQr(new TextEncoder().encode(text), { mask });
                return { version: qr.version,
                         rows: qr.dark.map((r) => r.map((d) => (d ? "1" : "0")).join("")) };
            }""",
            [text, mask],
        )
    )


def _assert_signed_by(
    requests: list[dict[str, Any]], public_key_text: str, custodian_origin: str
) -> None:
    """Every /patient request carries a valid signature by the patient's key, addressed
    to the custodian's origin."""
    public_key = parse_public_key(public_key_text)
    assert requests
    for request in requests:
        parsed = parse_headers(request["headers"], custodian_origin)
        assert parsed.signer == "patient:" + public_key_text
        url = urlsplit(request["url"])
        check_signature(
            parsed,
            request["method"],
            url.path,
            url.query,
            hashlib.sha256(request["body"]).digest(),
            public_key,
            parsed.timestamp,
            0,
        )


class TestPatientStory:
    def test_create_enroll_preview_grant_fetch_access_revoke_denial(
        self, hospitals: Hospitals
    ) -> None:
        a, b = hospitals.a, hospitals.b
        patient_requests: list[dict[str, Any]] = []
        with chromium_session("wallet", viewport=PHONE) as browser:
            page = browser.new_page()

            def record(request: Any) -> None:
                if urlsplit(request.url).path.startswith("/patient/"):
                    patient_requests.append(
                        {
                            "url": request.url,
                            "method": request.method,
                            "headers": dict(request.headers),
                            "body": request.post_data_buffer or b"",
                        }
                    )

            page.on("request", record)
            page.goto(a.url + "/wallet/")
            _ready(page, "setup")
            assert "another hospital" in str(page.text_content("#screen-setup .hint"))
            _fits_and_passes_axe(page, "1-setup")

            page.fill("#create-passphrase", PASSPHRASE)
            page.fill("#create-passphrase2", PASSPHRASE + "x")
            page.click("#create-button")
            page.wait_for_selector("#message:not([hidden])")
            assert page.text_content("#message") == (
                "The two passphrases are not the same: type them again."
            )
            page.fill("#create-passphrase2", PASSPHRASE)
            page.click("#create-button")
            # The guided backup: the passphrase is asked again before the file is given.
            _ready(page, "backup")
            assert page.is_visible("#backup-reminder")
            _fits_and_passes_axe(page, "2-backup")
            page.click("#backup-button")
            page.wait_for_selector("#confirm[open]")
            _fits_and_passes_axe(page, "2-backup-confirm")
            with page.expect_download() as download:
                _confirm(page)
            page.click("#backup-done")
            _ready(page, "key")
            assert not page.is_visible("#backup-reminder")
            key_text = str(page.text_content("#pubkey")).strip()
            assert page.get_attribute("#pubkey-qr svg", "data-text") == key_text
            page.wait_for_function(
                "document.querySelector('#enrollment').textContent.includes('Not enrolled')"
            )
            _fits_and_passes_axe(page, "2-key")
            backup = hospitals.base / "browser-backup.json"
            download.value.save_as(backup)
            sealed = json.loads(backup.read_text())
            assert (sealed["format"], sealed["kdf"], sealed["cipher"]) == (
                "imageshare-wallet-backup",
                "PBKDF2-SHA256",
                "AES-256-GCM",
            )

            # The desk enrolls the key it reads off the phone; the Key screen notices.
            a.cli("enroll", "--patient-id", MRN, f"--key={key_text}")
            # (A selector, not wait_for_function: the page's CSP forbids the eval it polls with.)
            page.wait_for_selector("#enrollment:has-text('You are enrolled')", timeout=20_000)

            # Locked, the wallet shows the lock screen instead of the studies, and signs
            # nothing until the passphrase opens it.
            page.click("#lock-button")
            _ready(page, "key")
            signed_before = len(patient_requests)
            page.click('#tabs button[data-screen="studies"]')
            page.wait_for_selector('body[data-screen="lock"][data-ready="true"]')
            _fits_and_passes_axe(page, "3-locked")
            page.fill("#unlock-passphrase", "not the passphrase")
            page.click("#unlock-button")
            page.wait_for_selector("#message:not([hidden])")
            assert "Wrong passphrase" in str(page.text_content("#message"))
            assert len(patient_requests) == signed_before
            page.fill("#unlock-passphrase", PASSPHRASE)
            page.click("#unlock-button")
            _ready(page, "studies")
            assert page.locator("#studies-list li.study").count() == 2
            series_count = len(hospitals.study.series_uids) + 1
            page.wait_for_function(
                f"[...document.querySelectorAll('img.preview')].filter("
                f"(i) => i.complete && i.naturalWidth > 0).length === {series_count}"
            )
            assert "CT CHEST" in page.text_content("#studies-list")
            assert "CT HEAD" in page.text_content("#studies-list")
            # Hospitals by name (the host, with no display name in the roster); the
            # option's value is the origin the grant names.
            assert page.locator("#grantee option").all_text_contents() == ["b.example"]
            assert page.locator("#grantee option").get_attribute("value") == b.origin
            _fits_and_passes_axe(page, "3-studies")

            chest = page.locator("#studies-list li.study", has_text="CT CHEST")
            chest_ref = str(chest.get_attribute("data-ref"))
            chest.locator("input.choose").check()
            page.select_option("#lifetime", "86400")
            # Share says in a sentence what goes to whom until when, and asks the
            # passphrase again: a wrong one shares nothing.
            page.click("#grant-button")
            page.wait_for_selector("#confirm[open]")
            sentence = str(page.text_content("#confirm-text"))
            assert sentence.startswith("You are about to let b.example see CT CHEST of ")
            assert " until " in sentence
            page.fill("#confirm-passphrase", "not the passphrase")
            page.click("#confirm-ok")
            page.wait_for_selector("#confirm-error:not([hidden])")
            assert not any(r["url"].endswith("/patient/grants") for r in patient_requests)
            _fits_and_passes_axe(page, "4-share-confirm")
            _confirm(page)
            _ready(page, "share")
            url = str(page.text_content("#share-url")).strip()
            assert url.startswith("imageshare:grant?t=")
            assert page.get_attribute("#share-qr svg", "data-text") == url
            assert "show this code to the staff" in str(page.text_content("#share-how"))
            _fits_and_passes_axe(page, "4-share")

            grant = decode_grant(parse_token_text(url))
            assert grant.signature_valid()
            assert grant.patient_key == parse_public_key(key_text)
            assert (grant.fields.custodian, grant.fields.grantee) == (a.origin, b.origin)
            assert grant.fields.scope is not None and len(grant.fields.scope) == 1
            assert grant.fields.expires - grant.fields.not_before == 86400
            token_id = grant.token_id.hex()
            assert page.text_content("#share-token-id") == token_id
            browser_qr = _browser_qr(page, url, 3)
            assert browser_qr["rows"] == _python_qr(url, browser_qr["version"], 3)

            fetched = json.loads(b.cli("fetch", url, "--json").stdout)
            assert fetched["instances"] == len(hospitals.study.files)

            def activity_shows(kind: str) -> bool:
                _tab(page, "activity")
                event = page.locator(f'li.event[data-kind="{kind}"]')
                return event.count() == 1 and event.get_attribute("data-proven") == "true"

            # Proven = included under A's signed checkpoint and cosigned by B (replication).
            wait_until(lambda: activity_shows("access"), timeout=30, message="a proven access")
            access = page.locator('li.event[data-kind="access"]')
            assert "b.example received CT CHEST" in access.inner_text()
            assert "witnessed by b.example" in access.inner_text()
            _fits_and_passes_axe(page, "5-activity-access")

            _tab(page, "tokens")
            token = page.locator(f'li.token[data-token-id="{token_id}"]')
            assert token.get_attribute("data-status") == "active"
            _fits_and_passes_axe(page, "6-shares")
            token.locator("button.revoke").click()
            page.wait_for_selector("#confirm[open] button.danger")
            assert "Revoke the share with b.example?" in str(page.text_content("#confirm-text"))
            _confirm(page)
            page.wait_for_selector(f'li.token[data-token-id="{token_id}"][data-status="revoked"]')
            _ready(page, "tokens")
            revoked = page.locator(f'li.token[data-token-id="{token_id}"]')
            assert "no longer works" in revoked.inner_text()
            assert revoked.locator("button").count() == 0
            _fits_and_passes_axe(page, "6-revoked")

            refused = b.cli("fetch", url, check=False)
            assert refused.returncode == 1 and "revoked" in refused.stderr
            wait_until(lambda: activity_shows("denial"), timeout=30, message="a proven denial")
            denial = page.locator('li.event[data-kind="denial"]')
            assert "b.example was refused: revoked" in denial.inner_text()
            assert page.locator('li.event[data-kind="revoke"]').count() == 1
            _fits_and_passes_axe(page, "7-activity-denial")

            assert page.foreign_requests(a.url) == []
            paths = {urlsplit(r["url"]).path for r in patient_requests}
            assert {
                "/patient/studies",
                "/patient/roster",
                "/patient/grants",
                "/patient/revocations",
                "/patient/tokens",
                f"/patient/studies/{chest_ref}/series/0/preview",
            } <= paths
            _assert_signed_by(patient_requests, key_text, a.origin)
            # The same requests unsigned, or replayed, are refused.
            for request in patient_requests:
                if request["method"] == "GET":
                    assert _get(a, urlsplit(request["url"]).path, None)[0] == 401
            roster = next(r for r in patient_requests if r["url"].endswith("/patient/roster"))
            replayed = urllib.request.Request(roster["url"], headers=roster["headers"])
            with pytest.raises(urllib.error.HTTPError) as refusal:
                urllib.request.urlopen(replayed, timeout=30)
            assert refusal.value.code == 401 and b"replayed nonce" in refusal.value.read()

        # The sealed backup restores the same key in another browser.
        with chromium_session("wallet-restore", viewport=PHONE) as browser:
            page = browser.new_page()
            page.goto(a.url + "/wallet/")
            _ready(page, "setup")
            page.set_input_files("#restore-file", str(backup))
            page.fill("#restore-passphrase", "not the passphrase")
            page.click("#restore-button")
            page.wait_for_selector("#message:not([hidden])")
            assert "Wrong passphrase" in str(page.text_content("#message"))
            assert _restore(page, a.url, backup, PASSPHRASE) == key_text
            # At 200% text (the root font size, as a browser's text-size setting sets it)
            # every screen still fits the phone and passes axe-core.
            page.evaluate("document.documentElement.style.fontSize = '200%'")
            _wallet_screens_at(page, "10-text-200")
            # "Forget this wallet on this device" leaves the first screen.
            page.click("#forget-button")
            _confirm(page)
            _ready(page, "setup")
            assert page.is_hidden("#tabs")
            _fits_and_passes_axe(page, "10-text-200-setup")

    def test_cli_wallet_restored_in_browser_derives_the_same_key_and_sees_cli_tokens(
        self, hospitals: Hospitals
    ) -> None:
        a, b = hospitals.a, hospitals.b
        wallet = Wallet.create(hospitals.base / "cli-wallet", None)
        cli_key = wallet.key_for(a.origin).public_key_text
        a.cli("enroll", "--patient-id", CLI_MRN, f"--key={cli_key}")

        async def grant() -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:
                return await wallet.grant(session, a.url, b.origin, None, 3600)

        record = asyncio.run(grant())
        with chromium_session("wallet-cli", viewport=PHONE) as browser:
            page = browser.new_page()
            restored = _restore(page, a.url, wallet.files.seed_path, PASSPHRASE)
            assert restored == cli_key
            _tab(page, "tokens")
            token = page.locator(f'li.token[data-token-id="{record["token_id"]}"]')
            assert token.get_attribute("data-status") == "active"
            assert "To b.example" in token.inner_text()
            page.shot("8-cli-tokens")


def _enroll(node: NodeProcess, patient_id: str) -> PatientKey:
    key = PatientKey.derive(os.urandom(32), node.origin)
    node.cli("enroll", "--patient-id", patient_id, f"--key={key.public_key_text}")
    return key


def _get(node: NodeProcess, path: str, key: PatientKey | None) -> tuple[int, str, bytes]:
    headers = {} if key is None else signed_headers(key, "GET", path)
    request = urllib.request.Request(node.url + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


class TestPreviewEndpoint:
    def test_a_preview_is_served_only_to_the_studys_patient(self, hospitals: Hospitals) -> None:
        a = hospitals.a
        owner = _enroll(a, "MRN-PREVIEW-OWNER")
        other = _enroll(a, "MRN-PREVIEW-OTHER")
        make_ct_study(
            hospitals.base / "preview", series=1, slices=3, rows=300, columns=200,
            patient_id="MRN-PREVIEW-OWNER",
        )  # fmt: skip
        a.cli("import", str(hospitals.base / "preview"))
        _, _, body = _get(a, "/patient/studies", owner)
        (study,) = json.loads(body)["studies"]
        series_path = f"/patient/studies/{study['ref']}/series"
        status, _, body = _get(a, series_path, owner)
        assert status == 200
        assert json.loads(body)["series"] == [
            {"position": 0, "modality": "CT", "description": "Series 1", "instances": 3}
        ]
        path = f"{series_path}/0/preview"

        status, content_type, png = _get(a, path, owner)
        assert (status, content_type) == (200, "image/png")
        with Image.open(io.BytesIO(png)) as image:
            assert max(image.size) == 160 and image.size == (107, 160)

        assert _get(a, path, None)[0] == 401
        status, _, body = _get(a, path, other)
        assert status == 403 and "not one of yours" in json.loads(body)["error"]
        assert _get(a, f"{series_path}/5/preview", owner)[0] == 404
        assert _get(a, "/patient/studies/not-a-ref/series/0/preview", owner)[0] == 400


VECTORS: dict[str, Any] = rfc6962_vectors()


@pytest.fixture(scope="class")
def wallet_page(hospitals: Hospitals) -> Iterator[Any]:
    """A browser page on the wallet's origin, to call its modules directly."""
    with chromium_session("wallet-modules", viewport=PHONE) as browser:
        page = browser.new_page()
        page.goto(hospitals.a.url + "/wallet/")
        _ready(page, "setup")
        yield page


def _call(page: Any, module: str, body: str, argument: Any) -> Any:
    """Run ``body`` (an async function of (module, argument)) against a wallet module."""
    script = (
        f"async (arg) => {{ const m = await import('/wallet/{module}'); return ({body})(m, arg); }}"
    )
    return page.evaluate(script, argument)


class TestWalletModules:
    def test_inclusion_proofs_verify_as_rfc6962_says(self, wallet_page: Any) -> None:
        leaves = VECTORS["leaf_hashes_hex"]
        roots = VECTORS["roots_hex_by_size"]
        cases = [
            {
                "leaf": leaves[p["leaf_index"]],
                "index": p["leaf_index"],
                "size": p["tree_size"],
                "root": roots[str(p["tree_size"])],
                "proof": p["proof"],
            }
            for p in VECTORS["all_inclusion_proofs_sizes_1_8"]
        ]
        results = _call(
            wallet_page,
            "ledger.js",
            """async (m, cases) => {
                const { fromHex } = await import('/wallet/bytes.js');
                const out = [];
                for (const c of cases) {
                    const args = [fromHex(c.leaf), c.index, c.size, fromHex(c.root)];
                    const proof = c.proof.map(fromHex);
                    const good = await m.verifyInclusion(proof, ...args);
                    let bad = false;
                    if (proof.length) {
                        proof[0][0] ^= 1;
                        bad = await m.verifyInclusion(proof, ...args);
                    }
                    const moved = await m.verifyInclusion(c.proof.map(fromHex),
                        args[0], c.index + 1, c.size, args[3]);
                    out.push([good, bad, moved]);
                }
                return out;
            }""",
            cases,
        )
        assert len(results) == len(cases) > 30
        assert all(good and not bad and not moved for good, bad, moved in results)

    def test_checkpoints_and_cosignatures_verify_and_tampering_does_not(
        self, wallet_page: Any
    ) -> None:
        example = VECTORS["derived_checkpoint_example"]
        vkey = VECTORS["signed_note_go_vectors"]["vkey_peter"]
        note = example["checkpoint"] + example["cosignature_line"]
        result = _call(
            wallet_page,
            "ledger.js",
            """async (m, [note, vkey, witness]) => {
                const checkpoint = await m.verifyCheckpoint(note, vkey);
                const cosigners = await m.validCosigners(note, [witness, vkey]);
                const errors = [];
                for (const bad of [note.replace("\\n8\\n", "\\n9\\n"), note.split("\\n\\n")[0]]) {
                    try { await m.verifyCheckpoint(bad, vkey); errors.push(null); }
                    catch (e) { errors.push(e.message); }
                }
                const forged = note.replace("\\n8\\n", "\\n9\\n");
                return { size: checkpoint.size, origin: checkpoint.origin, cosigners, errors,
                         forgedCosigners: await m.validCosigners(forged, [witness]) };
            }""",
            [note, vkey, example["witness_vkey"]],
        )
        assert (result["size"], result["origin"]) == (8, "PeterNeumann")
        assert result["cosigners"] == ["PeterNeumann-witness"]
        assert result["forgedCosigners"] == []
        assert "does not verify" in result["errors"][0]
        assert result["errors"][1] is not None

    def test_a_changed_log_key_is_refused(self, wallet_page: Any, hospitals: Hospitals) -> None:
        pin = "pin:" + hospitals.a.origin
        set_pin = "async (m, [name, value]) => m.store.put(name, value)"
        _call(wallet_page, "keys.js", set_pin, [pin, hospitals.b.vkey])
        try:
            wallet_page.reload()
            wallet_page.wait_for_selector("#message:not([hidden])")
            message = str(wallet_page.text_content("#message"))
            assert f"The log key of {hospitals.a.origin} changed" in message
        finally:
            _call(wallet_page, "keys.js", set_pin, [pin, hospitals.a.vkey])

    def test_an_address_now_naming_another_custodian_is_refused(
        self, wallet_page: Any, hospitals: Hospitals
    ) -> None:
        # As if this address had first answered as B: the page must not go on to sign
        # requests addressed to (and with a key derived for) the origin it names now.
        get_node = "async (m) => m.store.get('node')"
        set_node = "async (m, value) => m.store.put('node', value)"
        honest = _call(wallet_page, "keys.js", get_node, None)
        _call(wallet_page, "keys.js", set_node, {**honest, "origin": hospitals.b.origin})
        try:
            wallet_page.reload()
            wallet_page.wait_for_selector("#message:not([hidden])")
            message = str(wallet_page.text_content("#message"))
            assert f"was {hospitals.b.origin} when this wallet first saw it" in message
            assert f"now {hospitals.a.origin}" in message
        finally:
            _call(wallet_page, "keys.js", set_node, honest)

    def test_msgpack_decodes_only_canonical_bytes(self, wallet_page: Any) -> None:
        entry = canonical_encode({"v": 1, "kind": "x", "prev": b"\0" * 32, "time": 1_800_000_000})
        samples = {
            "entry": entry.hex(),
            "non_minimal_int": "cc05",
            "unsorted_map": "82a16201a16102",
            "trailing": "0101",
            "float": "ca3f800000",
            "big_int": "cf0020000000000000",
        }
        result = _call(
            wallet_page,
            "msgpack.js",
            """async (m, samples) => {
                const { fromHex, toHex } = await import('/wallet/bytes.js');
                const out = {};
                for (const [name, hex] of Object.entries(samples)) {
                    try { out[name] = toHex(m.encode(m.decode(fromHex(hex)))); }
                    catch (e) { out[name] = "refused"; }
                }
                return out;
            }""",
            samples,
        )
        assert result == {
            "entry": entry.hex(),
            "non_minimal_int": "refused",
            "unsorted_map": "refused",
            "trailing": "refused",
            "float": "refused",
            "big_int": "refused",
        }


class TestInstallableApp:
    def test_the_installed_app_shows_my_key_with_no_network(self, hospitals: Hospitals) -> None:
        a = hospitals.a
        with chromium_session("wallet-offline", PHONE, service_workers="allow") as browser:
            page = browser.new_page()
            key_text = _create_key(page, a.url)
            manifest = page.evaluate("fetch('manifest.webmanifest').then((r) => r.json())")
            assert (manifest["display"], manifest["start_url"]) == ("standalone", "./")
            page.evaluate("navigator.serviceWorker.ready.then(() => true)")
            wait_until(
                lambda: page.evaluate(
                    "navigator.serviceWorker.controller !== null && caches.keys()"
                    ".then((names) => Promise.all(names.map((n) => caches.open(n))))"
                    ".then((all) => Promise.all(all.map((c) => c.keys())))"
                    ".then((lists) => lists.flat().length >= 12)"
                ),
                message="the service worker to control the page and keep the app's files",
            )
            page.context.set_offline(True)
            try:
                page.reload()
                _ready(page, "key")
                assert str(page.text_content("#pubkey")).strip() == key_text
                assert page.get_attribute("#pubkey-qr svg", "data-text") == key_text
                assert "No connection" in str(page.text_content("#message"))
                page.shot("9-offline-key")
            finally:
                page.context.set_offline(False)


def _image_file(
    directory: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **extra: Any
) -> Path:
    """A Secondary Capture file holding ``pixels`` (frames x rows x columns [x 3])."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    frames, rows, columns = pixels.shape[:3]
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel = 3 if pixels.ndim == 4 else 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 4:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for name, value in extra.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.tobytes()
    path = directory / f"{generate_uid()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _grey(image: Image.Image, x: int, y: int) -> int:
    value = image.getpixel((x, y))
    assert isinstance(value, int)
    return value


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _virtual_authenticator(cdp: Any, prf: bool) -> str:
    """A platform authenticator (Chromium's virtual one, over a CDP session) that verifies
    the user at once, with or without the PRF extension; its id."""
    options = {
        "protocol": "ctap2",
        "transport": "internal",
        "hasResidentKey": True,
        "hasUserVerification": True,
        "isUserVerified": True,
        "automaticPresenceSimulation": True,
        "hasPrf": prf,
    }
    added = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": options})
    return str(added["authenticatorId"])


class TestPasskeyLock:
    def test_a_passkey_with_prf_unlocks_the_same_key_and_one_without_is_refused(
        self, hospitals: Hospitals
    ) -> None:
        # WebAuthn takes a domain, not an IP address, as the page's origin.
        url = hospitals.a.url.replace("127.0.0.1", "localhost")
        with chromium_session("wallet-passkey", PHONE) as browser:
            page = browser.new_page()
            cdp = page.context.new_cdp_session(page.page)
            cdp.send("WebAuthn.enable")
            without_prf = _virtual_authenticator(cdp, prf=False)
            key_text = _create_key(page, url)
            page.click("#passkey-button")
            _confirm(page)
            page.wait_for_selector("#message:has-text('cannot lock the wallet')")
            assert not page.is_hidden("#passkey-button"), "still offered: nothing was stored"
            cdp.send("WebAuthn.removeVirtualAuthenticator", {"authenticatorId": without_prf})
            _virtual_authenticator(cdp, prf=True)
            page.click("#passkey-button")
            page.wait_for_selector("#confirm[open]")
            page.fill("#confirm-passphrase", "not the passphrase")
            page.click("#confirm-ok")
            page.wait_for_selector("#confirm-error:not([hidden])")
            page.fill("#confirm-passphrase", PASSPHRASE)
            page.click("#confirm-ok")
            page.wait_for_selector("#message:has-text('unlock with your passkey')")
            assert page.is_hidden("#passkey-button")
            stored = page.evaluate(
                "new Promise((ok) => { const r = indexedDB.open('imageshare-wallet');"
                " r.onsuccess = () => { const g = r.result.transaction('kv')"
                ".objectStore('kv').get('wallet'); g.onsuccess = () => ok(g.result); }; })"
            )
            assert set(stored["passkey"]) == {"credential", "prfSalt", "hkdfSalt", "iv", "box"}
            assert "seedKey" not in stored and stored["backup"]["kdf"] == "PBKDF2-SHA256"
            page.click("#lock-button")  # locks: the Key screen, locked, offers Unlock
            _ready(page, "key")
            page.click("#lock-button")
            _ready(page, "lock")
            page.shot("1-lock-with-passkey")
            page.click("#passkey-unlock-button")
            _ready(page, "key")
            assert str(page.text_content("#pubkey")).strip() == key_text
            assert page.text_content("#lock-button") == "Lock the wallet now"
            # The passphrase still unlocks it.
            page.click("#lock-button")
            _ready(page, "key")
            page.click("#lock-button")
            _ready(page, "lock")
            page.fill("#unlock-passphrase", PASSPHRASE)
            page.click("#unlock-button")
            _ready(page, "key")
            assert str(page.text_content("#pubkey")).strip() == key_text


class TestRenderPreview:
    def test_the_middle_frame_is_shown_dark_to_bright_as_stored(self, tmp_path: Path) -> None:
        ramp = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (50, 1))  # dark left
        frames = np.stack([ramp[:, ::-1], ramp, ramp[:, ::-1]])
        image = _png(render_preview(_image_file(tmp_path, frames), LIMITS))
        assert (image.mode, image.size) == ("L", (100, 50))
        assert _grey(image, 0, 25) < 20 and _grey(image, 99, 25) > 235

    def test_monochrome1_is_inverted(self, tmp_path: Path) -> None:
        ramp = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (50, 1))[np.newaxis]
        image = _png(render_preview(_image_file(tmp_path, ramp, "MONOCHROME1"), LIMITS))
        assert _grey(image, 0, 25) > 235 and _grey(image, 99, 25) < 20

    def test_the_stored_window_is_applied(self, tmp_path: Path) -> None:
        ramp = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (50, 1))[np.newaxis]
        # Everything above 1000 is white in this window, so most of the ramp saturates.
        path = _image_file(tmp_path, ramp, WindowCenter=500, WindowWidth=1000)
        image = _png(render_preview(path, LIMITS))
        assert _grey(image, 50, 25) == _grey(image, 99, 25) == 255
        assert _grey(image, 5, 25) < 128

    def test_colour_stays_colour_and_large_images_shrink(self, tmp_path: Path) -> None:
        rgb = np.zeros((1, 400, 600, 3), dtype=np.uint8)
        rgb[..., 0] = 255  # red
        image = _png(render_preview(_image_file(tmp_path, rgb, "RGB"), LIMITS))
        assert (image.mode, image.size) == ("RGB", (160, 107))

    def test_a_file_without_pixels_is_refused(self) -> None:
        with pytest.raises(BadInput, match="cannot be previewed"):
            render_preview(Path(str(get_testdata_file("rtplan.dcm"))), LIMITS)


class TestWalletPages:
    def test_files_are_served_by_name_with_a_same_origin_policy(self, hospitals: Hospitals) -> None:
        a = hospitals.a
        with urllib.request.urlopen(a.url + "/wallet", timeout=10) as response:
            assert response.url == a.url + "/wallet/"
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            policy = response.headers["Content-Security-Policy"]
            etag = response.headers["ETag"]
        assert "default-src 'self'" in policy and "connect-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        revalidate = urllib.request.Request(a.url + "/wallet/", headers={"If-None-Match": etag})
        with pytest.raises(urllib.error.HTTPError) as not_modified:
            urllib.request.urlopen(revalidate, timeout=10)
        assert not_modified.value.code == 304
        for name, content_type in [
            ("app.js", "text/javascript; charset=utf-8"),
            ("manifest.webmanifest", "application/manifest+json"),
        ]:
            with urllib.request.urlopen(f"{a.url}/wallet/{name}", timeout=10) as response:
                assert response.headers["Content-Type"] == content_type
        for missing in ["nothing.js", "..%2Fnode.toml", "%2e%2e/node.toml"]:
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{a.url}/wallet/{missing}", timeout=10)
            assert refused.value.code == 404
