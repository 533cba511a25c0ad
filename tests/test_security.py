"""Security of the node: parsers of outside input fail closed, the HTTP surface refuses
hostile requests, and no route can hand out study data without a valid credential.

Fuzzers already elsewhere (not repeated here): canonical msgpack (test_encoding), ledger
entries (test_entries), grant and revocation decoding (test_consent), signed-request
headers (test_signed_requests), manifests and the instance stream (test_manifest), audit
answers (test_audit). This module covers the rest, and the running daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import re
import socket
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import load_config
from node.core import channel, notes
from node.core.consent import decode_revocation, parse_token_text, sign_revocation, token_text
from node.core.entries import LedgerEntry, decode_entry
from node.core.keys import NodeIdentity
from node.core.manifest import OpenRequest
from node.core.origins import log_id
from node.core.patient_keys import PatientKey, parse_public_key
from node.core.roster import make_member
from node.core.signed_requests import make_headers, node_signer
from node.edges.http import app as http_app
from node.edges.http.multipart import parse_accept
from node.errors import BadInput, PayloadTooLarge, Unauthorized
from node.samples import SyntheticStudy, make_ct_study
from node.services.peer_client import signed_request
from node.services.roster import add_peer
from node.services.runtime import open_runtime
from node.store.attributes import Level
from node.store.dicom_header import InflateLimits, parse_header, read_dataset
from node.store.queries import parse_qido
from node.store.secrets import read_seed
from tests.support import faults
from tests.support.nodes import NodeProcess, init_node, wait_until
from tests.support.patients import call, enroll_new_key, make_grant, send, signed_headers

FAIL_CLOSED = (BadInput, Unauthorized)
FUZZ = settings(max_examples=200, deadline=None)
LIVE = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
CLIENT_TIMEOUT = 2.0
# Above the /p2p limits (1 MiB, 8 MiB), so that those are what refuses a 9 MiB body.
MAX_BODY = 16 * 1024 * 1024
INFLATE_LIMITS = InflateLimits(max_bytes=1024**3, max_ratio=100.0)  # a node's defaults
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=fuzz-boundary'

# -- pure parsers ----------------------------------------------------------------------

SIGNER = NodeIdentity.generate("log.example/imageshare")
NOTE = notes.sign_note(
    notes.Checkpoint("log.example/imageshare", 7, bytes(range(32))).body(), SIGNER
)
PATIENT = PatientKey.derive(bytes(32), "a.example/imageshare")
REVOCATION = sign_revocation(PATIENT.public_key, bytes(32), 1_800_000_000, PATIENT.sign)


def mutations(original: bytes) -> st.SearchStrategy[bytes]:
    """Byte flips, cuts and insertions of ``original``: near misses of a valid input."""

    def flip(data: bytes, position: int, mask: int) -> bytes:
        if not data:
            return data
        out = bytearray(data)
        out[position % len(data)] ^= mask or 1
        return bytes(out)

    positions = st.integers(min_value=0, max_value=max(0, len(original) - 1))
    return st.one_of(
        st.builds(flip, st.just(original), positions, st.integers(0, 255)),
        st.builds(lambda n: original[:n], positions),
        st.builds(lambda n, junk: original[:n] + junk + original[n:], positions, st.binary()),
        st.binary(max_size=len(original) + 16),
    )


class TestNotesFailClosed:
    @FUZZ
    @given(mutations(NOTE.encode()))
    def test_mutated_signed_checkpoint_is_refused_or_still_the_signed_one(self, data: bytes):
        try:
            checkpoint = notes.verify_note(data, SIGNER.vkey)
        except FAIL_CLOSED:
            return
        # Only a change the signature does not cover (e.g. an extra unknown signer) passes.
        assert checkpoint == notes.Checkpoint.parse(NOTE.split("\n\n")[0] + "\n")

    @FUZZ
    @given(st.text(max_size=300))
    def test_text_is_parsed_as_note_checkpoint_and_vkey_or_refused(self, text: str) -> None:
        for parse in (notes.parse_note, notes.Checkpoint.parse, notes.parse_vkey):
            with contextlib.suppress(*FAIL_CLOSED):
                parse(text)

    @FUZZ
    @given(st.text(max_size=80), st.text(max_size=80), st.text(max_size=120))
    def test_roster_entries_are_valid_or_refused(self, origin: str, url: str, vkey: str) -> None:
        with contextlib.suppress(BadInput):
            make_member(origin, url, vkey)
        with contextlib.suppress(BadInput):
            make_member(SIGNER.origin, url, SIGNER.vkey)


class TestTokensAndKeysFailClosed:
    @FUZZ
    @given(st.text(max_size=200))
    def test_token_text_and_patient_keys_are_parsed_or_refused(self, text: str) -> None:
        for parse in (parse_token_text, parse_public_key):
            with contextlib.suppress(BadInput):
                parse(text)

    @FUZZ
    @given(mutations(token_text(REVOCATION).encode()))
    def test_mutated_token_text_never_decodes_to_another_valid_revocation(self, data: bytes):
        try:
            revocation = decode_revocation(parse_token_text(data.decode("utf-8", "replace")))
        except BadInput:
            return
        assert not revocation.signature_valid() or revocation == decode_revocation(REVOCATION)


KEY = bytes(range(32))
PLAINTEXT = bytes(range(256)) * 300  # more than one message


class TestEncryptedChannelFailsClosed:
    @settings(max_examples=80, deadline=None)
    @given(mutations(channel.seal(KEY, PLAINTEXT)), st.integers(1, 70_000))
    def test_altered_stream_is_refused_never_misread(self, data: bytes, piece: int) -> None:
        decryptor = channel.StreamDecryptor(KEY)
        received = b""
        try:
            for start in range(0, len(data), piece):
                for message, _final in decryptor.feed(data[start : start + piece]):
                    received += message
            decryptor.close()
        except channel.ChannelError:
            assert PLAINTEXT.startswith(received)  # what came out before the refusal is true
            return
        assert received == PLAINTEXT

    @FUZZ
    @given(st.binary(max_size=40), st.binary(max_size=40))
    def test_hostile_peer_keys_are_refused_or_give_unrelated_keys(
        self, peer_static: bytes, peer_ephemeral: bytes
    ) -> None:
        with contextlib.suppress(channel.ChannelError):
            channel.receiver_session(
                bytes(32), channel.EphemeralKey.generate(), peer_static, peer_ephemeral, b"id"
            )


def _real_dicom_files() -> list[bytes]:
    names = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"]
    names.append("image_dfl.dcm")  # Deflated Explicit VR Little Endian
    return [Path(str(get_testdata_file(name))).read_bytes() for name in names]


REAL_FILES = _real_dicom_files()
# Not deflated, in each byte order and VR encoding: read after their file meta by the node.
PLAIN_FILES = [
    *REAL_FILES[:-1],
    *(
        Path(str(get_testdata_file(name))).read_bytes()
        for name in ("MR_small_bigendian.dcm", "MR_small_implicit.dcm")
    ),
]


def _pydicom_read(path: Path, stop_before_pixels: bool) -> pydicom.FileDataset:
    """pydicom's dcmread of the file opened as the node opens it (named by its Path)."""
    with io.BufferedReader(io.FileIO(path)) as f:
        return pydicom.dcmread(f, stop_before_pixels=stop_before_pixels)


