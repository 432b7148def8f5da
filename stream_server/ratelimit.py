"""Token buckets keyed by identity, bounded in number so a flood of guests cannot grow memory."""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    def __init__(self, per_minute: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float) -> float:
        """0 if allowed (and counted), else the seconds until one more is allowed."""
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else float("inf")
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait
