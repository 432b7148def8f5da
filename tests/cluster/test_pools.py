"""Pools, the hybrid plan: vip on the local GPUs, normal and low on cloud GPUs, overflowing to
local ones that are free while no vip waits. Positions and ETAs per tier and pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from stream_server.admission.admission import Admission
from stream_server.admission.owner import TicketOwner
from stream_server.admission.policy import AdmissionPolicy
from stream_server.admission.redis_store import RedisAdmissionStore
from stream_server.settings import PoolSettings
from tests.cluster.cluster_harness import run_cluster
from tests.cluster.test_cluster_e2e import LIVE, hold, take_slot, wait_position
from tests.server_harness import mint
from tests.test_admission import TIERS, make_settings

HYBRID = PoolSettings(
    tiers={"vip": ["local"], "normal": ["cloud"], "low": ["cloud"]},
    overflow={"normal": ["local"], "low": ["local"]},
)
FOREVER = 1e12


async def hybrid(redis_url: str, prefix: str) -> tuple[aioredis.Redis, Admission[TicketOwner]]:
    client = aioredis.Redis.from_url(redis_url)
    stores = [
        RedisAdmissionStore(
            # grants handed off to the other node are never taken up here: they must not expire
            client, prefix=prefix, node_id=name, tiers=list(TIERS), slots=1, resume_grace_s=30.0, grant_ttl_s=1e6,
            pool=pool, url=f"ws://{name}/v1/stream", tier_pools=HYBRID.tiers, overflow=HYBRID.overflow,
        )
        for name, pool in (("gpu-local", "local"), ("gpu-cloud", "cloud"))
    ]
    for store in stores:
        await store.heartbeat(0.0, FOREVER)
    return client, Admission(AdmissionPolicy(make_settings(), HYBRID), stores[0])


async def test_tiers_take_their_pools_and_overflow_only_while_no_vip_waits(redis_url: str, prefix: str) -> None:
    client, q = await hybrid(redis_url, prefix)
    await q.join("n1", "u1", "normal", "a", 0.0)
    await q.join("n2", "u2", "normal", "a", 1.0)
    g = await q.grant(2.0)
    assert g is not None and (g.ticket.id, g.node) == ("n1", "gpu-cloud")
    g = await q.grant(2.0)
    assert g is not None and (g.ticket.id, g.node) == ("n2", "gpu-local"), "cloud full, no vip waits: overflow"
    await q.join("n3", "u3", "normal", "a", 3.0)
    await q.join("v1", "v1", "vip", "a", 490.0)  # deadline 610: behind n3 (603) in the line
    assert [t.id for t in (await q.view(490.0)).waiting] == ["n3", "v1"]
    await q.release("n2", 500.0)
    g = await q.grant(500.0)
    assert g is not None and g.ticket.id == "v1" and g.node == "gpu-local", "a vip waits: no overflow onto local"
    assert await q.grant(500.0) is None, "n3 waits for cloud while local serves the vip"
    await q.release("n1", 510.0)
    g = await q.grant(510.0)
    assert g is not None and (g.ticket.id, g.node) == ("n3", "gpu-cloud")
    view = await q.view(511.0)
    assert view.pools == {"local": (1, 1), "cloud": (1, 1)}
    await client.aclose()


async def test_a_vip_far_down_the_line_gets_the_local_slot_that_the_tickets_ahead_may_not_take(
    redis_url: str, prefix: str
) -> None:
    client, q = await hybrid(redis_url, prefix)
    await q.join("cloud-holder", "ch", "normal", "a", 0.0)
    g = await q.grant(0.0)
    assert g is not None and g.node == "gpu-cloud"
    for n in range(150):  # deadlines 600.0 to 614.9
        await q.join(f"n{n}", f"n{n}", "normal", "a", n / 10)
    await q.join("v", "v", "vip", "a", 495.0)  # deadline 615: behind all 150, on the third page of 64
    assert [t.id for t in (await q.view(495.0)).waiting][-1] == "v"
    g = await q.grant(496.0)
    assert g is not None and (g.ticket.id, g.node) == ("v", "gpu-local"), "the normals may not overflow: a vip waits"
    assert await q.grant(496.0) is None
    await client.aclose()


async def test_etas_count_only_the_work_in_the_tickets_own_pools(redis_url: str, prefix: str) -> None:
    client, q = await hybrid(redis_url, prefix)
    # measure a service time of 100 s on each pool
    for n, tier in enumerate(("vip", "normal")):
        await q.join(f"m{n}", f"m{n}", tier, "a", 0.0)
    while (g := await q.grant(0.0)) is not None:
        await q.release(g.ticket.id, 100.0)
    # both slots busy since 100; three normals wait for cloud, then a vip for local
    await q.join("busy-v", "bv", "vip", "a", 100.0)
    await q.join("busy-n", "bn", "normal", "a", 100.0)
    assert await q.grant(100.0) is not None and await q.grant(100.0) is not None
    for n in range(3):
        await q.join(f"n{n}", f"n{n}", "normal", "a", 101.0)
    await q.join("v", "v", "vip", "a", 102.0)
    view = await q.view(110.0)
    eta = dict(zip([t.id for t in view.waiting], view.eta_s, strict=True))
    assert [t.id for t in view.waiting][-1] == "v" or eta["v"] is not None
    # the vip waits for the local slot only (90 s left), not behind the normals in the cloud
    assert eta["v"] == pytest.approx(90.0)
    assert [eta[f"n{n}"] for n in range(3)] == pytest.approx([90.0, 190.0, 290.0])
    await client.aclose()


@pytest.mark.slow
async def test_queue_summary_shows_slots_per_pool_and_a_vip_is_served_by_the_local_pool(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    pools = {"MTS_POOLS__TIERS": '{"vip": ["local"], "normal": ["cloud"], "low": ["cloud"]}',
             "MTS_POOLS__OVERFLOW": '{"normal": ["local"], "low": ["local"]}'}
    per_node = {0: {"MTS_CLUSTER__POOL": "local"}, 1: {"MTS_CLUSTER__POOL": "cloud"}}
    with run_cluster(tmp_path, redis_url, prefix, nodes=2, per_node=per_node, **pools) as cluster:
        summary = cluster.queue(1)
        assert summary["slots"] == {"total": 2, "busy": 0, "pools": {"cloud": {"total": 1, "busy": 0},
                                                                     "local": {"total": 1, "busy": 0}}}
        normal = await hold(cluster, 1, "normal-holder", "normal")  # a normal on its node's cloud slot
        assert cluster.queue(0)["slots"]["pools"]["cloud"]["busy"] == 1
        # a vip joining on the cloud node is sent to the local node's slot
        vip = await cluster.connect(1)
        await vip.hello(mint("vip", "vip"))
        await vip.send("start", **LIVE)
        streaming = await take_slot(cluster, vip, mint("vip", "vip"), LIVE)
        assert vip.of_type("redirect") and vip.of_type("redirect")[0]["url"] == cluster.ws(0)
        # the pools are full: a low waits (no overflow possible) at position 1
        low = await cluster.connect(0)
        await low.hello(mint("low", "low"))
        await low.send("start", **LIVE)
        try:
            await wait_position(low, 1, timeout=10)
        except TimeoutError:
            raise AssertionError(f"{low.messages} {cluster.queue(0)}") from None
        assert cluster.queue(0)["slots"]["pools"] == {"cloud": {"total": 1, "busy": 1},
                                                      "local": {"total": 1, "busy": 1}}
        for c in (normal, streaming, low):
            await c.close()
