"""Zeroconf discovery between real node processes on loopback, and a liar on the LAN."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from node.config import load_config
from node.core.base64url import b64url_encode
from node.core.consent import parse_token_text
from node.core.keys import NodeIdentity, parse_verifier_key
from node.core.roster import address_proof_bytes, key_fingerprint
from node.samples import make_ct_study
from node.services.discovery import SERVICE_TYPE
from node.services.roster import add_peer
from node.services.wallet import Wallet
from tests.support.hostile import HostileServer, Received
from tests.support.nodes import NodeProcess, wait_until


def federation(node: NodeProcess) -> dict[str, Any]:
    federation_status: dict[str, Any] = node.get_json("/admin/api/federation")
    return federation_status


def learned_urls(node: NodeProcess) -> dict[str, list[str]]:
    return {p["origin"]: p["urls"] for p in federation(node)["peers"]}


def lean(node: NodeProcess, discovery: bool = True) -> None:
    text = node.config.read_text().replace("[dimse]\n", "[dimse]\nenabled = false\n")
    node.config.write_text(text)
    node.append_config(f"[federation]\ndiscovery = {str(discovery).lower()}")


class TestDiscovery:
    def test_members_find_each_other_strangers_are_ignored_and_off_means_off(
        self, node_factory: Callable[..., NodeProcess]
    ) -> None:
        with ThreadPoolExecutor(5) as pool:
            a, b, c, stranger, deaf = pool.map(
                node_factory,
                [f"{n}.disc.example/imageshare" for n in ("a", "b", "c", "stranger", "deaf")],
            )
        members = (a, b, c)
        # Members know each other's keys but no URL: only discovery can tell them where.
        for node in members:
            lean(node)
            for other in members:
                if other is not node:
                    add_peer(load_config(node.config), other.origin, "", other.vkey)
        lean(stranger)
        lean(deaf, discovery=False)
        add_peer(load_config(deaf.config), a.origin, "", a.vkey)
        with ThreadPoolExecutor(5) as pool:
            list(pool.map(NodeProcess.start, (a, b, c, stranger, deaf)))

        def everyone_found() -> bool:
            return all(
                learned_urls(node) == {o.origin: [o.url] for o in members if o is not node}
                for node in members
            )

        wait_until(everyone_found, timeout=20, message="members to learn each other's URLs")
        wait_until(
            lambda: stranger.origin in federation(a)["ignored_by_discovery"].values(),
            timeout=20,
            message="the stranger to be seen and ignored",
        )
        assert stranger.origin not in learned_urls(a)
        assert "not in the roster" in a.log_path.read_text()
        # b and c heard a's announcements; a node with discovery off hears nothing.
        assert learned_urls(deaf) == {a.origin: []}
        assert federation(deaf)["ignored_by_discovery"] == {}


ADDRESS_CHALLENGE = "/p2p/address-proof"


@contextmanager
def advertised_as(member: NodeProcess, port: int) -> Iterator[None]:
    """Advertise ``member``'s origin and key fingerprint at 127.0.0.1:``port`` by zeroconf,
    as anyone on the LAN can."""
    fingerprint = key_fingerprint(parse_verifier_key(member.vkey).public_key)
    info = ServiceInfo(
        SERVICE_TYPE,
        f"liar-{fingerprint[:12]}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton("127.0.0.1")],
        port=port,
        properties={"origin": member.origin, "fp": fingerprint, "path": "", "v": "1"},
        server="liar.local.",
    )
    zeroconf = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        zeroconf.register_service(info, allow_name_change=True)
        yield
    finally:
        zeroconf.unregister_all_services()
        zeroconf.close()


def impersonate(member: NodeProcess) -> Callable[[Received], web.Response | None]:
    """A liar's answers: a proof of ``member``'s address signed by another key, a forged
    refusal of every transfer, cosignatures and notifies swallowed; ledger reads relayed
    to the member, so that the address looks like a good one."""
    liar = NodeIdentity(member.origin, os.urandom(32))

    def respond(got: Received) -> web.Response | None:
        path = got.path_qs.partition("?")[0]
        if path == ADDRESS_CHALLENGE:
            asked = json.loads(got.body)
            message = address_proof_bytes(
                member.origin, asked["url"], bytes.fromhex(asked["challenge"])
            )
            signature = b64url_encode(liar.sign(message))
            return web.json_response({"origin": member.origin, "signature": signature})
        if path.startswith("/p2p/transfer"):
            forged = {"error": "refused (revoked): the patient revoked it", "rule": "revoked"}
            return web.json_response(forged, status=403)
        if path.startswith("/p2p/"):
            return web.json_response({"ok": True})
        return None

    return respond


def grant_and_study(custodian: NodeProcess, grantee: NodeProcess, base: Path) -> str:
    """A small study at the custodian and the patient's grant of it to the grantee."""
    make_ct_study(base / "study", series=1, slices=2, rows=32, columns=32)
    custodian.cli("import", str(base / "study"))
    wallet = Wallet.create(base / "wallet", None)
    key = wallet.key_for(custodian.origin).public_key_text
    custodian.cli("enroll", "--patient-id", "MRN-0001", f"--key={key}")

    async def grant() -> str:
        async with aiohttp.ClientSession() as session:
            made = await wallet.grant(session, custodian.url, grantee.origin, None, 3600)
            return str(made["token"])

    return asyncio.run(grant())


class TestLiarOnTheLan:
    def test_an_address_advertised_for_a_member_is_used_only_once_the_member_proves_its_key(
        self, node_factory: Callable[..., NodeProcess], tmp_path: Path
    ) -> None:
        a = node_factory("a.liar.example/imageshare")
        b = node_factory("b.liar.example/imageshare")
        lean(a, discovery=False)
        lean(b)
        for node in (a, b):
            node.append_config("replicate_interval = 0.3")
        add_peer(load_config(a.config), b.origin, b.url, b.vkey)
        add_peer(load_config(b.config), a.origin, a.url, a.vkey)
        liar = HostileServer(forward_to=a.url)
        liar.respond = impersonate(a)
        try:
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(NodeProcess.start, (a, b)))
            with advertised_as(a, liar.port):
                # b has seen the advertisement and contacted the address.
                wait_until(lambda: liar.received, timeout=30, message="b to contact the liar")
                token = grant_and_study(a, b, tmp_path)
                fetched = b.cli("fetch", token, "--json", check=False)
                assert fetched.returncode == 0, fetched.stderr
                assert json.loads(fetched.stdout)["instances"] == 2
                # b's cosignature of a's log went to a itself, not into the liar.
                wait_until(
                    lambda: b.origin in federation(a)["own_log"]["cosigners"],
                    timeout=40,
                    message="a to hold b's cosignature",
                )
                status = {p["origin"]: p for p in federation(b)["peers"]}[a.origin]
        finally:
            liar.stop()
        raw_token = parse_token_text(token)
        assert all(raw_token not in got.body for got in liar.received)
        asked_of_liar = {got.path_qs for got in liar.received if got.path_qs.startswith("/p2p/")}
        assert asked_of_liar == {ADDRESS_CHALLENGE}, asked_of_liar
        assert status["urls"] == [a.url], status
        assert status["rejected_urls"] == [liar.url], status
        assert "did not prove its key" in b.log_path.read_text()
