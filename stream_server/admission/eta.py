"""Wait estimates from measured service times, per tier and per slot count."""

from __future__ import annotations

import math
from collections.abc import Iterable


class ServiceTimes:
    """Exponentially weighted mean of how long a granted session holds its slot, per tier."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._mean: dict[str, float] = {}
        self._overall: float | None = None

    def record(self, tier: str, seconds: float) -> None:
        seconds = max(0.0, seconds)
        prev = self._mean.get(tier)
        self._mean[tier] = seconds if prev is None else prev + self.alpha * (seconds - prev)
        o = self._overall
        self._overall = seconds if o is None else o + self.alpha * (seconds - o)

    def mean(self, tier: str) -> float | None:
        return self._mean.get(tier, self._overall)

    @property
    def known(self) -> bool:
        return self._overall is not None

    def snapshot(self) -> dict[str, float]:
        return dict(self._mean)

    @classmethod
    def restore(cls, means: dict[str, float], overall: float | None, alpha: float = 0.2) -> ServiceTimes:
        """The means as a shared store keeps them (it applies ``record`` itself, atomically)."""
        times = cls(alpha)
        times._mean = dict(means)
        times._overall = overall
        return times

    def load(self, means: dict[str, float]) -> None:
        for tier, value in means.items():
            self.record(tier, value)


def estimate_waits(
    tiers_in_order: Iterable[str],
    busy_elapsed: Iterable[tuple[str, float]],
    slots: int,
    times: ServiceTimes,
) -> list[float | None]:
    """Estimated wait of each ticket, given in grant order: the work ahead of it spread over the
    slots. Work ahead is the expected remainder of every busy slot plus the mean service time of
    every ticket ahead. ``None`` everywhere until a service time has been measured."""
    order = list(tiers_in_order)
    if not times.known:
        return [None] * len(order)
    work = 0.0
    for tier, elapsed in busy_elapsed:
        mean = times.mean(tier) or 0.0
        work += max(mean - elapsed, mean * 0.1)
    slots = max(1, slots)
    waits: list[float | None] = []
    for tier in order:
        waits.append(work / slots)
        work += times.mean(tier) or 0.0
    return waits


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
