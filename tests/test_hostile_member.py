"""A hostile federation member, replayed against real nodes.

Replays: a hostile member B records the signed requests honest member A sends it and
replays them at member C within the freshness window; a request that a patient's wallet
signed before its key was enrolled is replayed once it is. Floods: a member presents
decodable tokens that no enrolled patient signed, or a real token over and over, to
fill the custodian's permanent, replicated log with ``denial`` entries.

B is a recording HTTP server standing at B's roster address (it holds B's roster key,
which it never needs: it only listens). A and C are real node processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import pytest

from node.core import channel
from node.core.consent import GrantFields, decode_grant, sign_grant, token_text
from node.core.entries import LedgerEntry
from node.core.keys import NodeIdentity
from node.core.manifest import OpenRequest
from node.core.patient_keys import PatientKey
from node.core.signed_requests import make_headers, node_signer
from node.samples import make_ct_study
from node.store.secrets import read_seed
from tests.support.nodes import NodeProcess, init_node, log_entries, wait_until
from tests.support.patients import make_grant, send, signed_headers

A_ORIGIN = "a.example/imageshare"
B_ORIGIN = "b.example/imageshare"
C_ORIGIN = "c.example/imageshare"
# A member of C's roster with no process: the tests sign its requests with its key.
D_ORIGIN = "d.example/imageshare"
PATIENT_ID = "MRN-HOSTILE-1"
# C's consent.max_denials_per_minute, small so that the test stays short.
DENIALS_PER_MINUTE = 5


@dataclass
class Captured:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingMember:
    """Hostile B: records every request it receives and refuses each (403, a rule)."""

    identity: NodeIdentity
    requests: list[Captured] = field(default_factory=list)

    def __post_init__(self) -> None:
        member = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                member.requests.append(
                    Captured(self.command, self.path, dict(self.headers.items()), body)
                )
                answer = json.dumps({"error": "refused", "rule": "expired"}).encode()
                self.send_response(403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = _record

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def captured(self, path: str, signer: str) -> Captured | None:
        """The last request to ``path`` that ``signer`` signed, if any."""
        return next(
            (
                r
                for r in reversed(self.requests)
                if r.path == path and r.headers.get("Signature-Signer") == signer
            ),
            None,
        )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Federation:
    a: NodeProcess
    b: RecordingMember
    c: NodeProcess
    a_identity: NodeIdentity
    d_identity: NodeIdentity
    patient: PatientKey  # enrolled at C


def _peer(origin: str, url: str, vkey: str) -> str:
    return f'[[peers]]\norigin = "{origin}"\nurl = "{url}"\nvkey = "{vkey}"\n'


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("hostile-member")
    a = init_node(base, A_ORIGIN)
    c = init_node(base, C_ORIGIN)
    b = RecordingMember(NodeIdentity.generate(B_ORIGIN))
    d = NodeIdentity.generate(D_ORIGIN)
    settings = "[federation]\ndiscovery = false\nreplicate_interval = 0.3\n"
    a.append_config(
        settings + _peer(B_ORIGIN, b.url, b.identity.vkey) + _peer(C_ORIGIN, c.url, c.vkey)
    )
    c.append_config(
        settings
        + f"[consent]\nmax_denials_per_minute = {DENIALS_PER_MINUTE}\n"
        + _peer(A_ORIGIN, a.url, a.vkey)
        + _peer(B_ORIGIN, b.url, b.identity.vkey)
        + _peer(D_ORIGIN, "http://127.0.0.1:9", d.vkey)
    )
    make_ct_study(base / "study", series=1, slices=2, patient_id=PATIENT_ID)
    c.cli("import", str(base / "study"))
    patient = PatientKey.derive(os.urandom(32), C_ORIGIN)
    c.cli("enroll", "--patient-id", PATIENT_ID, f"--key={patient.public_key_text}")
    try:
        c.start()
        a.start()
        yield Federation(
            a, b, c, NodeIdentity(A_ORIGIN, read_seed(a.data_dir / "node.key")), d, patient
        )
    finally:
        a.stop()
        c.stop()
        b.stop()


def own_entries(node: NodeProcess) -> list[LedgerEntry]:
    """Every entry of ``node``'s own log, read through its ledger API."""
    return log_entries(node)


