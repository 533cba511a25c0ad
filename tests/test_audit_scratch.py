"""The auditor's scratch mappings: a SpilledMap answers as a dict would, whichever of
its keys wait in memory, in the batch leaving it or on disk."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.store.audit_scratch import SpilledMap

KEYS = st.binary(min_size=1, max_size=2)  # few distinct keys: each is met again
OPS = st.lists(
    st.tuples(st.sampled_from(["set", "get", "in", "del", "item"]), KEYS, st.binary(max_size=3)),
    max_size=200,
)


def spilled(cache: int) -> SpilledMap[bytes]:
    return SpilledMap(sqlite3.connect(":memory:"), "t", bytes, bytes, cache=cache)


class TestSpilledMap:
    @settings(max_examples=60, deadline=None)
    @given(OPS)
    def test_answers_as_a_dict_with_keys_spilled_to_disk(
        self, ops: list[tuple[str, bytes, bytes]]
    ) -> None:
        mapping, model = spilled(cache=3), dict[bytes, bytes]()
        for op, key, value in ops:
            if op == "set":
                mapping[key] = model[key] = value
            elif op == "get":
                assert mapping.get(key, b"none") == model.get(key, b"none")
                assert mapping.get(key) == model.get(key)
            elif op == "in":
                assert (key in mapping) == (key in model)
            elif op == "item" and key in model:
                assert mapping[key] == model[key]
            elif op == "item":
                with pytest.raises(KeyError):
                    mapping[key]
            elif key in model:
                del mapping[key], model[key]
        assert sorted(mapping.rows()) == sorted(model.items())
        copy = spilled(cache=3)
        copy.load(mapping.rows())
        assert {key: copy[key] for key in model} == model
        assert copy.get(b"never stored") is None and b"never stored" not in copy
