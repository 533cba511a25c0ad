"""Share links (SMART Health Links) end to end, on real node processes.

Custodian A (with a peer B that witnesses its log and takes links) holds two studies of
Jane and one of John. The patients' wallets make links with `imageshare patient share`;
the tests read them as any SHL client would: decode the link, POST the manifest, decrypt
the files (with jwcrypto, not the node's JOSE library), validate the ImagingStudy with a
FHIR model library, and read the images through the link's DICOMweb root.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import urllib.error
import urllib.request
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwcrypto import jwe, jwk

from node.core.consent import GrantFields, decode_grant, is_link_grantee, link_grantee, sign_grant
from node.core.entries import decode_entry
from node.core.origins import is_node_origin
from node.core.shlink import (
    ShareLink,
    decode_shlink,
    decrypt_file,
    encode_shlink,
    encrypt_file,
    link_access_digest,
    link_access_kind,
    parse_manifest_request,
)
from node.errors import BadInput
from node.samples import make_ct_study
from node.services.wallet import Wallet, parse_study_ref
from tests.support.nodes import NodeProcess, init_node, peer_each_other, run_cli, wait_until
from tests.support.web_wallet import share_in_web_wallet

NO_PASSPHRASE = {"IMAGESHARE_WALLET_PASSPHRASE": ""}
# The PDI media streamer is the viewing half's; the download test runs once it is merged.
DICOM_JSON = "application/dicom+json"


def patient(wallet: Path, *args: str, check: bool = True) -> Any:
    result = run_cli(
        "patient", *args, "--wallet", str(wallet), "--json", check=check, env=NO_PASSPHRASE
    )
    return json.loads(result.stdout) if check else result


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """One request; (status, body, headers) whatever the status."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_link(shlink: str) -> dict[str, Any]:
    """The SHL payload, decoded as the spec says (not with the node's code)."""
    assert shlink.startswith("shlink:/")
    payload: dict[str, Any] = json.loads(b64url_decode(shlink[len("shlink:/") :]))
    return payload


def open_manifest(link: dict[str, Any], passcode: str | None = None) -> list[tuple[str, Any]]:
    """POST the manifest and decrypt every file with jwcrypto: [(contentType, JSON)]."""
    body = {"recipient": "Dr Test"} | ({"passcode": passcode} if passcode else {})
    status, answer, _ = http("POST", link["url"], body)
    assert status == 200, answer
    key = jwk.JWK(kty="oct", k=link["key"])
    files = []
    for item in json.loads(answer)["files"]:
        token = jwe.JWE()
        token.deserialize(item["embedded"], key=key)
        header = json.loads(b64url_decode(item["embedded"].split(".")[0]))
        assert (header["alg"], header["enc"]) == ("dir", "A256GCM")
        files.append((item["contentType"], json.loads(token.payload)))
    return files


def credential_of(files: list[tuple[str, Any]]) -> dict[str, Any]:
    (credential,) = [f for t, f in files if t == "application/smart-api-access"]
    return dict(credential)


def own_entries(node: NodeProcess) -> list[Any]:
    log_id = hashlib.sha256(node.origin.encode()).hexdigest()
    size = next(lg["size"] for lg in node.get_json("/ledger/logs") if lg["log_id"] == log_id)
    raw = urllib.request.urlopen(f"{node.url}/ledger/logs/{log_id}/entries?start=0&end={size}")
    return [decode_entry(e) for e in msgpack.unpackb(raw.read())]


def entries_of(node: NodeProcess, token_id: str, kind: str) -> list[dict[str, Any]]:
    return [
        e.fields
        for e in own_entries(node)
        if e.kind == kind and e.fields["token_id"].hex() == token_id
    ]


