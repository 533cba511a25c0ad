"""The web wallet pins the federation key: a custodian cannot vouch for its own log.

Custodian A and member B run as real nodes of a federation whose signed roster names
both. The patient's wallet is opened from the enrollment desk's code (which carries A's
log key and the federation key). A hostile custodian (a real aiohttp server in front of A)
lists a key it made as B's and serves A's checkpoint cosigned under that key: the wallet
shows the event *unproven*. The honest run shows it proven, and a wallet that pinned no
federation key is fooled by the same server (what the pin is for).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp import web

from node.config import load_config
from node.core.keys import NodeIdentity
from node.core.notes import add_signatures, cosign_checkpoint, parse_note, signed_only_by
from node.core.origins import log_id
from node.core.roster_document import make_roster_member
from node.samples import make_ct_study
from node.services.federation_roster import (
    create_federation_key,
    fetch_roster,
    load_federation_key,
    sign_next_version,
)
from node.services.patient_log import read_patient_log
from node.services.wallet import Wallet
from tests.support.browser import chromium_session
from tests.support.hostile import HostileServer, Received
from tests.support.nodes import NodeProcess, init_node, wait_until
from tests.support.web_wallet import PASSPHRASE, restore_wallet, unlock, wait_for_screen

FEDERATION = "fed.example/roster"
MRN = "MRN-ROSTER-1"
PHONE = (390, 844)


@dataclass
class Federation:
    base: Path
    a: NodeProcess
    b: NodeProcess
    wallet: Wallet
    pin_url: str  # the desk's code: A's wallet page with A's and the federation's keys


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("wallet-roster")
    key = create_federation_key(base / "fed.key", FEDERATION)
    a = init_node(base, "a.example/imageshare", "a")
    b = init_node(base, "b.example/imageshare", "b")
    members = [make_roster_member(n.origin, n.vkey, ["custodian"], n.url) for n in (a, b)]
    signed = sign_next_version(base / "roster-log", key, members, 0, int(time.time()), 30)
    (base / "roster.bundle").write_bytes(signed.bundle)
    for node in (a, b):
        node.append_config(
            f'[federation]\ndiscovery = false\nreplicate_interval = 0.3\nkey = "{key.vkey}"\n'
        )
        fetch_roster(load_config(node.config), str(base / "roster.bundle"))
    try:
        a.start()
        b.start()
        make_ct_study(base / "study", series=1, slices=1, patient_id=MRN)
        a.cli("import", str(base / "study"))
        wallet = Wallet.create(base / "cli-wallet", None)
        patient_key = wallet.key_for(a.origin).public_key_text
        enrolled = json.loads(
            a.cli("enroll", "--patient-id", MRN, f"--key={patient_key}", "--json").stdout
        )

        async def grant_and_revoke() -> None:
            async with aiohttp.ClientSession() as session:
                record = await wallet.grant(session, a.url, b.origin, None, 3600)
                await wallet.revoke(session, a.url, bytes.fromhex(record["token_id"]))

        asyncio.run(grant_and_revoke())
        # B witnesses A's log (its checkpoint with the revocation), as replication does.
        checkpoint_url = f"{a.url}/ledger/logs/{log_id(a.origin)}/checkpoint"
        wait_until(
            lambda: f"— {b.origin} ".encode() in _get(checkpoint_url),
            timeout=30,
            message="B's cosignature on A's checkpoint",
        )
        yield Federation(base, a, b, wallet, enrolled["wallet_pin_url"])
    finally:
        a.stop()
        b.stop()


class ForgedWitness:
    """A custodian lying about its witnesses: it lists a key it made as B's, and serves
    its checkpoint with B's real cosignature replaced by one under that key."""

    def __init__(self, federation: Federation) -> None:
        self.a, self.b = federation.a, federation.b
        self.fake_b = NodeIdentity.generate(self.b.origin)
        self.server = HostileServer(forward_to=self.a.url)
        self.server.respond = self.respond

    def respond(self, request: Received) -> web.Response | None:
        if request.path_qs == "/ledger/logs":
            logs = json.loads(_get(self.a.url + "/ledger/logs"))
            for row in logs:
                if row["origin"] == self.b.origin:
                    row["vkey"] = self.fake_b.vkey
            return web.json_response(logs)
        if request.path_qs == f"/ledger/logs/{log_id(self.a.origin)}/checkpoint":
            own = signed_only_by(_get(self.a.url + request.path_qs), self.a.vkey)
            body, _ = parse_note(own)
            forged = cosign_checkpoint(body, self.fake_b, int(time.time()))
            return web.Response(text=add_signatures(own, [forged]), content_type="text/plain")
        return None


def _activity(page: Any, wallet_url: str, seed: Path) -> Any:
    """Restore the wallet at ``wallet_url`` and open its activity screen once the
    revocation shows; the revocation's event element."""
    restore_wallet(page, wallet_url, seed, PASSPHRASE)
    page.click('#tabs button[data-screen="activity"]')
    wait_for_screen(page, "activity")
    event = page.locator('li.event[data-kind="revoke"]')
    event.wait_for()
    return event


