"""Zeroconf discovery between real node processes on loopback."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from node.config import load_config
from node.services.roster import add_peer
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
