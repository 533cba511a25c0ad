"""One node origin rule: node.toml, `imageshare init`, the roster, consent tokens and
signed requests accept and refuse the same origins."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from node.core.consent import NONCE_SIZE, GrantFields, decode_grant
from node.core.encoding import canonical_encode
from node.core.equivocation import EquivocationProof
from node.core.keys import NodeIdentity
from node.core.origins import is_node_origin, log_id, log_id_bytes, origin_host
from node.core.roster import make_member
from node.core.signed_requests import make_headers, node_signer, parse_headers
from node.errors import BadInput, Unauthorized
from node.services.audit_state import SavedCheckpoint
from node.store.ledger import LedgerStore
from tests.support.nodes import run_cli

ACCEPTED = [
    "hospital.example/imageshare",
    "abc",
    "a" * 200,
    "10.0.0.7:8600/x_y~z-1",
    "https://hospital.example:8443/imageshare",  # an origin may look like a URL
]
REFUSED = [
    "ab",  # too short
    "a" * 201,  # too long
    "has space.example/x",
    "plus+sign.example/x",  # would split a C2SP verifier key
    "ünicode.example/x",
    "newline.example/x\n",  # "$" in a regex would let this one through
    "tab\t.example/x",
    "",
]
NOW = 1_800_000_000


def _config_origin(tmp_path: Path, origin: str) -> bool:
    config = tmp_path / "node.toml"
    config.write_text(f"origin = {json.dumps(origin)}\n")
    result = run_cli("ledger", "verify", config=config, check=False)
    return "node.toml: origin:" not in result.stderr


def _config_peer(tmp_path: Path, origin: str) -> bool:
    config = tmp_path / "node.toml"
    config.write_text(
        'origin = "self.example/imageshare"\n[[peers]]\n'
        f'origin = {json.dumps(origin)}\nurl = "http://127.0.0.1:1"\nvkey = "k"\n'
    )
    result = run_cli("ledger", "verify", config=config, check=False)
    return "node.toml: [[peers]] #1 origin:" not in result.stderr


def _init(tmp_path: Path, origin: str) -> bool:
    result = run_cli("init", str(tmp_path / "n"), "--origin", origin, "--json", check=False)
    assert "Traceback" not in result.stderr
    return result.returncode == 0


def _roster(tmp_path: Path, origin: str) -> bool:
    # A key named by the origin itself, so that only the origin rule can refuse it.
    vkey = NodeIdentity(origin, b"\1" * 32).vkey
    try:
        make_member(origin, "http://127.0.0.1:1", vkey)
    except BadInput:
        return False
    return True


def _consent_token(tmp_path: Path, origin: str) -> bool:
    results = []
    for custodian, grantee in ((origin, "b.example/x"), ("a.example/x", origin)):
        fields = GrantFields(b"\2" * 32, custodian, grantee, None, NOW, NOW + 60, b"\3" * 16)
        assert len(fields.nonce) == NONCE_SIZE
        try:
            decode_grant(canonical_encode([*fields.as_list(), b"\4" * 64]))
            results.append(True)
        except BadInput:
            results.append(False)
    assert results[0] == results[1]
    return results[0]


def _signed_request(tmp_path: Path, origin: str) -> bool:
    identity = NodeIdentity("a.example/x", b"\5" * 32)
    headers = make_headers(
        identity.sign, node_signer(origin), "GET", "/p2p/x", b"", NOW, b"n" * 16, audience="b.ex"
    )
    try:
        parse_headers(headers, "b.ex")
    except Unauthorized as exc:
        assert "malformed node origin" in str(exc)
        return False
    return True


ENTRY_POINTS: dict[str, Callable[[Path, str], bool]] = {
    "node.toml origin": _config_origin,
    "node.toml [[peers]] origin": _config_peer,
    "imageshare init --origin": _init,
    "roster member": _roster,
    "consent token custodian and grantee": _consent_token,
    "signed request signer": _signed_request,
}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("origin", ACCEPTED + REFUSED)
def test_every_entry_point_follows_the_one_origin_rule(
    tmp_path: Path, entry_point: str, origin: str
) -> None:
    if entry_point == "signed request signer" and origin != origin.strip():
        pytest.skip("an HTTP header value cannot end in a line break; readers strip it")
    assert ENTRY_POINTS[entry_point](tmp_path, origin) == (origin in ACCEPTED)
    assert is_node_origin(origin) == (origin in ACCEPTED)


def test_signed_request_audience_with_a_bad_origin_is_not_echoed() -> None:
    identity = NodeIdentity("a.example/x", b"\5" * 32)
    headers = make_headers(
        identity.sign,
        node_signer(identity.origin),
        "GET",
        "/p2p/x",
        b"",
        NOW,
        b"n" * 16,
        audience="ab",  # too short to be an origin
    )
    with pytest.raises(Unauthorized, match="addressed to a malformed origin"):
        parse_headers(headers, "b.example/x")


def test_a_log_is_found_by_the_one_log_id_everywhere(tmp_path: Path) -> None:
    """The store, the roster, equivocation proofs and the audit state name a log alike."""
    identity = NodeIdentity.generate("a.example/imageshare")
    expected = hashlib.sha256(identity.origin.encode()).digest()
    assert log_id_bytes(identity.origin) == expected and log_id(identity.origin) == expected.hex()
    store = LedgerStore(tmp_path)
    try:
        own = store.own_log(identity.origin, identity.vkey)
        assert own.log_id == expected and store.log_by_id(expected.hex()) is own
    finally:
        store.close()
    member = make_member(identity.origin, "http://127.0.0.1:1", identity.vkey)
    assert member.log_id == expected.hex()
    assert EquivocationProof(identity.origin, ("a", "b")).log_id == expected.hex()
    saved = SavedCheckpoint(identity.origin, identity.vkey, 0, bytes(32), "")
    assert saved.log_id == expected.hex()


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("hospital.example/imageshare", "hospital.example"),
        ("https://Hospital.example:8443/imageshare", "hospital.example"),
        ("hospital.example:8600", "hospital.example"),
        ("10.0.0.7:8600/x_y~z-1", "10.0.0.7"),
        ("under_score.example/x", None),
        ("-dash.example/x", None),
    ],
)
def test_the_certificate_of_init_is_named_after_the_origins_host(
    origin: str, host: str | None
) -> None:
    assert origin_host(origin) == host
