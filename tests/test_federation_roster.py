"""The signed federation roster: its format and chain rule, its log, and nodes that pin it."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from node.config import NodeConfig, load_config
from node.core.encoding import canonical_decode
from node.core.entries import Witness
from node.core.keys import NodeIdentity
from node.core.merkle import ZERO_HASH
from node.core.notes import add_signatures, cosign_checkpoint, parse_note
from node.core.origins import log_id, log_id_bytes
from node.core.roster_document import (
    HEADER,
    MAX_ROSTER_BYTES,
    RosterDocument,
    RosterMember,
    add_roster_signatures,
    check_successor,
    make_roster_member,
    open_roster,
    parse_roster_body,
    sign_roster,
    verify_roster_chain,
)
from node.errors import BadInput, Conflict, Unauthorized
from node.services.audit import LogListing, PeerView, ServedLog, audit_views, run_audit
from node.services.federation_roster import (
    accept_roster_log,
    check_held_roster,
    create_federation_key,
    current_roster,
    decode_bundle,
    fetch_roster,
    roster_refresher,
    sign_next_version,
    verify_roster_log,
)
from node.services.roster import add_peer, move_member_key
from node.store.ledger import LedgerStore
from tests.support.nodes import NodeProcess, init_node, run_cli, wait_until
from tests.test_federation import identity_of, p2p

FEDERATION = "fed.example/roster"
NOW = 1_790_000_000


def member_of(identity: NodeIdentity, *roles: str) -> RosterMember:
    return make_roster_member(identity.origin, identity.vkey, roles, "http://127.0.0.1:9")


def document(
    key: NodeIdentity, version: int, *members: NodeIdentity, threshold: int = 0
) -> RosterDocument:
    listed = sorted((member_of(m, "custodian") for m in members), key=lambda m: m.origin)
    return RosterDocument(FEDERATION, version, NOW, NOW + 86400, key.vkey, threshold, tuple(listed))


@pytest.fixture(scope="module")
def keys() -> dict[str, NodeIdentity]:
    return {
        "fed": NodeIdentity.generate(FEDERATION),
        "fed2": NodeIdentity.generate(FEDERATION),
        "rogue": NodeIdentity.generate(FEDERATION),
        "a": NodeIdentity.generate("a.example/imageshare"),
        "b": NodeIdentity.generate("b.example/imageshare"),
        "c": NodeIdentity.generate("c.example/imageshare"),
    }


class TestRosterFormat:
    def test_a_signed_version_round_trips_and_names_its_members(self, keys: dict) -> None:
        v1 = document(keys["fed"], 1, keys["a"], keys["b"])
        note = sign_roster(v1, [keys["fed"]])
        body, _ = parse_note(note)
        assert body.startswith(HEADER + f"\nfederation {FEDERATION}\nversion 1\n")
        assert (
            f"member a.example/imageshare {keys['a'].vkey} custodian http://127.0.0.1:9\n" in body
        )
        opened, _, _ = open_roster(note)
        assert opened == v1
        assert opened.names_key("a.example/imageshare", keys["a"].public_key)
        assert not opened.names_key("a.example/imageshare", keys["b"].public_key)

    @pytest.mark.parametrize(
        "mangle, reason",
        [
            (lambda b: b.replace("version 1", "version 01"), "decimal"),
            (lambda b: b.replace("imageshare-roster/v1", "imageshare-roster/v2"), "starts with"),
            (lambda b: b + "extra line\n", "member"),
            (lambda b: b.replace(" custodian ", " Custodian "), "roles"),
            (lambda b: b.replace("not-after", "not-after "), "decimal"),
            (lambda b: b.replace("threshold 0", "threshold 9"), "threshold"),
            (lambda b: b + b.splitlines(keepends=True)[-1], "sorted"),
            (lambda b: b + "member x " * 8000 + "\n", "at most"),
            (lambda b: b[:-1], "newline"),
        ],
    )
    def test_a_malformed_roster_is_refused_with_a_reason(
        self, keys: dict, mangle: object, reason: str
    ) -> None:
        body = document(keys["fed"], 1, keys["a"], keys["b"]).body()
        with pytest.raises(BadInput, match=reason):
            parse_roster_body(mangle(body))  # type: ignore[operator]

    def test_a_roster_is_bounded(self, keys: dict) -> None:
        with pytest.raises(BadInput, match=str(MAX_ROSTER_BYTES)):
            parse_roster_body("x" * (MAX_ROSTER_BYTES + 1))

    def test_a_version_not_signed_by_the_key_it_names_is_refused(self, keys: dict) -> None:
        note = sign_roster(document(keys["fed"], 1, keys["a"]), [keys["rogue"]])
        with pytest.raises(Unauthorized, match="not signed by the federation key it names"):
            open_roster(note)


class TestChainRule:
    def test_the_next_version_must_be_signed_by_the_previous_federation_key(
        self, keys: dict
    ) -> None:
        v1 = document(keys["fed"], 1, keys["a"])
        # a key change: v2 names fed2, signed by fed2 (its own) and fed (the chain)
        v2 = sign_roster(
            document(keys["fed2"], 2, keys["a"], keys["b"]), [keys["fed2"], keys["fed"]]
        )
        assert check_successor(v1, v2).key == keys["fed2"].vkey
        forged = sign_roster(document(keys["rogue"], 2, keys["a"], keys["c"]), [keys["rogue"]])
        with pytest.raises(Unauthorized, match="signed neither by the federation key of version 1"):
            check_successor(v1, forged)
        skipped = sign_roster(document(keys["fed"], 3, keys["a"]), [keys["fed"]])
        with pytest.raises(BadInput, match="does not follow version 1"):
            check_successor(v1, skipped)

    def test_a_threshold_of_members_replaces_a_lost_federation_key(self, keys: dict) -> None:
        v1 = document(keys["fed"], 1, keys["a"], keys["b"], keys["c"], threshold=2)
        successor = document(keys["fed2"], 2, keys["a"], keys["b"], keys["c"], threshold=2)
        one = sign_roster(successor, [keys["fed2"], keys["a"]])
        with pytest.raises(Unauthorized, match="nor by 2 of its members"):
            check_successor(v1, one)
        two = add_roster_signatures(one, [keys["b"]])
        assert check_successor(v1, two).key == keys["fed2"].vkey

    def test_a_verifier_pinned_to_a_later_key_starts_at_the_version_naming_it(
        self, keys: dict
    ) -> None:
        v1 = sign_roster(document(keys["fed"], 1, keys["a"]), [keys["fed"]])
        v2 = sign_roster(
            document(keys["fed2"], 2, keys["a"], keys["b"]), [keys["fed2"], keys["fed"]]
        )
        v3 = sign_roster(document(keys["fed2"], 3, keys["b"]), [keys["fed2"]])
        assert [d.version for d in verify_roster_chain([v1, v2, v3], keys["fed"].vkey)] == [1, 2, 3]
        assert [d.version for d in verify_roster_chain([v1, v2, v3], keys["fed2"].vkey)] == [2, 3]
        with pytest.raises(Unauthorized, match="no roster version names the pinned"):
            verify_roster_chain([v1, v2, v3], keys["rogue"].vkey)
        rogue3 = sign_roster(document(keys["rogue"], 3, keys["c"]), [keys["rogue"]])
        with pytest.raises(Unauthorized):
            verify_roster_chain([v1, v2, rogue3], keys["fed"].vkey)


class TestRosterLog:
    def test_every_version_and_key_change_is_in_one_verifiable_log(
        self, keys: dict, tmp_path: Path
    ) -> None:
        members = [member_of(keys["a"]), member_of(keys["b"])]
        first = sign_next_version(tmp_path, keys["fed"], members[:1], 0, NOW, 30)
        changed = sign_next_version(
            tmp_path, keys["fed2"], members, 1, NOW + 5, 30, previous_key=keys["fed"]
        )
        assert (first.document.version, changed.document.version) == (1, 2)
        checkpoint, entries = decode_bundle(changed.bundle)
        # roster v1, the log's own key rotation, roster v2
        assert len(entries) == 3
        versions = verify_roster_log(keys["fed"].vkey, checkpoint, entries)
        assert [v.version for v in versions] == [1, 2]
        # a log cut before its newest version: the checkpoint is not that version's key's
        with pytest.raises(Unauthorized, match="no signature"):
            verify_roster_log(keys["fed"].vkey, checkpoint, entries[:2])
        with pytest.raises(BadInput, match="size 3, not the 4"):
            verify_roster_log(keys["fed"].vkey, checkpoint, [*entries, entries[1]])
        # a lost key: the threshold (1 of v2's members) signs v3 under a third key
        third = NodeIdentity.generate(FEDERATION)
        with pytest.raises(Unauthorized):
            sign_next_version(tmp_path, third, members, 1, NOW + 9, 30)
        replaced = sign_next_version(
            tmp_path, third, members, 1, NOW + 9, 30, member_keys=(keys["b"],)
        )
        checkpoint, entries = decode_bundle(replaced.bundle)
        assert [v.version for v in verify_roster_log(keys["fed"].vkey, checkpoint, entries)] == [
            1,
            2,
            3,
        ]
        # A node pinned to the first key follows both key changes into its mirror.
        node_dir = tmp_path / "node"
        node_dir.mkdir()
        (node_dir / "node.toml").write_text(
            f'origin = "a.example/imageshare"\ndata_dir = "{node_dir}"\n'
            f'[federation]\nkey = "{keys["fed"].vkey}"\n'
        )
        config = load_config(node_dir / "node.toml")
        assert accept_roster_log(config, *decode_bundle(changed.bundle)).version == 2
        assert accept_roster_log(config, checkpoint, entries).key == third.vkey
        assert check_held_roster(config, NOW + 10).version == 3
        with pytest.raises(BadInput, match="not now"):
            check_held_roster(config, NOW + 31 * 86400)

    def test_a_bundle_that_is_not_one_is_refused(self) -> None:
        with pytest.raises(BadInput):
            decode_bundle(b"\x81\xa1x\x01")
        with pytest.raises(BadInput, match="at most"):
            decode_bundle(b"\x00" * (16 * 1024 * 1024 + 1))


# -- nodes that take their members from the roster -------------------------------------------


def write_members(path: Path, *nodes: NodeProcess, threshold: int = 0) -> Path:
    text = f"threshold = {threshold}\n" + "".join(
        f'\n[[members]]\norigin = "{n.origin}"\nvkey = "{n.vkey}"\nurl = "{n.url}"\n'
        f'roles = ["custodian", "grantee"]\n'
        for n in nodes
    )
    path.write_text(text)
    return path


def sign_in_process(operator: Path, key: NodeIdentity, *nodes: NodeProcess, name: str) -> Path:
    """What `roster sign` does (its CLI is run once, below), writing bundle ``name``."""
    members = [make_roster_member(n.origin, n.vkey, ["custodian"], n.url) for n in nodes]
    signed = sign_next_version(operator / "log", key, members, 0, int(time.time()), 30)
    bundle = operator / name
    bundle.write_bytes(signed.bundle)
    return bundle


def get(node: NodeProcess, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(node.url + path, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_node_takes_peers_only_from_the_verified_roster(tmp_path: Path) -> None:
    operator, rogue = tmp_path / "operator", tmp_path / "rogue"
    operator.mkdir()
    rogue.mkdir()
    federation_key = create_federation_key(operator / "fed.key", FEDERATION)
    assert (operator / "fed.key").stat().st_mode & 0o777 == 0o600
    a = init_node(tmp_path, "a.example/imageshare")
    b = init_node(tmp_path, "b.example/imageshare")
    pin = f'[federation]\ndiscovery = false\nkey = "{federation_key.vkey}"\n'
    a.append_config(pin)
    b.append_config(pin + f'roster_url = "{a.url}"\nroster_refresh = 0.2\n')
    bundle_v1 = sign_in_process(operator, federation_key, a, name="v1.bundle")
    assert fetch_roster(load_config(a.config), str(bundle_v1)).version == 1
    a.start()
    try:
        # B is outside the roster: `peers add` is refused, its signed requests too.
        refused = a.cli("peers", "add", b.origin, b.url, b.vkey, check=False)
        assert refused.returncode == 1
        assert "roster version 1 of fed.example/roster does not name b.example" in refused.stderr
        assert p2p(a, identity_of(b), "/p2p/whoami")[0] == 401
        # A roster signed by another key is refused, and changes nothing.
        forged = sign_in_process(rogue, NodeIdentity.generate(FEDERATION), a, b, name="f.bundle")
        with pytest.raises(Unauthorized, match="no roster version names the pinned federation key"):
            fetch_roster(load_config(a.config), str(forged))
        assert p2p(a, identity_of(b), "/p2p/whoami")[0] == 401
        # The federation names B in version 2: the running node accepts it (no restart).
        bundle_v2 = operator / "v2.bundle"
        run_cli(
            "roster", "sign", "--federation", FEDERATION, "--key", str(operator / "fed.key"),
            "--members", str(write_members(operator / "m2.toml", a, b)),
            "--log", str(operator / "log"), "-o", str(bundle_v2),
        )  # fmt: skip
        shown = json.loads(a.cli("roster", "fetch", str(bundle_v2), "--json").stdout)
        assert (shown["version"], [m["origin"] for m in shown["members"]]) == (
            2,
            [a.origin, b.origin],
        )
        assert shown["members"][1]["roles"] == ["custodian", "grantee"]
        assert _wait_whoami(a, b) == (200, {"caller": b.origin, "origin": a.origin})
        add_peer(load_config(a.config), b.origin, b.url, b.vkey)
        # The roster log is served read-only; another member takes it from A by URL.
        status, note = get(a, "/federation/roster")
        assert status == 200 and b"version 2\n" in note
        status, raw = get(a, "/federation/roster/log/entries?start=0&end=10")
        assert status == 200 and len(canonical_decode(raw)) == 2
        b_config = load_config(b.config)
        assert _refreshed(b_config).version == 2  # the daemon's fetch from roster_url
        assert check_held_roster(b_config).version == 2
        # Version 1 offered after version 2 is refused: the log held is longer.
        with pytest.raises(Conflict, match="holds 2 roster log entries"):
            fetch_roster(load_config(a.config), str(bundle_v1))
        # The auditor reads A's roster log too, and finds nothing wrong with it.
        audited = run_audit([a.url], None, int(time.time()), federation_key=federation_key.vkey)
        assert not [v for v in audited.violations if "roster" in v.rule]
        # In a federation, a member's key moves only through a new roster version.
        with pytest.raises(BadInput, match="only through a new roster version"):
            move_member_key(load_config(a.config), b.origin, NodeIdentity.generate(b.origin).vkey)
    finally:
        a.stop()


def _refreshed(config: NodeConfig) -> RosterDocument:
    """Run the daemon's roster refresher until it holds a roster; that roster."""

    async def run() -> RosterDocument:
        refresher = roster_refresher(config)
        assert refresher is not None
        await refresher.start()
        try:
            return await asyncio.to_thread(
                wait_until, lambda: current_roster(config), 20, 0.05, "the roster refresh"
            )
        finally:
            await refresher.stop()

    return asyncio.run(run())