def _as_read(read: Any) -> object:
    """What a read made of a file, element for element; "refused" if it raised."""
    try:
        ds = read()
    except Exception:  # pydicom's many errors, or the node's BadInput for them
        return "refused"
    meta = [_element(e) for e in ds.file_meta._dict.values()]
    return (ds.preamble, meta, [_element(e) for e in ds._dict.values()], ds.original_encoding)


def _element(element: Any) -> object:
    """An element as read: a raw one as its fields, a converted one as its tag, VR and
    value, "unreadable" where pydicom cannot convert it (comparing would raise)."""
    if isinstance(element, RawDataElement):
        return tuple(element)
    try:
        return (element.tag, element.VR, repr(element.value))
    except Exception:
        return (element.tag, element.VR, "unreadable")


class TestDicomFilesFailClosed:
    @settings(max_examples=250, deadline=None)
    @given(st.sampled_from(range(len(REAL_FILES))).flatmap(lambda i: mutations(REAL_FILES[i])))
    def test_mutated_real_files_are_indexable_or_refused(self, data: bytes) -> None:
        with _on_disk(data) as path:
            try:
                header = parse_header(path, INFLATE_LIMITS)
            except (BadInput, PayloadTooLarge):
                return
        for uid in (header.sop_instance_uid, header.study_instance_uid, header.series_instance_uid):
            assert re.fullmatch(r"[0-9.]{1,64}", uid)

    @settings(max_examples=250, deadline=None)
    @given(st.sampled_from(range(len(PLAIN_FILES))).flatmap(lambda i: mutations(PLAIN_FILES[i])))
    def test_a_file_not_deflated_is_read_as_pydicom_reads_it(self, data: bytes) -> None:
        # The node reads the file meta once, then the dataset itself (_read_after_meta):
        # what it makes of a file must be what pydicom's dcmread makes of it, or both refuse.
        with _on_disk(data) as path:
            for stop in (False, True):
                ours = _as_read(functools.partial(read_dataset, path, INFLATE_LIMITS, None, stop))
                theirs = _as_read(functools.partial(_pydicom_read, path, stop))
                assert ours == theirs

    @settings(max_examples=250, deadline=None)
    @given(st.sampled_from(range(len(REAL_FILES))).flatmap(lambda i: mutations(REAL_FILES[i])))
    def test_a_file_in_memory_is_judged_as_the_same_file_on_disk(self, data: bytes) -> None:
        with _on_disk(data) as path:
            on_disk = _judgement(lambda: parse_header(path, INFLATE_LIMITS).values)
        assert _judgement(lambda: parse_header(data, INFLATE_LIMITS).values) == on_disk

    def test_an_encapsulated_value_cut_before_its_delimiter_is_refused(
        self, tmp_path: Path
    ) -> None:
        whole = Path(str(get_testdata_file("JPEG2000.dcm"))).read_bytes()
        cut = whole[:-100]  # inside the pixel data's last fragment: no sequence delimiter
        (tmp_path / "cut.dcm").write_bytes(cut)
        for source in (cut, tmp_path / "cut.dcm"):
            with pytest.raises(BadInput):
                parse_header(source, INFLATE_LIMITS)
        assert parse_header(whole, INFLATE_LIMITS).sop_instance_uid


