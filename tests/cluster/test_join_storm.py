"""Joins against the real Redis store as nodes make them: a thousand at once over three nodes
all get in (or get the documented refusal), with the nodes' own connection pools; each node's
copy of the line follows the changes and reads the whole line only when it must."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from stream_server.admission.admission import Admission
from stream_server.admission.owner import TicketOwner
from stream_server.admission.policy import AdmissionPolicy, QueueFull
from stream_server.admission.redis_store import RedisAdmissionStore
from stream_server.node import admission_store
from stream_server.settings import ClusterSettings, QueueSettings, ServerSettings, Settings
from tests.cluster.redis_helpers import delete_prefix
from tests.test_admission import make_settings

FOREVER = 1e12
START = json.dumps({"type": "start", "avatar": "astronaut", "mode": "clip", "transport": "mse",
                    "audio": {"format": "wav"}})


def node_settings(redis_url: str, prefix: str, node: str, queue: QueueSettings) -> Settings:
    return Settings(
        queue=queue.model_copy(update={"store": "redis", "redis_url": redis_url, "redis_prefix": prefix}),
        cluster=ClusterSettings(node_id=node),
        server=ServerSettings(public_url=f"http://{node}.example"),
    )


async def close(store: RedisAdmissionStore) -> None:
    for client in (store.client, store.lease_client):
        await client.aclose()
        await client.connection_pool.disconnect()


@pytest.fixture
async def three_nodes(redis_url: str, prefix: str) -> AsyncIterator[list[Admission[TicketOwner]]]:
    """Three nodes' admissions as ``Node`` builds them (``admission_store``: its Redis pools)."""
    queue = make_settings()  # 1000 waiting at most, as shipped
    stores = []
    for name in ("a", "b", "c"):
        store = admission_store(node_settings(redis_url, prefix, name, queue))
        assert isinstance(store, RedisAdmissionStore)
        await store.heartbeat(time.time(), FOREVER)
        stores.append(store)
    try:
        yield [Admission(AdmissionPolicy(queue), store, time.time) for store in stores]
    finally:
        for store in stores:
            await close(store)


async def test_a_thousand_joins_at_once_over_three_nodes_all_get_in_or_are_refused_as_documented(
    three_nodes: list[Admission[TicketOwner]],
) -> None:
    tiers = ["vip", "normal", "low"]
    joins = 1030  # 30 over the global cap of 1000

    async def join(i: int) -> str:
        q = three_nodes[i % 3]
        try:
            await q.join(f"t{i}", f"user-{i}", tiers[i % 3], "astronaut", q.clock(), request=START)
        except QueueFull as exc:
            assert "the queue is full (1000 waiting)" in exc.reason, exc.reason
            return "queue_full"
        return "joined"

    outcomes = Counter(await asyncio.gather(*(join(i) for i in range(joins))))
    assert outcomes == {"joined": 1000, "queue_full": 30}
    view = await three_nodes[0].view(time.time())
    assert len({t.id for t in view.waiting}) == 1000
    ranks = [tiers.index(t.tier) for t in view.waiting]
    assert ranks == sorted(ranks), "joined within a second: vip, then normal, then low"
    for q in three_nodes[1:]:
        assert [t.id for t in (await q.view(time.time())).waiting] == [t.id for t in view.waiting]
    whole = [q.store.line_copy.whole_reads for q in three_nodes]  # type: ignore[attr-defined]
    assert max(whole) <= 3, f"the nodes read the whole line {whole} times for {joins} joins"


def two_stores(redis_url: str, prefix: str) -> tuple[RedisAdmissionStore, RedisAdmissionStore]:
    queue = make_settings()
    stores = []
    for name in ("a", "b"):
        store = admission_store(node_settings(redis_url, prefix, name, queue))
        assert isinstance(store, RedisAdmissionStore)
        stores.append(store)
    return stores[0], stores[1]


async def test_a_nodes_copy_of_the_line_follows_the_changes_and_reads_it_whole_only_when_it_must(
    redis_url: str, prefix: str
) -> None:
    a, b = two_stores(redis_url, prefix)
    try:
        policy = AdmissionPolicy(make_settings())
        qa = Admission[TicketOwner](policy, a)
        await a.heartbeat(0.0, FOREVER)
        await b.heartbeat(0.0, FOREVER)
        assert (await b.line(1.0)).waiting == [] and b.line_copy.whole_reads == 1
        for i in range(10):
            await qa.join(f"t{i}", f"u{i}", "normal", "x", 1.0 + i)
        await qa.detach("t3", 20.0)
        assert [t.id for t in (await b.line(12.0)).waiting] == [f"t{i}" for i in range(10) if i != 3]
        assert b.line_copy.whole_reads == 1, "b followed the ten changes"
        assert list(b.line_copy.detached) == ["t3"]
        # more changes than the log keeps (1024): b reads the whole line again
        for _ in range(520):
            await qa.join("churn", "churner", "low", "x", 30.0)
            await qa.leave("churn")
        await qa.reattach("t3", "u3", 40.0)
        assert [t.id for t in (await b.line(41.0)).waiting] == [f"t{i}" for i in range(10)]
        assert b.line_copy.whole_reads == 2
    finally:
        await close(a)
        await close(b)


async def test_a_copy_from_before_redis_lost_the_line_is_not_taken_for_the_new_line(
    redis_url: str, prefix: str
) -> None:
    a, b = two_stores(redis_url, prefix)
    try:
        qa = Admission[TicketOwner](AdmissionPolicy(make_settings()), a)
        await a.heartbeat(0.0, FOREVER)  # version 1 (a new node)
        await qa.join("old", "u1", "normal", "x", 1.0)  # version 2
        assert [t.id for t in (await b.line(2.0)).waiting] == ["old"]
        version = b.line_copy.version
        delete_prefix(redis_url, prefix)  # Redis restarted empty
        await a.heartbeat(3.0, FOREVER)
        await qa.join("new", "u2", "normal", "x", 4.0)
        assert int(await a.client.get(prefix + "ver")) == version, "the new line is at the version b's copy names"
        assert [t.id for t in (await b.line(5.0)).waiting] == ["new"]
    finally:
        await close(a)
        await close(b)
