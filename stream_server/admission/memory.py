"""The in-process admission store, the single-node default.

Nothing here awaits, so each step runs to completion on the event loop before any other task
sees the store: that is what makes every step atomic on one node.
"""

from __future__ import annotations

import itertools

from sortedcontainers import SortedList

from stream_server.admission.eta import CLIP, BusySlot, OfferedWork, ServiceTimes
from stream_server.admission.policy import JoinSnapshot, Ticket
from stream_server.admission.store import AdmissionStore, Grant, LineState, NewTicket


class MemoryAdmissionStore(AdmissionStore):
    def __init__(self, tiers: list[str], slots: int) -> None:
        self.tiers = tiers
        self.slots_total = max(1, slots)
        self.times = ServiceTimes()
        self.offered = OfferedWork()
        self._seq = itertools.count()
        self._version = 0
        self._waiting: SortedList = SortedList(key=lambda t: t.order)
        self._by_id: dict[str, Ticket] = {}
        self._detached: dict[str, tuple[Ticket, float]] = {}
        self._busy: dict[str, tuple[Ticket, float]] = {}
        self._identity: dict[str, int] = {}

    def _changed(self) -> None:
        self._version += 1

    def _count(self, identity: str, delta: int) -> None:
        count = self._identity.get(identity, 0) + delta
        if count > 0:
            self._identity[identity] = count
        else:
            self._identity.pop(identity, None)

    def _busy_slots(self, now: float) -> list[BusySlot]:
        return [BusySlot(t.tier, t.mode, now - since) for t, since in self._busy.values()]

    async def expire(self, now: float) -> list[Ticket]:
        gone = [tid for tid, (_, until) in self._detached.items() if until <= now]
        if gone:
            self._changed()
        return [self._detached.pop(tid)[0] for tid in gone]

    async def join_snapshot(
        self, identity: str, tier: str, now: float, *, mode: str = CLIP, ticket_id: str = "", avatar: str = ""
    ) -> tuple[JoinSnapshot, int]:
        # Refused joins count as offered work too, or refusing a tier would shrink its reserve.
        self.offered.add(tier, self.times.mean(mode, tier) or 0.0, now)
        snapshot = JoinSnapshot(
            waiting=list(self._waiting),
            held=[t for t, _ in self._detached.values() if t.identity != identity],
            busy=self._busy_slots(now),
            slots_total=self.slots_total,
            identity_active=self._identity.get(identity, 0),
            times=self.times,
            offered={other: self.offered.rate(other, now) for other in self.tiers},
        )
        return snapshot, self._version

    async def insert(self, ticket: NewTicket, version: int) -> tuple[Ticket, list[Ticket]] | None:
        if ticket.id in self._by_id or ticket.id in self._busy:
            raise ValueError(f"ticket {ticket.id} is already active")
        if version != self._version:
            return None
        superseded = [t for t, _ in self._detached.values() if t.identity == ticket.identity]
        for old in superseded:
            del self._detached[old.id]
        added = Ticket(
            id=ticket.id,
            identity=ticket.identity,
            tier=ticket.tier,
            joined_at=ticket.joined_at,
            key=ticket.key,
            seq=next(self._seq),
            avatar=ticket.avatar,
            mode=ticket.mode,
        )
        self._waiting.add(added)
        self._by_id[added.id] = added
        self._count(added.identity, +1)
        self._changed()
        return added, superseded

    async def remove(self, ticket_id: str) -> Ticket | None:
        detached = self._detached.pop(ticket_id, None)
        ticket = self._by_id.pop(ticket_id, None)
        if ticket is not None:
            self._waiting.remove(ticket)
            self._count(ticket.identity, -1)
        if detached is not None or ticket is not None:
            self._changed()
        return ticket

    async def detach(self, ticket_id: str, until: float) -> Ticket | None:
        ticket = self._by_id.pop(ticket_id, None)
        if ticket is None:
            return None
        self._waiting.remove(ticket)
        self._count(ticket.identity, -1)
        self._detached[ticket_id] = (ticket, until)
        self._changed()
        return ticket

    async def reattach(self, ticket_id: str, identity: str) -> Ticket | None:
        entry = self._detached.get(ticket_id)
        if entry is None or entry[0].identity != identity:
            return None
        del self._detached[ticket_id]
        ticket = entry[0]
        self._waiting.add(ticket)
        self._by_id[ticket_id] = ticket
        self._count(ticket.identity, +1)
        self._changed()
        return ticket

    async def pop_and_reserve(self, now: float) -> Grant | None:
        if len(self._busy) >= self.slots_total or not self._waiting:
            return None
        ticket = self._waiting.pop(0)
        del self._by_id[ticket.id]
        self._busy[ticket.id] = (ticket, now)
        self._changed()
        return Grant(ticket, now, len(self._waiting), more=len(self._busy) < self.slots_total)

    async def release(self, ticket_id: str, now: float, *, served: bool) -> Ticket | None:
        entry = self._busy.pop(ticket_id, None)
        if entry is None:
            return None
        ticket, since = entry
        self._count(ticket.identity, -1)
        if served:
            self.times.record(ticket.mode, ticket.tier, now - since)
        self._changed()
        return ticket

    async def line(self, now: float) -> LineState:
        return LineState(
            waiting=list(self._waiting),
            busy=self._busy_slots(now),
            slots_total=self.slots_total,
            times=self.times,
        )

    async def set_slots(self, total: int) -> None:
        self.slots_total = max(1, total)
        self._changed()

    # ----- introspection for tests -----

    @property
    def detached_count(self) -> int:
        return len(self._detached)

    @property
    def identities(self) -> dict[str, int]:
        return dict(self._identity)