@contextlib.contextmanager
def _on_disk(data: bytes) -> Iterator[Path]:
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(data)
        f.flush()
        yield Path(f.name)


def _judgement(read: Any) -> object:
    """What the header check made of a file: its values, or that it refused it."""
    try:
        return read()
    except (BadInput, PayloadTooLarge):
        return "refused"


class TestHttpHeaderParsersFailClosed:
    @FUZZ
    @given(st.text(max_size=200))
    def test_accept_headers_never_raise(self, header: str) -> None:
        parse_accept(header)

    @FUZZ
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["PatientID", "StudyDate", "limit", "offset", "fuzzy", "00100010"])
                | st.text(max_size=12),
                st.text(max_size=24),
            ),
            max_size=4,
        ),
        st.sampled_from(list(Level)),
    )
    def test_qido_queries_are_parsed_or_refused(
        self, params: list[tuple[str, str]], level: Level
    ) -> None:
        with contextlib.suppress(BadInput):
            parse_qido(level, params)


# -- the running daemon ------------------------------------------------------------------


@dataclass
class Target:
    node: NodeProcess
    member: NodeIdentity  # a roster member of the node
    outsider: NodeIdentity  # a well-formed node key the node does not know
    patient: PatientKey
    study: SyntheticStudy


def _set_http(node: NodeProcess, settings_text: str) -> None:
    text = node.config.read_text().replace("[http]\n", "[http]\n" + settings_text, 1)
    node.config.write_text(text)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    base = tmp_path_factory.mktemp("security")
    node = init_node(base, "a.example/imageshare", "a")
    member = init_node(base, "b.example/imageshare", "b")
    _set_http(
        node,
        f"client_timeout = {CLIENT_TIMEOUT}\nmin_body_rate = 1024\nmax_body_bytes = {MAX_BODY}\n",
    )
    node.append_config("[federation]\ndiscovery = false")
    add_peer(load_config(node.config), member.origin, member.url, member.vkey)
    study = make_ct_study(base / "study", series=1, slices=2, rows=32, columns=32)
    node.cli("import", str(base / "study"))
    patient = enroll_new_key(node, study.patient_id)
    node.start()
    wait_until(lambda: _echo(node), message="DIMSE to listen")
    member_identity = NodeIdentity(member.origin, read_seed(member.data_dir / "node.key"))
    try:
        yield Target(
            node,
            member_identity,
            NodeIdentity.generate("stranger.example/imageshare"),
            patient,
            study,
        )
    finally:
        node.stop()


@pytest.fixture
def still_serving(target: Target) -> Iterator[None]:
    """After every test that attacks the daemon, it still answers /healthz."""
    yield
    assert raw(target.node, "GET", "/healthz")[0] == 200


def raw(
    node: NodeProcess,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10,
) -> tuple[int, bytes]:
    """One request sent byte for byte as given (no client-side normalisation of the path)."""
    head = faults.request_head(
        method, target, {"Connection": "close", **(headers or {})}, len(body) if body else None
    )
    if method == "POST" and not body:
        head = head[:-2] + b"Content-Length: 0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=timeout) as conn:
        conn.sendall(head + body)
        answer = bytearray()
        while chunk := conn.recv(65536):
            answer += chunk
    status_line, _, rest = bytes(answer).partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def ledger_size(node: NodeProcess) -> int:
    logs = node.get_json("/ledger/logs", auth=False)
    return int(next(g["size"] for g in logs if g["origin"] == node.origin))


def last_entry(node: NodeProcess) -> LedgerEntry:
    size = ledger_size(node)
    path = f"/ledger/logs/{log_id(node.origin)}/entries?start={size - 1}&end={size}"
    with urllib.request.urlopen(node.url + path, timeout=10) as response:
        return decode_entry(msgpack.unpackb(response.read())[0])


def object_count(node: NodeProcess) -> int:
    return sum(1 for _ in (node.data_dir / "objects").rglob("*.dcm"))


def signed(
    node: NodeProcess,
    caller: NodeIdentity,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    stream: bool = False,
) -> tuple[int, Any]:
    """A POST signed by ``caller``; ``stream`` sends the body chunked (no Content-Length)."""

    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            if headers is not None:
                data: Any = body
                if stream:

                    async def chunks() -> Any:
                        for i in range(0, len(body), 1 << 20):
                            yield body[i : i + (1 << 20)]

                    data = chunks()
                async with session.post(node.url + path, data=data, headers=headers) as r:
                    return r.status, await r.json(content_type=None)
            request = signed_request(
                session,
                "POST",
                node.url + path,
                caller.sign,
                node_signer(caller.origin),
                node.origin,
                body,
            )
            async with request as r:
                return r.status, await r.json(content_type=None)

    return asyncio.run(go())


def node_headers(caller: NodeIdentity, node: NodeProcess, path: str, body: bytes) -> dict[str, str]:
    """Signature headers by ``caller`` for a POST to ``node``."""
    return make_headers(
        caller.sign,
        node_signer(caller.origin),
        "POST",
        path,
        body,
        int(time.time()),
        os.urandom(16),
        audience=node.origin,
    )


