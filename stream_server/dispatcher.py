"""The dispatcher: grants free slots and fans the line's positions out to the tickets' owners.

It runs whenever something changed (batched: one round per wake-up, however many changes), and
on a heartbeat. Heartbeats go out in ``HEARTBEAT_PHASES`` slices of the line, so a thousand
waiting clients never get them in one burst. It only talks to ``TicketOwner`` handles, which
hand the status to an outbox that coalesces and never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from stream_server.admission.admission import Admission, QueueView
from stream_server.admission.owner import TicketOwner
from stream_server.admission.store import Grant, StoreUnavailable
from stream_server.cluster.grants import GrantClaim, GrantTokens
from stream_server.metrics import Metrics
from stream_server.settings import TIER_NAMES

log = logging.getLogger(__name__)
HEARTBEAT_PHASES = 10
OwnerT = TypeVar("OwnerT", bound=TicketOwner)


class Dispatcher(Generic[OwnerT]):
    def __init__(
        self,
        admission: Admission[OwnerT],
        metrics: Metrics,
        heartbeat_s: float,
        render_fps: Callable[[], float],
        grant_tokens: GrantTokens | None = None,
        grant_ttl_s: float = 10.0,
    ) -> None:
        self.admission = admission
        self.grant_tokens = grant_tokens
        """Signs the grants that send a client to another node (a shared store)."""
        self.grant_ttl_s = grant_ttl_s
        self._unreleased: dict[str, bool] = {}
        """Slots whose release the shared store did not take (ticket id -> served)."""
        self.granting = True
        """False while the node drains: it reserves no new slot of its own."""
        self.metrics = metrics
        self.heartbeat_s = heartbeat_s
        self.render_fps = render_fps
        self._changed = asyncio.Event()
        admission.on_change = self.changed

    def changed(self) -> None:
        """Something about the line changed: grant what can be granted and push positions."""
        self._changed.set()

    async def release(self, ticket_id: str, *, served: bool, mode: str = "clip", held_s: float = 0.0) -> None:
        """A granted request ended: free its slot (idempotent). A shared store that cannot be
        reached frees it on a later round."""
        try:
            released = await self.admission.release(ticket_id, self.admission.clock(), served=served)
        except StoreUnavailable as exc:
            log.warning("slot of %s not released yet (%s): retried every round", ticket_id, exc)
            self._unreleased[ticket_id] = served
            released = None
        if released is not None and served:
            self.metrics.service.labels(mode).observe(held_s)
        self.metrics.sessions_active.set(self.admission.serving_count)

    async def _retry_releases(self) -> None:
        for ticket_id, served in list(self._unreleased.items()):
            await self.admission.release(ticket_id, self.admission.clock(), served=served)
            del self._unreleased[ticket_id]

    async def run(self) -> None:
        tick = self.heartbeat_s / HEARTBEAT_PHASES
        next_tick = time.monotonic() + tick
        phase = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, next_tick - time.monotonic()))
            self._changed.clear()
            try:
                now = self.admission.clock()
                await self.admission.expire(now)  # once a round: the steps below take it as done
                await self._retry_releases()
                await self._grant_all(now)
                heartbeat = None
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + tick
                    phase = (phase + 1) % HEARTBEAT_PHASES
                    heartbeat = phase
                await self._push_positions(now, heartbeat_phase=heartbeat)
            except Exception:
                log.exception("dispatcher round failed")
                await asyncio.sleep(0.1)

    async def _grant_all(self, now: float) -> None:
        admission = self.admission
        for delivered in await admission.delivered():
            await self._hand_over(delivered)
        while self.granting and (grant := await admission.grant(now, expired=True)) is not None:
            if grant.owner_node == admission.node_id:
                await self._hand_over(grant)
            # else: the store put it in the inbox of the node that holds the ticket's client
            if not grant.more:
                break  # no slot left: no need to ask again
        self.metrics.sessions_active.set(admission.serving_count)

    async def _hand_over(self, grant: Grant) -> None:
        """Give a grant for one of this node's tickets to its owner: to start here, or with a
        signed token for the node whose slot it is."""
        ticket = grant.ticket
        self.metrics.grants.labels(ticket.tier).inc()
        self.metrics.queue_wait.labels(ticket.tier).observe(grant.waited_s)
        owner = self.admission.owner(ticket.id)
        if grant.remote:
            if owner is not None and self.grant_tokens is not None:
                claim = GrantClaim(grant.handoff, grant.node, grant.granted_at + self.grant_ttl_s)
                if owner.redirected(grant, grant.node_url, self.grant_tokens.sign(claim)):
                    self.admission.handed_off(ticket.id)
                    return
            await self.release(ticket.id, served=False)
        elif owner is None or not owner.granted(grant):
            await self.release(ticket.id, served=False)

    def _pool_metrics(self, view: QueueView) -> None:
        pools = self.admission.policy.pools
        per_tier: dict[str, tuple[int, float]] = {}  # (waiting, largest estimate): one pass over the line
        for ticket, eta in zip(view.waiting, view.eta_s, strict=True):
            n, largest = per_tier.get(ticket.tier, (0, 0.0))
            per_tier[ticket.tier] = (n + 1, largest if eta is None or eta < largest else eta)
        waiting = dict.fromkeys(view.pools, 0)
        last_eta = dict.fromkeys(view.pools, 0.0)
        for tier, (n, largest) in per_tier.items():
            for pool in pools.primary(tier) or list(view.pools):
                waiting[pool] = waiting.get(pool, 0) + n
                last_eta[pool] = max(last_eta.get(pool, 0.0), largest)
        m = self.metrics
        for pool, n in waiting.items():
            total, busy = view.pools.get(pool, (0, 0))
            m.pool_waiting.labels(pool).set(n)
            m.pool_wait_estimate.labels(pool).set(last_eta[pool])
            m.pool_slots.labels(pool).set(total)
            m.pool_slots_busy.labels(pool).set(busy)

    async def _push_positions(self, now: float, *, heartbeat_phase: int | None) -> None:
        view = await self.admission.view(now, expired=True)
        size = len(view.waiting)
        counts = dict.fromkeys(TIER_NAMES, 0)
        owner_of = self.admission.owner
        for position, (ticket, eta) in enumerate(zip(view.waiting, view.eta_s, strict=True), start=1):
            counts[ticket.tier] = counts.get(ticket.tier, 0) + 1
            owner = owner_of(ticket.id)
            if owner is not None:
                owner.queued(position, size, eta, force=position % HEARTBEAT_PHASES == heartbeat_phase)
        for tier, n in counts.items():
            self.metrics.queue_waiting.labels(tier).set(n)
        if view.pools:
            self._pool_metrics(view)
        self.metrics.slots_busy.set(view.slots_busy)
        self.metrics.render_fps.set(self.render_fps())
