"""Alerts' rules without a node: incidents open once, stay open, close, and reopen as new
ones; a peer's connection error in plain words (from a real failed connection)."""

from __future__ import annotations

import asyncio

import aiohttp

from node.services.alerts import (
    EMAIL,
    PEER_DOWN,
    WEBHOOK,
    Condition,
    IncidentBook,
    plain_peer_error,
)
from tests.support.nodes import free_port

DOWN = Condition(PEER_DOWN, "c.example/imageshare", "c.example/imageshare is down")
BOTH = {WEBHOOK, EMAIL}


class TestIncidentBook:
    def test_an_incident_is_due_until_every_channel_has_it_then_stays_open_silently(
        self,
    ) -> None:
        book = IncidentBook()
        (due,) = book.update([DOWN], 100.0, BOTH)
        due.delivered.add(WEBHOOK)
        assert book.update([DOWN], 101.0, BOTH) == [due]  # e-mail still owed
        due.delivered.add(EMAIL)
        assert book.update([DOWN], 102.0, BOTH) == []
        assert [i["opened_at"] for i in book.open_incidents()] == [100.0]

    def test_a_condition_that_ends_and_holds_again_is_a_new_incident(self) -> None:
        book = IncidentBook()
        (first,) = book.update([DOWN], 100.0, BOTH)
        first.delivered |= BOTH
        assert book.update([], 101.0, BOTH) == [] and book.open_incidents() == []
        (second,) = book.update([DOWN], 102.0, BOTH)
        assert second.id != first.id and second.delivered == set()


class TestPlainPeerError:
    def test_a_closed_port_reads_as_nothing_answering(self) -> None:
        async def connect() -> str:
            async with aiohttp.ClientSession() as session:
                try:
                    await session.get(f"http://127.0.0.1:{free_port()}/")
                except aiohttp.ClientError as exc:
                    return str(exc)
            return ""

        raw = asyncio.run(connect())
        assert raw and plain_peer_error(raw).startswith("nothing answers at its address")

    def test_an_unknown_error_keeps_the_original_words(self) -> None:
        assert plain_peer_error("odd thing") == "it cannot be reached (odd thing)"
