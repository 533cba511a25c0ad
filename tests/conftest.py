"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nodes import NodeProcess, init_node


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[object]:
    """Make initialised nodes (call with an origin); every started one is stopped after."""
    made: list[NodeProcess] = []

    def make(origin: str = "a.example/imageshare", name: str | None = None) -> NodeProcess:
        node = init_node(tmp_path, origin, name)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


@pytest.fixture
def running_node(node_factory: object) -> NodeProcess:
    """One started node with no data."""
    return node_factory().start()  # type: ignore[operator, no-any-return]
