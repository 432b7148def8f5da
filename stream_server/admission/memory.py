"""The in-process admission queue, the single-node default.

Nothing here awaits, so each method runs to completion on the event loop before any other task
sees the queue: that is what makes check-and-reserve atomic on one node.
"""

from __future__ import annotations

import itertools

from sortedcontainers import SortedList

from stream_server.admission.backend import AdmissionQueue, Grant, QueueView
from stream_server.admission.eta import OfferedWork, ServiceTimes, estimate_waits
from stream_server.admission.policy import Admission, Ticket, TierPolicy
from stream_server.settings import QueueSettings


class MemoryAdmissionQueue(AdmissionQueue):
    def __init__(self, settings: QueueSettings, slots: int) -> None:
        self.policy = TierPolicy(settings)
        self.settings = settings
        self.slots_total = slots
        self.times = ServiceTimes()
        self.offered = OfferedWork()
        self._seq = itertools.count()
        self._waiting: SortedList = SortedList(key=lambda t: t.order)
        self._by_id: dict[str, Ticket] = {}
        self._detached: dict[str, tuple[Ticket, float]] = {}
        self._busy: dict[str, tuple[Ticket, float]] = {}
        self._identity: dict[str, int] = {}

    # ----- helpers -----

    def _tier_count(self, tier: str) -> int:
        return sum(1 for t in self._waiting if t.tier == tier)

    def _expire(self, now: float) -> None:
        for tid in [tid for tid, (_, until) in self._detached.items() if until <= now]:
            del self._detached[tid]

    def _activate(self, identity: str, delta: int) -> None:
        count = self._identity.get(identity, 0) + delta
        if count > 0:
            self._identity[identity] = count
        else:
            self._identity.pop(identity, None)

    def _estimate_join(self, tier: str, now: float) -> tuple[float | None, bool]:
        """The estimated wait of a ticket joining now (with the reserve for higher-tier work that
        will overtake it), and whether its joining would make an on-time waiting ticket late."""
        key = self.policy.order_key(tier, now)
        line = list(self._waiting)
        at = next((i for i, t in enumerate(line) if t.key > key), len(line))
        busy = self._busy_elapsed(now)
        before = estimate_waits([t.tier for t in line], busy, self.slots_total, self.times)
        after = estimate_waits(
            [t.tier for t in line[:at]] + [tier] + [t.tier for t in line[at:]], busy, self.slots_total, self.times
        )
        wait = after[at]
        if wait is None:
            return None, False
        delays = any(
            now + (after[i + 1] or 0.0) > t.key >= now + (before[i] or 0.0)
            for i, t in enumerate(line[at:], start=at)
        )
        rates = {other: self.offered.rate(other, now) for other in self.settings.tiers}
        return wait + self.policy.overtake_reserve(tier, rates, self.slots_total), delays

    def _busy_elapsed(self, now: float) -> list[tuple[str, float]]:
        return [(t.tier, now - since) for t, since in self._busy.values()]

    # ----- the interface -----

    async def join(self, ticket_id: str, identity: str, tier: str, avatar: str, now: float) -> Ticket:
        self._expire(now)
        if ticket_id in self._by_id or ticket_id in self._busy:
            raise ValueError(f"ticket {ticket_id} is already active")
        # A fresh join by the same identity supersedes its detached tickets, but only once it is
        # admitted: a rejected join must not cost the client the place it could still resume.
        superseded = [tid for tid, (t, _) in self._detached.items() if t.identity == identity]
        # Detached tickets keep their place for the resume grace, so they count against the caps:
        # otherwise resuming them could take the line over the global or the tier cap.
        held = [t for tid, (t, _) in self._detached.items() if tid not in superseded]
        self.offered.add(tier, self.times.mean(tier) or 0.0, now)
        eta, delays = self._estimate_join(tier, now)
        self.policy.check(
            tier,
            Admission(
                waiting_total=len(self._waiting) + len(held),
                waiting_in_tier=self._tier_count(tier) + sum(1 for t in held if t.tier == tier),
                identity_active=self._identity.get(identity, 0),
                eta_s=eta,
                delays_waiting=delays,
            ),
        )
        for tid in superseded:
            del self._detached[tid]
        ticket = Ticket(
            id=ticket_id,
            identity=identity,
            tier=tier,
            joined_at=now,
            key=self.policy.order_key(tier, now),
            seq=next(self._seq),
            avatar=avatar,
        )
        self._waiting.add(ticket)
        self._by_id[ticket_id] = ticket
        self._activate(identity, +1)
        return ticket

    async def leave(self, ticket_id: str) -> Ticket | None:
        self._detached.pop(ticket_id, None)
        ticket = self._by_id.pop(ticket_id, None)
        if ticket is None:
            return None
        self._waiting.remove(ticket)
        self._activate(ticket.identity, -1)
        return ticket

    async def detach(self, ticket_id: str, now: float) -> Ticket | None:
        if ticket_id not in self._by_id:
            # Not waiting (busy, unknown, or detached already): a repeated detach must not cancel
            # the detached ticket the way ``leave`` does.
            return None
        ticket = await self.leave(ticket_id)
        if ticket is not None:
            self._detached[ticket_id] = (ticket, now + self.settings.resume_grace_s)
        return ticket

    async def reattach(self, ticket_id: str, now: float) -> Ticket | None:
        self._expire(now)
        entry = self._detached.pop(ticket_id, None)
        if entry is None:
            return None
        ticket = entry[0]
        self._waiting.add(ticket)
        self._by_id[ticket_id] = ticket
        self._activate(ticket.identity, +1)
        return ticket

    async def grant(self, now: float) -> Grant | None:
        self._expire(now)
        if len(self._busy) >= self.slots_total or not self._waiting:
            return None
        ticket = self._waiting.pop(0)
        del self._by_id[ticket.id]
        self._busy[ticket.id] = (ticket, now)
        return Grant(ticket, now)

    async def release(self, ticket_id: str, now: float, *, served: bool = True) -> None:
        entry = self._busy.pop(ticket_id, None)
        if entry is None:
            return
        ticket, since = entry
        self._activate(ticket.identity, -1)
        if served:
            self.times.record(ticket.tier, now - since)

    async def view(self, now: float) -> QueueView:
        self._expire(now)
        waiting = list(self._waiting)
        etas = estimate_waits(
            [t.tier for t in waiting], self._busy_elapsed(now), self.slots_total, self.times
        )
        return QueueView(
            waiting=waiting,
            eta_s=etas,
            slots_total=self.slots_total,
            slots_busy=len(self._busy),
            busy=self._busy_elapsed(now),
        )

    async def set_slots(self, total: int) -> None:
        self.slots_total = max(1, total)

    # ----- introspection for tests and metrics -----

    @property
    def detached_count(self) -> int:
        return len(self._detached)

    @property
    def identities(self) -> dict[str, int]:
        return dict(self._identity)
