"""Zeroconf discovery between real node processes on loopback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.support.nodes import NodeProcess, wait_until


def federation(node: NodeProcess) -> dict[str, Any]:
    return node.get_json("/admin/api/federation")  # type: ignore[no-any-return]


def learned_urls(node: NodeProcess) -> dict[str, list[str]]:
    return {p["origin"]: p["urls"] for p in federation(node)["peers"]}


class TestDiscovery:
    def test_members_without_static_urls_find_each_other_and_strangers_are_ignored(
        self, node_factory: Callable[..., NodeProcess]
    ) -> None:
        a = node_factory("a.disc.example/imageshare")
        b = node_factory("b.disc.example/imageshare")
        c = node_factory("c.disc.example/imageshare")
        stranger = node_factory("stranger.disc.example/imageshare")
        for node in (a, b, c):
            for other in (a, b, c):
                if other is not node:
                    node.cli("peers", "add", other.origin, "", other.vkey)
        for node in (a, b, c, stranger):
            node.start()

        def everyone_found() -> bool:
            return all(
                learned_urls(node) == {o.origin: [o.url] for o in (a, b, c) if o is not node}
                for node in (a, b, c)
            )

        wait_until(everyone_found, timeout=20, message="members to learn each other's URLs")
        ignored = wait_until(
            lambda: stranger.origin in federation(a)["ignored_by_discovery"].values(),
            timeout=20,
            message="the stranger to be seen and ignored",
        )
        assert ignored
        assert stranger.origin not in learned_urls(a)
        assert "not in the roster" in a.log_path.read_text()

    def test_discovery_off_learns_nothing(self, node_factory: Callable[..., NodeProcess]) -> None:
        quiet = node_factory("quiet.off.example/imageshare")
        loud = node_factory("loud.off.example/imageshare")
        listener = node_factory("listener.off.example/imageshare")
        quiet.append_config("[federation]\ndiscovery = false")
        quiet.cli("peers", "add", loud.origin, "", loud.vkey)
        listener.cli("peers", "add", loud.origin, "", loud.vkey)
        for node in (quiet, loud, listener):
            node.start()
        # Once the listener has heard loud's announcement, quiet would have too.
        wait_until(
            lambda: learned_urls(listener) == {loud.origin: [loud.url]},
            timeout=20,
            message="the listener to learn loud's URL",
        )
        assert learned_urls(quiet) == {loud.origin: []}
