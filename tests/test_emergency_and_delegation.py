"""Break-glass and delegation on real nodes (one pair of nodes for both stories).

Break-glass: a patient's emergency policy, a member's emergency fetch.

Custodian A holds the studies of two enrolled patients: one whose wallet signed "any
member may break the glass", one whose wallet signed "never". Member B's clinician runs
`imageshare fetch --emergency` for each. The first is served (a ``break_glass`` entry
before any byte, an ``access`` at A, a ``receipt`` at B) and the patient's log shows it
flagged and proven; the second is refused with the rule and the refusal is a ``denial``
at A; B's next request is over A's per-member limit. The auditor lists the first for
review; then A, turned hostile, writes a break-glass for the second patient into its own
log, and the auditor flags it as served against the policy in force.

Delegation: the first patient delegates the power to grant to another person's key; the
delegate grants B, which fetches; the patient revokes the delegation, and the delegate's
next grant is refused, while the grant it made before keeps working. The second patient
lets a delegate read their tokens and revoke their grants: the delegate does both with
its own key, a delegation without ``view_log`` is refused, the patient's log shows the
revocation as the delegate's, and once the delegation is revoked both are refused. The
auditor passes the first grant and the delegate's revocation, and rejects a grant and a
revocation written into A's log after their delegation's revocation.

Guardian: staff enroll a guardian's key for a minor with no key of their own (A makes and
holds one); the guardian grants B the minor's study, B fetches it, and the auditor
accepts it. A patient with a key of their own cannot be given a guardian at the desk.

The web wallet, restored from the first patient's seed in headless Chromium at phone
size, shows the policy, the delegations and the flagged event, and changes the first two
(screenshots in test-artifacts/wallet-safety/).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest

from node.core.base64url import b64url_encode
from node.core.consent import (
    Power,
    decode_delegation,
    decode_grant,
    parse_token_text,
    sign_revocation,
    token_id_of,
)
from node.core.emergency import Choice, split_references
from node.core.entries import Access, BreakGlass, Denial, Grant, Receipt, Revoke
from node.errors import Forbidden, Unauthorized
from node.samples import make_ct_study
from node.services.consent import DAY, subject_reference
from node.services.runtime import open_runtime
from node.services.wallet import Wallet
from tests.support.browser import chromium_session
from tests.support.nodes import (
    NodeProcess,
    init_node,
    log_entries,
    peer_each_other,
    run_cli,
    wait_until,
)
from tests.support.patients import patient, with_session
from tests.support.web_wallet import PASSPHRASE, restore_wallet, wait_for_screen

ALLOWS = "MRN-BG-ALLOWS"
NEVER = "MRN-BG-NEVER"
MINOR = "MRN-BG-MINOR"
# A's limit on new emergency requests per member and hour: small, so the test reaches it.
EMERGENCY_PER_HOUR = 3
NOTE = "unconscious after a fall; prior head CT wanted"
# Alerts are checked this often here, so the status strip shows an incident soon.
ALERT_CHECK_SECONDS = 0.3
T = TypeVar("T")


def admin_post(node: NodeProcess, path: str, document: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        node.url + path,
        data=json.dumps(document).encode(),
        headers={**node.auth, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def emergency_fetch_cli(b: NodeProcess, a: NodeProcess, patient_id: str) -> Any:
    """`imageshare fetch --emergency` at B for a patient of A; (exit status, JSON answer)."""
    result = b.cli(
        "fetch",
        "--emergency",
        "--patient-id",
        patient_id,
        "--reason",
        "ETREAT",
        "--note",
        NOTE,
        "--custodian",
        a.origin,
        "--json",
        check=False,
    )
    return result.returncode, json.loads(result.stdout) if result.stdout else None


def finished(node: NodeProcess, job: dict[str, Any]) -> Any:
    """A fetch job's outcome, once it has one."""
    return wait_until(
        lambda: (
            (j := node.get_json(f"/admin/api/transfers/{job['id']}"))["state"] != "running" and j
        ),
        timeout=30,
        interval=0.2,
    )


