"""No PHI and no DICOM UIDs in any ledger entry, read back through every node's ledger API."""

from __future__ import annotations

import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from node.core.base64url import b64url_decode
from node.core.consent import sign_revocation, token_id_of, token_text
from node.core.entries import Denial, decode_entry
from node.samples import SyntheticStudy, make_ct_study
from node.services import consent
from node.services.runtime import open_runtime
from tests.support.nodes import NodeProcess, init_node
from tests.support.patients import call, enroll_new_key, make_grant
from tests.support.privacy import sweep

PATIENTS = [
    # (node, MRN, name, birth date, accession)
    ("a", "MRN-PRIV-001", "Curie^Marie", "18671107", "ACC-PRIV-1"),
    ("a", "MRN-PRIV-002", "Turing^Alan", "19120623", "ACC-PRIV-2"),
    ("b", "MRN-PRIV-003", "Lovelace^Ada", "18151210", "ACC-PRIV-3"),
]


def read_every_entry(node: NodeProcess) -> list[bytes]:
    """Every entry of every log (own and mirrored) that ``node`` serves."""
    entries: list[bytes] = []
    for log in node.get_json("/ledger/logs", auth=False):
        start = 0
        while start < log["size"]:
            url = f"{node.url}/ledger/logs/{log['log_id']}/entries?start={start}&end={log['size']}"
            with urllib.request.urlopen(url, timeout=30) as response:
                batch = msgpack.unpackb(response.read())
            assert batch, "the ledger API returned no entries"
            entries += batch
            start += len(batch)
    return entries


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key)
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def phi_of(study: SyntheticStudy, name: str, birth: str, accession: str) -> set[str]:
    family, given = name.split("^")
    return {
        study.patient_id,
        name,
        family,
        given,
        birth,
        accession,
        study.study_uid,
        *study.series_uids,
        *study.sop_uids,
    }


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[tuple[list[NodeProcess], set[str]]]:
    nodes = {
        "a": init_node(tmp_path, "a.example/imageshare"),
        "b": init_node(tmp_path, "b.example/imageshare"),
    }
    for one, other in (("a", "b"), ("b", "a")):
        peer = nodes[other]
        nodes[one].append_config(
            f'[[peers]]\norigin = "{peer.origin}"\nurl = "{peer.url}"\nvkey = "{peer.vkey}"'
        )
    phi: set[str] = set()
    for where, mrn, name, birth, accession in PATIENTS:
        study = make_ct_study(
            tmp_path / mrn,
            series=2,
            slices=2,
            patient_id=mrn,
            patient_name=name,
            birth_date=birth,
            accession=accession,
        )
        nodes[where].cli("import", str(tmp_path / mrn))
        phi |= phi_of(study, name, birth, accession)
    for node in nodes.values():
        node.start()
    yield list(nodes.values()), phi
    for node in nodes.values():
        node.stop()


class TestNoPhiInTheLedger:
    def test_enrollments_grants_revocations_and_denials_carry_no_phi(
        self, scenario: tuple[list[NodeProcess], set[str]]
    ) -> None:
        nodes, phi = scenario
        a, b = nodes
        all_studies_grant: dict[str, bytes] = {}
        for node, mrn in ((a, "MRN-PRIV-001"), (a, "MRN-PRIV-002"), (b, "MRN-PRIV-003")):
            key = enroll_new_key(node, mrn)
            status, answer = call(node, key, "GET", "/patient/studies")
            assert status == 200 and len(answer["studies"]) == 1
            ref = b64url_decode(answer["studies"][0]["ref"], "ref")
            grantee = b.origin if node is a else a.origin
            one = make_grant(key, node.origin, grantee, (ref,))
            every = make_grant(key, node.origin, grantee, None)
            all_studies_grant[mrn] = every
            for token in (one, every):
                assert call(node, key, "POST", "/patient/grants", token)[0] == 200
            revocation = sign_revocation(
                key.public_key, token_id_of(one), int(time.time()), key.sign
            )
            assert call(node, key, "POST", "/patient/revocations", revocation)[0] == 200
        enroll_new_key(a, "MRN-PRIV-001")  # a lost phone: the old key is retired
        # A consented transfer writes access (custodian) and receipt (grantee) entries.
        b.cli("fetch", token_text(all_studies_grant["MRN-PRIV-002"]))

        # A refused access is written as a denial entry; check_access runs in the node.
        a.stop()
        runtime = open_runtime(a.config)
        try:
            verdict = consent.check_access(
                runtime,
                all_studies_grant["MRN-PRIV-002"],
                "evil.example/imageshare",
                None,
                int(time.time()),
            )
            assert verdict.reason == "wrong_grantee"
        finally:
            runtime.close()
        a.start()

        entries = read_every_entry(a) + read_every_entry(b)
        kinds = {decode_entry(raw).kind for raw in entries}
        assert {"enroll", "grant", "revoke", "denial", "access", "receipt"} <= kinds
        for raw in entries:
            texts = list(strings_in(msgpack.unpackb(raw, raw=False)))
            for needle in phi:
                assert needle.encode() not in raw, f"{needle!r} in a ledger entry"
                assert not any(needle in text for text in texts), f"{needle!r} in a ledger entry"


class TestSuiteWideSweep:
    """The sweep run after the whole suite (tests/conftest.py) finds PHI where it is."""

    def _node_with_entry(self, tmp_path: Path, denial: Denial) -> Path:
        node = init_node(tmp_path, "sweep.example/imageshare")
        study = make_ct_study(tmp_path / "study", series=1, slices=1, patient_id="MRN-SWEEP-9")
        node.cli("import", str(study.files[0]))
        runtime = open_runtime(node.config)
        try:
            runtime.services.ledger.append(denial)
        finally:
            runtime.close()
        return tmp_path

    def test_clean_ledgers_pass(self, tmp_path: Path) -> None:
        base = self._node_with_entry(
            tmp_path,
            Denial(
                token_id=b"\x01" * 32,
                requester="x.example/y",
                rule="expired",
                study=None,
            ),
        )
        result = sweep(base)
        assert result.entries == 1 and result.values > 0
        assert result.findings == []

    def test_an_mrn_in_an_entry_is_found(self, tmp_path: Path) -> None:
        base = self._node_with_entry(
            tmp_path,
            Denial(
                token_id=b"\x01" * 32,
                requester="MRN-SWEEP-9",
                rule="expired",
                study=None,
            ),
        )
        try:
            findings = sweep(base).findings
            assert len(findings) == 1 and "MRN-SWEEP-9" in findings[0]
        finally:
            # This ledger breaks the rule on purpose: keep it from the suite-wide sweep.
            shutil.rmtree(base)
