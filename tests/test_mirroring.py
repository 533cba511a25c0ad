"""Selective mirroring (docs/federation.md): entries of the logs a node deals with, checkpoints
of every log, a split view caught from checkpoints alone; an archive mirrors everything.

One federation of real node processes for the module: ``a`` and ``b`` mirror their
dealings, ``z`` is the archive (``mirror = "all"``), and ``c`` is a hostile member (a
small server holding c's real key) that shows ``a`` one history and ``z`` another; ``l``
is a member whose log server lies in its consistency proofs on demand.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from node.core.consent import token_text
from node.core.equivocation import EquivocationProof, verify_equivocation
from node.core.keys import NodeIdentity
from node.core.notes import Checkpoint, parse_note
from node.store.secrets import read_seed
from tests.support.hostile_log import HostileLogServer, enrollments
from tests.support.nodes import NodeProcess, init_node, wait_until
from tests.support.patients import enroll_new_key, make_grant


@dataclass
class Federation:
    a: NodeProcess
    b: NodeProcess
    z: NodeProcess
    c: NodeProcess  # never started: the hostile server signs with its key
    hostile: HostileLogServer
    liar: HostileLogServer  # l's log, one history, its proofs bad while bad_proofs is set


def configure(node: NodeProcess, mirror: str, peers: list[tuple[str, str, str]]) -> None:
    node.config.write_text(
        node.config.read_text().replace("[dimse]\n", "[dimse]\nenabled = false\n")
    )
    tables = "".join(
        f'\n[[peers]]\norigin = "{o}"\nurl = "{u}"\nvkey = "{v}"\n' for o, u, v in peers
    )
    node.append_config(
        f'[federation]\ndiscovery = false\nreplicate_interval = 0.2\nmirror = "{mirror}"\n' + tables
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    base: Path = tmp_path_factory.mktemp("mirroring")
    with ThreadPoolExecutor(5) as pool:
        made = pool.map(lambda n: init_node(base, f"{n}.example/imageshare"), "abzcl")
        a, b, z, c, liar = list(made)
    common = enrollments(1)
    # Two histories from one entry on: a is shown 2 entries, z (the archive) 3.
    forks = {"a": enrollments(1, common), "z": enrollments(2, common)}
    logged = enrollments(2)
    with (
        HostileLogServer(identity_of(c), c.vkey, forks) as hostile,
        # One history for all; only a's view grows, so only a meets the lie.
        HostileLogServer(identity_of(liar), liar.vkey, dict.fromkeys("az", logged)) as lying,
    ):
        honest = {n.origin: (n.origin, n.url, n.vkey) for n in (a, b, z)}
        for node, mirror, view in ((a, "dealings", "a"), (b, "dealings", "a"), (z, "all", "z")):
            others = [p for o, p in honest.items() if o != node.origin]
            members = [
                (c.origin, hostile.url(view), c.vkey),
                (liar.origin, lying.url(view), liar.vkey),
            ]
            configure(node, mirror, [*others, *members])
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(NodeProcess.start, (a, b, z)))
        try:
            yield Federation(a, b, z, c, hostile, lying)
        finally:
            for node in (a, b, z):
                node.stop()


def identity_of(node: NodeProcess) -> NodeIdentity:
    return NodeIdentity(node.origin, read_seed(node.data_dir / "node.key"))


def peer_row(node: NodeProcess, origin: str) -> dict[str, Any]:
    peers = node.get_json("/admin/api/federation")["peers"]
    return next(p for p in peers if p["origin"] == origin)


def served_logs(node: NodeProcess) -> dict[str, int]:
    """The logs a node serves entries of (its own and its mirrors), by origin."""
    return {log["origin"]: log["size"] for log in node.get_json("/ledger/logs", auth=False)}


def test_a_node_not_dealing_with_a_member_holds_its_checkpoint_but_no_entries(
    fed: Federation,
) -> None:
    enroll_new_key(fed.z, "MIRROR-1")
    row = wait_until(
        lambda: (r := peer_row(fed.a, fed.z.origin))["size_here"] == 1 and r,
        message="a to verify z's checkpoint at size 1",
    )
    assert row["mirrored"] is False
    assert fed.z.origin not in served_logs(fed.a)
    # a still witnesses z's log from checkpoints alone.
    wait_until(
        lambda: fed.a.origin in fed.z.get_json("/admin/api/federation")["own_log"]["cosigners"],
        message="a to cosign z's checkpoint",
    )


def test_the_archive_mirrors_every_log(fed: Federation) -> None:
    enroll_new_key(fed.a, "MIRROR-2")
    wait_until(
        lambda: served_logs(fed.z).get(fed.a.origin, 0) >= 1 and fed.b.origin in served_logs(fed.z),
        message="z to mirror a's and b's logs",
    )
    assert all(p["mirrored"] for p in fed.z.get_json("/admin/api/federation")["peers"])


def test_a_split_view_is_caught_by_a_node_holding_only_checkpoints(fed: Federation) -> None:
    def proofs() -> list[dict[str, Any]]:
        found = fed.a.get_json("/ledger/equivocations", auth=False)
        distrusted = not peer_row(fed.a, fed.c.origin)["trusted"]
        return [p for p in found if p["origin"] == fed.c.origin] if distrusted else []

    found = wait_until(proofs, timeout=30, message="a to prove c showed two histories")
    sizes = set()
    for document in found:
        verified = verify_equivocation(EquivocationProof.from_json(document), fed.c.vkey)
        sizes.add(tuple(Checkpoint.parse(parse_note(n)[0]).size for n in verified.proof.notes))
    assert sizes == {(2, 3)}
    # a caught it holding no entry of c's log: neither history was copied there.
    assert fed.c.origin not in served_logs(fed.a)
    assert peer_row(fed.a, fed.c.origin)["mirrored"] is False


def test_a_server_lying_in_its_consistency_proof_frames_no_one_and_is_followed_as_it_grows(
    fed: Federation,
) -> None:
    origin = fed.liar.identity.origin
    wait_until(lambda: peer_row(fed.a, origin)["size_here"] == 2, message="a to keep size 2")
    fed.liar.bad_proofs = True
    fed.liar.show("a", enrollments(1, fed.liar.histories["a"]))
    row = wait_until(
        lambda: (r := peer_row(fed.a, origin))["reachable"] is False and r,
        message="a to refuse the bad proof",
    )
    # The history is consistent: streamed once, it shows the proof was the server's lie.
    assert "bad consistency proof" in row["last_error"]
    assert row["trusted"] is True and row["size_here"] == 2
    proofs = fed.a.get_json("/ledger/equivocations", auth=False)
    assert [p for p in proofs if p["origin"] == origin] == []
    # That answer was judged once; the next checkpoint, proven honestly, is taken.
    fed.liar.bad_proofs = False
    fed.liar.show("a", enrollments(1, fed.liar.histories["a"]))
    wait_until(lambda: peer_row(fed.a, origin)["size_here"] == 4, message="a to reach 4")


def test_starting_a_dealing_starts_mirroring_on_both_sides(fed: Federation) -> None:
    assert fed.a.origin not in served_logs(fed.b)
    patient = enroll_new_key(fed.a, "MIRROR-3")
    grant = make_grant(patient, fed.a.origin, fed.b.origin)
    request = urllib.request.Request(
        fed.b.url + "/admin/api/fetch",
        data=json.dumps({"token": token_text(grant)}).encode(),
        headers={**fed.b.auth, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
    # b fetches from a, so mirrors a's whole log; a recorded the grant naming b, so mirrors b's.
    wait_until(
        lambda: served_logs(fed.b).get(fed.a.origin) == served_logs(fed.a)[fed.a.origin],
        timeout=30,
        message="b to mirror all of a's log",
    )
    assert peer_row(fed.b, fed.a.origin)["mirrored"] is True
    wait_until(
        lambda: served_logs(fed.a).get(fed.b.origin) == served_logs(fed.b)[fed.b.origin],
        timeout=30,
        message="a to mirror b's log",
    )
    # A dealing is kept across a restart.
    fed.b.stop()
    fed.b.start()
    assert peer_row(fed.b, fed.a.origin)["mirrored"] is True
