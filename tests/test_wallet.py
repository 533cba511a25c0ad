"""The patient wallet end to end against a real node process, through the CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from node.core.consent import decode_grant, parse_token_text
from node.core.entries import Grant, LedgerEntry, encode_entry
from node.core.keys import NodeIdentity
from node.core.merkle import ZERO_HASH, MemoryTree, inclusion_proof, leaf_hash
from node.core.notes import Checkpoint, sign_note
from node.errors import BadInput
from node.samples import make_ct_study
from node.services.wallet import Custodian, ProofFailed, Wallet, verify_recorded
from tests.support.hostile import HostileServer
from tests.support.nodes import NodeProcess, free_port, init_node, run_cli
from tests.support.proxy import TcpProxy

GRANTEE = "b.example/imageshare"
NO_PASSPHRASE = {"IMAGESHARE_WALLET_PASSPHRASE": ""}


def patient(wallet: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> Any:
    """`imageshare patient ARGS --wallet W --json`, parsed; the raw result if check=False."""
    result = run_cli(
        "patient",
        *args,
        "--wallet",
        str(wallet),
        "--json",
        check=check,
        env={**NO_PASSPHRASE, **(env or {})},
        input="",
    )
    return json.loads(result.stdout) if check else result


def enroll(node: NodeProcess, patient_id: str, key: str) -> dict[str, Any]:
    return json.loads(node.cli("enroll", "--patient-id", patient_id, "--key", key, "--json").stdout)


@pytest.fixture(scope="module")
def custodian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One custodian for the module; each test enrolls its own fresh wallets."""
    base = tmp_path_factory.mktemp("custodian")
    node = init_node(base, "a.example/imageshare")
    make_ct_study(base / "jane", series=1, slices=3, patient_id="MRN-JANE")
    make_ct_study(base / "john", series=1, slices=2, patient_id="MRN-JOHN", patient_name="Roe^John")
    node.cli("import", str(base / "jane"), str(base / "john"))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def plain_wallet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wallet without passphrase, for tests that do not change it."""
    wallet = tmp_path_factory.mktemp("wallets") / "plain"
    patient(wallet, "keygen")
    return wallet


class TestWalletRoundTrip:
    def test_keygen_enroll_studies_grant_tokens_revoke(
        self, custodian: NodeProcess, tmp_path: Path
    ) -> None:
        wallet = tmp_path / "wallet"
        created = patient(wallet, "keygen")
        assert created["encrypted"] is False
        assert stat.S_IMODE((wallet / "seed.json").stat().st_mode) == 0o600
        assert stat.S_IMODE(wallet.stat().st_mode) == 0o700

        key = patient(wallet, "pubkey", "--custodian", custodian.url)["pubkey"]
        enrolled = enroll(custodian, "MRN-JANE", key)
        assert enrolled["index"] >= 0 and enrolled["replaced"] is None

        studies = patient(wallet, "studies", "--custodian", custodian.url)["studies"]
        assert len(studies) == 1
        assert studies[0]["instances"] == 3 and studies[0]["modalities"] == ["CT"]
        ref = studies[0]["ref"]
        someone_elses = patient(
            wallet,
            "grant",
            "--custodian",
            custodian.url,
            "--to",
            GRANTEE,
            "--study",
            "A" * 43,
            check=False,
        )
        assert someone_elses.returncode == 1 and "not_owner" in someone_elses.stderr

        granted = patient(
            wallet, "grant", "--custodian", custodian.url, "--to", GRANTEE, "--study", ref
        )
        assert len(granted["token"]) <= 400
        assert granted["url"] == "imageshare:grant?t=" + granted["token"]
        token = decode_grant(parse_token_text(granted["url"]))
        assert token.token_id.hex() == granted["token_id"]
        assert token.fields.grantee == GRANTEE and token.fields.custodian == custodian.origin
        assert stat.S_IMODE((wallet / "state.json").stat().st_mode) == 0o600

        everything = patient(
            wallet,
            "grant",
            "--custodian",
            custodian.url,
            "--to",
            GRANTEE,
            "--all",
            "--expires",
            "2h",
        )
        statuses = {t["token_id"]: t for t in patient(wallet, "tokens")["tokens"]}
        assert statuses[granted["token_id"]]["status"] == "active"
        assert statuses[granted["token_id"]]["checked"] is True
        assert statuses[everything["token_id"]]["status"] == "active"

        revoked = patient(wallet, "revoke", granted["token_id"], "--custodian", custodian.url)
        assert revoked["status"] == "revoked"
        statuses = {t["token_id"]: t["status"] for t in patient(wallet, "tokens")["tokens"]}
        assert statuses == {granted["token_id"]: "revoked", everything["token_id"]: "active"}


class TestWalletFiles:
    def test_passphrase_encrypted_wallet_works_and_a_wrong_passphrase_fails_clearly(
        self, custodian: NodeProcess, tmp_path: Path
    ) -> None:
        wallet = tmp_path / "sealed"
        right = {"IMAGESHARE_WALLET_PASSPHRASE": "correct horse battery staple"}
        assert patient(wallet, "keygen", env=right)["encrypted"] is True
        seed_file = (wallet / "seed.json").read_text()
        assert "argon2id" in seed_file and '"seed"' not in seed_file
        key = patient(wallet, "pubkey", "--custodian", custodian.url, env=right)["pubkey"]
        assert len(key) == 43

        wrong = patient(
            wallet,
            "pubkey",
            "--custodian",
            custodian.url,
            check=False,
            env={"IMAGESHARE_WALLET_PASSPHRASE": "wrong"},
        )
        assert wrong.returncode == 1
        assert wrong.stderr.strip() == "imageshare: wrong wallet passphrase."
        missing = patient(wallet, "pubkey", "--custodian", custodian.url, check=False)
        assert missing.returncode == 1 and "passphrase-protected" in missing.stderr

    def test_keygen_refuses_to_replace_a_wallet(self, plain_wallet: Path) -> None:
        again = patient(plain_wallet, "keygen", check=False)
        assert again.returncode == 2 and "already exists" in again.stderr

    def test_wallet_readable_by_others_is_refused(self, plain_wallet: Path, tmp_path: Path):
        wallet = tmp_path / "copy"
        shutil.copytree(plain_wallet, wallet)
        (wallet / "seed.json").chmod(0o644)
        result = patient(wallet, "tokens", check=False)
        assert result.returncode == 2 and "chmod 600" in result.stderr

    def test_unreachable_custodian_exits_2(self, plain_wallet: Path) -> None:
        url = f"http://127.0.0.1:{free_port()}"
        result = patient(plain_wallet, "pubkey", "--custodian", url, check=False)
        assert result.returncode == 2 and "cannot reach" in result.stderr

    def test_bad_lifetime_is_a_clear_error(self, plain_wallet: Path) -> None:
        result = patient(
            plain_wallet,
            "grant",
            "--custodian",
            "http://127.0.0.1:1",
            "--to",
            GRANTEE,
            "--all",
            "--expires",
            "soon",
            check=False,
        )
        assert result.returncode == 1 and "--expires" in result.stderr


class TestCustodianPinning:
    def test_an_address_that_later_answers_as_another_custodian_is_refused(
        self, custodian: NodeProcess, tmp_path: Path
    ) -> None:
        # The wallet addresses its requests to the origin an address first answered
        # with; an address that now claims another origin gets none of them.
        other = init_node(tmp_path, "c.example/imageshare").start()
        proxy = TcpProxy(custodian.http_port)
        try:
            wallet = tmp_path / "wallet"
            patient(wallet, "keygen")
            patient(wallet, "pubkey", "--custodian", proxy.url)
            proxy.target_port = other.http_port
            result = patient(wallet, "pubkey", "--custodian", proxy.url, check=False)
            assert result.returncode == 1
            assert f"{proxy.url} was {custodian.origin}" in result.stderr
            assert other.origin in result.stderr
        finally:
            proxy.stop()
            other.stop()


class TestProofVerification:
    """The wallet believes a custodian only when the checkpoint and the proof verify."""

    origin = "a.example/imageshare"

    def answer(self, token: bytes, others: int = 4) -> tuple[dict[str, Any], Custodian]:
        identity = NodeIdentity.generate(self.origin)
        tree, prev, entries = MemoryTree(), ZERO_HASH, []
        for i in range(others + 1):
            fields = {"token": token} if i == others // 2 else {"token": bytes([i])}
            raw = encode_entry(LedgerEntry("grant", prev, 1_800_000_000 + i, fields))
            prev = leaf_hash(raw)
            tree.append(prev)
            entries.append(raw)
        index, size = others // 2, tree.size
        note = sign_note(Checkpoint(self.origin, size, tree.root(size)).body(), identity)
        answer = {
            "index": index,
            "size": size,
            "entry": base64.b64encode(entries[index]).decode(),
            "proof": [base64.b64encode(h).decode() for h in inclusion_proof(tree, index, size)],
            "checkpoint": note,
        }
        return answer, Custodian("http://custodian", self.origin, identity.vkey)

    def test_honest_answer_verifies(self) -> None:
        answer, custodian = self.answer(b"my token")
        assert verify_recorded(answer, custodian, Grant(token=b"my token")).index == 2

    @pytest.mark.parametrize("lie", ["other_token", "wrong_index", "bad_proof", "other_key"])
    def test_lies_are_caught(self, lie: str) -> None:
        answer, custodian = self.answer(b"my token")
        expected = b"my token"
        if lie == "other_token":
            expected = b"another token"
        elif lie == "wrong_index":
            answer["index"] = 1
        elif lie == "bad_proof":
            answer["proof"][0] = base64.b64encode(bytes(32)).decode()
        else:
            custodian = Custodian(
                custodian.url, self.origin, NodeIdentity.generate(self.origin).vkey
            )
        with pytest.raises(ProofFailed):
            verify_recorded(answer, custodian, Grant(token=expected))

    def test_garbage_answer_is_a_proof_failure(self) -> None:
        _, custodian = self.answer(b"t")
        garbage_answers: list[Any] = [
            {},
            {"entry": "!!", "proof": [], "index": 0, "checkpoint": ""},
            [],
        ]
        for garbage in garbage_answers:
            with pytest.raises(ProofFailed):
                verify_recorded(garbage, custodian, Grant(token=b"t"))


class TestCustodianOrigin:
    @pytest.mark.parametrize("origin", ["has space.example/x", "plus+sign.example/x", "ab", 7])
    def test_an_answer_naming_no_node_origin_is_refused(self, tmp_path: Path, origin: Any) -> None:
        """The wallet addresses its requests to the origin it learns: the one origin rule."""
        server = HostileServer()
        server.respond = lambda got: web.json_response({"origin": origin})
        wallet = Wallet.create(tmp_path / "wallet", None)

        async def ask() -> None:
            async with aiohttp.ClientSession() as session:
                await wallet.custodian(session, server.url)

        try:
            with pytest.raises(BadInput, match="does not look like an ImageShare node"):
                asyncio.run(ask())
        finally:
            server.stop()
        assert [r.path_qs for r in server.received] == ["/healthz"]
