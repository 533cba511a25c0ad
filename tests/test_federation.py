"""Federation between real node processes: roster, signed /p2p, replication, witnessing,
equivocation. Nodes find each other by static URLs here (discovery: test_discovery.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from node.config import load_config
from node.core.base64url import b64url_encode
from node.core.entries import Enroll
from node.core.equivocation import EquivocationProof, verify_equivocation
from node.core.keys import NodeIdentity
from node.core.merkle import MemoryTree, consistency_proof, leaf_hash
from node.core.notes import MAX_NOTE_BYTES, Checkpoint, parse_note, sign_note
from node.core.origins import log_id
from node.core.roster import Roster, key_fingerprint, make_member
from node.core.signed_requests import node_signer
from node.errors import BadInput, StorageFailed
from node.services.peer_client import signed_request
from node.services.replication import PeerError, PeerStatus
from node.services.roster import add_peer
from node.services.runtime import open_runtime
from node.store.federation_state import (
    STATE_FILE,
    Equivocation,
    FederationState,
    PostgresFederationState,
)
from node.store.ledger import LedgerStore
from node.store.secrets import read_seed
from tests.support.hostile_log import HostileLogServer, enrollments
from tests.support.nodes import NodeProcess, free_port, run_cli, wait_until
from tests.support.proxy import TcpProxy
from tests.support.state_engines import StateEngine

Factory = Callable[..., NodeProcess]


def identity_of(node: NodeProcess) -> NodeIdentity:
    return NodeIdentity(node.origin, read_seed(node.data_dir / "node.key"))


def p2p(
    node: NodeProcess, caller: NodeIdentity, path: str, body: bytes = b"", **kw: Any
) -> tuple[int, Any]:
    """A signed request from ``caller`` to ``node``; returns (status, JSON answer)."""

    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            method = "POST" if body else "GET"
            async with signed_request(
                session,
                method,
                node.url + path,
                caller.sign,
                node_signer(caller.origin),
                node.origin,
                body,
                **kw,
            ) as response:
                return response.status, await response.json()

    return asyncio.run(go())


def add_member(node: NodeProcess, origin: str, url: str, vkey: str) -> None:
    """What `imageshare peers add` does, in-process (the CLI itself is tested below)."""
    add_peer(load_config(node.config), origin, url, vkey)


def start_all(*nodes: NodeProcess) -> None:
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(NodeProcess.start, nodes))


def quiet(node: NodeProcess, interval: float = 0.5) -> None:
    """Lean nodes: no DIMSE, no LAN discovery (static URLs here), a short replication interval."""
    node.config.write_text(
        node.config.read_text().replace("[dimse]\n", "[dimse]\nenabled = false\n")
    )
    node.append_config(f"[federation]\ndiscovery = false\nreplicate_interval = {interval}")


def befriend(nodes: list[NodeProcess], url_of: Callable[[NodeProcess], str] | None = None) -> None:
    for node in nodes:
        for other in nodes:
            if other is not node:
                url = url_of(other) if url_of else other.url
                add_member(node, other.origin, url, other.vkey)


def append_offline(node: NodeProcess, count: int, tag: bytes = b"") -> None:
    """Append ``count`` entries to a stopped node's own log and sign a checkpoint."""
    identity = identity_of(node)
    store = LedgerStore(node.data_dir)
    try:
        own = store.own_log(node.origin, node.vkey)
        now = int(time.time())
        key = (tag * 32)[:32] or os.urandom(32)
        enroll = Enroll(subject=os.urandom(32), key=key, replaces=None)
        own.append_many([(enroll, now)] * count)
        own.publish_checkpoint(identity, now)
    finally:
        store.close()


def sizes(node: NodeProcess) -> dict[str, int]:
    """Every log a node holds (own and mirrored), by origin, from its public ledger API."""
    return {log["origin"]: log["size"] for log in node.get_json("/ledger/logs", auth=False)}