class TestLinkFormats:
    def test_a_link_round_trips_and_reads_from_a_viewer_url(self) -> None:
        link = ShareLink("https://a.example/shl/x", b"k" * 32, 1_800_000_000, True, "Dr X")
        text = encode_shlink(link)
        assert decode_shlink(text) == link
        assert decode_shlink(f"https://a.example/share/#{text}") == link

    @pytest.mark.parametrize(
        "payload",
        [
            b"not json",
            b"[1]",
            b'{"url": "https://a.example/m", "key": "short"}',
            b'{"url": "ftp://a.example/m", "key": "' + b"A" * 43 + b'"}',
            b'{"url": "https://a.example/m", "key": "' + b"A" * 43 + b'", "v": 2}',
            b'{"url": "https://a.example/m", "key": "' + b"A" * 43 + b'", "flag": "U"}',
            b'{"url": "https://a.example/m", "key": "' + b"A" * 43 + b'", "exp": "soon"}',
            b'{"url": "https://a.example/m", "key": "'
            + b"A" * 43
            + b'", "label": "'
            + b"x" * 81
            + b'"}',
        ],
    )
    def test_a_malformed_link_is_refused_with_a_clear_error(self, payload: bytes) -> None:
        text = "shlink:/" + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
        with pytest.raises(BadInput):
            decode_shlink(text)

    def test_garbage_never_escapes_as_anything_but_bad_input(self) -> None:
        for text in ("", "shlink:/", "shlink:/!!!", "#shlink:/" + "A" * 9000, "x" * 10):
            with pytest.raises(BadInput):
                decode_shlink(text)
        for body in (b"", b"{}", b'{"recipient": 5}', b'{"recipient": "x", "passcode": 1}'):
            with pytest.raises(BadInput):
                parse_manifest_request(body)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=300), st.binary(max_size=300))
    def test_any_input_is_a_link_or_bad_input_and_nothing_else(
        self, text: str, data: bytes
    ) -> None:
        payload = "shlink:/" + base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        for candidate in (text, payload, "#" + payload):
            with contextlib.suppress(BadInput):
                decode_shlink(candidate)
        for body in (data, text.encode()):
            with contextlib.suppress(BadInput):
                parse_manifest_request(body)
        with contextlib.suppress(BadInput):
            decrypt_file(b"\x01" * 32, text)

    def test_a_file_decrypts_only_under_its_link_key(self) -> None:
        key = b"\x01" * 32
        sealed = encrypt_file(key, "application/fhir+json", b'{"a": 1}')
        assert decrypt_file(key, sealed) == b'{"a": 1}'
        with pytest.raises(BadInput):
            decrypt_file(b"\x02" * 32, sealed)
        header, *rest = sealed.split(".")
        with pytest.raises(BadInput):
            decrypt_file(key, ".".join([header[:-2] + "AA", *rest]))

    def test_a_link_grantee_is_never_a_node_origin(self) -> None:
        grantee = link_grantee(b"\x05" * 32)
        assert is_link_grantee(grantee) and not is_node_origin(grantee)
        assert not is_link_grantee("link:short") and not is_node_origin("link:short")
        assert not is_link_grantee("b.example/imageshare")

    def test_a_grant_to_a_malformed_link_is_refused(self) -> None:
        fields = GrantFields(b"\x00" * 32, "a.example/x", "link:abc", None, 0, 10, b"\x00" * 16)
        with pytest.raises(BadInput):
            sign_grant(fields, lambda message: b"\x00" * 64)
        good = GrantFields(
            b"\x00" * 32, "a.example/x", link_grantee(b"\x09" * 32), None, 0, 10, b"\x00" * 16
        )
        token = sign_grant(good, lambda message: b"\x00" * 64)
        assert decode_grant(token).fields.grantee == good.grantee

    def test_each_kind_of_link_access_has_its_own_digest(self) -> None:
        digests = {kind: link_access_digest(kind) for kind in ("manifest", "view", "download")}
        assert len(set(digests.values())) == 3
        assert all(link_access_kind(d) == k for k, d in digests.items())
        assert link_access_kind(b"\x00" * 32) is None


