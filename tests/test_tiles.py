"""C2SP tlog-tiles: the path encoding, entry bundles, and a running node's tiles checked
against the Merkle code and by Go's golang.org/x/mod/sumdb/tlog and sumdb/note."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.core.entries import Grant
from node.core.keys import NodeIdentity
from node.core.merkle import MemoryTree, leaf_hash
from node.core.notes import MAX_SIGNATURES, cosign_checkpoint, parse_note
from node.core.tiles import (
    TILE_WIDTH,
    TileRef,
    encode_entry_bundle,
    encode_tile_index,
    parse_entry_bundle,
    parse_tile_path,
    split_tile_hashes,
)
from node.errors import BadInput, NotFound
from node.store.ledger import LedgerStore, OwnLog
from tests.support.ledger_stores import LedgerStores
from tests.support.nodes import NodeProcess, init_node
from tests.support.tlog import build_tlogcheck

# Debian's golang-golang-x-mod-dev puts golang.org/x/mod here (GOPATH layout).


class TestTilePaths:
    @pytest.mark.parametrize(
        ("n", "encoded"),
        [(0, "000"), (7, "007"), (999, "999"), (1000, "x001/000"), (1234067, "x001/x234/067")],
    )
    def test_index_is_groups_of_three_digits_x_prefixed_but_the_last(
        self, n: int, encoded: str
    ) -> None:
        assert encode_tile_index(n) == encoded
        assert parse_tile_path(f"tile/3/{encoded}") == TileRef(3, n)

    def test_partial_and_entry_paths_round_trip(self) -> None:
        for ref in (TileRef(0, 5, 3), TileRef(None, 1234067, 255), TileRef(None, 0), TileRef(7, 1)):
            assert parse_tile_path(ref.path()) == ref
        assert TileRef(1, 1234067, 8).path() == "tile/1/x001/x234/067.p/8"
        assert TileRef(None, 2).path() == "tile/entries/002"

    @pytest.mark.parametrize(
        "path",
        [
            "tile/0/1",  # not three digits
            "tile/0/0001",
            "tile/0/x000/001",  # a superfluous leading group
            "tile/0/001/002",  # a non-last group without x
            "tile/0/x001",  # the last group with x
            "tile/00/000",  # a leading-zero level
            "tile/8/000",  # beyond the last level of a 2**63 tree
            "tile/0/000.p/256",  # a full tile has no .p/
            "tile/0/000.p/0",
            "tile/0/000.p/07",
            "tile/entries/000.p/",
            "tile/data/000",  # Go's sumdb name, not C2SP's
            "tile/0/",
            "tiles/0/000",
            "tile/-1/000",
        ],
    )
    def test_non_canonical_or_malformed_paths_are_refused(self, path: str) -> None:
        with pytest.raises(BadInput):
            parse_tile_path(path)

    def test_available_width_follows_the_tree(self) -> None:
        assert TileRef(0, 0).available_width(300) == 256
        assert TileRef(0, 1).available_width(300) == 44
        assert TileRef(1, 0).available_width(300) == 1
        assert TileRef(1, 0).available_width(255) == 0
        assert TileRef(None, 2).available_width(300) == 0


class TestEntryBundles:
    def test_entries_are_big_endian_uint16_length_prefixed(self) -> None:
        bundle = encode_entry_bundle([b"ab", b"", b"x" * 300])
        assert bundle[:4] == b"\x00\x02ab" and bundle[4:6] == b"\x00\x00"
        assert bundle[6:8] == b"\x01\x2c"
        assert parse_entry_bundle(bundle, 3) == [b"ab", b"", b"x" * 300]

    def test_truncated_or_miscounted_bundles_are_refused(self) -> None:
        bundle = encode_entry_bundle([b"abc", b"de"])
        for cut in range(1, len(bundle)):
            if cut == 5:  # ends exactly after the first entry: one entry, not two
                continue
            with pytest.raises(BadInput):
                parse_entry_bundle(bundle[:cut], 2)
        with pytest.raises(BadInput):
            parse_entry_bundle(bundle, 1)
        with pytest.raises(BadInput):
            parse_entry_bundle(bundle[:5], 2)

    def test_an_entry_too_long_for_the_prefix_is_refused(self) -> None:
        with pytest.raises(BadInput):
            encode_entry_bundle([bytes(0x10000)])


# ---- a running node ---------------------------------------------------------------------


class Served:
    """One node, its own log through the store (the test grows it), and an HTTP client."""

    def __init__(self, node: NodeProcess, own: OwnLog) -> None:
        self.node, self.own = node, own
        self.conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=30)
        self.prefix = f"/ledger/logs/{hashlib.sha256(node.origin.encode()).hexdigest()}"
        self.tree = MemoryTree()
        self.entries: list[bytes] = []

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        self.conn.request("GET", self.prefix + "/" + path)
        response = self.conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def grow_to(self, size: int) -> None:
        start = self.own.size()
        results = self.own.append_many(
            [(Grant(token=i.to_bytes(4, "big")), 1_700_000_000) for i in range(start, size)]
        )
        for result in results:
            self.entries.append(result.entry)
            self.tree.append(result.leaf_hash)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    node = init_node(tmp_path_factory.mktemp("tiles"), "tiles.example/imageshare").start()
    store = LedgerStore(node.data_dir)
    try:
        yield Served(node, store.own_log(node.origin, node.vkey))
    finally:
        store.close()
        node.stop()


@pytest.fixture(scope="module")
def tlogcheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go verifier, built offline against Debian's golang.org/x/mod."""
    binary = build_tlogcheck(tmp_path_factory.mktemp("go"))
    if binary is None:
        pytest.skip(
            "the Go toolchain with golang.org/x/mod (Debian golang-go, "
            "golang-golang-x-mod-dev; scripts/setup-env installs them) is missing"
        )
    return binary


