"""The admin dashboard in headless Chromium, on node B of a running 3-node federation.

A is the custodian, B the grantee whose dashboard is watched, C a third member. B reaches
A through a throttling TCP proxy, so that a transfer lasts long enough to be watched.
C's identity also has a second, rewritten history (a fork in another data directory),
started at C's address late in the story so that B catches C equivocating.

The browser tests are one story in order (one federation, one browser for the module);
each step asserts on what the page shows and keeps a screenshot in
test-artifacts/dashboard/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from aiohttp import web

from node.config import load_config
from node.core.consent import sign_revocation, token_id_of, token_text
from node.core.entries import Enroll, LedgerEntry, encode_entry
from node.core.keys import NodeIdentity
from node.core.origins import log_id
from node.core.patient_keys import PatientKey
from node.core.roster import key_fingerprint
from node.errors import BadInput
from node.samples import SyntheticStudy, make_ct_study
from node.services.roster import add_peer
from node.services.status import StudyQuery, describe_entry
from node.store.ledger import LedgerStore
from node.store.secrets import read_seed
from tests.support.browser import ChromiumSession, RecordedPage, chromium_session
from tests.support.hostile import HostileServer
from tests.support.mail import MailReceiver
from tests.support.nodes import NodeProcess, free_port, init_node, wait_until
from tests.support.patients import enroll_new_key, make_grant
from tests.support.proxy import TcpProxy

# A description that would load an image from another origin if it were put in the page
# as HTML: the page must show it as text and make no such request.
HOSTILE_DESCRIPTION = '<img src="http://192.0.2.7/x.png">'


@dataclass
class Federation:
    a: NodeProcess
    b: NodeProcess
    c: NodeProcess
    c_fork: NodeProcess
    proxy: TcpProxy
    fetched: SyntheticStudy
    local: SyntheticStudy
    patient: PatientKey
    webhook: HostileServer
    mail: MailReceiver
    # B's data directory is a small tmpfs of its own (when the tests may mount one), so
    # that the disk can be filled for real; else "disk low" holds from the start (a
    # threshold of 1%).
    b_disk_is_tmpfs: bool


# B's alerts: a webhook and e-mail to the receivers the test runs, checked every 0.3 s.
ALERTS = """[alerts]
webhook_url = "{webhook}"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
smtp_starttls = false
smtp_from = "imageshare@b.example"
smtp_to = ["it@b.example"]
check_interval = 0.3
disk_full_percent = {disk_percent}
"""
B_DISK_BYTES = 96 * 1024**2


def _mount_tmpfs(directory: Path) -> bool:
    """A tmpfs of B_DISK_BYTES at ``directory``, if this process may mount one."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={B_DISK_BYTES}", "tmpfs", str(directory)],
        capture_output=True,
    )
    return mounted.returncode == 0


def _quiet(node: NodeProcess) -> None:
    node.config.write_text(
        node.config.read_text().replace("[dimse]\n", "[dimse]\nenabled = false\n")
    )
    node.append_config("[federation]\ndiscovery = false\nreplicate_interval = 0.3")


def _member(node: NodeProcess, other: NodeProcess, url: str) -> None:
    add_peer(load_config(node.config), other.origin, url, other.vkey)


def _append_history(node: NodeProcess, count: int, tag: bytes) -> None:
    """``count`` enroll entries in a stopped node's own log, and a signed checkpoint."""
    identity = NodeIdentity(node.origin, read_seed(node.data_dir / "node.key"))
    store = LedgerStore(node.data_dir)
    try:
        own = store.own_log(node.origin, node.vkey)
        now = int(time.time())
        items = [
            (Enroll(subject=os.urandom(32), key=(tag * 32)[:32], replaces=None), now)
            for _ in range(count)
        ]
        own.append_many(items)
        own.publish_checkpoint(identity, now)
    finally:
        store.close()