class TestAuditorRules:
    """The auditor's rules over a hand-made custodian log holding a link grant."""

    def test_a_link_access_counts_only_under_a_live_link_grant_and_needs_no_receipt(
        self,
    ) -> None:
        from nacl.signing import SigningKey

        from node.core.audit_rules import (
            SignatureChecks,
            access_violation,
            match_receipts,
            plan_consent_checks,
        )
        from node.core.consent import (
            decode_revocation,
            sign_revocation,
            token_id_of,
            validate_token,
        )
        from node.core.entries import LedgerEntry

        origin, zero, study = "a.example/imageshare", b"\x00" * 32, b"\x06" * 32
        patient_key = SigningKey(b"\x03" * 32)
        public = bytes(patient_key.verify_key)

        def sign(message: bytes) -> bytes:
            return bytes(patient_key.sign(message).signature)

        grantee = link_grantee(b"\x04" * 32)
        fields = GrantFields(public, origin, grantee, (study,), 1000, 2000, b"\x01" * 16)
        token = sign_grant(fields, sign)
        revocation = sign_revocation(public, token_id_of(token), 1500, sign)

        def accessed(at: int, by: str) -> LedgerEntry:
            return LedgerEntry(
                "access",
                zero,
                at,
                {
                    "token_id": token_id_of(token),
                    "grantee": by,
                    "study": study,
                    "instances": 0,
                    "bytes": 0,
                    "digest": link_access_digest("view"),
                },
            )

        entries: list[LedgerEntry | None] = [
            LedgerEntry(
                "enroll", zero, 900, {"subject": b"\x07" * 32, "key": public, "replaces": None}
            ),
            LedgerEntry("grant", zero, 1000, {"token": token}),
            accessed(1100, grantee),
            accessed(1200, "c.example/imageshare"),  # a node riding on the link's grant
            LedgerEntry("revoke", zero, 1500, {"revocation": revocation}),
            accessed(1600, grantee),
        ]
        grant = decode_grant(token)
        checks = SignatureChecks(
            grants={token: grant},
            grants_valid=frozenset({token}),
            revocations={revocation: decode_revocation(revocation)},
            revocations_valid=frozenset({revocation}),
        )
        found, planned = plan_consent_checks(origin, entries, checks, clock_skew=0)
        assert found == []
        violations = [
            access_violation(c, validate_token(c.token, c.request, c.view, c.policy).rule)
            for c in planned
        ]
        assert [(v.index, v.rule) if v else None for v in violations] == [
            None,
            (3, "access_wrong_grantee"),
            (5, "access_after_revocation"),
        ]
        # Only the node's access lacks a receipt: a link has no log to hold one.
        receipts = match_receipts({origin: entries}, now=10**6, grace=0)
        assert [(v.index, v.rule) for v in receipts] == [(3, "access_without_receipt")]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("share-links")
    a = init_node(base, "a.example/imageshare")
    b = init_node(base, "b.example/imageshare")
    peer_each_other(a, b)
    # Expiry is judged to the second here: no clock skew allowance.
    text = a.config.read_text().replace("clock_skew_seconds = 300", "clock_skew_seconds = 0")
    a.config.write_text(text)
    if "clock_skew_seconds = 0" not in text:
        a.append_config("[consent]\nclock_skew_seconds = 0")
    make_ct_study(base / "jane-ct", series=2, slices=2, patient_id="MRN-JANE", seed=1)
    make_ct_study(
        base / "jane-old", series=1, slices=1, patient_id="MRN-JANE", study_date="20200101", seed=2
    )
    make_ct_study(base / "john", series=1, slices=1, patient_id="MRN-JOHN", seed=3)
    a.cli("import", str(base / "jane-ct"), str(base / "jane-old"), str(base / "john"))
    a.start()
    b.start()
    # The wallets by the library, in process (the CLI around it is tested where it matters).
    wallets, studies = {}, {}
    for name, mrn in (("jane", "MRN-JANE"), ("john", "MRN-JOHN")):
        wallet = base / f"wallet-{name}"
        opened = Wallet.create(wallet, None)
        custodian = in_session(partial(opened.custodian, url=a.url))
        a.cli(
            "enroll", "--patient-id", mrn, "--key", opened.key_for(custodian.origin).public_key_text
        )
        wallets[name] = wallet
        found = in_session(partial(opened.studies, url=a.url))
        studies[name] = sorted(found, key=lambda s: s["date"])
    try:
        yield {"a": a, "b": b, "wallets": wallets, "studies": studies}
    finally:
        a.stop()
        b.stop()


