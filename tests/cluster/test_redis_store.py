"""The in-memory store's properties (tests/test_admission.py) hold on the Redis store too, and
its atomic steps hold across nodes sharing one line."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings

from stream_server.admission.admission import Admission
from stream_server.admission.owner import TicketOwner
from stream_server.admission.policy import AdmissionPolicy
from stream_server.admission.redis_store import RedisAdmissionStore
from stream_server.admission.store import NewTicket
from stream_server.settings import QueueSettings
from tests.cluster.redis_helpers import SHARED_URL, delete_prefix, unique_prefix
from tests.test_admission import (
    TIERS,
    AdmissionMachine,
    check_live_holders_count_for_their_expectation,
    live_settings,
    make_settings,
)

FOREVER = 1e12


def redis_store(client: aioredis.Redis, prefix: str, node: str, slots: int, grace: float) -> RedisAdmissionStore:
    return RedisAdmissionStore(
        client, prefix=prefix, node_id=node, tiers=list(TIERS), slots=slots, resume_grace_s=grace, grant_ttl_s=5.0,
        url=f"ws://{node}/v1/stream",
    )


class RedisAdmissionMachine(AdmissionMachine):
    """The same rules and model, every step a Lua script on the real Redis."""

    def make_queue(self, cfg: QueueSettings, slots: int) -> Admission[TicketOwner]:
        self.loop = asyncio.new_event_loop()
        self.prefix = unique_prefix()
        self.client = aioredis.Redis.from_url(SHARED_URL)
        store = redis_store(self.client, self.prefix, "node-a", slots, cfg.resume_grace_s)
        self.loop.run_until_complete(store.heartbeat(0.0, FOREVER))
        return Admission(AdmissionPolicy(cfg), store)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def identities(self) -> dict[str, int]:
        return self.run(self.q.store.identities())  # type: ignore[attr-defined]

    def detached_count(self) -> int:
        return self.run(self.q.store.detached_count())  # type: ignore[attr-defined]

    def teardown(self) -> None:
        if not hasattr(self, "q"):
            return
        try:
            super().teardown()
        finally:
            self.run(self.client.aclose())
            self.loop.close()
            delete_prefix(SHARED_URL, self.prefix)


RedisAdmissionMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRedisAdmissionMachine = RedisAdmissionMachine.TestCase


async def test_live_holders_count_for_their_expectation_on_the_shared_store(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = redis_store(client, prefix, "a", 4, 30.0)
    await store.heartbeat(0.0, FOREVER)
    await check_live_holders_count_for_their_expectation(Admission(AdmissionPolicy(live_settings()), store))
    # kept per mode and tier in the shared store
    fields = {k.decode() for k in await client.hkeys(prefix + "times")}
    assert fields == {"live:vip", "live:*", "clip:normal", "clip:*"}
    await client.aclose()


async def test_a_join_decided_on_a_stale_snapshot_is_not_inserted(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    a = redis_store(client, prefix, "a", 1, 30.0)
    b = redis_store(client, prefix, "b", 1, 30.0)
    await a.heartbeat(0.0, FOREVER)
    await b.heartbeat(0.0, FOREVER)
    policy = AdmissionPolicy(make_settings())
    snapshot, version = await a.join_snapshot("a", "normal", 0.0)
    key = policy.admit("normal", 0.0, snapshot)
    assert await b.insert(NewTicket("B", "b", "normal", "x", 0.0, key), version) is not None
    assert await a.insert(NewTicket("A", "a", "normal", "x", 0.0, key), version) is None
    assert [t.id for t in (await a.line(0.0)).waiting] == ["B"]
    assert await a.identities() == {"b": 1}
    await client.aclose()


async def test_nodes_share_one_line_in_global_order_and_grants_prefer_the_tickets_own_node(
    redis_url: str, prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    cfg = make_settings()
    nodes = {n: redis_store(client, prefix, n, 1, 30.0) for n in ("a", "b", "c")}
    for store in nodes.values():
        await store.heartbeat(0.0, FOREVER)
    queues = {n: Admission[TicketOwner](AdmissionPolicy(cfg), s) for n, s in nodes.items()}
    await queues["a"].join("a1", "u1", "low", "x", 1.0)
    await queues["b"].join("b1", "u2", "normal", "x", 2.0)
    await queues["c"].join("c1", "u3", "vip", "x", 3.0)
    await queues["a"].join("a2", "u4", "low", "x", 4.0)
    view = await queues["b"].view(5.0)
    assert [t.id for t in view.waiting] == ["c1", "b1", "a1", "a2"] and view.slots_total == 3
    # node a grants: c1 first (on c's own slot, delivered to c), then b1 on b, then a1 on a
    grants = [await queues["a"].grant(5.0) for _ in range(4)]
    made = [(g.ticket.id, g.node, g.handoff) for g in grants[:3] if g]
    assert made == [("c1", "c", ""), ("b1", "b", ""), ("a1", "a", "")]
    assert grants[3] is None, "three slots, three grants"
    assert [g.ticket.id for g in await nodes["c"].delivered()] == ["c1"]
    assert [g.ticket.id for g in await nodes["b"].delivered()] == ["b1"]
    assert await nodes["a"].delivered() == []
    # a2's node has no slot free: when b's frees, a2 is granted there with a single-use handoff
    await queues["b"].release("b1", 10.0)
    g = await queues["c"].grant(10.0)
    assert g is not None and (g.ticket.id, g.node, g.owner_node) == ("a2", "b", "a") and g.handoff
    assert g.node_url == "ws://b/v1/stream"
    assert await nodes["a"].consume_grant(g.handoff, 10.5) is None, "the grant is for b's slot"
    await queues["b"].release("c1", 10.0)
    g2 = await queues["b"].grant(10.0)
    assert g2 is None, "nothing waits"
    await client.aclose()


async def test_a_handoff_is_used_once_and_an_unused_one_gives_its_slot_back(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    cfg = make_settings()
    a, b = redis_store(client, prefix, "a", 1, 30.0), redis_store(client, prefix, "b", 1, 30.0)
    await a.heartbeat(0.0, FOREVER)
    await b.heartbeat(0.0, FOREVER)
    qa = Admission[TicketOwner](AdmissionPolicy(cfg), a)
    await qa.join("x", "ux", "normal", "v", 0.0)
    await qa.join("y", "uy", "normal", "v", 0.0)
    await qa.join("z", "uz", "normal", "v", 0.0)
    gx, gy, gz = [await qa.grant(1.0) for _ in range(3)]
    assert gx is not None and gy is not None and gz is None
    assert (gx.node, gy.node) == ("a", "b") and gy.handoff
    ticket = await b.consume_grant(gy.handoff, 2.0)
    assert ticket is not None and ticket.id == "y"
    assert await b.consume_grant(gy.handoff, 2.0) is None, "a grant is single-use"
    await qa.release("y", 3.0)
    await qa.join("w", "uw", "normal", "v", 3.0)
    gz = await qa.grant(3.0)
    assert gz is not None and gz.ticket.id == "z" and gz.node == "b" and gz.handoff
    assert (await qa.view(4.0)).slots_busy == 2
    # z's client never takes it up: after the grant's ttl (5 s) its slot returns, w gets it
    assert await qa.grant(7.0) is None
    gw = await qa.grant(8.1)
    assert gw is not None and gw.ticket.id == "w" and gw.node == "b"
    assert await b.consume_grant(gz.handoff, 8.2) is None, "an expired grant is refused"
    assert await a.identities() == {"ux": 1, "uw": 1}, "z's identity holds nothing any more"
    await client.aclose()


async def test_a_dead_nodes_slots_come_back_and_its_waiting_tickets_keep_their_places(
    redis_url: str, prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    cfg = make_settings()
    a, b = redis_store(client, prefix, "a", 1, 30.0), redis_store(client, prefix, "b", 1, 30.0)
    await a.heartbeat(0.0, 100.0)
    await b.heartbeat(0.0, 10.0)  # b stops renewing: its lease runs out at 10
    qa, qb = Admission[TicketOwner](AdmissionPolicy(cfg), a), Admission[TicketOwner](AdmissionPolicy(cfg), b)
    await qb.join("b1", "u1", "normal", "v", 0.0)
    await qa.join("a1", "u2", "normal", "v", 0.5)
    await qb.join("b2", "u3", "normal", "v", 1.0)
    await qa.join("a2", "u4", "normal", "v", 1.5)
    g1, g2 = await qa.grant(2.0), await qa.grant(2.0)
    assert g1 is not None and g2 is not None and {(g1.ticket.id, g1.node), (g2.ticket.id, g2.node)} == {
        ("b1", "b"), ("a1", "a")
    }
    assert await qa.grant(5.0) is None
    view = await qa.view(11.0)
    assert [t.id for t in view.waiting] == ["a2"], "b's client b2 is held for a resume, not waiting"
    assert view.slots_total == 1 and view.slots_busy == 1, "b's slot and its busy session are gone"
    assert await a.find_detached("") is None
    assert await a.detached_count() == 1
    # b2's client resumes on a: same place, ahead of a2 which joined after it
    resumed = await qa.reattach("b2", "u3", 12.0)
    assert resumed is not None and resumed.meta["node"] == "a", "a holds b2's client now"
    await qa.release("a1", 12.0)
    g3 = await qa.grant(12.0)
    assert g3 is not None and g3.ticket.id == "b2" and (g3.node, g3.owner_node) == ("a", "a")
    await client.aclose()