@pytest.mark.usefixtures("still_serving")
class TestPathTraversal:
    PAYLOADS = (
        "..%2f..%2fnode.key",
        "%2e%2e%2f%2e%2e%2fadmin.token",
        "..%5c..%5cnode.key",
        "%2fetc%2fpasswd",
        "....%2f%2f....%2f%2fetc%2fpasswd",
        "node.key%00.dcm",
        "%00",
    )
    RAW_PATHS = (
        "/wallet/../admin.token",
        "/admin/static/../../node.key",
        "/dicomweb/studies/../../../etc/passwd",
        "/ledger/logs/../../node.key/checkpoint",
        "//etc/passwd",
        "/p2p/transfer/..%2f..%2fnode.key/instances",
    )

    def secrets_of(self, node: NodeProcess) -> list[bytes]:
        return [
            node.admin_token.encode(),
            (node.data_dir / "node.key").read_bytes().strip()[:24],
            b"root:x:0:0",
        ]

    def test_every_path_parameter_refuses_traversal_and_leaks_nothing(self, target: Target) -> None:
        node = target.node
        secrets = self.secrets_of(node)
        templates = sorted({canonical for _, canonical in _routes(node)} - {"/healthz"})
        probed = 0
        for template in templates:
            if "{" not in template:
                continue
            for payload in self.PAYLOADS:
                path = re.sub(r"\{[^}]+\}", payload, template)
                for method in ("GET", "POST"):
                    status, body = raw(node, method, path, node.auth)
                    probed += 1
                    assert 400 <= status < 500, (method, path, status, body[:200])
                    assert not any(s in body for s in secrets), (method, path)
        for path in self.RAW_PATHS:
            status, body = raw(node, "GET", path, node.auth)
            assert 400 <= status < 500, (path, status)
            assert not any(s in body for s in secrets), path
        assert probed > 100

    def test_patient_path_parameters_refuse_traversal_behind_a_valid_signature(
        self, target: Target
    ) -> None:
        node = target.node
        templates = sorted(
            {t for m, t in _routes(node) if m == "GET" and t.startswith("/patient/") and "{" in t}
        )
        assert templates
        for template in templates:
            for payload in (*self.PAYLOADS, "A" * 43, "x" * 2000):
                path = re.sub(r"\{[^}]+\}", payload, template)
                headers = signed_headers(target.patient, "GET", path)
                status, answer = raw(node, "GET", path, headers)
                # Signed correctly, so refused by the route itself, not for the signature.
                assert 400 <= status < 500 and status != 401, (path, status, answer[:300])

    def test_nul_and_control_bytes_in_the_request_line_are_refused(self, target: Target):
        for path in ("/wallet/\x00", "/dicomweb/studies/1.2\x00/metadata", "/ledger/logs/\r"):
            with socket.create_connection(("127.0.0.1", target.node.http_port), timeout=5) as c:
                c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                answer = c.recv(4096)
            assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:80]