def checkpoint(node: NodeProcess, origin: str) -> str:
    url = f"{node.url}/ledger/logs/{log_id(origin)}/checkpoint"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def cosigners(node: NodeProcess) -> set[str]:
    _, signatures = parse_note(checkpoint(node, node.origin))
    return {s.name for s in signatures} - {node.origin}


def converged(nodes: list[NodeProcess], expected: dict[str, int]) -> bool:
    return all({o: s for o, s in sizes(n).items() if o in expected} == expected for n in nodes)


class TestRoster:
    def test_members_are_found_by_origin_log_id_fingerprint_and_signer(self) -> None:
        me, peer = NodeIdentity.generate("me.example"), NodeIdentity.generate("peer.example")
        roster = Roster(
            me.origin,
            [make_member(me.origin, "", me.vkey), make_member(peer.origin, "", peer.vkey)],
        )
        assert [m.origin for m in roster] == [peer.origin]  # never its own peer
        member = roster.get(peer.origin)
        assert member is not None and member.public_key == peer.public_key
        assert roster.by_log_id(log_id(peer.origin)) == member
        assert roster.by_fingerprint(key_fingerprint(peer.public_key)) == member
        assert roster.public_key_of_signer(node_signer(peer.origin)) == peer.public_key
        assert roster.public_key_of_signer(node_signer("other.example")) is None
        assert roster.public_key_of_signer("patient:" + b64url_encode(peer.public_key)) is None

    def test_a_later_entry_replaces_the_key_of_an_origin(self) -> None:
        old, new = NodeIdentity.generate("p.example"), NodeIdentity.generate("p.example")
        roster = Roster("me.example", [make_member("p.example", "", old.vkey)])
        roster.add(make_member("p.example", "http://p.example:8600/", new.vkey))
        assert roster.public_key_of_signer("node:p.example") == new.public_key
        assert roster.by_fingerprint(key_fingerprint(old.public_key)) is None
        assert roster.get("p.example").url == "http://p.example:8600"  # type: ignore[union-attr]


class TestPeersCommand:
    def test_added_peers_are_listed_and_kept(self, node_factory: Factory) -> None:
        a, b = node_factory("a.example/imageshare"), node_factory("b.example/imageshare")
        added = json.loads(a.cli("peers", "add", b.origin, b.url + "/", b.vkey, "--json").stdout)
        assert added["url"] == b.url
        listed = json.loads(a.cli("peers", "list", "--json").stdout)
        assert [(p["origin"], p["url"], p["vkey"]) for p in listed] == [(b.origin, b.url, b.vkey)]
        assert (a.data_dir / "peers.toml").stat().st_mode & 0o077 == 0

    def test_peers_from_node_toml_are_listed(self, node_factory: Factory) -> None:
        a, b = node_factory("a.example/imageshare"), node_factory("b.example/imageshare")
        a.append_config(f'[[peers]]\norigin = "{b.origin}"\nurl = ""\nvkey = "{b.vkey}"')
        listed = json.loads(a.cli("peers", "list", "--json").stdout)
        assert [(p["origin"], p["url"]) for p in listed] == [(b.origin, "")]

    def test_bad_entries_are_refused_in_one_sentence(self, node_factory: Factory) -> None:
        a, b = node_factory("a.example/imageshare"), node_factory("b.example/imageshare")
        cases = {
            "key of another name": (b.origin, b.url, a.vkey),
            "malformed key": (b.origin, b.url, "b.example+00+AAAA"),
            "bad url": (b.origin, "ftp://x", b.vkey),
            "changed key": (b.origin, b.url, NodeIdentity.generate(b.origin).vkey),
        }
        add_member(a, b.origin, b.url, b.vkey)
        for args in cases.values():
            with pytest.raises(BadInput):
                add_member(a, *args)
        result = a.cli("peers", "add", a.origin, a.url, a.vkey, check=False)
        assert result.returncode == 1
        assert result.stderr == "imageshare: a node cannot be its own peer.\n"
        listed = json.loads(a.cli("peers", "list", "--json").stdout)
        assert [(p["origin"], p["vkey"]) for p in listed] == [(b.origin, b.vkey)]