def replay(node: NodeProcess, captured: Captured) -> tuple[int, Any]:
    """Send a recorded request, its signature headers and body unchanged, to ``node``."""
    headers = {k: v for k, v in captured.headers.items() if k.lower().startswith("signature")}
    return send(node, captured.method, captured.path, headers, captured.body)


def open_body(token: bytes) -> bytes:
    return OpenRequest(token, channel.EphemeralKey.generate().public).encode()


def post_opens(
    node: NodeProcess, caller: NodeIdentity, tokens: list[bytes]
) -> list[tuple[int, dict[str, Any]]]:
    """One signed POST /p2p/transfer by ``caller`` to ``node`` per token, over one session."""

    async def go() -> list[tuple[int, dict[str, Any]]]:
        answers = []
        async with aiohttp.ClientSession() as session:
            for token in tokens:
                body = open_body(token)
                headers = make_headers(
                    caller.sign,
                    node_signer(caller.origin),
                    "POST",
                    "/p2p/transfer",
                    body,
                    int(time.time()),
                    os.urandom(16),
                    audience=node.origin,
                )
                url = node.url + "/p2p/transfer"
                async with session.post(url, data=body, headers=headers) as response:
                    answers.append((response.status, await response.json(content_type=None)))
        return answers

    return asyncio.run(go())


class TestReplayAtAnotherMember:
    def test_open_a_sent_to_b_replayed_at_c_is_refused_and_writes_nothing(
        self, fed: Federation
    ) -> None:
        # A fetches a token whose custodian is B: A signs the open for B, B records it.
        b_patient = PatientKey.derive(os.urandom(32), B_ORIGIN)
        token = make_grant(b_patient, B_ORIGIN, A_ORIGIN)
        # Hostile B does not sign its refusal, so A takes it for no answer at all (exit 2).
        assert fed.a.cli("fetch", token_text(token), check=False).returncode == 2
        captured = fed.b.captured("/p2p/transfer", node_signer(A_ORIGIN))
        assert captured is not None
        before = len(own_entries(fed.c))

        status, answer = replay(fed.c, captured)

        assert status == 401
        assert answer["error"] == f"the request is addressed to {B_ORIGIN}, not to {C_ORIGIN}"
        # No denial attributed to A, nothing at all, is written at C.
        assert len(own_entries(fed.c)) == before

    def test_notify_a_sent_to_b_replayed_at_c_is_refused(self, fed: Federation) -> None:
        # A greets every member with a signed notify when it starts.
        captured = wait_until(
            lambda: fed.b.captured("/p2p/notify", node_signer(A_ORIGIN)),
            message="A's notify to B",
        )
        status, answer = replay(fed.c, captured)
        assert status == 401 and "addressed to " + B_ORIGIN in answer["error"]

    def test_open_signed_for_b_carrying_a_token_valid_at_c_is_not_relayed(
        self, fed: Federation
    ) -> None:
        token = make_grant(fed.patient, C_ORIGIN, A_ORIGIN)
        body = open_body(token)
        headers = make_headers(
            fed.a_identity.sign,
            node_signer(A_ORIGIN),
            "POST",
            "/p2p/transfer",
            body,
            int(time.time()),
            os.urandom(16),
            audience=B_ORIGIN,
        )
        before = len(own_entries(fed.c))
        status, answer = send(fed.c, "POST", "/p2p/transfer", headers, body)
        assert status == 401 and "addressed to " + B_ORIGIN in answer["error"]
        # Not opened: the grant was not even recorded on this sight of it.
        assert len(own_entries(fed.c)) == before

    def test_a_still_fetches_from_c_with_requests_addressed_to_c(self, fed: Federation) -> None:
        token = make_grant(fed.patient, C_ORIGIN, A_ORIGIN)
        fetched = json.loads(fed.a.cli("fetch", token_text(token), "--json").stdout)
        assert fetched["custodian"] == C_ORIGIN and fetched["instances"] == 2