def emergency_fetch_api(b: NodeProcess, a: NodeProcess, patient_id: str) -> Any:
    """The dashboard's way: POST /admin/api/emergency at B, then the job's outcome."""
    body = {"patient_id": patient_id, "reason": "BTG", "custodian": a.origin}
    (job,) = admin_post(b, "/admin/api/emergency", body)["jobs"]
    return finished(b, job)


def fetch_api(b: NodeProcess, token: str) -> Any:
    """A token fetched through B's admin API (as the dashboard does), to its outcome."""
    return finished(b, admin_post(b, "/admin/api/fetch", {"token": token}))


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("break-glass")
    a = init_node(base, "a.example/imageshare")
    b = init_node(base, "b.example/imageshare")
    peer_each_other(a, b)
    a.append_config(f"[consent]\nmax_emergency_per_hour = {EMERGENCY_PER_HOUR}")
    for node in (a, b):
        node.append_config(f"[alerts]\ncheck_interval = {ALERT_CHECK_SECONDS}")
    make_ct_study(base / "allows", series=1, slices=2, patient_id=ALLOWS)
    make_ct_study(base / "never", series=1, slices=2, patient_id=NEVER)
    make_ct_study(base / "minor", series=1, slices=2, patient_id=MINOR)
    a.cli("import", str(base / "allows"), str(base / "never"), str(base / "minor"))
    a.start()
    b.start()
    try:
        allows, never = base / "wallet-allows", base / "wallet-never"
        patient(allows, "keygen")
        key = patient(allows, "pubkey", "--custodian", a.url)["pubkey"]
        enrolled = json.loads(
            a.cli("enroll", "--patient-id", ALLOWS, f"--key={key}", "--json").stdout
        )
        policy_allows = patient(allows, "emergency-policy", "--custodian", a.url, "--any-member")
        # The second patient's wallet through its library calls (the CLI is tested above).
        wallet = Wallet.create(never, None)
        custodian = asyncio.run(with_session(lambda s: wallet.custodian(s, a.url)))
        key = wallet.key_for(custodian.origin).public_key_text
        admin_post(a, "/admin/api/enrollments", {"patient_id": NEVER, "key": key})
        policy_never = asyncio.run(
            with_session(lambda s: wallet.set_emergency_policy(s, a.url, Choice.NEVER, ()))
        )
        shown = asyncio.run(with_session(lambda s: wallet.emergency_policy(s, a.url)))
        served = emergency_fetch_cli(b, a, ALLOWS)
        refused = emergency_fetch_cli(b, a, NEVER)
        unknown = emergency_fetch_api(b, a, "MRN-NOT-HERE")
        limited = emergency_fetch_api(b, a, ALLOWS)
        yield {
            "a": a,
            "b": b,
            "allows": allows,
            "never": never,
            "enrolled": enrolled,
            "policies": {"allows": policy_allows, "never": policy_never},
            "shown": shown,
            "served": served,
            "refused": refused,
            "unknown": unknown,
            "limited": limited,
        }
    finally:
        a.stop()
        b.stop()


def audited(a: NodeProcess, b: NodeProcess) -> dict[str, Any] | None:
    """The audit report once replication has caught up (None while a mirror lags)."""
    result = run_cli("audit", a.url, b.url, "--json", "--receipt-grace", "0", check=False)
    report: dict[str, Any] = json.loads(result.stdout)
    lagging = any(
        v["rule"] in {"access_without_receipt", "receipt_without_access"}
        for v in report["violations"]
    )
    return None if lagging or result.returncode == 2 else report


class TestPolicy:
    def test_enrollment_shows_the_federation_default(self, story: dict[str, Any]) -> None:
        assert story["enrolled"]["emergency_default"] == "any_member"

    def test_the_wallet_signs_each_policy_into_the_custodians_log(self, story: dict[str, Any]):
        assert story["policies"]["allows"]["choice"] == "any_member"
        assert story["policies"]["never"]["choice"] == "never"
        kinds = [e.kind for e in log_entries(story["a"])]
        assert kinds.count("emergency_policy") == 2
        assert story["shown"]["choice"] == "never" and story["shown"]["default"] is False