def share(nodes: dict[str, Any], who: str, *args: str) -> dict[str, Any]:
    """`imageshare patient share ... --json`."""
    result: dict[str, Any] = patient(
        nodes["wallets"][who], "share", "--custodian", nodes["a"].url, *args
    )
    return result


T = TypeVar("T")


def in_session(action: Callable[[aiohttp.ClientSession], Awaitable[T]]) -> T:
    async def run() -> T:
        async with aiohttp.ClientSession() as session:
            return await action(session)

    return asyncio.run(run())


def make_link(
    nodes: dict[str, Any],
    who: str,
    study: dict[str, Any] | None = None,
    lifetime: int = 3600,
    passcode: str | None = None,
    label: str = "",
) -> dict[str, Any]:
    """What `patient share` does, by the wallet library in process (``study`` None: all)."""
    wallet = Wallet.open(nodes["wallets"][who], None)
    scope = None if study is None else (parse_study_ref(study["ref"]),)
    return in_session(lambda s: wallet.share(s, nodes["a"].url, scope, lifetime, passcode, label))


def credential_of_root(root: str) -> str:
    return root.split("/links/", 1)[1].split("/", 1)[0]


def link_root(files: list[tuple[str, Any]]) -> str:
    return str(credential_of(files)["aud"])


def qido(root: str, path: str = "/studies") -> tuple[int, Any]:
    status, body, _ = http("GET", root + path, headers={"Accept": DICOM_JSON})
    return status, json.loads(body) if body else None


def study_uids_of(results: list[dict[str, Any]]) -> list[str]:
    return sorted(r["0020000D"]["Value"][0] for r in results)