class TestPatientRequestBeforeEnrollment:
    def test_request_refused_for_an_unknown_key_cannot_be_replayed_once_enrolled(
        self, fed: Federation
    ) -> None:
        # The wallet submits a grant before the desk enrolled its key; an eavesdropper
        # keeps the request and replays it right after the enrollment.
        newcomer = PatientKey.derive(os.urandom(32), C_ORIGIN)
        grant = make_grant(newcomer, C_ORIGIN, A_ORIGIN)
        headers = signed_headers(newcomer, "POST", "/patient/grants", grant)
        status, answer = send(fed.c, "POST", "/patient/grants", headers, grant)
        assert status == 401 and answer["error"].startswith("unknown signer")
        fed.c.cli("enroll", "--patient-id", "MRN-HOSTILE-2", f"--key={newcomer.public_key_text}")
        before = len(own_entries(fed.c))

        assert send(fed.c, "POST", "/patient/grants", headers, grant) == (
            401,
            {"error": "replayed nonce"},
        )
        assert len(own_entries(fed.c)) == before

    def test_patient_request_signed_for_another_custodian_is_refused(self, fed: Federation) -> None:
        headers = signed_headers(fed.patient, "GET", "/patient/studies", audience=B_ORIGIN)
        status, answer = send(fed.c, "GET", "/patient/studies", headers)
        assert status == 401
        assert answer["error"] == f"the request is addressed to {B_ORIGIN}, not to {C_ORIGIN}"


class TestDenialFlood:
    def test_200_tokens_no_enrolled_key_signed_are_answered_4xx_and_write_no_denial(
        self, fed: Federation
    ) -> None:
        # Half claim the enrolled patient's key but carry another key's signature; half
        # are validly signed by keys nobody enrolled here.
        forger = PatientKey.derive(os.urandom(32), C_ORIGIN)
        now = int(time.time())
        tokens = []
        for i in range(200):
            if i % 2:
                tokens.append(
                    make_grant(PatientKey.derive(os.urandom(32), C_ORIGIN), C_ORIGIN, A_ORIGIN)
                )
            else:
                fields = GrantFields(
                    fed.patient.public_key,
                    C_ORIGIN,
                    A_ORIGIN,
                    None,
                    now,
                    now + 3600,
                    os.urandom(16),
                )
                tokens.append(sign_grant(fields, forger.sign))
        assert all(decode_grant(t) for t in tokens)
        before = own_entries(fed.c)

        started = time.monotonic()
        answers = post_opens(fed.c, fed.a_identity, tokens)
        elapsed = time.monotonic() - started

        rules = {answer["rule"] for status, answer in answers if status == 403}
        assert all(status == 403 for status, _ in answers), answers[:3]
        assert rules == {"bad_signature", "unknown_patient"}
        after = own_entries(fed.c)
        assert after[: len(before)] == before and len(after) == len(before), [
            e.kind for e in after[len(before) :]
        ][:5]
        print(f"200 forged opens answered in {elapsed:.2f}s, no entry written")

    def test_denials_of_a_real_token_over_the_configured_rate_are_answered_but_not_written(
        self, fed: Federation
    ) -> None:
        # A real grant to A, presented again and again by member D: wrong grantee.
        token = make_grant(fed.patient, C_ORIGIN, A_ORIGIN)
        token_id = decode_grant(token).token_id
        tries = 3 * DENIALS_PER_MINUTE

        answers = post_opens(fed.c, fed.d_identity, [token] * tries)

        assert [(s, a["rule"]) for s, a in answers] == [(403, "wrong_grantee")] * tries
        denials = [
            e for e in own_entries(fed.c) if e.kind == "denial" and e.fields["token_id"] == token_id
        ]
        assert len(denials) == DENIALS_PER_MINUTE
        assert {d.fields["requester"] for d in denials} == {D_ORIGIN}
        # Another requester has its own allowance: its first refusal is on the record.
        ((status, answer),) = post_opens(
            fed.c, fed.a_identity, [make_grant(fed.patient, C_ORIGIN, D_ORIGIN)]
        )
        assert (status, answer["rule"]) == (403, "wrong_grantee")
        last = own_entries(fed.c)[-1]
        assert last.kind == "denial" and last.fields["requester"] == A_ORIGIN