@pytest.mark.usefixtures("still_serving")
class TestOversizeBodies:
    def test_p2p_bodies_over_their_limit_are_413_even_when_streamed(self, target: Target):
        node, before = target.node, ledger_size(target.node)
        big = os.urandom(9 * 1024 * 1024)
        for path in ("/p2p/transfer", "/p2p/notify"):
            # Signed over the whole body (a member could send it), streamed without a length.
            headers = node_headers(target.member, target.node, path, big)
            status, answer = signed(node, target.member, path, big, headers, stream=True)
            assert status == 413, (path, answer)
            # Claimed by anyone as a member, with a Content-Length over the limit.
            status, _ = signed(node, target.member, path, big, headers)
            assert status == 413
        assert ledger_size(node) == before

    def test_admin_and_patient_bodies_over_the_node_limit_are_413(self, target: Target):
        node, before_objects = target.node, object_count(target.node)
        body = b"{" + b" " * (MAX_BODY + 1024) + b"}"
        for path in ("/admin/api/fetch", "/admin/api/enrollments"):
            request = urllib.request.Request(
                node.url + path,
                data=body,
                method="POST",
                headers={**node.auth, "Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 413
        status, _ = call(node, target.patient, "POST", "/patient/revocations", bytes(70_000))
        assert status == 413
        assert object_count(node) == before_objects


@pytest.mark.usefixtures("still_serving")
class TestSlowClients:
    def _healthz_time(self, node: NodeProcess) -> float:
        started = time.monotonic()
        assert raw(node, "GET", "/healthz")[0] == 200
        return time.monotonic() - started

    def test_stalled_headers_stalled_body_and_trickled_body_are_cut_off(self, target: Target):
        node = target.node
        body = faults.request_head(
            "POST", "/dicomweb/studies", {**node.auth, "Content-Type": STOW_TYPE}, 10_000
        )
        head_only = body.split(b"\r\n")[0] + b"\r\nHost: 127.0.0.1\r\n"
        # A signed route reads its body before it can check the signature.
        p2p_body = node_headers(target.member, target.node, "/p2p/notify", bytes(1000))
        p2p = faults.request_head("POST", "/p2p/notify", p2p_body, 1000)
        clients = [faults.SlowClient(node.http_port) for _ in range(4)]
        stalled_headers, stalled_body, trickler, stalled_p2p = clients
        before = object_count(node)
        try:
            stalled_headers.send(head_only)  # never finishes its headers
            stalled_body.send(body + b"--fuzz-boundary\r\n")  # headers, then nothing
            stalled_p2p.send(p2p + bytes(10))
            trickler.send(body)
            trickler.trickle(b"--fuzz-boundary\r\n" + b"x" * 5000, interval=0.1)
            # The others are served at full speed meanwhile.
            assert max(self._healthz_time(node) for _ in range(5)) < 1.0
            for client in clients:
                wait_until(client.is_cut_off, timeout=4 * CLIENT_TIMEOUT + 2, interval=0.1)
                assert client.cut_off_after is not None
                assert client.cut_off_after < 3 * CLIENT_TIMEOUT + 1
        finally:
            for client in clients:
                client.close()
        assert object_count(node) == before
        wait_until(lambda: not list((node.data_dir / "tmp").iterdir()), timeout=5)
        assert "unhandled error" not in node.log_path.read_text()  # a cut is no crash

    def test_a_slow_but_steady_upload_is_not_cut_off(self, target: Target, tmp_path: Path):
        node = target.node
        study = make_ct_study(tmp_path, series=1, slices=1, rows=128, columns=128)
        data = study.files[0].read_bytes()
        payload = (
            b"--fuzz-boundary\r\nContent-Type: application/dicom\r\n\r\n"
            + data
            + b"\r\n--fuzz-boundary--\r\n"
        )
        head = faults.request_head(
            "POST",
            "/dicomweb/studies",
            {**node.auth, "Content-Type": STOW_TYPE, "Connection": "close"},
            len(payload),
        )
        with socket.create_connection(("127.0.0.1", node.http_port), timeout=30) as conn:
            conn.sendall(head)
            # About 5 KiB/s for over two windows: slower than a LAN, faster than the floor.
            deadline = time.monotonic() + 2.5 * CLIENT_TIMEOUT
            sent = 0
            while sent < len(payload):
                step = 1024 if time.monotonic() < deadline else len(payload)
                conn.sendall(payload[sent : sent + step])
                sent += step
                time.sleep(0.2 if step == 1024 else 0)
            answer = conn.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


@pytest.mark.usefixtures("still_serving")
class TestSignedRequestRefusals:
    def test_replayed_node_request_is_refused(self, target: Target) -> None:
        node = target.node
        body = json.dumps({"log_id": log_id(target.member.origin), "size": 0}).encode()
        headers = node_headers(target.member, target.node, "/p2p/notify", body)
        assert signed(node, target.member, "/p2p/notify", body, headers)[0] == 200
        assert signed(node, target.member, "/p2p/notify", body, headers) == (
            401,
            {"error": "replayed nonce"},
        )

    def test_replayed_patient_submission_is_refused_and_recorded_once(self, target: Target):
        node, before = target.node, ledger_size(target.node)
        grant = make_grant(target.patient, node.origin, target.member.origin)
        headers = signed_headers(target.patient, "POST", "/patient/grants", grant)
        assert send(node, "POST", "/patient/grants", headers, grant)[0] == 200
        assert send(node, "POST", "/patient/grants", headers, grant) == (
            401,
            {"error": "replayed nonce"},
        )
        assert ledger_size(node) == before + 1

    def test_node_outside_the_roster_is_refused_and_nothing_is_recorded(self, target: Target):
        node, before = target.node, ledger_size(target.node)
        grant = make_grant(target.patient, node.origin, target.outsider.origin)
        request = OpenRequest(grant, channel.EphemeralKey.generate().public).encode()
        status, answer = signed(node, target.outsider, "/p2p/transfer", request)
        assert status == 401 and "unknown signer" in answer["error"]
        assert ledger_size(node) == before

    def test_garbage_tokens_are_refused_with_a_reason_and_no_denial_entry(self, target: Target):
        node, before, objects = target.node, ledger_size(target.node), object_count(target.node)
        ephemeral = channel.EphemeralKey.generate().public
        for garbage in (b"", b"\x93\x01\x02", os.urandom(200), b"\xc1" * 50):
            request = OpenRequest(garbage, ephemeral).encode()
            status, answer = signed(node, target.member, "/p2p/transfer", request)
            assert 400 <= status < 500 and answer["error"], answer
            status, answer = signed(node, target.member, "/p2p/transfer", garbage)
            assert 400 <= status < 500 and answer["error"], answer
            status, answer = call(node, target.patient, "POST", "/patient/grants", garbage)
            assert status == 400 and answer["error"]
            status, answer = call(node, target.patient, "POST", "/patient/revocations", garbage)
            assert status == 400 and answer["error"]
            request_json = json.dumps({"token": garbage.hex()}).encode()
            assert raw(node, "POST", "/admin/api/fetch", node.auth, request_json)[0] == 400
        assert ledger_size(node) == before
        assert object_count(node) == objects

    def test_well_formed_token_for_another_grantee_is_refused_with_one_denial(
        self, target: Target
    ) -> None:
        node, before = target.node, ledger_size(target.node)
        grant = make_grant(target.patient, node.origin, "c.example/imageshare")
        request = OpenRequest(grant, channel.EphemeralKey.generate().public).encode()
        status, answer = signed(node, target.member, "/p2p/transfer", request)
        assert status == 403 and answer["rule"] == "wrong_grantee"
        # A well-formed token's refusal is on the record: a denial naming the rule.
        last = last_entry(node)
        assert ledger_size(node) > before
        assert last.kind == "denial" and last.fields["rule"] == "wrong_grantee"


# -- DICOM over the wire ----------------------------------------------------------------


class TestStowFuzz:
    @LIVE
    @given(st.data())
    def test_mutated_multipart_bodies_get_a_clean_answer_and_store_nothing_half(
        self, target: Target, data: st.DataObject
    ) -> None:
        files = target.study.files
        valid = (
            b"".join(
                b"--fuzz-boundary\r\nContent-Type: application/dicom\r\n\r\n"
                + p.read_bytes()
                + b"\r\n"
                for p in files
            )
            + b"--fuzz-boundary--\r\n"
        )
        body = data.draw(mutations(valid))
        content_type = data.draw(
            st.sampled_from([STOW_TYPE, "multipart/related; boundary=fuzz-boundary"])
            | st.text(max_size=60).filter(lambda t: t.isprintable())
        )
        status, answer = raw(
            target.node,
            "POST",
            "/dicomweb/studies",
            {**target.node.auth, "Content-Type": content_type},
            body,
        )
        assert status in (200, 202, 400, 409, 413, 415), (status, answer[:300])
        assert faults.store_problems(target.node.data_dir) == []
        assert raw(target.node, "GET", "/healthz")[0] == 200

    def test_part_header_that_is_no_http_header_is_400(self, target: Target) -> None:
        body = (
            b"--fuzz-boundary\r\nContent,Type: application/dicom\r\n\r\nx\r\n--fuzz-boundary--\r\n"
        )
        headers = {**target.node.auth, "Content-Type": STOW_TYPE}
        status, answer = raw(target.node, "POST", "/dicomweb/studies", headers, body)
        assert status == 400 and b"malformed multipart body" in answer


class TestDicomwebReadFuzz:
    @LIVE
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["PatientID", "StudyDate", "limit", "offset", "fuzzy", "includefield"]
                )
                | st.text(max_size=10),
                st.text(max_size=30),
            ),
            max_size=4,
        ),
        st.text(max_size=40),
        st.sampled_from(["", "application/dicom+json", 'multipart/related; type="x"'])
        | st.text(max_size=60),
    )
    def test_queries_frames_and_accept_headers_never_fail_the_node(
        self, target: Target, query: list[tuple[str, str]], frames: str, accept: str
    ) -> None:
        node, study = target.node, target.study
        instance = (
            f"/dicomweb/studies/{study.study_uid}/series/{study.series_uids[0]}"
            f"/instances/{study.sop_uids[0]}"
        )
        accept = "".join(c for c in accept if c.isprintable())
        headers = {**node.auth, "Accept": accept} if accept else node.auth
        for path in (
            "/dicomweb/studies?" + urllib.parse.urlencode(query),
            f"{instance}/frames/{urllib.parse.quote(frames, safe='')}",
            instance,
            f"{instance}/metadata",
        ):
            status, answer = raw(node, "GET", path, headers)
            assert status < 500, (path, accept, status, answer[:300])


