"""The node's small state stores on both engines (tests/support/state_engines.py): what
each keeps, and that two daemons of one node sharing PostgreSQL keep each rule once
(opening a store twice is a restart on SQLite, a second daemon on PostgreSQL)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from node.core.entries import BreakGlass, Enroll, EntryBody, Grant
from node.store.consent_state import ConsentState, PostgresConsentState
from tests.support.state_engines import StateEngine

T = TypeVar("T")


def at_once(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run ``calls`` in threads released together; their results in order."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        start.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def key(n: int) -> bytes:
    return n.to_bytes(32, "big")


def served(n: int) -> BreakGlass:
    return BreakGlass(key(n), "node:b", "emergency", key(0), None, "default", None, b"s")


# -- consent state ---------------------------------------------------------------------


@pytest.fixture
def open_consent(state_engine: StateEngine) -> Callable[[], ConsentState]:
    return lambda: state_engine.open(
        lambda directory: ConsentState(directory / "consent.sqlite"), PostgresConsentState
    )


class TestConsentState:
    def test_replay_records_keys_rotations_and_requests_and_skips_bad_entries(
        self, open_consent: Callable[[], ConsentState]
    ) -> None:
        state = open_consent()
        entries: list[EntryBody] = [
            Enroll(key(100), key(1), None),
            Enroll(key(100), key(2), key(1)),
            Grant(b"not a grant"),
            served(7),
        ]
        state.apply(0, entries)
        assert state.applied_size == 4
        old, new = state.key(key(1)), state.key(key(2))
        assert old is not None and old.retired_index == 1
        assert new is not None and not new.retired and new.enrolled_index == 1
        active = state.active_key_of_subject(key(100))
        assert active is not None and active.public_key == key(2)
        found = state.break_glass(key(7))
        assert found is not None and (found.requester, found.studies) == ("node:b", b"s")
        assert state.grants_of_key(key(2)) == []

    def test_entries_applied_again_are_skipped_and_a_gap_is_refused(
        self, open_consent: Callable[[], ConsentState]
    ) -> None:
        state = open_consent()
        state.apply(0, [served(1), served(2)])
        state.apply(1, [served(2), served(3)])
        assert state.applied_size == 3
        with pytest.raises(ValueError, match="gap"):
            state.apply(5, [served(9)])
        assert [row.request for row in state.recent_break_glass(10)] == [key(3), key(2), key(1)]

    def test_a_subject_and_a_patient_keep_their_first_binding(
        self, open_consent: Callable[[], ConsentState]
    ) -> None:
        state = open_consent()
        state.bind_subject(key(1), "P1")
        state.bind_subject(key(1), "P2")
        state.bind_subject(key(2), "P1")
        assert state.patient_of_subject(key(1)) == "P1"
        assert state.patient_of_subject(key(2)) is None
        state.remember_study_refs({key(5): "1.2.3", key(6): "1.2.4"})
        state.remember_study_refs({key(5): "9.9.9"})
        assert (state.study_of_ref(key(5)), state.study_of_ref(key(7))) == ("1.2.3", None)

    def test_two_daemons_replaying_at_once_apply_each_entry_once_and_never_go_back(
        self, open_consent: Callable[[], ConsentState]
    ) -> None:
        daemons = [open_consent(), open_consent()]
        # Each round, each replays a different prefix of the next 40 entries.
        ends = [40, 10, 25, 5, 33, 40, 1, 17]
        for start in range(0, 400, 40):
            entries = [served(n) for n in range(start + 1, start + 41)]
            at_once(
                [
                    functools.partial(daemons[i % 2].apply, start, entries[:end])
                    for i, end in enumerate(ends)
                ]
            )
            assert [state.applied_size for state in daemons] == [start + 40] * 2
        assert len(daemons[1].recent_break_glass(1000)) == 400