class TestLinkRoundTrip:
    def test_link_opens_the_shared_study_and_every_read_is_in_the_patient_log(
        self, nodes: dict[str, Any]
    ) -> None:
        a, b = nodes["a"], nodes["b"]
        ct = nodes["studies"]["jane"][1]
        made = share(
            nodes,
            "jane",
            f"--study={ct['ref']}",
            "--expires",
            "1d",
            "--passcode",
            "4711",
            "--label",
            "second opinion, Dr X",
        )
        assert made["url"] == f"{a.url}/share/#{made['shlink']}"
        link = decode_link(made["shlink"])
        assert link["flag"] == "P" and link["label"] == "second opinion, Dr X"
        assert len(b64url_decode(link["key"])) == 32 and link["v"] == 1
        files = open_manifest(link, "4711")
        studies = [f for t, f in files if t == "application/fhir+json"]
        assert len(studies) == 1 and studies[0]["numberOfInstances"] == 4
        root = link_root(files)
        assert studies[0]["contained"][0]["address"] == root

        status, found = qido(root)
        assert status == 200
        uid = studies[0]["identifier"][0]["value"].removeprefix("urn:oid:")
        assert study_uids_of(found) == [uid]
        assert found[0]["00081190"]["Value"][0] == f"{root}/studies/{uid}"
        status, instances = qido(root, f"/studies/{uid}/instances")
        assert status == 200 and len(instances) == 4
        status, body, headers = http(
            "GET",
            f"{root}/studies/{uid}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
        )
        assert status == 200 and headers["Content-Type"].startswith("multipart/related")
        assert headers["Referrer-Policy"] == "no-referrer"  # streamed answers too
        assert body.count(b"DICM") == 4
        status, metadata = qido(root, f"/studies/{uid}/metadata")
        assert status == 200 and len(metadata) == 4
        first = instances[0]
        series_uid, sop_uid = first["0020000E"]["Value"][0], first["00080018"]["Value"][0]
        status, frame, _ = http(
            "GET",
            f"{root}/studies/{uid}/series/{series_uid}/instances/{sop_uid}/frames/1",
            headers={"Accept": "multipart/related; type=application/octet-stream"},
        )
        assert status == 200 and len(frame) > 64 * 64  # one 64x64 16-bit frame, framed

        accesses = entries_of(a, made["link_id"], "access")
        assert [e["grantee"] for e in accesses] == [accesses[0]["grantee"]] * 2
        assert accesses[0]["grantee"].startswith("link:")
        # The ledger names the link by a hash only: neither key, id nor credential.
        ledger = b"".join(msgpack.packb(e.fields) for e in own_entries(a))
        credential = credential_of(files)["access_token"]
        for secret in (link["key"], credential, link["url"].rsplit("/", 1)[1], "Dr X"):
            assert secret.encode() not in ledger

        def proven() -> dict[str, Any] | None:
            result = run_cli(
                "patient",
                "log",
                a.url,
                b.url,
                "--wallet",
                str(nodes["wallets"]["jane"]),
                "--json",
                check=False,
            )
            if result.returncode != 0:
                return None
            log: dict[str, Any] = json.loads(result.stdout)
            return log if len(log["events"]) >= 2 else None

        log = wait_until(proven, timeout=30, interval=0.5, message="a proven patient log")
        mine = [e for e in log["events"] if e["token_id"] == made["link_id"]]
        assert [(e["kind"], e["link_access"]) for e in mine] == [
            ("access", "manifest"),
            ("access", "view"),
        ]
        assert all(e["link"] == "second opinion, Dr X" and e["proof"]["proven"] for e in mine)
        text = run_cli(
            "patient", "log", a.url, b.url, "--wallet", str(nodes["wallets"]["jane"])
        ).stdout
        assert "opened by the link 'second opinion, Dr X' on " in text
        assert "viewed by the link 'second opinion, Dr X' on " in text

    def test_the_files_decrypt_with_another_jose_library_and_validate_as_fhir(
        self, nodes: dict[str, Any]
    ) -> None:
        from fhir.resources.R4B.imagingstudy import ImagingStudy

        made = make_link(nodes, "jane", None, 7200)
        link = decode_link(made["shlink"])
        assert "flag" not in link and link["exp"] > 0
        files = open_manifest(link)
        studies: list[Any] = [
            ImagingStudy.model_validate(f) for t, f in files if t == "application/fhir+json"
        ]
        assert len(studies) == 2
        for study in studies:
            assert study.identifier[0].system == "urn:dicom:uid"
            assert study.identifier[0].value.startswith("urn:oid:1.")
            assert study.series and all(s.modality.code == "CT" for s in study.series)
            endpoint = study.contained[0]
            assert endpoint.connectionType.code == "dicom-wado-rs"
            assert study.endpoint[0].reference == "#wado"
        credential = credential_of(files)
        assert len(b64url_decode(credential["access_token"])) == 32

    def test_ohif_configuration_points_at_the_link_root(self, nodes: dict[str, Any]) -> None:
        made = make_link(nodes, "john")
        files = open_manifest(decode_link(made["shlink"]))
        root = link_root(files)
        status, body, _ = http("GET", root + ".json")
        assert status == 200
        (server,) = json.loads(body)["servers"]["dicomWeb"]
        assert server["wadoRoot"] == server["qidoRoot"] == root
        # The same reading options as the node's own OHIF data source (one definition).
        assert server["imageRendering"] == "wadors"
        assert server["thumbnailRendering"] == "thumbnail"
        assert server["qidoSupportsIncludeField"] and server["bulkDataURI"] == {"enabled": True}


