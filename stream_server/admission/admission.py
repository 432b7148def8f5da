"""Admission: the one owner of ticket state, the policy's rules applied to a store's steps.

The store keeps the tickets (waiting, detached, busy, per-identity counts); this object keeps,
for the tickets of this node, the owner handle each one is reported to, and which detached
ticket a resume may take back. Nothing else keeps a copy of either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from stream_server.admission.eta import CLIP, BusySlot
from stream_server.admission.owner import TicketOwner
from stream_server.admission.policy import AdmissionPolicy, Ticket
from stream_server.admission.store import AdmissionStore, Grant, NewTicket

OwnerT = TypeVar("OwnerT", bound=TicketOwner)


def _nothing() -> None:
    """No one listens for changes (an admission driven step by step, as in tests)."""


@dataclass(frozen=True)
class QueueView:
    """The waiting tickets in grant order with their estimated waits, and the slots."""

    waiting: list[Ticket]
    eta_s: list[float | None]
    slots_total: int
    slots_busy: int
    busy: list[BusySlot]
    pools: dict[str, tuple[int, int]]
    """(slots, busy) per pool of the live nodes (a shared store); empty on one node."""


class Admission(Generic[OwnerT]):
    def __init__(
        self, policy: AdmissionPolicy, store: AdmissionStore, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy
        self.store = store
        self.clock = clock
        """The time every caller passes as ``now``: shared by all nodes with a shared store."""
        self._owners: dict[str, OwnerT] = {}
        """Owners of this node's waiting and detached tickets."""
        self._serving: dict[str, tuple[OwnerT, Grant]] = {}
        """Owners of this node's granted tickets and their grants, until released."""
        self._parked: dict[str, str] = {}
        """Resume key -> the detached ticket it may take back."""
        self.on_change: Callable[[], None] = _nothing
        """Called after every step that changed the line (the dispatcher subscribes)."""
        self._joining = asyncio.Lock()
        """This node's joins are decided one at a time: a thousand sockets joining at once wait
        here, not for the shared store's connections, and never decide on the same snapshot
        (where one's insert would make all the others' stale). Never contended on one node,
        where a join does not suspend."""

    @property
    def serving_count(self) -> int:
        return len(self._serving)

    @property
    def node_id(self) -> str:
        return self.store.node_id

    async def expire(self, now: float) -> None:
        """Forget the detached tickets whose grace is over (their owners hear it) and, with a
        shared store, the grants not taken up and the nodes whose lease ran out. Every step below
        does it first, unless told the caller just did at the same ``now`` (a dispatcher round)."""
        for ticket in await self.store.expire(now):
            self._forget(ticket.id, tell=True)

    def _forget(self, ticket_id: str, *, tell: bool = False) -> None:
        """Drop the ticket's owner handle; ``tell``: the ticket is gone for good without its
        owner's doing (expired, or superseded by a new join of its identity), so it hears it."""
        owner = self._owners.pop(ticket_id, None)
        if owner is None:
            return
        if self._parked.get(owner.resume_key) == ticket_id:
            del self._parked[owner.resume_key]
        if tell:
            owner.forgotten()

    async def join(
        self,
        ticket_id: str,
        identity: str,
        tier: str,
        avatar: str,
        now: float,
        owner: OwnerT | None = None,
        *,
        hot: bool = False,
        request: str = "",
        mode: str = CLIP,
    ) -> Ticket:
        """Add a ticket, or raise ``QueueFull`` / ``IdentityBusy``. ``owner`` hears of its place
        and its grant; a ticket granted with no owner is released by the dispatcher. ``hot``: its
        avatar is hot by this node's count (the policy's bounded boost; a shared store counts
        every node's). ``request`` (the ``start``, JSON) goes with the ticket in a shared store,
        for a resume on another node. ``mode``: the ``start``'s, which the estimates of the
        tickets behind it go by."""
        async with self._joining:
            await self.expire(now)
            while True:
                snapshot, version = await self.store.join_snapshot(
                    identity, tier, now, mode=mode, ticket_id=ticket_id, avatar=avatar
                )
                key = self.policy.admit(tier, now, snapshot, hot=hot, mode=mode)
                resume_key = owner.resume_key if owner is not None else ""
                added = await self.store.insert(
                    NewTicket(ticket_id, identity, tier, avatar, now, key, resume_key, request, mode), version
                )
                if added is not None:
                    break
        ticket, superseded = added
        for old in superseded:
            self._forget(old.id, tell=True)
        if owner is not None:
            self._owners[ticket_id] = owner
        self.on_change()
        return ticket

    async def leave(self, ticket_id: str) -> Ticket | None:
        """Remove a waiting (or detached) ticket for good; ``None`` if it was not waiting."""
        ticket = await self.store.remove(ticket_id)
        self._forget(ticket_id)
        self.on_change()
        return ticket

    async def detach(self, ticket_id: str, now: float) -> Ticket | None:
        """The ticket's socket closed: out of the line, its place held for the resume grace."""
        ticket = await self.store.detach(ticket_id, now + self.policy.resume_grace_s)
        owner = self._owners.get(ticket_id)
        if ticket is not None and owner is not None:
            self._parked[owner.resume_key] = ticket_id
        self.on_change()
        return ticket

    async def parked(self, resume_key: str) -> str | None:
        """The detached ticket a resume by ``resume_key`` would take back: held here, or (a
        shared store) on a node that went away."""
        return self._parked.get(resume_key) or await self.store.find_detached(resume_key)

    async def reattach(self, ticket_id: str, identity: str, now: float) -> Ticket | None:
        """Put a detached ticket of ``identity`` back at its old place. ``None`` if unknown,
        expired or another identity's; then nothing changes, so its owner can still resume."""
        await self.expire(now)
        ticket = await self.store.reattach(ticket_id, identity)
        if ticket is None:
            return None
        owner = self._owners.get(ticket_id)
        if owner is not None:
            self._parked.pop(owner.resume_key, None)
        self.on_change()
        return ticket

    async def grant(self, now: float, *, expired: bool = False) -> Grant | None:
        """Pop the first ticket and reserve a slot for it; its owner moves to the serving ones.
        With a shared store the ticket may be another node's (``owner_node``): the store
        delivers the grant there."""
        if not expired:
            await self.expire(now)
        grant = await self.store.pop_and_reserve(now)
        if grant is None:
            return None
        self._to_serving(grant)
        return grant

    async def delivered(self) -> list[Grant]:
        """Grants other nodes made for this node's tickets; their owners move to the serving ones."""
        grants = await self.store.delivered()
        for grant in grants:
            self._to_serving(grant)
        return grants

    def _to_serving(self, grant: Grant) -> None:
        owner = self._owners.pop(grant.ticket.id, None)
        if owner is not None:
            self._serving[grant.ticket.id] = (owner, grant)

    def handed_off(self, ticket_id: str) -> None:
        """The ticket's client went to the node whose slot it was granted: that node serves and
        releases it."""
        self._serving.pop(ticket_id, None)

    async def take_handoff(self, handoff: str, now: float) -> Ticket | None:
        """A client brought a grant made for a slot of this node: valid once, before it expires.
        The slot is then this node's to release."""
        return await self.store.consume_grant(handoff, now)

    def adopt(self, ticket_id: str, owner: OwnerT) -> None:
        """``owner`` takes over a waiting ticket whose node went away (a resume)."""
        self._owners[ticket_id] = owner

    def serve(self, grant: Grant, owner: OwnerT) -> None:
        """``owner`` serves a grant whose client came from another node (a handoff)."""
        self._serving[grant.ticket.id] = (owner, grant)

    async def recover(self, now: float) -> list[OwnerT]:
        """The shared store lost the line (Redis restarted empty): reserve again the slots this
        node's sessions hold, and give up the waiting tickets, whose places are gone. Returns
        their owners, to tell their clients."""
        await self.store.restore_busy([grant for _, grant in self._serving.values()], now)
        lost = list(self._owners.values())
        self._owners.clear()
        self._parked.clear()
        self.on_change()
        return lost

    async def release(self, ticket_id: str, now: float, *, served: bool = True) -> Ticket | None:
        """Free the slot held by ``ticket_id`` (idempotent)."""
        self._serving.pop(ticket_id, None)
        ticket = await self.store.release(ticket_id, now, served=served)
        self.on_change()
        return ticket

    async def view(self, now: float, *, expired: bool = False) -> QueueView:
        """The whole line in grant order with each ticket's estimated wait."""
        if not expired:
            await self.expire(now)
        line = await self.store.line(now)
        if line.pool_slots:
            eta = self.policy.estimates_in_pools(line.waiting, line.busy, line.busy_pools, line.pool_slots, line.times)
        else:
            eta = self.policy.estimates(line.waiting, line.busy, line.slots_total, line.times)
        pools = {p: (n, line.busy_pools.count(p)) for p, n in line.pool_slots.items()}
        return QueueView(
            waiting=line.waiting,
            eta_s=eta,
            slots_total=line.slots_total,
            slots_busy=len(line.busy),
            busy=line.busy,
            pools=pools,
        )

    def census(self) -> dict[str, int]:
        """The handles this node keeps (admin stats; all 0 on an idle node): owners of waiting
        and parked tickets, parked tickets a resume may take back, granted ones not released."""
        return {"owned": len(self._owners), "parked": len(self._parked), "serving": len(self._serving)}

    def owner(self, ticket_id: str) -> OwnerT | None:
        """The owner of one of this node's tickets (waiting, detached or granted)."""
        serving = self._serving.get(ticket_id)
        return self._owners.get(ticket_id) or (serving[0] if serving is not None else None)

    async def set_slots(self, total: int) -> None:
        await self.store.set_slots(total)
        self.on_change()
