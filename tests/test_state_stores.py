"""The node's small state stores on both engines (tests/support/state_engines.py): what
each keeps, and that two daemons of one node sharing PostgreSQL keep each rule once
(opening a store twice is a restart on SQLite, a second daemon on PostgreSQL)."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from node.core.entries import BreakGlass, Enroll, EntryBody, Grant
from node.core.shlink import ManifestFile
from node.errors import Conflict, StorageFailed
from node.store import transfers
from node.store.consent_state import ConsentState, PostgresConsentState
from node.store.links import LinkRecord, LinkStore, PostgresLinkStore
from node.store.opinions import FILE_NAME, OpinionState, OpinionStore, PostgresOpinionStore
from node.store.sqlite import LockedDatabase
from node.store.transfers import OpenStream, PostgresTransferStore, StreamedInstance, TransferStore
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
    return state_engine.opener(ConsentState, "consent.sqlite", PostgresConsentState)


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


# -- share links -------------------------------------------------------------------------


@pytest.fixture
def open_links(state_engine: StateEngine) -> Callable[[], LinkStore]:
    return state_engine.opener(LinkStore, "links.sqlite", PostgresLinkStore)


def link(n: int, manifest: int | None = None, token: int | None = None) -> LinkRecord:
    files = [ManifestFile("application/fhir+json", f"jwe-{n}")]
    return LinkRecord(
        f"link:{n}", key(manifest or n), key(token or n), b"hash", 0, False, files, True
    )


class TestLinkStore:
    def test_a_link_is_kept_whole_and_found_by_grantee_and_manifest(
        self, open_links: Callable[[], LinkStore]
    ) -> None:
        store = open_links()
        store.add(link(1))
        store.add(link(1))  # the same link submitted again
        assert store.by_grantee("link:1") == link(1)
        assert open_links().by_manifest(key(1)) == link(1)
        assert store.by_grantee("link:2") is None

    def test_a_taken_credential_or_manifest_id_is_a_conflict(
        self, open_links: Callable[[], LinkStore]
    ) -> None:
        store = open_links()
        store.add(link(1))
        with pytest.raises(Conflict):
            store.add(link(2, manifest=1))
        with pytest.raises(Conflict):
            store.add(replace(link(2), grantee="link:1"))
        assert store.by_grantee("link:2") is None

    def test_two_daemons_adding_links_with_one_manifest_id_at_once_keep_one(
        self, open_links: Callable[[], LinkStore]
    ) -> None:
        daemons = [open_links(), open_links()]

        def add(n: int) -> bool:
            try:
                daemons[n % 2].add(link(n, manifest=99))
            except Conflict:
                return False
            return True

        assert at_once([functools.partial(add, n) for n in range(1, 9)]).count(True) == 1
        kept = daemons[0].by_manifest(key(99))
        held = [n for n in range(1, 9) if daemons[1].by_grantee(f"link:{n}") is not None]
        assert kept is not None and [kept.grantee] == [f"link:{n}" for n in held]

    def test_wrong_passcodes_at_two_daemons_at_once_each_count_and_kill_at_the_limit(
        self, open_links: Callable[[], LinkStore]
    ) -> None:
        daemons = [open_links(), open_links()]
        daemons[0].add(link(1))
        counted = at_once(
            [functools.partial(daemons[n % 2].count_failure, "link:1", 5) for n in range(10)]
        )
        assert sorted(counted) == [(n, n >= 5) for n in range(1, 11)]
        record = daemons[1].by_grantee("link:1")
        assert record is not None and (record.failures, record.dead) == (10, True)


# -- transfer journal ----------------------------------------------------------------------


@pytest.fixture
def open_transfers(state_engine: StateEngine) -> Callable[..., TransferStore]:
    """The journal of a daemon (``owner``; an embedded node has one, whatever it is named)."""
    return lambda owner="daemon-1": state_engine.open(
        TransferStore, lambda pool: PostgresTransferStore(pool, owner)
    )


def streamed(n: int) -> StreamedInstance:
    return StreamedInstance(key(1), key(n), n)


class TestTransferStore:
    def test_a_cut_stream_is_found_again_in_order_until_recorded(
        self, open_transfers: Callable[..., TransferStore]
    ) -> None:
        store = open_transfers()
        store.open_stream("out-1", "access", key(9), "node:b", 1.0)
        store.journal("out-1", [streamed(3), streamed(1)])
        store.journal("out-1", [streamed(2)])
        store.open_stream("in-1", "receipt", key(8), "node:c", 2.0)
        [cut, empty] = open_transfers().unrecorded_streams()
        journaled = [streamed(3), streamed(1), streamed(2)]
        assert cut == OpenStream("out-1", "access", key(9), "node:b", journaled)
        assert (empty.stream_id, empty.instances) == ("in-1", [])
        store.mark_recorded("out-1")
        assert [s.stream_id for s in store.unrecorded_streams()] == ["in-1"]

    @pytest.mark.parametrize("state_engine", ["postgresql"], indirect=True)
    def test_a_daemon_starting_again_closes_only_its_own_cut_streams(
        self, open_transfers: Callable[..., TransferStore]
    ) -> None:
        sending = open_transfers("daemon-1")
        sending.open_stream("out-1", "access", key(9), "node:b", 1.0)
        sending.journal("out-1", [streamed(1)])
        restarted = open_transfers("daemon-2")
        assert restarted.unrecorded_streams() == []
        assert [s.stream_id for s in open_transfers("daemon-1").unrecorded_streams()] == ["out-1"]

    def test_a_fetch_saved_again_replaces_its_document(
        self, open_transfers: Callable[..., TransferStore]
    ) -> None:
        store = open_transfers()
        store.save_fetch("job-1", 1.0, '{"state": "running"}')
        store.save_fetch("job-2", 2.0, '{"state": "done"}')
        store.save_fetch("job-1", 3.0, '{"state": "done"}')
        done = '{"state": "done"}'
        assert store.recent_fetches() == [("job-1", done), ("job-2", done)]
        assert (store.fetch("job-2"), store.fetch("job-3")) == ('{"state": "done"}', None)


def test_a_journal_from_before_positions_keeps_its_order(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "transfers.sqlite")) as conn:
        conn.executescript(transfers.SCHEMA)
        conn.execute("INSERT INTO streams VALUES ('out-1', 'access', x'09', 'node:b', 1.0, 0)")
        conn.executemany(
            "INSERT INTO stream_instances VALUES ('out-1', ?, ?, ?)",
            [(key(1), key(n), n) for n in (5, 2, 7)],
        )
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    [stream] = TransferStore(tmp_path).unrecorded_streams()
    assert [i.size for i in stream.instances] == [5, 2, 7]


# -- returned opinions ----------------------------------------------------------------------


class TestOpinionStore:
    def test_an_opinion_is_held_until_accepted_and_its_first_times_are_kept(
        self, state_engine: StateEngine
    ) -> None:
        open_opinions = state_engine.opener(OpinionStore, FILE_NAME, PostgresOpinionStore)
        store = open_opinions()
        store.hold("1.2.1", "1.2", now=10.0)
        store.hold("1.2.1", "1.2", now=99.0)  # received again: no change
        store.hold("1.3.1", "1.3", now=20.0)
        assert store.held(["1.2.1", "1.3.1", "9.9"]) == {"1.2.1", "1.3.1"}
        assert store.accept("1.2.1", now=30.0) and store.accept("1.2.1", now=40.0)
        assert not store.accept("9.9", now=30.0) and not store.mark_seen("9.9", now=30.0)
        assert open_opinions().mark_seen("1.2.1", now=50.0)
        assert store.held(["1.2.1", "1.3.1"]) == {"1.3.1"} and store.held([]) == set()
        assert store.states() == [
            OpinionState("1.3.1", "1.3", 20.0, None, None),
            OpinionState("1.2.1", "1.2", 10.0, 30.0, 50.0),
        ]
        assert [s.sop_instance_uid for s in store.states("1.2")] == ["1.2.1"]

    def test_two_daemons_accepting_at_once_keep_one_acceptance_time(
        self, state_engine: StateEngine
    ) -> None:
        open_opinions = state_engine.opener(OpinionStore, FILE_NAME, PostgresOpinionStore)
        daemons = [open_opinions(), open_opinions()]
        daemons[0].hold("1.2.1", "1.2", now=1.0)
        times = [float(n) for n in range(2, 10)]
        accepting = [
            functools.partial(daemons[n % 2].accept, "1.2.1", t) for n, t in enumerate(times)
        ]
        assert all(at_once(accepting))
        [state] = daemons[1].states()
        assert state.accepted in times
        assert daemons[0].states() == [state]


# -- the SQLite engine ----------------------------------------------------------------------


def test_a_transaction_whose_commit_fails_is_rolled_back_and_the_next_one_runs(
    tmp_path: Path,
) -> None:
    # A deferred foreign key is checked at COMMIT: a way to make COMMIT itself fail.
    schema = (
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
        "CREATE TABLE child (parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);"
    )
    database = LockedDatabase(tmp_path / "x.sqlite", (schema,), node_errors=True)
    with database.connection() as db:
        db.execute("PRAGMA foreign_keys = ON")
    with pytest.raises(StorageFailed, match="FOREIGN KEY"), database.transaction() as db:
        db.execute("INSERT INTO child VALUES (7)")
    with database.transaction() as db:
        db.execute("INSERT INTO parent VALUES (7)")
        db.execute("INSERT INTO child VALUES (7)")
    with database.connection() as db:
        assert db.execute("SELECT parent FROM child").fetchall() == [(7,)]
    database.close()