class TestBreakGlass:
    def test_a_member_fetches_a_patient_whose_policy_allows_it(self, story: dict[str, Any]):
        status, answer = story["served"]
        assert status == 0, answer
        (job,) = answer["fetches"]
        assert job["state"] == "done" and job["emergency"] and job["reason"] == "ETREAT"
        assert job["instances_total"] == 2

    def test_break_glass_is_written_before_the_access_and_names_no_patient(
        self, story: dict[str, Any]
    ) -> None:
        a, b = story["a"], story["b"]
        request_id = bytes.fromhex(story["served"][1]["fetches"][0]["token_id"])
        entries = log_entries(a)
        (at,) = [i for i, e in enumerate(entries) if isinstance(e.body, BreakGlass)]
        glass = entries[at].body
        assert isinstance(glass, BreakGlass)
        assert glass.request == request_id and glass.requester == b.origin
        assert glass.reason == "ETREAT" and glass.policy == "any_member"
        assert len(split_references(glass.studies)) == 1
        accesses = [i for i, e in enumerate(entries) if isinstance(e.body, Access)]
        assert accesses and all(i > at for i in accesses)
        raw = b"".join(repr(e.fields).encode() for e in entries)
        assert ALLOWS.encode() not in raw and NOTE.encode() not in raw
        receipts = [e.body for e in log_entries(b) if isinstance(e.body, Receipt)]
        assert [r.token_id for r in receipts] == [request_id]

    def test_a_patient_whose_policy_says_never_is_refused_with_the_rule_and_logged(
        self, story: dict[str, Any]
    ) -> None:
        status, answer = story["refused"]
        assert status == 1
        (job,) = answer["fetches"]
        assert job["state"] == "refused" and job["rule"] == "emergency_not_allowed"
        denials = [e.body for e in log_entries(story["a"]) if isinstance(e.body, Denial)]
        assert [(d.rule, d.requester) for d in denials] == [
            ("emergency_not_allowed", story["b"].origin)
        ]
        assert denials[0].token_id == bytes.fromhex(job["token_id"])

    def test_an_unknown_patient_is_refused_and_not_written(self, story: dict[str, Any]):
        assert story["unknown"]["rule"] == "emergency_unknown_patient"

    def test_a_member_over_its_hourly_limit_is_refused(self, story: dict[str, Any]):
        assert story["limited"]["rule"] == "emergency_rate_limited"

    def test_both_dashboards_raise_it(self, story: dict[str, Any]) -> None:
        a, b = story["a"], story["b"]
        served = a.get_json("/admin/api/emergency")["served"]
        assert [(s["requester"], s["reason"]) for s in served] == [(b.origin, "ETREAT")]
        fetched = b.get_json("/admin/api/emergency")["fetched"]
        assert sorted(f["state"] for f in fetched) == ["done", "refused", "refused", "refused"]
        assert all(f["custodian"] == a.origin for f in fetched)

    def test_both_status_strips_show_one_break_glass_alert_naming_no_patient(
        self, story: dict[str, Any]
    ) -> None:
        a, b = story["a"], story["b"]
        request_id = story["served"][1]["fetches"][0]["token_id"]

        def break_glass_alerts(node: NodeProcess) -> list[dict[str, Any]]:
            incidents = node.get_json("/admin/api/status")["health"]["incidents"]
            return [i for i in incidents if i["kind"] == "break_glass"]

        at_a = wait_until(lambda: break_glass_alerts(a), timeout=10, message="A's alert")
        at_b = wait_until(lambda: break_glass_alerts(b), timeout=10, message="B's alert")
        # The refused and rate-limited requests raise nothing: one incident each.
        assert [(i["subject"], i["text"]) for i in at_a] == [
            (request_id, f"Emergency access to a patient's studies by {b.origin} (reason ETREAT)")
        ]
        assert [(i["subject"], i["text"]) for i in at_b] == [
            (
                request_id,
                f"Emergency access to a patient's studies by {b.origin} (reason ETREAT),"
                f" served by {a.origin}",
            )
        ]
        assert break_glass_alerts(a)[0]["id"] == at_a[0]["id"], "the incident stays one"

    def test_the_patients_log_shows_it_flagged_first_and_proven(self, story: dict[str, Any]):
        a, b = story["a"], story["b"]

        def proven() -> dict[str, Any] | None:
            result = patient(story["allows"], "log", a.url, b.url, check=False)
            return json.loads(result.stdout) if result.returncode == 0 else None

        log = wait_until(proven, timeout=30, interval=0.5, message="a proven patient log")
        kinds = [(e["kind"], e["flagged"]) for e in log["events"]]
        assert kinds[:2] == [("break_glass", True), ("access", True)]
        first = log["events"][0]
        assert first["requester"] == b.origin and first["reason"] == "ETREAT"
        assert first["proof"]["proven"] and first["proof"]["cosigners"] == [b.origin]
        human = run_cli("patient", "log", a.url, b.url, "--wallet", str(story["allows"]))
        assert human.stdout.startswith("FLAGGED")
        assert f"EMERGENCY ACCESS by {b.origin} (ETREAT)" in human.stdout