class TestP2pAuthentication:
    def test_members_are_accepted_and_everyone_else_refused_with_a_reason(
        self, node_factory: Factory
    ) -> None:
        a, b = node_factory("a.example/imageshare"), node_factory("b.example/imageshare")
        quiet(a)
        a.cli("peers", "add", b.origin, b.url, b.vkey)
        a.start()
        member = identity_of(b)
        assert p2p(a, member, "/p2p/whoami") == (200, {"caller": b.origin, "origin": a.origin})

        stranger = NodeIdentity.generate("stranger.example/imageshare")
        assert p2p(a, stranger, "/p2p/whoami") == (
            401,
            {"error": "unknown signer node:stranger.example/imageshare"},
        )
        impostor = NodeIdentity(b.origin, NodeIdentity.generate(b.origin).seed)
        assert p2p(a, impostor, "/p2p/whoami") == (401, {"error": "bad signature"})
        stale = p2p(a, member, "/p2p/whoami", now=int(time.time()) - 3600)
        assert stale == (401, {"error": "stale timestamp"})

        # A member's claims are checked, not believed.
        status, answer = p2p(a, member, "/p2p/equivocation", b"not json")
        assert (status, answer) == (400, {"error": "an equivocation proof must be JSON"})
        unproven = {"log_id": log_id(b.origin), "notes": ["x", "y"]}
        status, _ = p2p(a, member, "/p2p/equivocation", json.dumps(unproven).encode())
        assert status == 400
        status, _ = p2p(a, member, "/p2p/cosignature", b"not a note")
        assert status == 400
        assert a.get_json("/ledger/equivocations", auth=False) == []

    def test_a_member_added_while_running_is_accepted_without_restart(
        self, node_factory: Factory
    ) -> None:
        a, c = node_factory("a.example/imageshare"), node_factory("c.example/imageshare")
        quiet(a)
        a.start()
        newcomer = identity_of(c)
        assert p2p(a, newcomer, "/p2p/whoami")[0] == 401
        a.cli("peers", "add", c.origin, c.url, c.vkey)
        wait_until(
            lambda: p2p(a, newcomer, "/p2p/whoami")[0] == 200,
            timeout=10,
            interval=0.2,
            message="the new member to be accepted",
        )