def test_a_custodian_listing_witness_keys_it_made_shows_unproven(
    federation: Federation,
) -> None:
    a, b = federation.a, federation.b
    seed = federation.wallet.files.seed_path
    hostile, unpinned = ForgedWitness(federation), ForgedWitness(federation)
    try:
        with chromium_session("wallet-roster", viewport=PHONE) as browser:
            # Honest: the desk's code pins the federation key; B's cosignature counts.
            page = browser.new_page()
            page.goto(federation.pin_url)
            wait_for_screen(page, "setup")
            event = _activity(page, a.url, seed)
            assert event.get_attribute("data-proven") == "true"
            # The wallet names a hospital by its host (shell.js hospitalName).
            assert f"witnessed by {b.origin.split('/')[0]}" in event.inner_text()
            summary = str(page.text_content("#activity-summary"))
            assert "members of the federation roster, version 1" in summary
            page.shot("1-honest-proven")
            # The federation publishes version 2: the wallet takes it (its chain checks out).
            members = [make_roster_member(n.origin, n.vkey, ["custodian"], n.url) for n in (a, b)]
            key = load_federation_key(federation.base / "fed.key", FEDERATION)
            v2 = sign_next_version(
                federation.base / "roster-log", key, members, 0, int(time.time()), 30
            )
            (federation.base / "roster-v2.bundle").write_bytes(v2.bundle)
            fetch_roster(load_config(a.config), str(federation.base / "roster-v2.bundle"))
            page.reload()  # a reload locks the wallet: the key is asked for again
            wait_for_screen(page, "key")
            page.click('#tabs button[data-screen="activity"]')
            unlock(page)
            wait_for_screen(page, "activity")
            summary = str(page.text_content("#activity-summary"))
            assert "members of the federation roster, version 2" in summary
            assert (
                page.locator('li.event[data-kind="revoke"]').get_attribute("data-proven") == "true"
            )

            # Hostile, same desk code at its address: the forged cosignature does not count.
            page = browser.new_page()
            page.goto(federation.pin_url.replace(a.url, hostile.server.url))
            wait_for_screen(page, "setup")
            event = _activity(page, hostile.server.url, seed)
            assert event.get_attribute("data-proven") == "false"
            assert "not yet witnessed" in event.inner_text()
            page.shot("2-hostile-unproven")
            assert any(
                r.path_qs.startswith("/federation/roster/log") for r in hostile.server.received
            )
            assert page.foreign_requests(hostile.server.url) == []

            # The same lie fools a wallet that pinned no federation key (the old behaviour).
            page = browser.new_page()
            event = _activity(page, unpinned.server.url, seed)
            assert event.get_attribute("data-proven") == "true"
            # The wallet names a hospital by its host (shell.js hospitalName).
            assert f"witnessed by {b.origin.split('/')[0]}" in event.inner_text()
    finally:
        hostile.server.stop()
        unpinned.server.stop()


def test_the_desk_code_carries_the_custodians_and_the_federations_keys(
    federation: Federation,
) -> None:
    fragment = federation.pin_url.split("#", 1)[1]
    pins = {k: v[0] for k, v in parse_qs(fragment).items()}
    assert pins["custodian"] == federation.a.vkey
    assert pins["federation"] == load_config(federation.a.config).federation.key


def test_the_cli_wallet_pinned_by_the_desk_code_counts_only_roster_witnesses(
    federation: Federation,
) -> None:
    a, b = federation.a, federation.b
    hostile = ForgedWitness(federation)
    try:
        wallet = federation.wallet

        async def log_via(wallet: Wallet, url: str) -> tuple[bool, list[str], list[str]]:
            async with aiohttp.ClientSession() as session:
                await wallet.pin_desk_code(session, federation.pin_url.replace(a.url, url))
                read = await read_patient_log(session, wallet, [url])
            revoke = next(e for e in read.events if e.kind == "revoke")
            return revoke.proof.proven, revoke.proof.cosigners, read.problems

        proven, cosigners, _ = asyncio.run(log_via(wallet, a.url))
        assert (proven, cosigners) == (True, [b.origin])
        state = json.loads((federation.wallet.files.directory / "state.json").read_text())
        assert (
            state["custodians"][a.origin]["federation"]
            == parse_qs(federation.pin_url.split("#")[1])["federation"][0]
        )
        # Re-pinned at the liar's address (same origin): its forged cosignature does not count.
        state["custodians"].pop(a.origin)
        (federation.wallet.files.directory / "state.json").write_text(json.dumps(state))
        proven, cosigners, _ = asyncio.run(log_via(wallet, hostile.server.url))
        assert (proven, cosigners) == (False, [])
    finally:
        hostile.server.stop()