class TestDimseFuzz:
    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(st.data())
    def test_mutated_datasets_get_a_status_and_the_node_keeps_serving(
        self, target: Target, data: st.DataObject
    ) -> None:
        source = target.study.files[0].read_bytes()
        # Keep the preamble and file meta (the SCU needs them); mutate the data set.
        meta_end = _meta_end(source)
        mutated = source[:meta_end] + data.draw(mutations(source[meta_end:]))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "fuzz.dcm"
            path.write_bytes(mutated)
            status = _c_store_raw(target.node, path)
        assert status in (0x0000, 0xA700, 0xA900, 0xC000), hex(status)
        assert faults.store_problems(target.node.data_dir) == []
        assert _echo(target.node)


def _meta_end(data: bytes) -> int:
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True)
    group_length = int(ds.file_meta.FileMetaInformationGroupLength)
    return 132 + 12 + group_length  # preamble + DICM, group length element, the group


def _c_store_raw(node: NodeProcess, path: Path) -> int:
    """Send a file's data set bytes as they are (no re-encoding); returns the status."""
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="IMAGESHARE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        answer = assoc.send_c_store(path)
        return int(answer.Status) if "Status" in answer else -1
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        if assoc.is_established:
            assoc.release()


def _echo(node: NodeProcess) -> bool:
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="IMAGESHARE")
    try:
        return bool(assoc.is_established and assoc.send_c_echo().Status == 0)
    finally:
        if assoc.is_established:
            assoc.release()


# -- no study leaves without a valid credential ------------------------------------------

