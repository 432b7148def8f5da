"""Wait estimates from measured service times, per mode, tier and slot count.

A clip's hold time and a live session's have nothing in common (seconds against minutes), so
they are measured apart: a live session ahead of a clip counts as a live session. A live
session's length is unknown while it runs, so it counts for the measured live mean, or the
configured ``queue.live_expected_s`` until one has ended, less the time it has held its slot so
far, and never less than ``REMAINDER_FLOOR`` of that: a session running over its expectation
still has some time left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

CLIP = "clip"
LIVE = "live"
REMAINDER_FLOOR = 0.1
"""A busy slot counts for at least this share of its expected hold time, however long it has run."""
MIN_ETA_S = 1.0
"""The least estimate a waiting client is told: its wait has not begun to end, so never 0 s."""


class BusySlot(NamedTuple):
    tier: str
    mode: str
    """``clip`` or ``live``: the ``start`` of the session holding it."""
    held_s: float
    """How long the session has held the slot so far."""


class ServiceTimes:
    """Exponentially weighted mean of how long a granted session holds its slot, per mode and
    tier, and per mode over every tier (for a tier not measured yet)."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._mean: dict[tuple[str, str], float] = {}
        self._overall: dict[str, float] = {}

    def record(self, mode: str, tier: str, seconds: float) -> None:
        seconds = max(0.0, seconds)
        prev = self._mean.get((mode, tier))
        self._mean[mode, tier] = seconds if prev is None else prev + self.alpha * (seconds - prev)
        o = self._overall.get(mode)
        self._overall[mode] = seconds if o is None else o + self.alpha * (seconds - o)

    def mean(self, mode: str, tier: str) -> float | None:
        return self._mean.get((mode, tier), self._overall.get(mode))

    @classmethod
    def restore(
        cls, means: dict[tuple[str, str], float], overall: dict[str, float], alpha: float = 0.2
    ) -> ServiceTimes:
        """The means as a shared store keeps them (it applies ``record`` itself, atomically)."""
        times = cls(alpha)
        times._mean = dict(means)
        times._overall = dict(overall)
        return times


def expected_hold_s(times: ServiceTimes, mode: str, tier: str, live_expected_s: float) -> float | None:
    """How long a session of ``mode`` and ``tier`` is expected to hold its slot: the measured
    mean; for live mode ``live_expected_s`` until one was measured; ``None`` for a clip then."""
    mean = times.mean(mode, tier)
    if mean is None and mode == LIVE:
        return live_expected_s
    return mean


def estimate_waits(
    tickets_in_order: Iterable[tuple[str, str]],
    busy: Iterable[BusySlot],
    slots: int,
    times: ServiceTimes,
    live_expected_s: float,
) -> list[float | None]:
    """Estimated wait of each ticket, given as (tier, mode) in grant order: the work ahead of it
    spread over the slots. Work ahead is the expected remainder of every busy slot plus the
    expected hold time of every ticket ahead. ``None`` for a ticket with work ahead of it that has
    no expectation yet (a clip, before any clip was measured), and so for every ticket behind it."""
    work = _busy_work(busy, times, live_expected_s)
    slots = max(1, slots)
    waits: list[float | None] = []
    for tier, mode in tickets_in_order:
        waits.append(None if work is None else work / slots)
        expected = expected_hold_s(times, mode, tier, live_expected_s)
        work = None if work is None or expected is None else work + expected
    return waits


def _busy_work(busy: Iterable[BusySlot], times: ServiceTimes, live_expected_s: float) -> float | None:
    """The expected remainder of every busy slot; ``None`` if one has no expectation."""
    work = 0.0
    for slot in busy:
        expected = expected_hold_s(times, slot.mode, slot.tier, live_expected_s)
        if expected is None:
            return None
        work += max(expected - slot.held_s, expected * REMAINDER_FLOOR)
    return work


def shown(waits: list[float | None]) -> list[float | None]:
    """The estimates as clients hear them: at least ``MIN_ETA_S``."""
    return [None if w is None else max(w, MIN_ETA_S) for w in waits]


class OfferedWork:
    """Work (slot-seconds a second) each tier has recently asked for, admitted or not, decaying
    over ``horizon_s``: how much higher-tier work is expected to overtake a ticket while it waits.
    Refused joins count too, or refusing a tier would shrink its reserve and refuse it further."""

    def __init__(self, horizon_s: float = 300.0) -> None:
        self.horizon_s = horizon_s
        self._work: dict[str, tuple[float, float]] = {}

    def restore(self, tier: str, value: float, since: float) -> None:
        """A tier's work as a shared store keeps it (decayed to ``since``)."""
        self._work[tier] = (value, since)

    def add(self, tier: str, seconds: float, now: float) -> None:
        self._work[tier] = (self._decayed(tier, now) + seconds, now)

    def rate(self, tier: str, now: float) -> float:
        return self._decayed(tier, now) / self.horizon_s

    def _decayed(self, tier: str, now: float) -> float:
        value, since = self._work.get(tier, (0.0, now))
        return value * math.exp(-max(0.0, now - since) / self.horizon_s)
