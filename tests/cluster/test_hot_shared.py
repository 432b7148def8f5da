"""Hot avatars with a shared line: the uses are counted in Redis by every node's joins, so the
hot boost is the same whichever node a client joins (on one node, the engine's own count
decides: tests/test_hot_avatars.py)."""

from __future__ import annotations

import redis.asyncio as aioredis

from stream_server.admission.admission import Admission
from stream_server.admission.owner import TicketOwner
from stream_server.admission.policy import AdmissionPolicy
from stream_server.admission.redis_store import RedisAdmissionStore
from tests.test_admission import TIERS, make_settings

FOREVER = 1e12
WINDOW_S = 60.0


def store(client: aioredis.Redis, prefix: str, node: str) -> RedisAdmissionStore:
    return RedisAdmissionStore(
        client, prefix=prefix, node_id=node, tiers=list(TIERS), slots=1, resume_grace_s=30.0, grant_ttl_s=5.0,
        url=f"ws://{node}/v1/stream", hot_window_s=WINDOW_S,
    )


async def test_uses_counted_on_one_node_make_the_avatar_hot_on_another(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    a, b = store(client, prefix, "a"), store(client, prefix, "b")
    await a.heartbeat(0.0, FOREVER)
    await b.heartbeat(0.0, FOREVER)
    policy = AdmissionPolicy(make_settings(), hot_after_uses=3)
    qa, qb = Admission[TicketOwner](policy, a), Admission[TicketOwner](policy, b)
    for i in range(4):  # four uses of "popular", all on node a
        await qa.join(f"a{i}", f"ua{i}", "low", "popular", float(i))
    # node b has not seen "popular" before; the caller says it is not hot (its own count)
    cold = await qb.join("cold", "uc", "low", "quiet", 10.0)
    boosted = await qb.join("boosted", "ub", "low", "popular", 11.0)
    assert boosted.key == cold.key + 1.0 - policy.hot_boost("low")
    order = [t.id for t in (await qb.view(12.0)).waiting]
    assert order.index("boosted") < order.index("cold"), "joined later, keyed earlier: the shared count made it hot"
    # the uses leave the window: a minute later "popular" is not hot any more, on either node
    late_cold = await qa.join("late-cold", "ulc", "low", "quiet", 100.0)
    late = await qa.join("late", "ul", "low", "popular", 100.5)
    assert late.key == late_cold.key + 0.5, "not boosted"
    await client.aclose()


async def test_a_join_decided_again_counts_its_use_once(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    a, b = store(client, prefix, "a"), store(client, prefix, "b")
    await a.heartbeat(0.0, FOREVER)
    first, _ = await a.join_snapshot("u1", "normal", 1.0, ticket_id="t1", avatar="x")
    again, _ = await a.join_snapshot("u1", "normal", 1.5, ticket_id="t1", avatar="x")  # a stale insert's retry
    other, _ = await b.join_snapshot("u2", "normal", 2.0, ticket_id="t2", avatar="x")
    assert (first.avatar_uses, again.avatar_uses, other.avatar_uses) == (1, 1, 2)
    plain = RedisAdmissionStore(client, prefix=prefix, node_id="c", tiers=list(TIERS), slots=1, resume_grace_s=30.0,
                                grant_ttl_s=5.0)  # hot_window_s = 0: the caller counts
    none, _ = await plain.join_snapshot("u3", "normal", 3.0, ticket_id="t3", avatar="x")
    assert none.avatar_uses is None
    await client.aclose()