def _wait_whoami(a: NodeProcess, b: NodeProcess) -> tuple[int, object]:
    return wait_until(
        lambda: (r := p2p(a, identity_of(b), "/p2p/whoami"))[0] == 200 and r,
        timeout=15,
        message="the roster reload to admit B",
    )


# -- the auditor -----------------------------------------------------------------------------


def served_log(source: str, identity: NodeIdentity, directory: Path, when: int) -> ServedLog:
    """A member's log of two entries signed by ``identity`` (the real ledger store)."""
    directory.mkdir()
    store = LedgerStore(directory)
    try:
        log = store.own_log(identity.origin, identity.vkey)
        elsewhere = Witness(log_id_bytes("elsewhere.example/imageshare"), 0, ZERO_HASH)
        log.append_many([(elsewhere, when), (elsewhere, when + 1)])
        note = log.publish_checkpoint(identity, when + 1)
        listing = LogListing(identity.origin, log_id(identity.origin), identity.vkey, 2)
        return ServedLog(source, listing, note, log.entries(0, 2))
    finally:
        store.close()


class TestRosterAudit:
    def test_a_forked_roster_and_a_member_under_an_unnamed_key_are_reported(
        self, keys: dict, tmp_path: Path
    ) -> None:
        t0 = int(time.time()) - 100
        a, b, c = (member_of(keys[n]) for n in "abc")
        sign_next_version(tmp_path / "one", keys["fed"], [a], 0, t0, 30)
        shutil.copytree(tmp_path / "one", tmp_path / "two")
        one = sign_next_version(tmp_path / "one", keys["fed"], [a, b], 0, t0 + 1, 30)
        two = sign_next_version(tmp_path / "two", keys["fed"], [a, c], 0, t0 + 1, 30)

        def view(url: str, bundle: bytes, *logs: ServedLog) -> PeerView:
            return PeerView(url, "a.example/imageshare", list(logs), [], decode_bundle(bundle))

        honest_a = served_log("http://one", keys["a"], tmp_path / "a", t0 + 10)
        report, _ = audit_views([view("http://one", one.bundle, honest_a)], {}, t0 + 20)
        assert report.violations == []

        # A node shows another roster version 2 than the first: the roster forked.
        report, _ = audit_views(
            [view("http://one", one.bundle, honest_a), view("http://two", two.bundle)],
            {},
            t0 + 20,
            federation_key=keys["fed"].vkey,
        )
        assert [(v.rule, v.log, v.index) for v in report.violations] == [
            ("roster_equivocation", FEDERATION, 2)
        ]

        # A member's log under a key no roster version names for it, and its cosignature.
        impostor = NodeIdentity.generate("a.example/imageshare")
        fake_b = NodeIdentity.generate("b.example/imageshare")
        forged_a = served_log("http://one", impostor, tmp_path / "impostor", t0 + 10)
        body, _ = parse_note(forged_a.note or "")
        cosigned = add_signatures(forged_a.note or "", [cosign_checkpoint(body, fake_b, t0 + 12)])
        forged_a.note = cosigned
        forged_b = served_log("http://one", fake_b, tmp_path / "fake-b", t0 + 10)
        report, _ = audit_views([view("http://one", one.bundle, forged_a, forged_b)], {}, t0 + 20)
        found = {(v.rule, v.log, v.index) for v in report.violations}
        assert found == {
            ("key_not_in_roster", "a.example/imageshare", 0),
            ("key_not_in_roster", "a.example/imageshare", None),
            ("key_not_in_roster", "b.example/imageshare", 0),
        }

    def test_a_roster_log_that_does_not_chain_from_the_federation_key_is_reported(
        self, keys: dict, tmp_path: Path
    ) -> None:
        rogue = sign_next_version(tmp_path, keys["rogue"], [member_of(keys["a"])], 0, NOW, 30)
        view = PeerView("http://x", "a.example/imageshare", [], [], decode_bundle(rogue.bundle))
        report, _ = audit_views([view], {}, NOW + 5, federation_key=keys["fed"].vkey)
        assert [(v.rule, v.log) for v in report.violations] == [("roster_invalid", "http://x")]
        assert "no roster version names the pinned federation key" in report.violations[0].detail
