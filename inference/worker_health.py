"""Which workers count in the node's capacity: those up, not stalled and not slow.

A worker is out while it is down (a process that died and is being started again), stalled (one
render has run for ``STALL_S``, or a worker process sent nothing for that long: stopped, hung,
swapped out) or slow (it renders at under ``SLOW_SHARE`` of the speed of the other workers, the
median of theirs, both measured in frames per second of render time, so load does not count).
A worker that is out gets no new streams and its share of the slots is withdrawn; it comes back
by itself once it is up and fast again. Its running streams stay where they are.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from inference.worker import WorkerStats

STALL_S = 3.0
SLOW_SHARE = 0.25


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as the node sees it (its metrics, and whether it counts in the capacity)."""

    name: str
    stats: WorkerStats
    up: bool
    restarts: int
    serving: bool
    """Up, not stalled and not slow: it gets new streams and counts in the capacity."""
    why_out: str | None = None
    """Why it does not serve, in words (``None`` while it does)."""


def judge(up: list[bool], stats: list[WorkerStats], silent_s: list[float]) -> list[str | None]:
    """For each worker, why it is out of the capacity, or ``None`` when it serves. ``silent_s``:
    seconds since each worker last reported (0 for threads, which report when asked)."""
    reasons: list[str | None] = []
    for i, (is_up, s, silent) in enumerate(zip(up, stats, silent_s, strict=True)):
        if not is_up:
            reasons.append("down")
        elif silent >= STALL_S:
            reasons.append(f"stalled: no report for {silent:.1f} s")
        elif s.busy_s >= STALL_S:
            reasons.append(f"stalled: one render has run for {s.busy_s:.1f} s")
        else:
            others = [o.render_speed for j, o in enumerate(stats) if j != i and up[j] and o.render_speed > 0]
            reference = statistics.median(others) if others else 0.0
            if s.render_speed > 0 and reference > 0 and s.render_speed < SLOW_SHARE * reference:
                reasons.append(f"slow: {s.render_speed:.0f} frames/s against {reference:.0f} for the others")
            else:
                reasons.append(None)
    return reasons