def logged(story: dict[str, Any], wallet: str, kind: str) -> list[dict[str, Any]]:
    """The events of one kind in the patient log of one of the story's wallets."""
    a, b = story["a"], story["b"]
    result = patient(story[wallet], "log", a.url, b.url, check=False)
    return [e for e in json.loads(result.stdout)["events"] if e["kind"] == kind]


@pytest.fixture(scope="module")
def delegated(story: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    a, b = story["a"], story["b"]
    principal = Wallet.open(story["allows"], None)
    directory = tmp_path_factory.mktemp("delegate") / "wallet"
    delegate = Wallet.create(directory, None)
    delegate_key = delegate.key_for(a.origin).public_key
    # The patient's and the delegate's command-line wallets; the rest by library calls.
    delegation = patient(
        story["allows"],
        "delegate",
        "--custodian",
        a.url,
        f"--to-key={delegate.key_for(a.origin).public_key_text}",
        "--all",
        "--powers",
        "grant",
        "--expires",
        "1d",
    )
    chain = parse_token_text(delegation["delegation"])
    first = patient(
        directory, "grant-as-delegate", delegation["delegation"], "--to", b.origin, "--all"
    )
    fetched = b.cli("fetch", first["token"], "--json", check=False)
    delegation_id = bytes.fromhex(delegation["delegation_id"])
    asyncio.run(with_session(lambda s: principal.revoke(s, a.url, delegation_id)))
    after = delegate.grant_as_delegate(chain, b.origin, None, 3600)
    refused = fetch_api(b, after["token"])
    again = fetch_api(b, first["token"])
    listed = asyncio.run(with_session(lambda s: principal.delegations(s, a.url)))
    return {
        "delegation": delegation,
        "first": first,
        "after": after,
        "fetched": fetched,
        "refused": refused,
        "again": again,
        "listed": listed,
        "delegate_key": delegate_key,
    }


class TestDelegation:
    def test_a_delegates_grant_is_fetched_by_the_grantee(self, delegated: dict[str, Any]):
        assert delegated["fetched"].returncode == 0, delegated["fetched"].stderr
        assert json.loads(delegated["fetched"].stdout)["instances"] == 2

    def test_after_the_revocation_the_delegates_next_grant_is_refused(
        self, delegated: dict[str, Any]
    ) -> None:
        refused = delegated["refused"]
        assert (refused["state"], refused["rule"]) == ("refused", "delegation_revoked")

    def test_a_grant_made_before_the_revocation_keeps_working(self, delegated: dict[str, Any]):
        assert delegated["again"]["state"] == "done", delegated["again"]

    def test_the_token_carries_the_chain_and_the_patient_owns_it(
        self, story: dict[str, Any], delegated: dict[str, Any]
    ) -> None:
        token = decode_grant(parse_token_text(delegated["first"]["token"]))
        assert token.fields.patient_key == delegated["delegate_key"]
        assert token.delegation is not None and token.signature_valid()
        principal = Wallet.open(story["allows"], None).key_for(story["a"].origin)
        assert token.patient_key == principal.public_key

    def test_the_patient_sees_the_delegated_grant_and_the_revoked_delegation(
        self, story: dict[str, Any], delegated: dict[str, Any]
    ) -> None:
        grants = logged(story, "allows", "grant")
        assert [g["token_id"] for g in grants] == [delegated["first"]["token_id"]]
        assert grants[0]["grantee"] == story["b"].origin
        assert [d["status"] for d in delegated["listed"]] == ["revoked"]


def refusal(call: Any) -> str:
    """The message of the refusal ``call`` (a coroutine factory taking a session) ends in."""
    try:
        asyncio.run(with_session(call))
    except (Forbidden, Unauthorized) as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError("the request was not refused")


@pytest.fixture(scope="module")
def acting(story: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The second patient's delegate reads their tokens and revokes one of their grants."""
    a, b = story["a"], story["b"]
    principal = Wallet.open(story["never"], None)
    delegate = Wallet.create(tmp_path_factory.mktemp("acting") / "wallet", None)
    delegate_key = delegate.key_for(a.origin).public_key

    def run(call: Any) -> Any:
        return asyncio.run(with_session(call))

    def delegation(*powers: Power) -> bytes:
        made = run(lambda s: principal.delegate(s, a.url, delegate_key, None, powers, DAY))
        return parse_token_text(made["delegation"])

    keeper = delegation(Power.REVOKE, Power.VIEW_LOG, Power.DOWNLOAD)
    grant_only = delegation(Power.GRANT)
    first = run(lambda s: principal.grant(s, a.url, b.origin, None, 3600))
    second = run(lambda s: principal.grant(s, a.url, b.origin, None, 3600))
    first_id, second_id = bytes.fromhex(first["token_id"]), bytes.fromhex(second["token_id"])

    def tokens(chain: bytes) -> Any:
        return lambda s: delegate.as_delegate(s, a.url, chain, "GET", "/patient/tokens")

    read = run(tokens(keeper))
    studies = run(lambda s: delegate.as_delegate(s, a.url, keeper, "GET", "/patient/studies"))
    no_download = refusal(
        lambda s: delegate.as_delegate(s, a.url, grant_only, "GET", "/patient/studies")
    )
    other_patient = Wallet.open(story["allows"], None).key_for(a.origin).public_key_text

    async def for_another_patient(session: Any) -> Any:
        custodian = await delegate.custodian(session, a.url)
        query = f"for={other_patient}&delegation={token_id_of(keeper).hex()}"
        return await delegate.signed(session, custodian, "GET", "/patient/tokens?" + query)

    wrong_patient = refusal(for_another_patient)
    no_power = refusal(tokens(grant_only))
    own_key = refusal(lambda s: delegate.studies(s, a.url))
    revoked = run(lambda s: delegate.revoke_as_delegate(s, a.url, keeper, first_id))
    after_revoke = run(tokens(keeper))
    run(lambda s: principal.revoke(s, a.url, token_id_of(keeper)))
    read_after_end = refusal(tokens(keeper))
    revoke_after_end = refusal(lambda s: delegate.revoke_as_delegate(s, a.url, keeper, second_id))
    late = delegate.key_for(a.origin)
    late_revocation = sign_revocation(
        late.public_key, second_id, int(time.time()), late.sign, keeper
    )
    return {
        "read": read,
        "no_power": no_power,
        "own_key": own_key,
        "studies": studies,
        "no_download": no_download,
        "wrong_patient": wrong_patient,
        "revoked": revoked,
        "after_revoke": after_revoke,
        "read_after_end": read_after_end,
        "revoke_after_end": revoke_after_end,
        "first_id": first_id,
        "second_id": second_id,
        "delegate_key": delegate_key,
        "late_revocation": late_revocation,
    }


class TestActingForThePatient:
    def test_a_delegate_with_view_log_reads_the_patients_tokens(self, acting: dict[str, Any]):
        listed = {t["token_id"]: t["status"] for t in acting["read"]["tokens"]}
        assert listed == {acting["first_id"].hex(): "active", acting["second_id"].hex(): "active"}

    def test_a_delegate_without_view_log_is_refused(self, acting: dict[str, Any]) -> None:
        assert acting["no_power"].startswith("Forbidden")
        assert "delegation_no_power" in acting["no_power"]

    def test_a_delegate_with_download_lists_the_patients_studies_and_without_it_is_refused(
        self, acting: dict[str, Any]
    ) -> None:
        assert [s["instances"] for s in acting["studies"]["studies"]] == [2]
        assert "delegation_no_power" in acting["no_download"]

    def test_a_delegates_own_key_is_no_patient_key_here(self, acting: dict[str, Any]):
        assert acting["own_key"].startswith("Unauthorized")
        assert "unknown signer" in acting["own_key"]

    def test_a_delegate_naming_another_patient_than_its_delegations_is_refused(
        self, acting: dict[str, Any]
    ) -> None:
        assert acting["wrong_patient"].startswith("Unauthorized")
        assert "unknown signer" in acting["wrong_patient"]

    def test_a_delegate_with_revoke_revokes_a_grant_of_the_patient(
        self, acting: dict[str, Any]
    ) -> None:
        assert acting["revoked"]["status"] == "revoked"
        statuses = {t["token_id"]: t["status"] for t in acting["after_revoke"]["tokens"]}
        assert statuses[acting["first_id"].hex()] == "revoked"
        assert statuses[acting["second_id"].hex()] == "active"

    def test_after_the_delegation_is_revoked_both_are_refused(self, acting: dict[str, Any]):
        for refused in (acting["read_after_end"], acting["revoke_after_end"]):
            assert refused.startswith("Forbidden") and "delegation_revoked" in refused

    def test_the_patients_log_shows_the_revocation_was_the_delegates(
        self, story: dict[str, Any], acting: dict[str, Any]
    ) -> None:
        revokes = logged(story, "never", "revoke")
        assert [(e["token_id"], e["delegate"]) for e in revokes] == [
            (acting["first_id"].hex(), b64url_encode(acting["delegate_key"]))
        ]


@pytest.fixture(scope="module")
def guardian(story: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Staff enroll a guardian for the minor; the guardian grants B, which fetches."""
    a, b = story["a"], story["b"]
    directory = tmp_path_factory.mktemp("guardian") / "wallet"
    key = Wallet.create(directory, None).key_for(a.origin).public_key_text
    desk = json.loads(
        a.cli("enroll-guardian", "--patient-id", MINOR, f"--key={key}", "--json").stdout
    )
    second = json.loads(
        a.cli("enroll-guardian", "--patient-id", MINOR, f"--key={key}", "--json").stdout
    )
    own_key = a.cli("enroll-guardian", "--patient-id", ALLOWS, f"--key={key}", check=False)
    granted = patient(directory, "grant-as-delegate", desk["delegation"], "--to", b.origin, "--all")
    fetched = b.cli("fetch", granted["token"], "--json", check=False)
    return {
        "desk": desk,
        "second": second,
        "own_key": own_key,
        "granted": granted,
        "fetched": fetched,
    }


class TestGuardian:
    def test_the_desk_delegates_every_power_of_a_key_it_holds_for_the_minor(
        self, story: dict[str, Any], guardian: dict[str, Any]
    ) -> None:
        desk, second = guardian["desk"], guardian["second"]
        assert desk["created_minor_key"] and not second["created_minor_key"]
        assert desk["minor_key"] == second["minor_key"]
        chain = decode_delegation(parse_token_text(desk["delegation"]))
        assert set(chain.powers) == set(Power) and chain.scope is None
        assert chain.signature_valid() and b64url_encode(chain.patient_key) == desk["minor_key"]
        entries = log_entries(story["a"])
        assert entries[desk["index"]].kind == "desk_delegation"
        assert entries[desk["index"] - 1].kind == "enroll"

    def test_the_guardian_grants_the_minors_study_and_the_grantee_fetches_it(
        self, guardian: dict[str, Any]
    ) -> None:
        assert guardian["fetched"].returncode == 0, guardian["fetched"].stderr
        assert json.loads(guardian["fetched"].stdout)["instances"] == 2

    def test_a_patient_with_a_key_of_their_own_gets_no_guardian_at_the_desk(
        self, guardian: dict[str, Any]
    ) -> None:
        assert guardian["own_key"].returncode == 1
        assert "their wallet delegates" in guardian["own_key"].stderr


class TestAudit:
    def test_the_auditor_lists_the_break_glass_and_flags_forced_entries(
        self,
        story: dict[str, Any],
        delegated: dict[str, Any],
        acting: dict[str, Any],
        guardian: dict[str, Any],
    ) -> None:
        a, b = story["a"], story["b"]
        report = wait_until(lambda: audited(a, b), timeout=30, interval=0.5)
        assert report["violations"] == []
        (listed,) = report["break_glass"]
        assert listed["requester"] == b.origin and listed["flagged"] is False
        # A turns hostile: it writes, through its own ledger service, a break-glass for
        # the patient whose signed policy says never.
        a.stop()
        runtime = open_runtime(a.config)
        try:
            subject = subject_reference(runtime, NEVER)
            key = runtime.services.consent.state.active_key_of_subject(subject)
            assert key is not None
            forced = runtime.services.ledger.append(
                BreakGlass(
                    request=bytes(32),
                    requester=b.origin,
                    reason="BTG",
                    subject=subject,
                    patient_key=key.public_key,
                    policy="any_member",
                    policy_index=None,
                    studies=b"",
                )
            )
            # ... and records the delegate's grant it refused after the revocation.
            late = runtime.services.ledger.append(
                Grant(token=parse_token_text(delegated["after"]["token"]))
            )
            # ... and the delegate's revocation it refused after that delegation's end.
            late_revoke = runtime.services.ledger.append(
                Revoke(revocation=acting["late_revocation"])
            )
        finally:
            runtime.close()
        a.start()
        report = wait_until(
            lambda: (r := audited(a, b)) and len(r["break_glass"]) == 2 and r,
            timeout=30,
            interval=0.5,
        )
        flagged = [v for v in report["violations"] if v["rule"] == "break_glass_against_policy"]
        assert {v["index"] for v in flagged} == {forced.index}
        assert any("(never) does not allow" in v["detail"] for v in flagged)
        assert [r["flagged"] for r in report["break_glass"]] == [False, True]
        outside = [v for v in report["violations"] if v["rule"] == "grant_outside_delegation"]
        assert [(v["index"], "delegation_revoked" in v["detail"]) for v in outside] == [
            (late.index, True)
        ]
        outside = [v for v in report["violations"] if v["rule"] == "revocation_outside_delegation"]
        assert [(v["index"], "delegation_revoked" in v["detail"]) for v in outside] == [
            (late_revoke.index, True)
        ]


PHONE = (390, 844)


class TestWebWallet:
    def test_the_safety_screen_shows_the_policy_delegations_and_flagged_events_at_phone_size(
        self, story: dict[str, Any], delegated: dict[str, Any]
    ) -> None:
        a, b = story["a"], story["b"]
        seed = Wallet.open(story["allows"], None).files.seed_path
        helper = Wallet.create(story["allows"].parent / "web-delegate", None)
        helper_key = helper.key_for(a.origin).public_key_text
        with chromium_session("wallet-safety", viewport=PHONE) as browser:
            page = browser.new_page()
            restore_wallet(page, a.url, seed, PASSPHRASE)

            def proven() -> bool:
                page.click('#tabs button[data-screen="safety"]')
                wait_for_screen(page, "safety")
                return page.locator("#flagged-list .card.flagged .proof.ok").count() == 1

            wait_until(proven, timeout=30, interval=1.0, message="a proven break-glass")
            flagged = page.inner_text("#flagged-list")
            assert f"Emergency access by {b.origin}" in flagged and "ETREAT" in flagged
            assert page.inner_text("#policy-current").startswith("Any hospital")
            assert "revoked" in page.inner_text("#delegations-list")
            page.shot("1-safety")
            # The patient names the hospitals allowed, and lets a helper act for them.
            page.check('input[name="policy-choice"][value="named_members"]')
            page.check(f'#policy-members input[value="{b.origin}"]')
            page.click("#policy-button")
            page.wait_for_selector("#policy-current:has-text('Only the hospitals')")
            page.fill("#delegate-key", helper_key)
            page.click("#delegate-button")
            page.wait_for_selector("#delegations-list .status.active")
            page.shot("2-safety-chosen")
        principal = Wallet.open(story["allows"], None)
        policy = asyncio.run(with_session(lambda s: principal.emergency_policy(s, a.url)))
        assert (policy["choice"], policy["members"]) == ("named_members", [b.origin])
        listed = asyncio.run(with_session(lambda s: principal.delegations(s, a.url)))
        assert [d["status"] for d in listed] == ["revoked", "active"]
        assert listed[1]["powers"] == ["grant", "view_log"]