class TestReplication:
    def test_logs_converge_are_cosigned_and_catch_up_after_downtime(
        self, node_factory: Factory
    ) -> None:
        a = node_factory("a.example/imageshare")
        b = node_factory("b.example/imageshare")
        c = node_factory("c.example/imageshare")
        nodes = [a, b, c]
        for node in nodes:
            quiet(node)
        befriend(nodes)
        append_offline(a, 3)
        append_offline(b, 1200)  # more than one entries batch
        start_all(*nodes)
        expected = {a.origin: 3, b.origin: 1200, c.origin: 0}
        wait_until(lambda: converged(nodes, expected), timeout=30, message="convergence")
        wait_until(lambda: cosigners(a) == {b.origin, c.origin}, message="a's witnesses")
        wait_until(lambda: cosigners(b) == {a.origin, c.origin}, message="b's witnesses")

        # An append through the product while everyone runs reaches the others quickly.
        c.cli("enroll", "--patient-id", "MRN-1", "--key", b64url_encode(os.urandom(32)))
        expected[c.origin] = 1
        wait_until(lambda: converged(nodes, expected), timeout=5, message="the enroll entry")

        # c misses appends at a while down; a restarts with them; c catches up on return.
        c.stop()
        a.stop()
        append_offline(a, 2)
        a.start()
        wait_until(lambda: sizes(b)[a.origin] == 5, timeout=20, message="b to follow a")
        c.start()
        wait_until(lambda: sizes(c)[a.origin] == 5, timeout=20, message="c to catch up")

        def reachable() -> dict[str, bool]:
            peers = a.get_json("/admin/api/federation")["peers"]
            return {p["origin"]: p["reachable"] for p in peers}

        # c announces itself on start, so a retries it at once instead of after its backoff.
        wait_until(lambda: reachable() == {b.origin: True, c.origin: True}, timeout=5)
        assert a.get_json("/admin/api/federation")["equivocations"] == []

    def test_every_log_a_node_lists_its_checkpoint_route_serves(
        self, node_factory: Factory
    ) -> None:
        a, b = node_factory("a.example/imageshare"), node_factory("b.example/imageshare")
        unreachable = node_factory("z.example/imageshare")  # a member that never answers
        for node in (a, b):
            quiet(node)
        befriend([a, b])
        add_member(b, unreachable.origin, unreachable.url, unreachable.vkey)
        start_all(a, b)
        # b has verified a's empty log (it witnessed and mirrored it); z's it has never seen.
        wait_until(lambda: cosigners(a) == {b.origin}, message="b to witness a's empty log")
        wait_until(lambda: set(sizes(b)) == {a.origin, b.origin}, message="b to mirror a's log")
        for node in (a, b):
            for listed in node.get_json("/ledger/logs", auth=False):
                note = checkpoint(node, listed["origin"])
                assert Checkpoint.parse(parse_note(note)[0]).size == listed["size"]

    def test_a_node_cut_off_from_a_log_gets_it_from_another_member(
        self, node_factory: Factory
    ) -> None:
        a = node_factory("a.example/imageshare")
        b = node_factory("b.example/imageshare")
        c = node_factory("c.example/imageshare")
        nodes = [a, b, c]
        for node in nodes:
            quiet(node)
        # c knows no working address of a (a partition between them), only of b.
        befriend([a, b])
        add_member(c, a.origin, f"http://127.0.0.1:{free_port()}", a.vkey)
        add_member(c, b.origin, b.url, b.vkey)
        append_offline(a, 4)
        start_all(*nodes)
        wait_until(lambda: sizes(c).get(a.origin) == 4, timeout=20, message="a's log at c")
        status = c.get_json("/admin/api/federation")
        assert {p["origin"]: p["reachable"] for p in status["peers"]}[a.origin] is False


def fork_of(node: NodeProcess, port: int | None = None) -> NodeProcess:
    """The same node identity in a second data dir, to sign a second history with its key."""
    fork_port = port or free_port()
    fork_dir = node.data_dir.parent / f"{node.data_dir.name}-fork"
    shutil.copytree(node.data_dir, fork_dir)
    config = (fork_dir / "node.toml").read_text()
    (fork_dir / "node.toml").write_text(
        config.replace(f"127.0.0.1:{node.http_port}", f"127.0.0.1:{fork_port}")
    )
    (fork_dir / "daemon.log").unlink(missing_ok=True)
    return NodeProcess(fork_dir, node.origin, fork_port, 0, node.vkey, node.admin_token)


class TestPartition:
    def test_both_sides_converge_after_a_partition_heals(self, node_factory: Factory) -> None:
        a = node_factory("a.example/imageshare")
        b = node_factory("b.example/imageshare")
        for node in (a, b):
            quiet(node, interval=0.3)
        a_via_proxy, b_via_proxy = TcpProxy(a.http_port), TcpProxy(b.http_port)
        try:
            add_member(a, b.origin, b_via_proxy.url, b.vkey)
            add_member(b, a.origin, a_via_proxy.url, a.vkey)
            start_all(a, b)
            wait_until(
                lambda: sizes(b).get(a.origin) == 0 and sizes(a).get(b.origin) == 0,
                message="each to mirror the other",
            )
            for proxy in (a_via_proxy, b_via_proxy):
                proxy.cut()
            key = b64url_encode(os.urandom(32))
            a.cli("enroll", "--patient-id", "MRN-P", "--key", key)
            b.cli("enroll", "--patient-id", "MRN-Q", "--key", b64url_encode(os.urandom(32)))
            wait_until(
                lambda: all(
                    p["failures"] >= 2
                    for n in (a, b)
                    for p in n.get_json("/admin/api/federation")["peers"]
                ),
                timeout=20,
                message="both sides to notice the partition",
            )
            assert sizes(b)[a.origin] == 0 and sizes(a)[b.origin] == 0
            for proxy in (a_via_proxy, b_via_proxy):
                proxy.heal()
            expected = {a.origin: 1, b.origin: 1}
            wait_until(lambda: converged([a, b], expected), timeout=15, message="healing")
        finally:
            for proxy in (a_via_proxy, b_via_proxy):
                proxy.stop()