class TestLinkScope:
    def test_a_link_reads_only_its_own_studies(self, nodes: dict[str, Any]) -> None:
        jane_old = nodes["studies"]["jane"][0]
        jane_link = make_link(nodes, "jane", jane_old)
        jane = open_manifest(decode_link(jane_link["shlink"]))
        john = open_manifest(decode_link(make_link(nodes, "john")["shlink"]))
        jane_root, john_root = link_root(jane), link_root(john)
        _, jane_found = qido(jane_root)
        _, john_found = qido(john_root)
        (jane_uid,) = study_uids_of(jane_found)
        (john_uid,) = study_uids_of(john_found)
        assert jane_uid != john_uid
        # John's credential cannot read Jane's study, nor can Jane's read her other study.
        for root, uid in ((john_root, jane_uid), (jane_root, john_uid)):
            for path in (f"/studies/{uid}", f"/studies/{uid}/metadata", f"/studies/{uid}/series"):
                status, found = qido(root, path)
                assert status == 404 or found == [], (root, path)
        status, found = qido(jane_root, f"/studies?StudyInstanceUID={john_uid}")
        assert status == 200 and found == []
        _, all_series = qido(jane_root, "/series")
        assert {s["0020000D"]["Value"][0] for s in all_series} == {jane_uid}

    def test_a_link_credential_reaches_no_admin_route_and_stores_nothing(
        self, nodes: dict[str, Any]
    ) -> None:
        a = nodes["a"]
        files = open_manifest(decode_link(make_link(nodes, "john")["shlink"]))
        root, token = link_root(files), credential_of(files)["access_token"]
        bearer = {"Authorization": f"Bearer {token}"}
        for path in ("/admin/api/status", "/dicomweb/studies", "/admin/api/studies"):
            assert http("GET", a.url + path, headers=bearer)[0] == 401
        for path in ("/../../admin/api/status", "/%2e%2e/%2e%2e/admin/api/status"):
            assert http("GET", root + path)[0] in (401, 404)
        status, _, _ = http(
            "POST", root + "/studies", body={}, headers={"Content-Type": "application/dicom"}
        )
        assert status == 405

    def test_an_unknown_credential_is_refused_and_never_logged(self, nodes: dict[str, Any]) -> None:
        a = nodes["a"]
        made_up = base64.urlsafe_b64encode(b"\x07" * 32).rstrip(b"=").decode()
        status, body, _ = http("GET", f"{a.url}/links/{made_up}/dicomweb/studies")
        assert status == 401 and "no share link" in json.loads(body)["error"]
        assert http("POST", f"{a.url}/shl/{made_up}", {"recipient": "x"})[0] == 404
        assert made_up not in a.log_path.read_text()


class TestLinkRefusals:
    def test_a_revoked_link_is_refused_on_the_next_request(self, nodes: dict[str, Any]) -> None:
        a, b = nodes["a"], nodes["b"]
        made = make_link(nodes, "john", label="for Dr Z")
        link = decode_link(made["shlink"])
        root = link_root(open_manifest(link))
        assert qido(root)[0] == 200
        john = Wallet.open(nodes["wallets"]["john"], None)
        in_session(lambda s: john.revoke(s, a.url, bytes.fromhex(made["link_id"])))
        assert qido(root)[0] == 404
        assert http("POST", link["url"], {"recipient": "x"})[0] == 404
        rules = [d["rule"] for d in entries_of(a, made["link_id"], "denial")]
        assert rules == ["revoked", "revoked"]
        # Refusals are logged by route, never with the credential or manifest id in it.
        daemon_log = a.log_path.read_text()
        assert credential_of_root(root) not in daemon_log
        assert link["url"].rsplit("/", 1)[1] not in daemon_log
        assert "/links/{access_token}/dicomweb/studies" in daemon_log

        def refusal_shown() -> bool:
            result = run_cli(
                "patient", "log", a.url, b.url, "--wallet", str(nodes["wallets"]["john"]),
                check=False,
            )  # fmt: skip
            return result.returncode == 0 and "the link 'for Dr Z' was refused (revoked)" in (
                result.stdout
            )

        wait_until(refusal_shown, timeout=30, interval=0.5, message="the refusal, proven")

    def test_an_expired_link_is_refused(self, nodes: dict[str, Any]) -> None:
        a = nodes["a"]
        made = make_link(nodes, "john", None, 3)
        link = decode_link(made["shlink"])
        root = link_root(open_manifest(link))
        wait_until(lambda: qido(root)[0] == 404, timeout=10, interval=0.25)
        assert http("POST", link["url"], {"recipient": "x"})[0] == 404
        rules = {d["rule"] for d in entries_of(a, made["link_id"], "denial")}
        assert rules == {"expired"}

    def test_five_wrong_passcodes_kill_the_link(self, nodes: dict[str, Any]) -> None:
        a = nodes["a"]
        made = make_link(nodes, "john", passcode="right")
        link = decode_link(made["shlink"])
        remaining = []
        for _ in range(4):
            status, body, _ = http("POST", link["url"], {"recipient": "x", "passcode": "wrong"})
            assert status == 401
            remaining.append(json.loads(body)["remainingAttempts"])
        assert remaining == [4, 3, 2, 1]
        assert http("POST", link["url"], {"recipient": "x", "passcode": "wrong"})[0] == 404
        status, body, _ = http("POST", link["url"], {"recipient": "x", "passcode": "right"})
        assert status == 404 and "link_dead" in json.loads(body)["error"]
        rules = [d["rule"] for d in entries_of(a, made["link_id"], "denial")]
        assert rules == ["wrong_passcode"] * 4 + ["link_dead", "link_dead"]

    def test_a_link_over_the_maximum_lifetime_is_refused(self, nodes: dict[str, Any]) -> None:
        result = patient(
            nodes["wallets"]["john"],
            "share",
            "--custodian",
            nodes["a"].url,
            "--all",
            "--expires",
            "31d",
            check=False,
        )
        assert result.returncode == 1
        assert "lifetime_too_long" in result.stderr


