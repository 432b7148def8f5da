"""The admission policy: every rule that decides order, caps, estimates and refusals, shared by
every store. Pure and synchronous: it decides from a snapshot the store read atomically.

Order: earliest deadline first. A ticket's key is its deadline, its join time plus its tier's
maximum wait; the smallest key is granted first, ties by arrival. Because maximum waits grow from
vip to low, a higher-tier ticket is never granted after a lower-tier ticket that joined later; a
lower-tier ticket is overtaken only by tickets whose deadlines come before its own, so no tier
starves: admission refuses a join whose estimated wait is over its tier's maximum, and every
ticket admitted is served by its deadline as long as the estimates hold. (A fixed offset per tier
that is not the difference of the maximum waits either lets a full lower-tier line block higher
tiers at admission, or lets higher-tier load push a lower tier past its maximum.)
Keys never change, so a waiting ticket only moves back when a ticket with a smaller key joins.

Hot avatars (``inference.avatars.hot``) get a bounded in-tier boost: their tickets are keyed up to
``hot_boost_s`` earlier, never so far that they pass a higher-tier ticket that joined at the same
time or before (``hot_boost``), and never when that would make an on-time waiting ticket late.

Admission keeps those deadlines (by the estimates): a join is refused when its own estimated wait,
plus a reserve for the higher-tier work expected to overtake it (at most ``overtake_reserve`` of its
maximum wait), is over its tier's maximum, or when it would push a ticket that is still on time past
its deadline. Higher tiers thus come first, and under any sustained load a lower-tier ticket that
was admitted is still served in time: the excess is refused at the door, in whichever tier it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from stream_server.admission.eta import CLIP, BusySlot, ServiceTimes, estimate_waits, shown
from stream_server.settings import PoolSettings, QueueSettings


@dataclass(frozen=True)
class Ticket:
    id: str
    identity: str
    tier: str
    joined_at: float
    key: float
    seq: int
    avatar: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)
    mode: str = CLIP
    """The ``start``'s mode (``clip`` or ``live``): what its slot is expected to be held for."""

    @property
    def order(self) -> tuple[float, int]:
        return (self.key, self.seq)


OVERTAKE_SAFETY = 1.5
HOT_BOOST_MARGIN_S = 0.001
"""A boosted key stays this much after a higher tier's key for the same join time (strictly after)."""


class QueueFull(Exception):
    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class IdentityBusy(Exception):
    """The identity already holds as many active tickets as it may."""


@dataclass(frozen=True)
class JoinSnapshot:
    """The line as a join sees it, read in one atomic step of the store (with this join's work
    already counted as offered)."""

    waiting: Sequence[Ticket]
    """In grant order."""
    held: Sequence[Ticket]
    """Detached tickets that keep their place for a resume, except the joiner's own (superseded)."""
    busy: Sequence[BusySlot]
    slots_total: int
    identity_active: int
    times: ServiceTimes
    offered: Mapping[str, float]
    """Slot-seconds a second each tier has recently asked for."""
    avatar_uses: int | None = None
    """The joining avatar's uses within the hot window as a shared store counts them (every
    node's joins, this one included); ``None`` where the caller counts them (one node)."""


