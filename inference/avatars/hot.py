"""Which avatars are hot: uses counted per avatar over a sliding window.

An avatar used more than ``hot_after`` times within the last ``window_s`` seconds is hot: its
tickets get the bounded in-tier boost (``AdmissionPolicy.order_key``), its loaded copies are kept
through cache evictions, and the background pre-generation renders templates for the hottest.
The count is this node's (each node counts the starts it admits).
"""

from __future__ import annotations

import threading
import time
from collections import deque


class HotAvatars:
    """Thread-safe; memory is bounded by the uses inside the window (old ones are dropped)."""

    def __init__(self, hot_after: int = 10, window_s: float = 600.0) -> None:
        self.hot_after = hot_after
        self.window_s = window_s
        self._lock = threading.Lock()
        self._uses: dict[str, deque[float]] = {}

    def record(self, avatar_id: str, now: float | None = None) -> int:
        """Count one use; returns the uses within the window, this one included."""
        now = time.monotonic() if now is None else now
        with self._lock:
            uses = self._uses.setdefault(avatar_id, deque())
            uses.append(now)
            self._trim(avatar_id, uses, now)
            return len(uses)

    def uses(self, avatar_id: str, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            uses = self._uses.get(avatar_id)
            if uses is None:
                return 0
            self._trim(avatar_id, uses, now)
            return len(uses)

    def is_hot(self, avatar_id: str, now: float | None = None) -> bool:
        return self.uses(avatar_id, now) > self.hot_after

    def hottest(self, k: int, now: float | None = None) -> list[str]:
        """The ``k`` hot avatars with the most uses, most used first."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for avatar_id, uses in list(self._uses.items()):
                self._trim(avatar_id, uses, now)
            counts = [(len(u), a) for a, u in self._uses.items() if len(u) > self.hot_after]
        return [a for _, a in sorted(counts, key=lambda c: (-c[0], c[1]))[:k]]

    def forget(self, avatar_id: str) -> None:
        with self._lock:
            self._uses.pop(avatar_id, None)

    def _trim(self, avatar_id: str, uses: deque[float], now: float) -> None:
        while uses and uses[0] <= now - self.window_s:
            uses.popleft()
        if not uses:
            self._uses.pop(avatar_id, None)
