"""Measures how late the event loop runs a timer: the figure that says it never blocks."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import Histogram


class LoopLagMonitor:
    def __init__(self, histogram: Histogram | None = None, interval_s: float = 0.05, keep: int = 4096):
        self.interval_s = interval_s
        self.histogram = histogram
        self.samples: deque[float] = deque(maxlen=keep)

    async def run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.perf_counter() - start - self.interval_s)
            self.samples.append(lag)
            if self.histogram is not None:
                self.histogram.observe(lag)

    def percentile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def reset(self) -> None:
        self.samples.clear()
