"""The per-key sliding-window rate limit (node.core.rate_limit)."""

from __future__ import annotations

import pytest

from node.core.rate_limit import SlidingWindowLimit


class TestSlidingWindowLimit:
    def test_admits_up_to_the_limit_then_refuses_within_the_window(self) -> None:
        limit = SlidingWindowLimit(3, 60.0)
        assert [limit.admit("a", 100.0 + i) for i in range(5)] == [True] * 3 + [False] * 2

    def test_refused_events_do_not_count(self) -> None:
        limit = SlidingWindowLimit(1, 60.0)
        assert limit.admit("a", 0.0)
        assert not limit.admit("a", 30.0)
        # Only the admitted event at 0 counts: free again once it leaves the window.
        assert limit.admit("a", 60.0)

    def test_each_key_has_its_own_allowance(self) -> None:
        limit = SlidingWindowLimit(1, 60.0)
        assert limit.admit("a", 0.0) and limit.admit("b", 0.0)
        assert not limit.admit("a", 1.0)

    def test_keys_held_stay_bounded(self) -> None:
        limit = SlidingWindowLimit(2, 60.0, max_keys=10)
        for i in range(1000):
            limit.admit(f"k{i}", float(i))
        assert len(limit._events) <= 10

    @pytest.mark.parametrize(("count", "window"), [(0, 60.0), (1, 0.0)])
    def test_empty_limit_or_window_is_refused(self, count: int, window: float) -> None:
        with pytest.raises(ValueError):
            SlidingWindowLimit(count, window)