class TestAddresses:
    def test_an_address_serving_less_than_the_member_announced_is_passed_over(
        self, node_factory: Factory
    ) -> None:
        a, b = node_factory("a.example/imageshare"), node_factory("b.example/imageshare")
        quiet(a, interval=60)
        add_member(a, b.origin, "http://placeholder.invalid", b.vkey)

        async def scenario() -> None:
            urls: dict[int, str] = {}
            runners = []
            for size in (1, 2):  # a stale copy of b's log, and b as it is now

                async def listing(_r: web.Request, size: int = size) -> web.Response:
                    return web.json_response([{"origin": b.origin, "size": size}])

                app = web.Application()
                app.router.add_get("/ledger/logs", listing)
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                port = free_port()
                await web.TCPSite(runner, "127.0.0.1", port).start()
                urls[size] = f"http://127.0.0.1:{port}"
                runners.append(runner)
            add_member(a, b.origin, urls[2], b.vkey)
            runtime = open_runtime(a.config)
            replication = runtime.services.replication
            # An address b once proved (so it is used first) that now serves a stale copy.
            replication.roster.add_candidate(b.origin, urls[1])
            replication.roster.confirm_url(b.origin, urls[1])
            await replication.start()
            try:

                async def used_url(expected: str) -> None:
                    deadline = time.monotonic() + 10
                    while replication.peers.get(b.origin, PeerStatus()).url != expected:
                        assert time.monotonic() < deadline, f"never used {expected}"
                        await asyncio.sleep(0.05)

                await used_url(urls[1])  # no reason yet to doubt the learned address
                replication.notify_received(b.origin, log_id(b.origin), 2)
                await used_url(urls[2])
            finally:
                await replication.stop()
                runtime.close()
                for runner in runners:
                    await runner.cleanup()

        asyncio.run(scenario())