class TestFetchByLink:
    def test_another_node_imports_the_linked_study(self, nodes: dict[str, Any]) -> None:
        a, b = nodes["a"], nodes["b"]
        ct = nodes["studies"]["jane"][1]
        made = make_link(nodes, "jane", ct, passcode="2468")
        result = json.loads(b.cli("fetch", made["shlink"], "--passcode", "2468", "--json").stdout)
        assert result["stored"] == 4 and len(result["studies"]) == 1
        uid = result["studies"][0]["study_uid"]
        found = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    f"{b.url}/dicomweb/studies/{uid}/instances",
                    headers={**b.auth, "Accept": DICOM_JSON},
                )
            ).read()
        )
        assert len(found) == 4
        kinds = [e["digest"] for e in entries_of(a, made["link_id"], "access")]
        assert len(kinds) == 2  # the manifest, then the viewing session the fetch opened
        assert not [e for e in own_entries(b) if e.kind == "receipt"]

    def test_a_wrong_passcode_fails_the_fetch(self, nodes: dict[str, Any]) -> None:
        ct = nodes["studies"]["jane"][1]
        made = make_link(nodes, "jane", ct, passcode="1357")
        result = nodes["b"].cli("fetch", made["shlink"], "--passcode", "nope", check=False)
        assert result.returncode == 1 and "passcode" in result.stderr


class TestDownload:
    def test_the_download_is_the_linked_study_as_pdi_media_and_is_recorded(
        self, nodes: dict[str, Any]
    ) -> None:
        ct = nodes["studies"]["jane"][1]
        made = make_link(nodes, "jane", ct)
        root = link_root(open_manifest(decode_link(made["shlink"])))
        status, body, _ = http("GET", root.removesuffix("/dicomweb") + "/download")
        assert status == 200, body[:200]
        with zipfile.ZipFile(io.BytesIO(body)) as media:
            names = media.namelist()
        # IHE PDI file names: PTnnnnnn/STnnnnnn/SEnnnnnn/IMnnnnnn (docs/viewer.md).
        assert "DICOMDIR" in names and len([n for n in names if n.startswith("PT")]) >= 4
        digests = [e["digest"] for e in entries_of(nodes["a"], made["link_id"], "access")]
        assert link_access_digest("download") in digests


