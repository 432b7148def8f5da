"""This node in the cluster: it renews its lease, and hears of every change of the shared line.

The lease is renewed every third of ``cluster.lease_s``; a node that misses it is dead to the
others (its slots return, its clients' tickets are held for a resume). Every change of the line
is published on one channel, and the dispatcher runs a round on each, so a position pushed by any
node's step reaches every node's clients at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from stream_server.admission.redis_store import RedisAdmissionStore
from stream_server.admission.store import StoreUnavailable

log = logging.getLogger(__name__)
RETRY_S = 0.5


class Membership:
    def __init__(
        self,
        store: RedisAdmissionStore,
        lease_s: float,
        clock: Callable[[], float],
        on_change: Callable[[], None],
        on_reset: Callable[[], Awaitable[None]],
    ) -> None:
        self.store = store
        self.lease_s = lease_s
        self.clock = clock
        self.on_change = on_change
        self.on_reset = on_reset
        """The node was not registered any more: the line it knew is gone (Redis restarted
        empty) or it was taken for dead (a lease that ran out)."""
        self.registered = asyncio.Event()

    async def register(self) -> None:
        await self.store.heartbeat(self.clock(), self.lease_s)
        self.registered.set()

    async def run_heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if await self.store.heartbeat(self.clock(), self.lease_s):
                    log.warning(
                        "node %s was not registered any more (Redis restarted, or the lease ran out): registered again",
                        self.store.node_id,
                    )
                    await self.store.drop_idle_connections()
                    await self.on_reset()
            except StoreUnavailable as exc:
                log.error("lease not renewed: %s", exc)

    async def run_changes(self) -> None:
        """Subscribe to the line's changes; resubscribe after a lost connection."""
        channel = self.store.prefix + "changed"
        while True:
            pubsub = self.store.lease_client.pubsub()
            try:
                await pubsub.subscribe(channel)
                self.on_change()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.on_change()
            except (RedisError, OSError) as exc:
                log.error("lost the line's change feed (%s); resubscribing", exc)
                await asyncio.sleep(RETRY_S)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
