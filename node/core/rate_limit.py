"""A per-key sliding-window rate limit: at most ``limit`` events per key in ``window`` seconds.

Pure: the caller passes ``now``. Memory is bounded: each key keeps at most ``limit``
times, and keys whose window has emptied are dropped once more than ``max_keys`` are held.
"""

from __future__ import annotations

import collections
import threading


class SlidingWindowLimit:
    """Admits an event for a key only while that key had fewer than ``limit`` in the window."""

    def __init__(self, limit: int, window: float, max_keys: int = 4096) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a rate limit needs limit >= 1 and a positive window")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, key: str, now: float) -> bool:
        """Count an event for ``key`` at ``now`` and return True, or return False (not counted)
        if ``key`` already had ``limit`` events in the last ``window`` seconds."""
        with self._lock:
            times = self._events.get(key)
            if times is None:
                if len(self._events) >= self.max_keys:
                    self._forget_idle(now)
                times = self._events[key] = collections.deque(maxlen=self.limit)
            while times and times[0] <= now - self.window:
                times.popleft()
            if len(times) >= self.limit:
                return False
            times.append(now)
            return True

    def _forget_idle(self, now: float) -> None:
        cutoff = now - self.window
        idle = [k for k, times in self._events.items() if not times or times[-1] <= cutoff]
        for key in idle:
            del self._events[key]
        if len(self._events) >= self.max_keys:
            # Every key is busy: the oldest-inserted goes, so memory stays bounded.
            del self._events[next(iter(self._events))]