class TestEquivocation:
    def test_two_histories_signed_by_one_node_are_caught_and_kept(
        self, node_factory: Factory
    ) -> None:
        x = node_factory("x.example/imageshare")
        quiet(x)
        fork = fork_of(x)
        a = node_factory("a.example/imageshare")
        b = node_factory("b.example/imageshare")
        for node in (a, b):
            quiet(node)
        befriend([a, b])
        add_member(a, x.origin, fork.url, x.vkey)  # a is shown the fork
        add_member(b, x.origin, x.url, x.vkey)  # b is shown the original
        append_offline(x, 3, tag=b"o")
        append_offline(fork, 3, tag=b"f")
        try:
            start_all(x, fork, a, b)

            def proofs(node: NodeProcess) -> list[dict[str, Any]]:
                held: list[dict[str, Any]] = node.get_json("/ledger/equivocations", auth=False)
                return held

            for node in (a, b):
                found = wait_until(lambda n=node: proofs(n), timeout=60, message="the proof")
                assert found[0]["origin"] == x.origin
                note_a, note_b = found[0]["notes"]
                assert note_a != note_b
                assert {parse_note(n)[1][0].name for n in (note_a, note_b)} == {x.origin}
                assert check_proof(found[0], x.vkey) == (3, 3)
                status = node.get_json("/admin/api/federation")
                assert status["equivocations"] == found
                assert {p["origin"]: p["trusted"] for p in status["peers"]}[x.origin] is False

            # x's later entries are refused, and the proof survives a restart.
            x.stop()
            append_offline(x, 2, tag=b"o")
            x.start()
            restarted = time.time()

            def polled_x_since_restart() -> bool:
                peers = b.get_json("/admin/api/federation")["peers"]
                last = {p["origin"]: p["last_success"] for p in peers}[x.origin]
                return last is not None and last > restarted

            wait_until(polled_x_since_restart, timeout=20, message="b to poll x again")
            assert sizes(b)[x.origin] == 3
            a.stop()
            a.start()
            assert proofs(a)
            assert "EQUIVOCATION" in b.log_path.read_text()
        finally:
            fork.stop()

    def test_a_later_checkpoint_that_does_not_extend_the_earlier_one_is_caught(
        self, node_factory: Factory
    ) -> None:
        x = node_factory("x.example/imageshare")
        b = node_factory("b.example/imageshare")
        for node in (x, b):
            quiet(node)
        # The rewritten history answers at x's address once x is gone.
        fork = fork_of(x, port=x.http_port)
        add_member(b, x.origin, x.url, x.vkey)
        append_offline(x, 3, tag=b"o")
        append_offline(fork, 5, tag=b"f")
        start_all(x, b)
        wait_until(lambda: sizes(b).get(x.origin) == 3, message="b to mirror x")
        x.stop()
        try:
            fork.start()
            found = wait_until(
                lambda: b.get_json("/ledger/equivocations", auth=False),
                timeout=20,
                message="the proof",
            )
            # The rewritten history, read whole from x's address, proves the fork to anyone.
            assert check_proof(found[0], x.vkey) == (3, 5)
            assert "another root at size 3" in found[0]["reason"]
            assert sizes(b)[x.origin] == 3
        finally:
            fork.stop()


def equivocation_proofs(node: NodeProcess) -> list[dict[str, Any]]:
    return node.get_json("/ledger/equivocations", auth=False)


def trusted(node: NodeProcess, origin: str) -> bool:
    peers = node.get_json("/admin/api/federation")["peers"]
    return bool({p["origin"]: p["trusted"] for p in peers}[origin])


def distrusts_with_proof(node: NodeProcess, origin: str) -> list[dict[str, Any]]:
    """The node's proofs about ``origin`` once it also shows that log as untrusted."""
    found = [p for p in equivocation_proofs(node) if p["origin"] == origin]
    return found if found and not trusted(node, origin) else []


def check_proof(document: dict[str, Any], vkey: str) -> tuple[int, int]:
    """Verify a served proof with the log's key alone; returns the two checkpoint sizes."""
    verified = verify_equivocation(EquivocationProof.from_json(document), vkey)
    small, large = (Checkpoint.parse(parse_note(n)[0]).size for n in verified.proof.notes)
    return small, large


