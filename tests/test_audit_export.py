"""Security audit export (IHE ATNA) to a real rsyslog, from real node processes.

Custodian A and grantee B both send their audit messages to one rsyslog; the test
triggers each event kind, reads what rsyslog wrote and parses every message as a DICOM
audit message. Then rsyslog is stopped, more events happen (including A's stop), rsyslog
is started again and the queued messages arrive.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from node.core import atna
from node.edges.http.app import AUTH_AUDITS_PER_MINUTE
from node.samples import make_ct_study
from node.services.wallet import Wallet
from node.store.audit_queue import AuditQueue
from tests.support.nodes import NodeProcess, free_port, init_node, run_cli, wait_until
from tests.support.syslog import AuditRecord, Rsyslog, make_test_ca, parse_record
from tests.test_dimse import dcmtk
from tests.test_dimse_access import RECEIVER, storescp
from tests.test_stow import CONTENT_TYPE, multipart

SOURCE = atna.AuditSource("a.example/imageshare", "IMAGESHARE")
CALLER = "AUDITED_PACS"


def _export(rsyslog: Rsyslog, extra: str = "") -> str:
    return (
        "[audit_export]\nenabled = true\n"
        f'transport = "{rsyslog.transport.removeprefix("m")}"\n'
        f'host = "127.0.0.1"\nport = {rsyslog.port}\n'
        f"max_backoff = 1.0\n{extra}"
    )


def _peer(node: NodeProcess) -> str:
    return f'[[peers]]\norigin = "{node.origin}"\nurl = "{node.url}"\nvkey = "{node.vkey}"\n'


def _get(node: NodeProcess, path: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(node.url + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _post(node: NodeProcess, path: str, body: bytes, content_type: str) -> int:
    headers = {**node.auth, "Content-Type": content_type}
    request = urllib.request.Request(node.url + path, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
        return int(response.status)


def _wait_for(rsyslog: Rsyslog, wanted: Callable[[AuditRecord], bool], what: str) -> AuditRecord:
    def found() -> AuditRecord | None:
        return next((m for m in rsyslog.messages() if wanted(m)), None)

    record: AuditRecord = wait_until(found, timeout=30, message=f"the audit message of {what}")
    return record


def _event(
    source: str, event_id: str, type_code: str | None = None, **checks: str
) -> Callable[[AuditRecord], bool]:
    def matches(record: AuditRecord) -> bool:
        if record.source != source or record.event_id != event_id:
            return False
        if type_code is not None and type_code not in record.type_codes:
            return False
        return all(getattr(record, k) == v for k, v in checks.items())

    return matches


def _transferred(source: str, via: str, sent: bool) -> Callable[[AuditRecord], bool]:
    def matches(record: AuditRecord) -> bool:
        return (
            record.source == source
            and record.event_id == "110104"
            and record.action == ("R" if sent else "C")
            and record.details().get("Service") == via
        )

    return matches


class TestAuditMessages:
    """The message forms, at unit level."""

    def test_key_rotation_is_a_security_alert_naming_both_keys(self) -> None:
        event = atna.key_rotation(SOURCE, "operator", "keyid-old", "keyid-new")
        frame = atna.syslog_frame(atna.audit_message_xml(event, SOURCE, 1.7e9), 1.7e9, "h", "42")
        record = parse_record(frame)
        assert (record.event_id, record.type_codes) == ("110113", ["110129"])
        assert record.objects("110182") == ["keyid-old", "keyid-new"]
        assert record.source == SOURCE.origin

    def test_syslog_frame_is_rfc5424_with_the_ihe_msgid_and_octet_counting(self) -> None:
        event = atna.admin_authentication(SOURCE, False, "10.0.0.9")
        frame = atna.syslog_frame(
            atna.audit_message_xml(event, SOURCE, 0.25), 0.25, "host name", "7", event.outcome
        )
        record = parse_record(frame)
        # Facility 10 (authpriv), severity warning for a failed authentication.
        assert record.pri == 10 * 8 + 4
        assert record.header == ["1970-01-01T00:00:00.250Z", "hostname", "imageshare", "7",
                                 "IHE+RFC-3881", "-"]  # fmt: skip
        assert atna.octet_counted(frame) == str(len(frame)).encode() + b" " + frame

    def test_hostile_participant_text_still_makes_a_parsable_bounded_message(self) -> None:
        hostile = "AE\x00\x1b<x>&" + "z" * 10_000
        event = atna.query(SOURCE, hostile, "127.0.0.1", "C-FIND", 3)
        root = ET.fromstring(atna.audit_message_xml(event, SOURCE, 0))
        user = root.findall("ActiveParticipant")[0].attrib["UserID"]
        assert user.startswith("AE<x>&") and len(user) == atna.MAX_TEXT


class TestAuditQueue:
    def test_over_the_message_bound_the_oldest_are_dropped_and_counted(
        self, tmp_path: Path
    ) -> None:
        queue = AuditQueue(tmp_path, max_messages=3, max_bytes=10_000)
        dropped = [queue.add(f"m{i}".encode()) for i in range(5)]
        assert dropped == [0, 0, 0, 1, 1]
        assert [q.message for q in queue.oldest(10)] == [b"m2", b"m3", b"m4"]
        queue.close()
        reopened = AuditQueue(tmp_path, max_messages=3, max_bytes=10_000)
        assert reopened.counts() == (3, 2)
        reopened.remove(reopened.oldest(2))
        assert [q.message for q in reopened.oldest(10)] == [b"m4"]
        reopened.close()

    def test_over_the_byte_bound_the_oldest_are_dropped(self, tmp_path: Path) -> None:
        queue = AuditQueue(tmp_path, max_messages=100, max_bytes=250)
        for i in range(4):
            queue.add(bytes([i]) * 100)
        assert [q.message[0] for q in queue.oldest(10)] == [2, 3]
        assert queue.counts() == (2, 2)
        queue.close()


@pytest.fixture
def rsyslog_tcp(tmp_path: Path) -> Iterator[Rsyslog]:
    collector = Rsyslog(tmp_path / "rsyslog", "tcp").start()
    yield collector
    collector.stop()


class TestAuditExportEndToEnd:
    def test_every_event_kind_arrives_as_dicom_audit_xml_even_across_a_collector_restart(
        self, tmp_path: Path, rsyslog_tcp: Rsyslog
    ) -> None:
        collector = rsyslog_tcp
        a = init_node(tmp_path, "a.example/imageshare", "a")
        b = init_node(tmp_path, "b.example/imageshare", "b")
        settings = "[federation]\ndiscovery = false\nreplicate_interval = 0.3\n"
        move_port = free_port()
        a.append_config(
            settings + _export(collector) + _peer(b)
            + f'[[dimse.callers]]\nae_title = "{CALLER}"\nhost = "127.0.0.1"\n'
            + f'[[dimse.destinations]]\nae_title = "{RECEIVER}"\nhost = "127.0.0.1"\n'
            + f"port = {move_port}\n"
        )  # fmt: skip
        b.append_config(settings + _export(collector) + _peer(a))
        study = make_ct_study(tmp_path / "study", series=1, slices=3)
        a.cli("import", str(tmp_path / "study"))
        wallet = Wallet.create(tmp_path / "wallet", None)
        try:
            a.start()
            b.start()
            _wait_for(collector, _event(a.origin, "110100", "110120"), "A's start")
            _wait_for(collector, _event(b.origin, "110100", "110120"), "B's start")

            # Admin-token authentication, failed and succeeded; a WADO-RS retrieve.
            assert _get(a, "/dicomweb/studies", {}) == 401
            accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
            path = f"/dicomweb/studies/{study.study_uid}"
            assert _get(a, path, {**a.auth, "Accept": accept}) == 200
            as_json = {**a.auth, "Accept": "application/dicom+json"}
            # A viewer reads the metadata twice and a frame: one message for each kind.
            assert _get(a, f"{path}/metadata", as_json) == 200
            assert _get(a, f"{path}/metadata", as_json) == 200
            frame = f"{path}/series/{study.series_uids[0]}/instances/{study.sop_uids[0]}/frames/1"
            octets = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
            assert _get(a, frame, {**a.auth, "Accept": octets}) == 200
            assert _get(a, f"/dicomweb/studies?PatientID={study.patient_id}", as_json) == 200
            _wait_for(collector, _event(a.origin, "110114", "110122", outcome="4"), "a bad token")
            _wait_for(collector, _event(a.origin, "110114", "110122", outcome="0"), "the token")
            wado = _wait_for(collector, _transferred(a.origin, "WADO-RS", True), "WADO-RS")
            assert wado.objects("110180") == [study.study_uid]
            _wait_for(collector, _transferred(a.origin, "WADO-RS frames", True), "a frame")
            qido = _wait_for(collector, _event(a.origin, "110112"), "QIDO-RS")
            assert qido.details() == {"Matches": "1"}
            uploaded = make_ct_study(tmp_path / "stow", series=1, slices=2, patient_id="MRN-3")
            body = multipart(*(f.read_bytes() for f in uploaded.files))
            assert _post(a, "/dicomweb/studies", body, CONTENT_TYPE) == 200
            stow = _wait_for(collector, _transferred(a.origin, "STOW-RS", False), "STOW-RS")
            assert stow.objects("110180") == [uploaded.study_uid]
            assert stow.details()["ContainsInstances"] == "2"
            metadata = [
                m
                for m in collector.messages()
                if _transferred(a.origin, "WADO-RS metadata", True)(m)
            ]
            assert len(metadata) == 1

            # DIMSE: a C-STORE from a modality; a C-FIND, C-GET and C-MOVE by the known caller.
            other = make_ct_study(tmp_path / "other", series=1, slices=1, patient_id="MRN-2")
            called = ["-aet", CALLER, "-aec", "IMAGESHARE", "127.0.0.1", str(a.dimse_port)]
            assert dcmtk("storescu", *called, str(other.files[0])).returncode == 0
            keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}"]
            assert dcmtk("findscu", "-S", *called, *keys).returncode == 0
            out = tmp_path / "got"
            out.mkdir()
            assert dcmtk("getscu", "-S", *called, "-od", str(out), *keys).returncode == 0
            stored = _wait_for(collector, _transferred(a.origin, "C-STORE", False), "C-STORE")
            assert stored.objects("110180") == [other.study_uid]
            _wait_for(collector, lambda m: _event(a.origin, "110112")(m)
                      and "C-FIND" in m.objects("12"), "C-FIND")  # fmt: skip
            _wait_for(collector, _transferred(a.origin, "C-GET", True), "C-GET")
            with storescp(move_port, tmp_path / "moved"):
                moving = ["movescu", "-S", *called, "-aem", RECEIVER, *keys]
                assert dcmtk(*moving).returncode == 0
            moved = _wait_for(collector, _transferred(a.origin, "C-MOVE", True), "C-MOVE")
            assert moved.objects("110180") == [study.study_uid]

            # Configuration changes: a patient key enrolled, a federation member added.
            key = wallet.key_for(a.origin).public_key_text
            a.cli("enroll", "--patient-id", study.patient_id, f"--key={key}")
            enrolled = _wait_for(collector, _event(a.origin, "110113", "110129"), "enrollment")
            assert enrolled.objects("2") == [study.patient_id]
            run_cli("peers", "add", "c.example/imageshare", "http://127.0.0.1:9",
                    _vkey_of_new_node(tmp_path), config=a.config)  # fmt: skip
            _wait_for(collector, _event(a.origin, "110113", "110128"), "peers add")

            # Consent: a grant, the consented transfer (both sides), a revocation, a denial.
            grant = asyncio.run(_grant(wallet, a, b))
            granting = _event(a.origin, "110110", "110135", action="C")
            granted = _wait_for(collector, granting, "grant")
            assert granted.objects("2") == [study.patient_id]
            b.cli("fetch", grant["url"], "--json")
            sent = _wait_for(collector, _transferred(a.origin, "transfer", True), "transfer sent")
            assert sent.objects("110180") == [study.study_uid]
            received = _wait_for(
                collector, _transferred(b.origin, "transfer", False), "transfer received"
            )
            assert received.objects("110180") == [study.study_uid]
            run_cli("patient", "revoke", grant["token_id"], "--custodian", a.url,
                    "--wallet", str(tmp_path / "wallet"))  # fmt: skip
            _wait_for(collector, _event(a.origin, "110110", "110135", action="U"), "revocation")
            assert b.cli("fetch", grant["token"], check=False).returncode == 1
            denial = _wait_for(collector, _event(a.origin, "110113", "110132"), "the denial")
            assert denial.outcome == "4"

            # The node key rotated: a Security Alert naming the retired and the new key.
            rotated = json.loads(a.cli("key", "rotate", "--json").stdout)
            rotation = _wait_for(
                collector,
                lambda m: _event(a.origin, "110113", "110129")(m) and bool(m.objects("110182")),
                "key rotation",
            )
            assert rotation.objects("110182") == [rotated["old_vkey"], rotated["vkey"]]
            # B follows the rotation from A's log into its roster: a Network Configuration.
            _wait_for(collector, _event(b.origin, "110113", "110128"), "B following A's key")

            # The collector goes away; A stops (its stop message is queued on disk), B
            # authenticates a request; the collector comes back, then A.
            collector.stop()
            before = len(collector.messages())
            assert _get(b, "/admin/api/transfers", b.auth) == 200
            a.stop()
            collector.start()
            _wait_for(collector, _event(b.origin, "110114", "110122", outcome="0"), "B's login")
            a.start()
            wait_until(
                lambda: any(_event(a.origin, "110100", "110121")(m)
                            for m in collector.messages()[before:]),
                timeout=30, message="A's stop, queued while the collector was down",
            )  # fmt: skip
            _wait_for(collector, _event(a.origin, "110100", "110120"), "A's restart")
        finally:
            a.stop()
            b.stop()
        b_stop = _wait_for(collector, _event(b.origin, "110100", "110121"), "B's stop")
        assert b_stop.action == "E"
        # Nothing of this goes into the ledger: its entries name keyed references only.
        for node in (a, b):
            for ledger in node.data_dir.glob("ledger*"):
                held = ledger.read_bytes()
                assert study.study_uid.encode() not in held
                assert study.patient_id.encode() not in held


def _vkey_of_new_node(base: Path) -> str:
    return init_node(base, "c.example/imageshare", "c").vkey


async def _grant(wallet: Wallet, a: NodeProcess, b: NodeProcess) -> dict[str, str]:
    async with aiohttp.ClientSession() as session:
        return dict(await wallet.grant(session, a.url, b.origin, None, 3600))


@pytest.mark.parametrize("transport", ["tls", "udp"])
def test_node_start_and_authentication_reach_rsyslog_over(transport: str, tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path / "ca") if transport == "tls" else None
    collector = Rsyslog(tmp_path / "rsyslog", transport, ca).start()
    node = init_node(tmp_path, "a.example/imageshare", "a")
    extra = f'ca_file = "{ca.ca_file}"\n' if ca is not None else ""
    node.append_config("[federation]\ndiscovery = false\n" + _export(collector, extra))
    try:
        node.start()
        _wait_for(collector, _event(node.origin, "110100", "110120"), "the start")
        # A client guessing tokens is audited a bounded number of times a minute.
        wrong = {"Authorization": "Bearer guess"}
        for _ in range(3 * AUTH_AUDITS_PER_MINUTE):
            assert _get(node, "/admin/api/transfers", wrong) == 401
        assert _get(node, "/admin/api/transfers", node.auth) == 200
        # Messages go out in order: once the right token's message is in, so are the others.
        _wait_for(collector, _event(node.origin, "110114", "110122", outcome="0"), "the login")
        failed = [m for m in collector.messages() if m.event_id == "110114" and m.outcome == "4"]
        assert len(failed) == AUTH_AUDITS_PER_MINUTE
    finally:
        node.stop()
        collector.stop()
    assert os.path.getsize(collector.output) > 0


def test_a_collector_requiring_client_certificates_gets_the_queue_once_the_node_has_one(
    tmp_path: Path,
) -> None:
    ca = make_test_ca(tmp_path / "ca")
    collector = Rsyslog(tmp_path / "rsyslog", "mtls", ca).start()
    node = init_node(tmp_path, "a.example/imageshare", "a")
    settings = "[federation]\ndiscovery = false\n"
    node.append_config(settings + _export(collector, f'ca_file = "{ca.ca_file}"\n'))
    try:
        node.start()
        wait_until(
            lambda: "security audit collector" in node.log_path.read_text(),
            timeout=30,
            message="the node to find the collector refusing it",
        )
        node.stop()
        assert collector.messages() == []
        # The same node, now with its certificate: what it queued arrives, then its restart.
        text = node.config.read_text().replace(
            f'ca_file = "{ca.ca_file}"\n',
            f'ca_file = "{ca.ca_file}"\ncert_file = "{ca.client_cert_file}"\n'
            f'key_file = "{ca.client_key_file}"\n',
        )
        node.config.write_text(text)
        node.start()
        _wait_for(collector, _event(node.origin, "110100", "110121"), "the first stop")
        starts = wait_until(
            lambda: [m for m in collector.messages() if _event(node.origin, "110100", "110120")(m)]
            if len([m for m in collector.messages()
                    if _event(node.origin, "110100", "110120")(m)]) == 2 else None,
            timeout=30,
            message="both starts",
        )  # fmt: skip
        assert len(starts) == 2
    finally:
        node.stop()
        collector.stop()


def test_a_node_with_unusable_tls_files_for_the_collector_refuses_to_start(
    tmp_path: Path,
) -> None:
    node = init_node(tmp_path, "a.example/imageshare", "a")
    node.append_config(
        "[federation]\ndiscovery = false\n[audit_export]\nenabled = true\n"
        'host = "127.0.0.1"\nca_file = "missing-ca.pem"\n'
    )
    result = node.cli("run", check=False, timeout=60)
    assert result.returncode != 0
    assert "audit_export: the TLS files cannot be used" in result.stderr