def _fork_of(node: NodeProcess) -> NodeProcess:
    """The same identity, at the same address, in a copy of its data directory."""
    fork_dir = node.data_dir.parent / f"{node.data_dir.name}-fork"
    shutil.copytree(node.data_dir, fork_dir)
    (fork_dir / "daemon.log").unlink(missing_ok=True)
    return NodeProcess(
        fork_dir, node.origin, node.http_port, node.dimse_port, node.vkey, node.admin_token
    )


def _describe_study(study: SyntheticStudy, description: str) -> None:
    for path in study.files:
        dataset = pydicom.dcmread(path)
        dataset.StudyDescription = description
        dataset.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("dashboard")
    b_disk_is_tmpfs = _mount_tmpfs(base / "b")
    webhook = HostileServer()
    webhook.respond = lambda got: web.json_response({"ok": True})
    mail = MailReceiver()
    pool = ThreadPoolExecutor(3)
    a, b, c = pool.map(
        lambda origin: init_node(base, origin), [f"{n}.example/imageshare" for n in "abc"]
    )
    proxy = TcpProxy(a.http_port)
    for node in (a, b, c):
        _quiet(node)
    # A forwards to a PACS that is not there: failures and retries to show.
    pacs_port = free_port()
    a.append_config(
        f'[forward]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
        "initial_backoff = 60"
    )
    b.append_config(
        ALERTS.format(
            webhook=webhook.url + "/alerts",
            smtp_port=mail.port,
            disk_percent=90 if b_disk_is_tmpfs else 1,
        )
    )
    _member(a, b, b.url)
    _member(a, c, c.url)
    _member(b, a, proxy.url)
    _member(b, c, c.url)
    _member(c, a, a.url)
    _member(c, b, b.url)
    c_fork = _fork_of(c)
    _append_history(c, 2, b"o")
    _append_history(c_fork, 5, b"f")  # does not extend c's history: a second one
    # About 3 MB: a few seconds through the throttled proxy.
    fetched = make_ct_study(
        base / "fetched", series=2, slices=12, rows=256, columns=256,
        patient_id="MRN-FETCH-7", patient_name="Fetch^Frida",
    )  # fmt: skip
    local = make_ct_study(base / "local", series=1, slices=2, patient_id="MRN-LOCAL-3",
                          patient_name="Local^Lucy", accession="ACC-LOCAL")  # fmt: skip
    _describe_study(local, HOSTILE_DESCRIPTION)
    nodes = [a, b, c]

    def prepare_a() -> PatientKey:
        a.cli("import", str(base / "fetched"))
        return enroll_new_key(a, fetched.patient_id)

    try:
        patient = pool.submit(prepare_a)
        b.cli("import", str(base / "local"))
        patient.result()
        list(pool.map(NodeProcess.start, nodes))
        yield Federation(
            a, b, c, c_fork, proxy, fetched, local, patient.result(), webhook, mail,
            b_disk_is_tmpfs,
        )  # fmt: skip
    finally:
        list(pool.map(NodeProcess.stop, [*nodes, c_fork]))
        pool.shutdown()
        proxy.stop()
        webhook.stop()
        mail.stop()
        if b_disk_is_tmpfs:
            subprocess.run(["umount", str(base / "b")], check=False)


@pytest.fixture(scope="module")
def browser(fed: Federation) -> Iterator[ChromiumSession]:
    with chromium_session("dashboard") as session:
        yield session


@pytest.fixture(scope="module")
def page(fed: Federation, browser: ChromiumSession) -> Iterator[RecordedPage]:
    """B's dashboard, signed in; after the story, proof that it asked only its own node."""
    page = browser.new_page()
    page.goto(fed.b.url + "/admin")
    page.locator("#token").fill(fed.b.admin_token)
    page.locator("#login-form button[type=submit]").click()
    page.locator("#node .facts").wait_for()
    yield page
    assert page.foreign_requests(fed.b.url) == []