class TestSharePage:
    def test_the_share_page_decrypts_the_manifest_and_lists_the_study_without_sending_the_key(
        self, nodes: dict[str, Any]
    ) -> None:
        from tests.support.browser import chromium_session

        ct = nodes["studies"]["jane"][1]
        made = make_link(nodes, "jane", ct, passcode="9911", label="Dr Y")
        link = decode_link(made["shlink"])
        sent: list[str] = []
        with chromium_session("share-links", viewport=(390, 844)) as browser:
            page = browser.new_page()

            def record(request: Any) -> None:
                body = (request.post_data_buffer or b"").decode(errors="replace")
                sent.append(" ".join([request.url, json.dumps(dict(request.headers)), body]))

            page.on("request", record)
            page.goto(made["url"])
            page.wait_for_selector("#passcode-form:not([hidden])")
            page.fill("#passcode", "wrong")
            page.click("#passcode-button")
            page.wait_for_selector("#attempts:not([hidden])")
            assert "4 attempts left" in page.text_content("#attempts")
            page.fill("#passcode", "9911")
            page.click("#passcode-button")
            page.wait_for_selector("#studies:not([hidden])")
            page.shot("study-list")
            items = page.locator("#study-list li")
            assert items.count() == 1
            assert "4 images" in items.first.text_content()
            href = items.first.locator("a").get_attribute("href")
            # OHIF's viewer mode on its dicomwebproxy source (which reads studyInstanceUIDs
            # only), or the light viewer where OHIF is not installed.
            assert href.startswith(("/viewer/viewer/dicomwebproxy?url=", "/viewer-lite/?root="))
            if href.startswith("/viewer/"):
                assert "&studyInstanceUIDs=" in href
            assert page.get_attribute("#download", "href").endswith("/download")
            assert page.text_content("#label") == "Shared: Dr Y"
            assert page.foreign_requests(nodes["a"].url) == []
        assert sent, "the page made no request"
        for request in sent:
            assert link["key"] not in request and "shlink:" not in request, request


class TestWebWallet:
    def test_a_link_made_in_the_web_wallet_opens_in_a_browser_that_never_saw_it(
        self, nodes: dict[str, Any]
    ) -> None:
        from tests.support.browser import chromium_session

        a, ct = nodes["a"], nodes["studies"]["jane"][1]
        seed = nodes["wallets"]["jane"] / "seed.json"  # the same patient, restored
        phone = (390, 844)

        with chromium_session("share-links-wallet", viewport=phone) as browser:
            page = browser.new_page()
            url, token_id = share_in_web_wallet(page, a.url, seed, ct["ref"], "Dr Web", "3141")
            page.shot("1-link-made")
        assert url.startswith(f"{a.url}/share/#shlink:/")
        link = decode_link(url.split("#", 1)[1])
        assert link["label"] == "Dr Web" and link["flag"] == "P"
        # The independent check holds for the browser's files too.
        files = open_manifest(link, "3141")
        assert [t for t, _ in files] == ["application/fhir+json", "application/smart-api-access"]
        assert qido(link_root(files))[0] == 200

        sent: list[str] = []
        with chromium_session("share-links-recipient", viewport=phone) as browser:
            page = browser.new_page()
            page.on("request", lambda r: sent.append(r.url + (r.post_data or "")))
            page.goto(url)
            page.fill("#passcode", "3141")
            page.click("#passcode-button")
            page.wait_for_selector("#studies:not([hidden])")
            page.shot("2-recipient")
            assert "4 images" in str(page.text_content("#study-list"))
        assert all(link["key"] not in r and "shlink:" not in r for r in sent)
        kinds = [link_access_kind(e["digest"]) for e in entries_of(a, token_id, "access")]
        assert kinds == ["manifest", "view", "manifest"]


class TestAuditOfTheFederation:
    def test_the_federation_with_all_these_links_audits_clean(self, nodes: dict[str, Any]) -> None:
        a, b = nodes["a"], nodes["b"]

        def clean() -> dict[str, Any] | None:
            result = run_cli("audit", a.url, b.url, "--json", check=False)
            report: dict[str, Any] = json.loads(result.stdout)
            return report if result.returncode == 0 else None

        report = wait_until(clean, timeout=30, interval=1.0, message="a clean audit")
        assert report["violations"] == []