class TestSplitView:
    """A hostile member shows each of two honest nodes its own fork, signed with its real key
    (a small server in the test holding that key, one URL per victim)."""

    def test_forks_of_different_sizes_are_proven_to_both_nodes_and_fail_the_audit(
        self, node_factory: Factory
    ) -> None:
        c = node_factory("c.example/imageshare")  # never started: the hostile server is c
        d, e = node_factory("d.example/imageshare"), node_factory("e.example/imageshare")
        for node in (d, e):
            quiet(node)
        befriend([d, e])
        common = enrollments(1)
        forks = {"d": enrollments(1, common), "e": enrollments(2, common)}
        with HostileLogServer(identity_of(c), c.vkey, forks) as hostile:
            add_member(d, c.origin, hostile.url("d"), c.vkey)
            add_member(e, c.origin, hostile.url("e"), c.vkey)
            start_all(d, e)
            for node in (d, e):
                found = wait_until(
                    lambda n=node: distrusts_with_proof(n, c.origin),
                    timeout=30,
                    message=f"{node.origin} to hold a proof and distrust c",
                )
                assert {check_proof(p, c.vkey) for p in found} == {(2, 3)}
                assert node.get_json("/admin/api/federation")["equivocations"] == (
                    equivocation_proofs(node)
                )
            assert (sizes(d)[c.origin], sizes(e)[c.origin]) == (2, 3)
        # The proof counts on its own: even d alone, holding only the smaller fork, fails.
        for urls in ([d.url, e.url], [d.url]):
            result = run_cli("audit", *urls, "--json", check=False)
            assert result.returncode == 1, result.stderr
            violations = json.loads(result.stdout)["violations"]
            assert (c.origin, "equivocation") in {(v["log"], v["rule"]) for v in violations}
        human = run_cli("audit", d.url, e.url, check=False)
        assert human.returncode == 1
        assert c.origin in human.stdout and "equivocation" in human.stdout

    def test_a_same_size_fork_shown_after_cosigning_is_caught(self, node_factory: Factory) -> None:
        c, d = node_factory("c.example/imageshare"), node_factory("d.example/imageshare")
        quiet(d)
        common = enrollments(1)
        with HostileLogServer(identity_of(c), c.vkey, {"d": enrollments(1, common)}) as hostile:
            add_member(d, c.origin, hostile.url("d"), c.vkey)
            d.start()
            wait_until(
                lambda: sizes(d).get(c.origin) == 2,
                timeout=20,
                message="d to mirror the first history",
            )
            # The same size, another last entry: only the root tells them apart.
            hostile.show("d", enrollments(1, common))
            found = wait_until(
                lambda: distrusts_with_proof(d, c.origin), timeout=20, message="the proof"
            )
        assert [check_proof(p, c.vkey) for p in found] == [(2, 2)]
        assert sizes(d)[c.origin] == 2


    def test_a_members_proof_that_does_not_hold_is_refused_and_frames_no_one(
        self, node_factory: Factory
    ) -> None:
        c, d, e = (node_factory(f"{n}.example/imageshare") for n in "cde")
        quiet(d)
        befriend([d, e])
        add_member(d, c.origin, c.url, c.vkey)  # c is never started: only its key matters
        d.start()
        key = identity_of(c)
        history = enrollments(3)
        tree = MemoryTree([leaf_hash(entry) for entry in history])

        def signed(size: int, signer: NodeIdentity = key) -> str:
            return sign_note(Checkpoint(c.origin, size, tree.root(size)).body(), signer)

        honest = EquivocationProof(
            c.origin, (signed(2), signed(3)), tree.root(2), tuple(consistency_proof(tree, 2, 3))
        )
        impostor = NodeIdentity(c.origin, NodeIdentity.generate(c.origin).seed)
        forged_root = sign_note(Checkpoint(c.origin, 2, bytes(32)).body(), impostor)
        for claim, status in [
            (honest, 400),  # two checkpoints of one history
            (replace(honest, notes=(forged_root, signed(3))), 401),  # not c's signature
            (replace(honest, prefix_root=bytes(32)), 400),  # a made-up prefix root
        ]:
            body = json.dumps(claim.as_json()).encode()
            assert p2p(d, identity_of(e), "/p2p/equivocation", body)[0] == status
        assert equivocation_proofs(d) == [] and trusted(d, c.origin)


@pytest.fixture
def open_federation_state(state_engine: StateEngine) -> Callable[[], FederationState]:
    """Open the state (again: a restart on SQLite, another daemon on PostgreSQL)."""
    return state_engine.opener(FederationState, STATE_FILE, PostgresFederationState)