class AdmissionPolicy:
    def __init__(
        self, settings: QueueSettings, pools: PoolSettings | None = None, *, hot_after_uses: int = 10
    ) -> None:
        self.settings = settings
        self.pools = pools or PoolSettings()
        self.hot_after_uses = hot_after_uses
        """An avatar with more uses than this within the window is hot (``avatars.hot_after_uses``)."""

    @property
    def resume_grace_s(self) -> float:
        return self.settings.resume_grace_s

    def order_key(self, tier: str, joined_at: float, *, hot: bool = False) -> float:
        """The deadline ``joined_at + max_wait_s``; for a hot avatar's ticket, ``hot_boost`` earlier."""
        key = joined_at + self.settings.tier(tier).max_wait_s
        return key - self.hot_boost(tier) if hot else key

    def hot_boost(self, tier: str) -> float:
        """How much earlier a hot avatar's ticket of ``tier`` is keyed: at most ``hot_boost_s``,
        and less (by ``HOT_BOOST_MARGIN_S``) than the gap to the maximum wait of every tier listed
        above it, so the boosted key stays after the key of any higher-tier ticket that joined at
        the same time or earlier; the top tier's key stays at or after its join time."""
        tiers = list(self.settings.tiers)
        max_wait = self.settings.tier(tier).max_wait_s
        higher = [self.settings.tier(t).max_wait_s for t in tiers[: tiers.index(tier)]]
        room = max_wait - max(higher) - HOT_BOOST_MARGIN_S if higher else max_wait
        return max(0.0, min(self.settings.hot_boost_s, room))

    def admit(self, tier: str, now: float, line: JoinSnapshot, *, hot: bool = False, mode: str = CLIP) -> float:
        """The order key of a ticket of ``tier`` and ``mode`` joining ``line`` now (``hot``: its
        avatar is hot by the caller's count; a shared store's count, ``line.avatar_uses``,
        decides instead where there is one); raise ``IdentityBusy`` or ``QueueFull`` when it may
        not join. A boost that would make an on-time waiting ticket late is not given."""
        if line.avatar_uses is not None:
            hot = line.avatar_uses > self.hot_after_uses
        s = self.settings
        if line.identity_active >= s.per_identity_cap:
            raise IdentityBusy(f"this identity already has {line.identity_active} active request(s)")
        key = self.order_key(tier, now, hot=hot)
        eta, delays = self._join_estimate(tier, mode, key, now, line)
        if hot and delays:
            key = self.order_key(tier, now)
            eta, delays = self._join_estimate(tier, mode, key, now, line)
        retry = self.retry_after(eta)
        if len(line.waiting) + len(line.held) >= s.global_cap:
            raise QueueFull(f"the queue is full ({s.global_cap} waiting)", retry)
        cfg = s.tier(tier)
        in_tier = sum(1 for t in line.waiting if t.tier == tier) + sum(1 for t in line.held if t.tier == tier)
        if in_tier >= cfg.cap:
            raise QueueFull(f"the {tier} queue is full ({cfg.cap} waiting)", retry)
        if eta is not None and eta > cfg.max_wait_s:
            raise QueueFull(
                f"the estimated wait ({eta:.0f} s) is over the {tier} maximum ({cfg.max_wait_s:.0f} s)",
                retry,
            )
        if delays:
            raise QueueFull(
                "the line is full: admitting this request would make requests already waiting miss their "
                "maximum wait",
                retry,
            )
        return key

    def _waits(
        self, waiting: Sequence[Ticket], busy: Sequence[BusySlot], slots: int, times: ServiceTimes
    ) -> list[float | None]:
        tickets = [(t.tier, t.mode) for t in waiting]
        return estimate_waits(tickets, busy, slots, times, self.settings.live_expected_s)

    def estimates(
        self, waiting: Sequence[Ticket], busy: Sequence[BusySlot], slots: int, times: ServiceTimes
    ) -> list[float | None]:
        """Each waiting ticket's estimated wait as its client hears it (at least ``MIN_ETA_S``),
        in grant order."""
        return shown(self._waits(waiting, busy, slots, times))

    def estimates_in_pools(
        self,
        waiting: Sequence[Ticket],
        busy: Sequence[BusySlot],
        busy_pools: Sequence[str],
        pool_slots: Mapping[str, int],
        times: ServiceTimes,
    ) -> list[float | None]:
        """Each waiting ticket's estimated wait where tiers are mapped to pools (``pools.tiers``):
        the work ahead of it that competes for its tier's pools (tickets whose pools overlap
        them, the busy slots in them), over those pools' slots. Overflow is left out: it only
        makes waits shorter. Without a mapping, ``estimates``."""
        if not self.pools.tiers or not pool_slots:
            return self.estimates(waiting, busy, sum(pool_slots.values()) or 1, times)
        every = frozenset(pool_slots)

        def pools_of(tier: str) -> frozenset[str]:
            mapped = self.pools.primary(tier)
            return every if mapped is None else frozenset(mapped)

        sets = [pools_of(t.tier) for t in waiting]
        out: list[float | None] = [None] * len(waiting)
        for group in set(sets):
            members = [i for i, s in enumerate(sets) if s & group]
            held = [b for b, pool in zip(busy, busy_pools, strict=True) if pool in group]
            slots = sum(pool_slots.get(p, 0) for p in group)
            waits = self._waits([waiting[i] for i in members], held, max(1, slots), times)
            for i, wait in zip(members, waits, strict=True):
                if sets[i] == group:
                    out[i] = wait
        return shown(out)

    def _join_estimate(
        self, tier: str, mode: str, key: float, now: float, line: JoinSnapshot
    ) -> tuple[float | None, bool]:
        """The estimated wait of a ticket joining now (with the reserve for higher-tier work that
        will overtake it), and whether its joining would make an on-time waiting ticket late."""
        waiting = line.waiting
        at = next((i for i, t in enumerate(waiting) if t.key > key), len(waiting))
        tickets = [(t.tier, t.mode) for t in waiting]
        joined = [*tickets[:at], (tier, mode), *tickets[at:]]
        live_s = self.settings.live_expected_s
        before = estimate_waits(tickets, line.busy, line.slots_total, line.times, live_s)
        after = estimate_waits(joined, line.busy, line.slots_total, line.times, live_s)
        wait = after[at]
        if wait is None:
            return None, False
        delays = any(
            now + (after[i + 1] or 0.0) > t.key >= now + (before[i] or 0.0)
            for i, t in enumerate(waiting[at:], start=at)
        )
        return wait + self.overtake_reserve(tier, line.offered, line.slots_total), delays

    def overtake_reserve(self, tier: str, offered: Mapping[str, float], slots: int) -> float:
        """Seconds of a new ticket's maximum wait held back for higher-tier work that will join
        later and overtake it: tiers with shorter maximum waits, at the rate they are offered
        (slot-seconds a second), over the window in which they can overtake, times
        ``OVERTAKE_SAFETY`` for bursts; at most ``overtake_reserve`` of the maximum wait."""
        max_wait = self.settings.tier(tier).max_wait_s
        work = sum(
            offered.get(other, 0.0) * (max_wait - cfg.max_wait_s)
            for other, cfg in self.settings.tiers.items()
            if cfg.max_wait_s < max_wait
        )
        return min(OVERTAKE_SAFETY * work / max(1, slots), self.settings.overtake_reserve * max_wait)

    def retry_after(self, eta_s: float | None) -> float:
        if eta_s is None:
            return self.settings.retry_after_s
        return max(1.0, min(eta_s / 4, 60.0))
