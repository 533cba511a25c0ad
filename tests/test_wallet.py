"""The patient wallet end to end against a real node process, through the CLI."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from node.core.consent import decode_grant, parse_token_text
from tests.support.nodes import NodeProcess, run_cli
from tests.support.studies import make_ct_study

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


@pytest.fixture
def custodian(node_factory: Any, tmp_path: Path) -> NodeProcess:
    node: NodeProcess = node_factory("a.example/imageshare")
    make_ct_study(tmp_path / "jane", series=1, slices=3, patient_id="MRN-JANE")
    make_ct_study(
        tmp_path / "john", series=1, slices=2, patient_id="MRN-JOHN", patient_name="Roe^John"
    )
    node.cli("import", str(tmp_path / "jane"), str(tmp_path / "john"))
    return node.start()


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

    def test_new_key_for_the_same_patient_retires_the_old_key_and_its_grants(
        self, custodian: NodeProcess, tmp_path: Path
    ) -> None:
        lost, new = tmp_path / "lost-phone", tmp_path / "new-phone"
        keys = {}
        for wallet in (lost, new):
            patient(wallet, "keygen")
            keys[wallet] = patient(wallet, "pubkey", "--custodian", custodian.url)["pubkey"]
        enroll(custodian, "MRN-JANE", keys[lost])
        old = patient(lost, "grant", "--custodian", custodian.url, "--to", GRANTEE, "--all")
        rotated = enroll(custodian, "MRN-JANE", keys[new])
        assert rotated["replaced"] == keys[lost]

        refused = patient(lost, "studies", "--custodian", custodian.url, check=False)
        assert refused.returncode == 1 and "unknown signer" in refused.stderr
        assert len(patient(new, "studies", "--custodian", custodian.url)["studies"]) == 1
        # The custodian no longer answers the retired key; its wallet keeps the last status,
        # and the custodian refuses the retired key's grant (see test_patient_api).
        assert old["token_id"] in {t["token_id"] for t in patient(lost, "tokens")["tokens"]}

    def test_grant_of_another_patients_study_is_refused(
        self, custodian: NodeProcess, tmp_path: Path
    ) -> None:
        jane, john = tmp_path / "jane-wallet", tmp_path / "john-wallet"
        for wallet, mrn in ((jane, "MRN-JANE"), (john, "MRN-JOHN")):
            patient(wallet, "keygen")
            enroll(
                custodian, mrn, patient(wallet, "pubkey", "--custodian", custodian.url)["pubkey"]
            )
        johns_ref = patient(john, "studies", "--custodian", custodian.url)["studies"][0]["ref"]
        result = patient(
            jane,
            "grant",
            "--custodian",
            custodian.url,
            "--to",
            GRANTEE,
            "--study",
            johns_ref,
            check=False,
        )
        assert result.returncode == 1 and "not_owner" in result.stderr


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

    def test_keygen_refuses_to_replace_a_wallet(self, tmp_path: Path) -> None:
        wallet = tmp_path / "w"
        patient(wallet, "keygen")
        again = patient(wallet, "keygen", check=False)
        assert again.returncode == 2 and "already exists" in again.stderr

    def test_wallet_readable_by_others_is_refused(self, tmp_path: Path) -> None:
        wallet = tmp_path / "w"
        patient(wallet, "keygen")
        (wallet / "seed.json").chmod(0o644)
        result = patient(wallet, "tokens", check=False)
        assert result.returncode == 2 and "chmod 600" in result.stderr

    def test_unreachable_custodian_exits_2(self, tmp_path: Path) -> None:
        from tests.support.nodes import free_port

        wallet = tmp_path / "w"
        patient(wallet, "keygen")
        result = patient(
            wallet, "pubkey", "--custodian", f"http://127.0.0.1:{free_port()}", check=False
        )
        assert result.returncode == 2 and "cannot reach" in result.stderr

    def test_bad_lifetime_is_a_clear_error(self, tmp_path: Path) -> None:
        wallet = tmp_path / "w"
        patient(wallet, "keygen")
        result = patient(
            wallet,
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