def _api(node: NodeProcess, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(
        node.url + path, data=data, headers=headers, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _fetch(fed: Federation, grantee: NodeProcess) -> str:
    """B starts fetching what the patient granted to ``grantee``; returns the job id."""
    grant = make_grant(fed.patient, fed.a.origin, grantee.origin)
    status, job = _api(fed.b, "/admin/api/fetch", fed.b.admin_token, {"token": token_text(grant)})
    assert status == 202, job
    return str(job["id"])


def _peer_row(page: RecordedPage, node: NodeProcess, state: str = "") -> Any:
    """The peers table row of ``node``; ``state`` adds attribute conditions."""
    return page.locator(f'#peers tr[data-origin="{node.origin}"]{state}')


class TestWithoutTheToken:
    def test_api_refuses_every_call_without_the_admin_token(self, fed: Federation) -> None:
        for path, body in (
            ("/admin/api/status", None),
            ("/admin/api/studies?q=Lucy", None),
            ("/admin/api/audit", {}),
        ):
            assert _api(fed.b, path, None, body)[0] == 401
            assert _api(fed.b, path, "wrong-token", body)[0] == 401

    def test_page_asks_for_the_token_and_shows_nothing_of_the_node(
        self, fed: Federation, browser: ChromiumSession
    ) -> None:
        page = browser.new_page()
        page.goto(fed.b.url + "/admin")
        page.locator("#token").wait_for(state="visible")
        assert page.locator("#dashboard").is_hidden()
        text = page.locator("body").inner_text()
        assert fed.b.origin not in text and "Lucy" not in text
        page.shot("01-login")
        assert page.accessibility_violations() == []
        assert page.horizontal_overflow() <= 0
        page.locator("#token").fill("not-the-token")
        page.locator("#login-form button[type=submit]").click()
        page.locator("#login-error").filter(has_text="refused").wait_for()
        assert page.locator("#dashboard").is_hidden()
        assert fed.b.origin not in page.locator("body").inner_text()
        page.shot("02-wrong-token")
        # The only API call was the refused one; the page asked nothing else of the node.
        calls = [u for u in page.requests if "/admin/api/" in u]
        assert calls == [fed.b.url + "/admin/api/status"]
        assert page.foreign_requests(fed.b.url) == []
        page.close()

    def test_a_token_refused_later_brings_back_the_login_and_clears_the_page(
        self, fed: Federation, browser: ChromiumSession
    ) -> None:
        page = browser.new_page()
        page.goto(fed.b.url + "/admin")
        page.locator("#token").fill(fed.b.admin_token)
        page.locator("#login-form button[type=submit]").click()
        page.locator("#node .facts").filter(has_text=fed.b.origin).wait_for()
        # As if the node's admin token had been replaced: the next poll is refused.
        page.evaluate("sessionStorage.setItem('imageshare.admin-token', 'replaced')")
        page.locator("#login-error").filter(has_text="refused").wait_for()
        assert page.locator("#dashboard").is_hidden()
        assert fed.b.origin not in page.locator("body").inner_text()
        assert page.locator("#dashboard td").count() == 0
        page.close()

    def test_page_sets_a_policy_that_allows_its_own_origin_only(self, fed: Federation) -> None:
        with urllib.request.urlopen(fed.b.url + "/admin", timeout=10) as response:
            policy = response.headers["Content-Security-Policy"]
            assert "set-cookie" not in {k.lower() for k in response.headers}
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        with urllib.request.urlopen(fed.b.url + "/admin/", timeout=10) as response:
            assert response.url == fed.b.url + "/admin"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(fed.b.url + "/admin/static/..%2fadmin.py", timeout=10)
        assert refused.value.code == 404


class TestDashboard:
    def test_shows_the_node_its_peers_and_its_log_at_a_glance(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        node = page.locator("#node")
        assert fed.b.origin in node.inner_text()
        fingerprint = key_fingerprint(
            NodeIdentity(fed.b.origin, read_seed(fed.b.data_dir / "node.key")).public_key
        )
        assert fingerprint in node.inner_text()
        assert "1 studies · 1 series · 2 instances" in node.inner_text()
        for member in (fed.a, fed.c):
            _peer_row(page, member, '[data-reachable="true"]').wait_for()
        # C's log (2 entries) is mirrored here; sizes here and there agree.
        _peer_row(page, fed.c).locator("td", has_text="2 / 2").wait_for()
        # B and its peers witness each other's logs.
        _peer_row(page, fed.a).filter(has_text="we cosigned theirs at size").wait_for()
        assert "Entries" in page.locator("#log").inner_text()
        strip = page.locator("#health-items")
        if fed.b_disk_is_tmpfs:
            strip.locator('li[data-kind="ok"]', has_text="All good").wait_for()
        page.shot("03-overview")
        assert page.accessibility_violations() == []
        assert page.horizontal_overflow() <= 0

    def test_studies_are_searchable_and_hostile_text_stays_text(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        row = page.locator(f'#studies tr[data-study="{fed.local.study_uid}"]')
        row.wait_for()
        assert HOSTILE_DESCRIPTION in row.inner_text()
        assert page.locator("#studies img").count() == 0
        assert "local" in row.locator("td.source").inner_text()
        link = row.locator("a").get_attribute("href")
        assert link == f"{fed.b.url}/dicomweb/studies/{fed.local.study_uid}/metadata"
        page.locator("#study-search").fill("nobody-by-this-name")
        page.locator("#studies", has_text="No study matches.").wait_for()
        page.locator("#study-search").fill("lucy")
        row.wait_for()

    def test_studies_are_filtered_by_date_and_modality_paged_and_sorted(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        token = fed.b.admin_token
        _, dated = _api(fed.b, "/admin/api/studies?from=2026-01-01&to=2026-01-01", token)
        assert fed.local.study_uid in {s["study_instance_uid"] for s in dated["studies"]}
        _, other_day = _api(fed.b, "/admin/api/studies?from=1999-01-01&to=1999-12-31", token)
        assert other_day == {"total": 0, "studies": []}
        _, other_kind = _api(fed.b, "/admin/api/studies?modality=MR", token)
        assert other_kind["total"] == 0
        _, past_the_end = _api(fed.b, "/admin/api/studies?offset=5&order=patient", token)
        assert past_the_end["studies"] == [] and past_the_end["total"] >= 1
        assert _api(fed.b, "/admin/api/studies?order=nonsense", token)[0] == 400
        # The page's own controls: a range with nothing in it, then none.
        page.locator("#study-from").fill("1999-01-01")
        page.locator("#study-to").fill("1999-12-31")
        page.locator("#study-to").dispatch_event("change")
        page.locator("#studies", has_text="No study matches.").wait_for()
        page.locator("#study-from").fill("")
        page.locator("#study-to").fill("")
        page.locator("#study-to").dispatch_event("change")
        page.locator(f'#studies tr[data-study="{fed.local.study_uid}"]').wait_for()
        # DA 20260101 as the browser writes that date in its own language.
        local_date = page.evaluate(
            "new Date(2026, 0, 1).toLocaleDateString(undefined, {dateStyle: 'medium'})"
        )
        assert local_date in page.locator("#studies").inner_text()

    def test_a_running_fetch_is_cancelled_from_the_page(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        # Slow enough that no instance (about 130 kB) arrives before the click: what a
        # cancelled fetch stored would be missing from the next test's whole transfer.
        fed.proxy.rate = 10_000
        try:
            job_id = _fetch(fed, fed.b)
            running = page.locator(f'#transfers .running[data-id="{job_id}"]')
            running.locator("button.fetch-cancel").click()
            cancelled = page.locator(f'#transfers tr[data-id="{job_id}"][data-state="cancelled"]')
            cancelled.wait_for()
        finally:
            fed.proxy.rate = None
        assert cancelled.locator("button.fetch-retry").count() == 1
        assert _api(fed.b, f"/admin/api/transfers/{job_id}/cancel", fed.b.admin_token, {})[0] == 409

    def test_a_transfer_is_watched_live_then_listed_with_size_time_and_speed(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        fed.proxy.rate = 700_000
        try:
            job_id = _fetch(fed, fed.b)
            running = page.locator(f'#transfers .running[data-id="{job_id}"]')
            running.wait_for()
            bar = running.locator("progress")

            def progress() -> float:
                return float(bar.get_attribute("value") or 0) if bar.count() else -1.0

            first = wait_until(lambda: 0 < progress() < 100 and progress(), timeout=15)
            page.shot("04-transfer-running")
            assert f"Fetching from {fed.a.origin}" in running.inner_text()
            second = wait_until(lambda: progress() > first and progress(), timeout=15)
            assert second > first
        finally:
            fed.proxy.rate = None
        done = page.locator(f'#transfers tr[data-id="{job_id}"][data-state="done"]')
        done.wait_for(timeout=30_000)
        text = done.inner_text()
        assert fed.a.origin in text and "24/24" in text and "MB/s" in text
        study = page.locator(f'#studies tr[data-study="{fed.fetched.study_uid}"]')
        page.locator("#study-search").fill("")
        study.wait_for(timeout=10_000)
        assert "Fetch, Frida" in study.inner_text()  # PN Fetch^Frida, as staff read it
        assert f"fetched from {fed.a.origin} under token" in study.inner_text()
        # B's own log now holds the receipt, in plain words.
        receipt = page.locator("#log tr[data-kind=receipt]").first
        receipt.wait_for()
        assert "received 24 instance(s)" in receipt.inner_text()
        assert fed.a.origin in receipt.inner_text()
        page.shot("05-transfer-done")

    def test_a_refused_fetch_shows_the_rule_that_failed(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        # Through the page's own form: the patient granted C, not B.
        grant = make_grant(fed.patient, fed.a.origin, fed.c.origin)
        page.locator("#fetch-token").fill(token_text(grant))
        page.locator("#fetch-form button").click()
        # The form's line says it was refused, not that a fetch started.
        page.locator("#fetch-result").filter(
            has_text=f"Refused by {fed.a.origin}: wrong_grantee"
        ).wait_for()
        refused = page.locator('#transfers tr[data-state="refused"]').first
        refused.wait_for()
        assert "wrong_grantee" in refused.locator(".rule").inner_text()
        assert "granted to another node" in refused.inner_text()
        # Retry asks again (a new job), and is refused again, at once.
        refused_id = str(refused.get_attribute("data-id"))
        refused.locator("button.fetch-retry").click()
        page.locator("#notice", has_text=f"Fetching again: {fed.a.origin}.").wait_for()
        page.locator("#fetch-result").filter(
            has_text=f"Refused by {fed.a.origin}: wrong_grantee"
        ).wait_for()
        page.locator('#transfers tr[data-state="refused"]').nth(1).wait_for()
        assert page.locator(f'#transfers tr[data-id="{refused_id}"]').count() == 1
        page.locator("#fetch-token").fill("not a token")
        page.locator("#fetch-form button").click()
        page.locator("#fetch-result").filter(has_text="Not started").wait_for()
        page.shot("06-transfer-refused")

    def test_a_fetch_of_a_study_already_held_says_nothing_moved(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        _, listed = _api(fed.b, "/admin/api/transfers", fed.b.admin_token)
        done = next(j for j in listed["fetches"] if j["state"] == "done")
        status, again = _api(
            fed.b, f"/admin/api/transfers/{done['id']}/retry", fed.b.admin_token, {}
        )
        assert status == 202
        row = page.locator(f'#transfers tr[data-id="{again["id"]}"][data-state="done"]')
        row.wait_for(timeout=30_000)
        assert "already held, nothing transferred" in row.inner_text()
        assert "MB/s" not in row.inner_text()

    def test_a_peer_going_down_and_coming_back_is_shown(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        fed.c.stop()
        row = _peer_row(page, fed.c)
        _peer_row(page, fed.c, '[data-reachable="false"]').wait_for()
        assert "unreachable" in row.locator("td.state").inner_text()
        assert "nothing answers at its address" in row.locator("td.state").inner_text()
        down = page.locator('#health-items li[data-kind="peer_down"]')
        down.wait_for()
        assert re.match(r"\d+ peers? down since ", down.inner_text())
        assert fed.c.origin in down.inner_text()
        page.shot("07-peer-down")
        assert page.accessibility_violations() == []
        fed.c.start()
        _peer_row(page, fed.c, '[data-reachable="true"]').wait_for()
        assert "reachable" in row.locator("td.state").inner_text()
        page.shot("08-peer-back")

    def test_the_audit_button_audits_the_federation_and_shows_the_verdict(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        page.locator("#audit-run").click()
        verdict = page.locator("#audit .verdict")
        verdict.wait_for(timeout=30_000)
        assert "Clean" in verdict.inner_text(), page.locator("#audit").inner_text()
        audit_text = page.locator("#audit").inner_text()
        for node in (fed.a, fed.b, fed.c):
            assert node.origin in audit_text
        assert "not verified" not in audit_text
        page.shot("09-audit-clean")

    def test_an_equivocation_proof_appears_in_red(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        fed.c.stop()
        fed.c_fork.start()  # C's key, C's address, another history
        proof = page.locator(f'#peers .proof[data-origin="{fed.c.origin}"]')
        proof.wait_for(timeout=20_000)
        assert f"Equivocation by {fed.c.origin}" in proof.inner_text()
        color = proof.evaluate("e => getComputedStyle(e).color")
        assert color == "rgb(179, 38, 30)"  # the page's "bad" red
        row = _peer_row(page, fed.c, '[data-trusted="false"]')
        row.wait_for()
        assert "equivocated" in row.inner_text()
        proof.locator("summary").click()
        assert proof.locator("pre").count() == 2
        page.locator('#health-items li[data-kind="equivocation"]').wait_for()
        page.shot("10-equivocation")
        assert page.accessibility_violations() == []
        assert page.horizontal_overflow() <= 0

    def test_each_incident_is_sent_once_by_webhook_and_by_email(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        filler = fed.b.data_dir / "filler.bin"
        if fed.b_disk_is_tmpfs:
            # Fill B's disk past 90% for real; the strip says so.
            usage = shutil.disk_usage(fed.b.data_dir)
            filler.write_bytes(b"\0" * (int(usage.total * 0.95) - (usage.total - usage.free)))
        disk = page.locator('#health-items li[data-kind="disk_low"]')
        disk.wait_for()
        assert "full" in disk.inner_text()
        page.shot("12-alerts")
        kinds = {"peer_down", "equivocation", "disk_low"}

        def incidents() -> dict[str, str]:
            sent = [json.loads(r.body) for r in fed.webhook.received]
            return {m["id"]: m["kind"] for m in sent if m["state"] == "open"}

        wait_until(lambda: kinds <= set(incidents().values()), message="the three alerts")
        # A second's more checks (every 0.3 s) while the conditions still hold: no repeats.
        time.sleep(1.0)
        sent = [json.loads(r.body) for r in fed.webhook.received]
        ids = [m["id"] for m in sent if m["state"] == "open"]
        assert len(ids) == len(set(ids)), "an incident was sent twice by webhook"
        # (A may miss rounds on a loaded machine too: then it has incidents of its own.)
        assert fed.c.origin in {m["subject"] for m in sent if m["kind"] == "peer_down"}
        assert {m["subject"] for m in sent if m["kind"] == "equivocation"} == {fed.c.origin}
        wait_until(lambda: len(fed.mail.messages) >= len(ids), message="one e-mail each")
        mailed = [str(m["Subject"]) for m in fed.mail.messages]
        assert len(mailed) == len(ids)
        for kind in kinds:
            assert sum(kind in subject for subject in mailed) == sum(
                1 for m in sent if m["kind"] == kind
            )
        body = fed.mail.messages[0].get_body()
        assert body is not None and f"Node: {fed.b.origin}" in body.get_content()
        # The test button reaches both channels and says so.
        page.locator("#alert-test").click()
        page.locator("#alert-test-result", has_text="email: sent · webhook: sent").wait_for()
        assert [json.loads(r.body)["state"] for r in fed.webhook.received].count("test") == 1
        filler.unlink(missing_ok=True)
        if fed.b_disk_is_tmpfs:
            disk.wait_for(state="detached")

    def test_the_whole_log_is_paged_and_exported_as_csv(self, fed: Federation) -> None:
        # The custodian's log: enrollments, grants, the access and the denial.
        token = fed.a.admin_token
        status, newest = _api(fed.a, "/admin/api/log?limit=2", token)
        assert status == 200 and len(newest["entries"]) == 2
        size = newest["size"]
        assert [e["index"] for e in newest["entries"]] == [size - 1, size - 2]
        _, older = _api(fed.a, f"/admin/api/log?limit=2&before={newest['next_before']}", token)
        assert older["entries"][0]["index"] == size - 3
        assert _api(fed.a, "/admin/api/log?limit=0", token)[0] == 400
        request = urllib.request.Request(
            fed.a.url + "/admin/api/log.csv", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
            lines = response.read().decode().splitlines()
        assert lines[0] == "index,time_utc,kind,token_id,other_party,what"
        assert len(lines) - 1 >= size and lines[1].startswith("0,")

    def test_a_peer_is_removed_from_the_page_and_the_cli_refuses_a_non_member(
        self, fed: Federation, page: RecordedPage
    ) -> None:
        page.once("dialog", lambda dialog: dialog.accept())
        _peer_row(page, fed.c).locator("button.remove-peer").click()
        _peer_row(page, fed.c).wait_for(state="detached")
        assert page.locator("#notice").inner_text() == f"Removed {fed.c.origin}."
        refused = fed.b.cli("peers", "remove", fed.c.origin, check=False)
        assert refused.returncode != 0 and "is not a member" in refused.stderr


class TestCustodianView:
    def test_custodian_shows_what_it_sent_what_it_refused_and_its_pacs_retries(
        self, fed: Federation, browser: ChromiumSession
    ) -> None:
        page = browser.new_page()
        page.goto(fed.a.url + "/admin")
        page.locator("#token").fill(fed.a.admin_token)
        page.locator("#login-form button[type=submit]").click()
        sent = page.locator('#transfers tr[data-state="done"]').first
        sent.wait_for()
        assert fed.b.origin in sent.inner_text() and "24/24" in sent.inner_text()
        denial = page.locator("#log tr[data-kind=denial]").first
        denial.wait_for()
        assert "wrong_grantee" in denial.inner_text() and fed.b.origin in denial.inner_text()
        access = page.locator("#log tr[data-kind=access]").first
        assert "sent 24 instance(s)" in access.inner_text()
        forwarding = page.locator("#forwarding")
        forwarding.filter(has_text="Retrying or failed").wait_for()
        assert "PACS at 127.0.0.1" in forwarding.inner_text()
        assert forwarding.locator("tbody tr").count() >= 1
        page.shot("11-custodian")
        # Staff retry one instance now and cancel one (after a confirmation).
        forwarding.locator("tbody tr").first.locator("button.forward-retry").click()
        page.locator("#notice", has_text="Sending it to the PACS now.").wait_for()
        page.once("dialog", lambda dialog: dialog.accept())
        forwarding.locator("tbody tr").first.locator("button.forward-cancel").click()
        page.locator("#notice", has_text="Cancelled: it will not be sent.").wait_for()
        assert fed.a.get_json("/admin/api/forwarding")["cancelled"] == 1
        assert page.foreign_requests(fed.a.url) == []
        page.close()


class TestStudyQuery:
    def test_words_and_limit_are_parsed(self) -> None:
        query = StudyQuery.parse("  doe  CT ", "20")
        assert query.words == ("doe", "CT") and query.limit == 20

    @pytest.mark.parametrize(
        ("text", "limit"), [("x" * 201, "10"), ("", "0"), ("", "201"), ("", "ten")]
    )
    def test_bad_searches_are_refused(self, text: str, limit: str) -> None:
        with pytest.raises(BadInput):
            StudyQuery.parse(text, limit)

    def test_dates_modality_page_and_order_are_parsed(self) -> None:
        query = StudyQuery.parse("", "10", "20", "2026-01-01", "", " ct ", "patient")
        assert (query.offset, query.order, len(query.filters)) == (20, "patient", 2)

    @pytest.mark.parametrize(
        ("offset", "date_from", "order"),
        [("-1", "", "arrival"), ("0", "yesterday", "arrival"), ("0", "", "by-mood")],
    )
    def test_bad_pages_dates_and_orders_are_refused(
        self, offset: str, date_from: str, order: str
    ) -> None:
        with pytest.raises(BadInput):
            StudyQuery.parse("", "10", offset, date_from, "", "", order)


def _entry(kind: str, **fields: Any) -> bytes:
    return encode_entry(LedgerEntry(kind, bytes(32), 1_800_000_000, fields))


class TestDescribeEntry:
    def test_every_kind_is_told_in_plain_words_without_study_or_subject_references(
        self,
    ) -> None:
        key = PatientKey.derive(os.urandom(32), "a.example/imageshare")
        token = make_grant(key, "a.example/imageshare", "b.example/imageshare")
        token_id = token_id_of(token)
        study, subject, digest = os.urandom(32), os.urandom(32), os.urandom(32)
        moved = {"token_id": token_id, "study": study, "instances": 3, "bytes": 2_500_000}
        entries = {
            "enroll": _entry("enroll", subject=subject, key=key.public_key, replaces=None),
            "grant": _entry("grant", token=token),
            "revoke": _entry(
                "revoke",
                revocation=sign_revocation(key.public_key, token_id, 1_800_000_000, key.sign),
            ),
            "access": _entry("access", grantee="b.example/imageshare", digest=digest, **moved),
            "receipt": _entry("receipt", custodian="a.example/imageshare", digest=digest, **moved),
            "denial": _entry(
                "denial",
                token_id=token_id,
                requester="c.example/imageshare",
                rule="wrong_grantee",
                study=None,
            ),
            "witness": _entry(
                "witness", log_id=bytes.fromhex(log_id("c.example/imageshare")), size=9, root=digest
            ),
        }
        names = {log_id("c.example/imageshare"): "c.example/imageshare"}
        told = {kind: describe_entry(0, raw, names) for kind, raw in entries.items()}
        assert told["enroll"]["text"] == "a patient key was enrolled"
        assert "granted b.example/imageshare all the patient's studies" in told["grant"]["text"]
        assert told["revoke"]["token_id"] == token_id.hex()
        assert told["access"]["text"].startswith(
            "sent 3 instance(s), 2.5 MB, to b.example/imageshare"
        )
        assert told["receipt"]["party"] == "a.example/imageshare"
        assert told["denial"]["rule"] == "wrong_grantee"
        assert "granted to another node" in told["denial"]["text"]
        assert told["witness"]["text"] == "witnessed c.example/imageshare at size 9"
        shown = json.dumps(told)
        for secret in (study, subject, digest, key.public_key):
            assert secret.hex() not in shown and secret.hex()[:16] not in shown

    def test_garbage_is_described_as_unreadable(self) -> None:
        described = describe_entry(7, b"\xc1not msgpack", {})
        assert described["kind"] == "unreadable" and described["index"] == 7