# Empty, inside the first tile, its edges, several entry bundles, and past 65,536 leaves,
# where the first level-1 tile is full and a level-2 tile appears (partial, width 1).
SIZES = (0, 1, 255, 256, 257, 700, TILE_WIDTH * TILE_WIDTH + 300)


def expected_tiles(size: int) -> list[TileRef]:
    """Every hash tile a tree of ``size`` holds, the partial ones at their full width."""
    refs = []
    level = 0
    while level == 0 or size >> (8 * level):
        held = size >> (8 * level)
        for n in range((held + TILE_WIDTH - 1) // TILE_WIDTH):
            refs.append(TileRef(level, n, min(TILE_WIDTH, held - n * TILE_WIDTH)))
        level += 1
        if not held:
            break
    return refs


class TestGoVerifiesTiles:
    def test_go_sumdb_tlog_and_note_verify_tiles_and_checkpoint_at_several_sizes(
        self, served: Served, tlogcheck: Path
    ) -> None:
        base = f"{served.node.url}{served.prefix}"
        # First in the module's node tests, so every size is reached in turn.
        for size in (1, 255, 256, 257, 700, max(SIZES)):
            served.grow_to(size)
            served.get("checkpoint")  # signs the head
            done = subprocess.run(
                [str(tlogcheck), base, served.node.vkey],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert result["size"] == result["records"] == served.own.size()
            assert result["origin"] == served.node.origin

    def test_go_refuses_a_checkpoint_under_another_key(
        self, served: Served, tlogcheck: Path
    ) -> None:
        other = NodeIdentity(served.node.origin, os.urandom(32))  # same name, another key
        done = subprocess.run(
            [str(tlogcheck), f"{served.node.url}{served.prefix}", other.vkey],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and "checkpoint note" in done.stderr

    def test_go_verifies_a_checkpoint_cosigned_by_more_witnesses_than_a_note_may_carry(
        self, served: Served, tlogcheck: Path
    ) -> None:
        served.grow_to(served.own.size() + 1)
        status, _, note = served.get("checkpoint")
        assert status == 200
        body = parse_note(note)[0]
        witnesses = [NodeIdentity.generate(f"w{i}.example/x") for i in range(MAX_SIGNATURES + 20)]
        policy_witness = witnesses[-1].origin  # cosigns last, when the note is full
        for witness in witnesses:
            served.own.add_cosignature(
                cosign_checkpoint(body, witness, 1_700_000_000),
                witness.vkey,
                body,
                preferred=[policy_witness],
            )
        status, _, note = served.get("checkpoint")
        names = [s.name for s in parse_note(note)[1]]
        assert len(names) == MAX_SIGNATURES and policy_witness in names
        done = subprocess.run(
            [str(tlogcheck), f"{served.node.url}{served.prefix}", served.node.vkey],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr


class TestServedTiles:
    def test_tiles_and_bundles_match_the_merkle_code_at_several_sizes(self, served: Served) -> None:
        # Tiles of a smaller tree are served from a larger log too: they never change.
        for size in SIZES:
            served.grow_to(size)
            status, _, _ = served.get("checkpoint")
            assert status == 200
            for ref in expected_tiles(size):
                status, headers, body = served.get(ref.path())
                assert status == 200, (size, ref.path(), body)
                assert headers["Content-Type"] == "application/octet-stream"
                expected = served.tree.levels[ref.merkle_level][
                    ref.n * TILE_WIDTH : ref.n * TILE_WIDTH + ref.width
                ]
                assert split_tile_hashes(body, ref.width) == expected, (size, ref.path())
                lifetime = "max-age=5" if ref.partial else "immutable"
                assert lifetime in headers["Cache-Control"]
            for n in range((size + TILE_WIDTH - 1) // TILE_WIDTH):
                ref = TileRef(None, n, min(TILE_WIDTH, size - n * TILE_WIDTH))
                status, headers, body = served.get(ref.path())
                assert status == 200
                bundled = parse_entry_bundle(body, ref.width)
                start = n * TILE_WIDTH
                assert bundled == served.entries[start : start + ref.width]
                assert [leaf_hash(e) for e in bundled] == served.tree.levels[0][
                    start : start + ref.width
                ]

    def test_a_narrower_partial_tile_of_what_is_held_is_served_a_wider_one_is_not(
        self, served: Served
    ) -> None:
        served.grow_to(max(SIZES))
        size = served.own.size()
        status, _, body = served.get("tile/0/000.p/3")
        assert status == 200 and split_tile_hashes(body, 3) == served.tree.levels[0][:3]
        last = (size - 1) // TILE_WIDTH
        beyond = size - last * TILE_WIDTH + 1
        assert served.get(TileRef(0, last, beyond).path())[0] == 404
        assert served.get(TileRef(None, last + 1, 1).path())[0] == 404
        assert served.get(TileRef(3, 0, 1).path())[0] == 404

    def test_malformed_tile_paths_are_400_and_unknown_logs_404(self, served: Served) -> None:
        for path in ("tile/0/1", "tile/0/000.p/256", "tile/entries/x000/001", "tile/9/000"):
            assert served.get(path)[0] == 400, path
        served.conn.request("GET", "/ledger/logs/" + "ab" * 32 + "/tile/0/000")
        response = served.conn.getresponse()
        response.read()
        assert response.status == 404


class TestStoredTiles:
    def test_the_store_gives_the_merkle_codes_tiles_and_bundles_on_each_engine(
        self, ledger_stores: LedgerStores, tmp_path: Path
    ) -> None:
        identity = NodeIdentity.generate("tiles.example/imageshare")
        own = ledger_stores.open(tmp_path / "log").own_log(identity.origin, identity.vkey)
        tree, entries = MemoryTree(), []
        for size in (1, 255, 256, 257, 700):
            start = own.size()
            for result in own.append_many(
                [(Grant(token=i.to_bytes(4, "big")), 1) for i in range(start, size)]
            ):
                entries.append(result.entry)
                tree.append(result.leaf_hash)
            for ref in expected_tiles(size):
                first = ref.n * TILE_WIDTH
                expected = tree.levels[ref.merkle_level][first : first + ref.width]
                assert split_tile_hashes(own.tile(ref), ref.width) == expected, ref.path()
                bundle = TileRef(None, ref.n, min(TILE_WIDTH, size - first))
                if ref.merkle_level == 0:
                    bundled = parse_entry_bundle(own.tile(bundle), bundle.width)
                    assert bundled == entries[first : first + bundle.width]
        with pytest.raises(NotFound):
            own.tile(TileRef(0, 2, 189))  # one hash more than the 700 held