# Routes open to anyone, each with why that is safe. Anything else must be behind the
# admin token, a roster member's signature, or an enrolled patient's signature.
PUBLIC_ROUTES = {
    "/healthz": "liveness: origin and version only",
    "/ledger/logs": "the ledger is public by design: no PHI, no DICOM UIDs",
    "/ledger/logs/{log_id}/checkpoint": "signed tree head",
    "/ledger/logs/{log_id}/published-checkpoint": "signed tree head its witnesses cosigned",
    "/ledger/logs/{log_id}/entries": "ledger entries (keyed hashes, no study data)",
    "/ledger/logs/{log_id}/proof/inclusion": "Merkle proof",
    "/ledger/logs/{log_id}/proof/consistency": "Merkle proof",
    "/ledger/equivocations": "proofs of a misbehaving log (signed notes)",
    "/federation/roster": "the federation's signed roster: origins, node keys, URLs",
    "/federation/roster/log/checkpoint": "the roster log's signed tree head",
    "/federation/roster/log/entries": "signed roster versions",
    "/federation/roster/log/proof/inclusion": "Merkle proof",
    "/federation/roster/log/proof/consistency": "Merkle proof",
    "/ledger/logs/{log_id}/tile/{tile_path}": "C2SP tlog-tiles: Merkle hashes and entries",
    "/witness/add-checkpoint": "C2SP tlog-witness: cosigns only a member-signed, consistent"
    " checkpoint; writes only the witness's own state",
    "/wallet": "redirect to the wallet app",
    "/wallet/": "the wallet app's page, from memory",
    "/wallet/{name}": "the wallet app's static files, from memory by name",
    "/admin": "the dashboard page; its data comes from /admin/api",
    "/admin/": "the dashboard page",
    "/admin/static/{name}": "the dashboard's static files, from memory by name",
    "/share": "redirect to the share page",
    "/share/": "the share page (a link's key stays in its fragment), from memory",
    "/share/{name}": "the share page's static files, from memory by name",
    "/viewer": "redirect to the viewer",
    "/viewer/{tail}": "OHIF's files found at start and its page; study data only via /dicomweb"
    " (admin token) or a link's root",
    "/viewer-lite": "redirect to the light viewer",
    "/viewer-lite/": "the light viewer's page, from memory; it reads a DICOMweb root it is given",
    "/viewer-lite/{name}": "the light viewer's static files, from memory by name",
}
# Routes that can hand out study data (DICOM files, frames, metadata, previews) and the
# credential that guards each kind.
STUDY_DATA_GUARDS = {
    "/dicomweb/": "admin token",
    "/p2p/transfer/{transfer_id}/instances": "node signature",  # and consent, per transfer
    "/patient/studies/": "patient signature",  # the patient's own studies only
    "/links/": "link credential",  # a live link grant's studies only
}


def _routes(node: NodeProcess) -> list[tuple[str, str]]:
    """(method, path template) of every route the node's app mounts."""
    runtime = open_runtime(node.config)
    try:
        app = http_app.build_app(runtime)
        return [
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.resource is not None and route.method not in ("HEAD", "OPTIONS")
        ]
    finally:
        runtime.close()


def _guard(path: str) -> str | None:
    if path in PUBLIC_ROUTES:
        return "public"
    if http_app._has_admin_prefix(path):
        return "admin token"
    if path.startswith("/p2p/"):
        return "node signature"
    if path.startswith("/patient/"):
        return "patient signature"
    if path.startswith(("/links/", "/shl/")):
        return "link credential"  # a share link's access token, or its manifest id
    return None


def _example_path(template: str, node: NodeProcess) -> str:
    values = {
        "log_id": log_id(node.origin),
        "name": "index.html",
        "ref": "A" * 43,
        "position": "1",
        "frames": "1",
        "tag": "7FE00010",
        "location": "7FE00010",
        "transfer_id": "0" * 32,
        "study": "1.2.3",
        "series": "1.2.3.4",
        "instance": "1.2.3.4.5",
        "access_token": "A" * 43,
        "manifest_id": "A" * 43,
    }
    # A variable may carry a pattern with braces of its own: {location:[0-9A-F]{8}...}.
    variable = r"\{(\w+)(?::(?:[^{}]|\{[^{}]*\})*)?\}"
    return re.sub(variable, lambda m: values.get(m.group(1), "x"), template)


@pytest.mark.usefixtures("still_serving")
class TestRouteGuards:
    def test_every_route_is_public_by_design_or_guarded(self, target: Target) -> None:
        routes = _routes(target.node)
        assert len(routes) > 30
        unguarded = [(m, p) for m, p in routes if _guard(p) is None]
        assert unguarded == [], "add the route to a guarded prefix or justify it as public"
        public_writes = [(m, p) for m, p in routes if _guard(p) == "public" and m != "GET"]
        # tlog-witness is a public POST by its spec: the log's signature is its credential.
        assert public_writes == [("POST", "/witness/add-checkpoint")]
        for _method, path in routes:
            for prefix, guard in STUDY_DATA_GUARDS.items():
                if path.startswith(prefix):
                    assert _guard(path) == guard, path

    def test_every_guarded_route_refuses_a_request_without_credentials(self, target: Target):
        node = target.node
        before_ledger, before_objects = ledger_size(node), object_count(node)
        for method, template in _routes(node):
            path = _example_path(template, node)
            status, body = raw(node, method, path)
            if _guard(template) == "public":
                assert status not in (401, 500), (method, path, status)
            else:
                # SHL: an unknown manifest is 404, whatever credential comes with it.
                refused = 404 if template.startswith("/shl/") else 401
                assert status == refused, (method, path, status, body[:200])
                wrong = {"Authorization": "Bearer " + "x" * len(node.admin_token)}
                assert raw(node, method, path, wrong)[0] == refused, (method, path)
        assert ledger_size(node) == before_ledger
        assert object_count(node) == before_objects

    def test_study_bytes_are_served_to_the_admin_token_only(self, target: Target) -> None:
        node, study = target.node, target.study
        path = f"/dicomweb/studies/{study.study_uid}"
        accept = {"Accept": 'multipart/related; type="application/dicom"'}
        status, body = raw(node, "GET", path, {**accept, **node.auth})
        assert status == 200
        assert study.files[0].read_bytes()[132:400] in body
        assert raw(node, "GET", path, accept)[0] == 401