class TestEquivocationStore:
    def test_a_proof_is_kept_whole_across_reopening_and_recorded_once(
        self, open_federation_state: Callable[[], FederationState]
    ) -> None:
        identity = NodeIdentity.generate("c.example/imageshare")
        proof = EquivocationProof(identity.origin, ("note a", "note b"), bytes(32), (b"h" * 32,))
        state = open_federation_state()
        assert state.record_equivocation(Equivocation(proof, "why", 7))
        assert not state.record_equivocation(Equivocation(proof, "again", 8))
        state.close()
        reopened = open_federation_state()
        try:
            assert reopened.equivocations() == [Equivocation(proof, "why", 7)]
            assert reopened.equivocating_logs() == {proof.log_id}
            assert not reopened.record_equivocation(Equivocation(proof, "elsewhere", 9))
        finally:
            reopened.close()

    def test_a_proof_with_notes_padded_to_the_note_limit_is_still_recorded_once(
        self, open_federation_state: Callable[[], FederationState]
    ) -> None:
        # Notes of up to a mebibyte are parsed; a key of them would not fit a B-tree.
        padding = os.urandom(MAX_NOTE_BYTES // 4).hex()
        notes = (f"note a\n{padding}", f"note b\n{padding}")
        proof = EquivocationProof("c.example/imageshare", notes, None, ())
        state = open_federation_state()
        assert state.record_equivocation(Equivocation(proof, "why", 7))
        assert not state.record_equivocation(Equivocation(proof, "again", 8))
        swapped = replace(proof, notes=(notes[1], notes[0]))
        assert state.record_equivocation(Equivocation(swapped, "the other order", 9))
        assert [e.proof for e in state.equivocations()] == [proof, swapped]

    def test_members_dealt_with_are_new_once_and_the_scan_position_is_replaced(
        self, open_federation_state: Callable[[], FederationState]
    ) -> None:
        daemons = [open_federation_state(), open_federation_state()]
        origins = {f"m{n}.example/imageshare" for n in range(10)}
        with ThreadPoolExecutor(4) as pool:
            added = list(
                pool.map(lambda n: daemons[n % 2].add_dealings(origins, n, now=n), range(4))
            )
        assert set().union(*added) == origins and sum(len(a) for a in added) == 10
        assert daemons[1].dealings() == origins
        assert daemons[0].dealings_scanned() in range(4)
        daemons[0].add_dealings(set(), 42, now=5)
        assert daemons[1].dealings_scanned() == 42

    def test_the_latest_checkpoint_of_a_log_replaces_the_one_kept(
        self, open_federation_state: Callable[[], FederationState]
    ) -> None:
        state = open_federation_state()
        assert state.checkpoint("log-1") is None
        state.keep_checkpoint("log-1", "c.example/imageshare", 2, "note 2", "https://c/1")
        state.keep_checkpoint("log-1", "c.example/imageshare", 3, "note 3", "https://c/2")
        assert open_federation_state().checkpoint("log-1") == ("note 3", "https://c/2")

    def test_a_failing_database_raises_storage_failed_which_replication_handles(
        self, tmp_path: Path
    ) -> None:
        state = FederationState(tmp_path / STATE_FILE)
        try:
            with sqlite3.connect(tmp_path / STATE_FILE) as damage:
                damage.execute("DROP TABLE equivocations")
            damage.close()
            with pytest.raises(StorageFailed, match="federation") as raised:
                state.equivocations()
            assert isinstance(raised.value, PeerError)  # a follower's round survives it
        finally:
            state.close()

    def test_a_table_from_before_self_contained_proofs_is_read_and_still_freezes_the_log(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / STATE_FILE
        with sqlite3.connect(path) as db:
            db.execute(
                "CREATE TABLE equivocations (log_id TEXT NOT NULL, origin TEXT NOT NULL,"
                " note_a TEXT NOT NULL, note_b TEXT NOT NULL, reason TEXT NOT NULL,"
                " detected_at INTEGER NOT NULL, PRIMARY KEY (log_id, note_a, note_b))"
            )
            db.execute(
                "INSERT INTO equivocations VALUES (?, ?, 'a', 'b', 'old', 1)",
                (log_id("c.example/imageshare"), "c.example/imageshare"),
            )
        db.close()
        state = FederationState(path)
        try:
            (old,) = state.equivocations()
            assert old.proof == EquivocationProof("c.example/imageshare", ("a", "b"))
            assert state.equivocating_logs() == {log_id("c.example/imageshare")}
        finally:
            state.close()