def _log_since(node: NodeProcess, offset: int) -> str:
    return node.log_path.read_bytes()[offset:].decode(errors="replace")


@pytest.mark.usefixtures("still_serving")
class TestBodyReadingErrors:
    GARBAGE = b"this is not a compressed stream" * 64

    def test_malformed_gzip_or_deflate_stow_body_is_400_without_a_traceback(
        self, target: Target
    ) -> None:
        node, before = target.node, object_count(target.node)
        offset = node.log_path.stat().st_size
        for encoding in ("gzip", "deflate"):
            headers = {**node.auth, "Content-Type": STOW_TYPE, "Content-Encoding": encoding}
            status, answer = raw(node, "POST", "/dicomweb/studies", headers, self.GARBAGE)
            assert status == 400, answer
            assert f"does not decode as {encoding}" in json.loads(answer)["error"]
        assert object_count(node) == before
        wait_until(
            lambda: _log_since(node, offset).count("refused POST /dicomweb/studies with 400") == 2,
            message="both refusals in the log",
        )
        assert "Traceback" not in _log_since(node, offset)

    def test_broken_chunked_framing_is_400_and_one_line_at_info(self, target: Target) -> None:
        node = target.node
        offset = node.log_path.stat().st_size
        head = faults.request_head(
            "POST",
            "/p2p/notify",
            {"Transfer-Encoding": "chunked", "Connection": "close"},
            None,
        )
        with socket.create_connection(("127.0.0.1", node.http_port), timeout=10) as conn:
            conn.sendall(head + b"5\r\nhello\r\nZZZ\r\n")
            answer = conn.recv(65536)
        assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer
        wait_until(
            lambda: (
                "INFO aiohttp.server: refused a request that cannot be parsed with 400"
                in _log_since(node, offset)
            ),
            message="the refusal in the log",
        )
        assert "Traceback" not in _log_since(node, offset)

    def test_encoded_body_on_a_signed_route_is_refused_unread_with_415(
        self, target: Target
    ) -> None:
        node = target.node
        offset = node.log_path.stat().st_size
        # Named as a roster member but signed by someone else: the body is never read.
        forged = make_headers(
            target.outsider.sign,
            node_signer(target.member.origin),
            "POST",
            "/p2p/transfer",
            self.GARBAGE,
            int(time.time()),
            os.urandom(16),
            audience=node.origin,
        )
        patient = signed_headers(target.patient, "POST", "/patient/grants", self.GARBAGE)
        for path, headers in (("/p2p/transfer", forged), ("/patient/grants", patient)):
            for encoding in ("gzip", "deflate", "br", "zstd"):
                status, answer = raw(
                    node, "POST", path, {**headers, "Content-Encoding": encoding}, self.GARBAGE
                )
                assert status == 415, (path, encoding, answer)
                assert "Content-Encoding" in json.loads(answer)["error"]
        wait_until(
            lambda: "refused POST /patient/grants with 415" in _log_since(node, offset),
            message="the refusal in the log",
        )
        assert "refused POST /p2p/transfer with 415" in _log_since(node, offset)
        assert "Traceback" not in _log_since(node, offset)

    def test_every_refusal_is_logged_at_info_with_its_route_and_reason(
        self, target: Target
    ) -> None:
        node = target.node
        offset = node.log_path.stat().st_size
        assert raw(node, "GET", "/dicomweb/studies")[0] == 401
        body = json.dumps({"log_id": log_id(target.member.origin), "size": 0}).encode()
        forged = make_headers(
            target.outsider.sign,
            node_signer(target.member.origin),
            "POST",
            "/p2p/notify",
            body,
            int(time.time()),
            os.urandom(16),
            audience=node.origin,
        )
        assert signed(node, target.member, "/p2p/notify", body, forged)[0] == 401
        stranger = PatientKey.derive(os.urandom(32), node.origin)
        not_theirs = make_grant(stranger, node.origin, target.member.origin)
        assert call(node, target.patient, "POST", "/patient/grants", not_theirs)[0] == 403
        big = os.urandom(9 * 1024 * 1024)
        headers = node_headers(target.member, node, "/p2p/notify", big)
        assert signed(node, target.member, "/p2p/notify", big, headers)[0] == 413
        expected = [
            "INFO node.edges.http.app: refused GET /dicomweb/studies with 401: missing or wrong"
            " admin token",
            "INFO node.edges.http.app: refused POST /p2p/notify with 401: bad signature",
            "INFO node.edges.http.app: refused POST /patient/grants with 403: a patient may"
            " submit only grants signed with their own key",
            "INFO node.edges.http.app: refused POST /p2p/notify with 413: this request carries"
            " at most",
        ]
        wait_until(
            lambda: all(line in _log_since(node, offset) for line in expected),
            message="every refusal in the log",
        )
