"""Redis restarted mid-run (a private redis-server, killed and started again empty): clients
get clear errors, the line recovers, and nothing is granted twice."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.cluster_harness import Cluster, run_cluster, slots
from tests.cluster.redis_helpers import private_redis, unique_prefix
from tests.cluster.test_cluster_e2e import LIVE, hold, take_slot, wait_position
from tests.server_harness import mint

pytestmark = pytest.mark.slow
LEASE_S = 1.5


def queue_or_error(cluster: Cluster) -> dict[str, Any] | None:
    """``/v1/queue`` of node 0; ``None`` while it answers that Redis cannot be reached (a JSON 503)."""
    response = httpx.get(cluster.nodes[0].url + "/v1/queue", timeout=10)
    if response.status_code == 503:
        body = response.json()
        assert body["code"] == "internal" and "unreachable" in body["message"], body
        assert response.headers["retry-after"] == "2"
        return None
    return dict(response.json())


async def test_redis_restarted_mid_run(tmp_path: Path) -> None:
    with private_redis(tmp_path) as redis_server, run_cluster(
        tmp_path, redis_server.url, unique_prefix(), nodes=2, MTS_CLUSTER__LEASE_S=str(LEASE_S)
    ) as cluster:
        h0, h1 = await hold(cluster, 0, "h0"), await hold(cluster, 1, "h1")
        waiter = await cluster.connect(1)
        await waiter.hello(mint("waiter", "normal"))
        await waiter.send("start", **LIVE)
        await wait_position(waiter, 1)

        redis_server.kill()
        newcomer = await cluster.connect(0)
        await newcomer.hello(mint("newcomer", "vip"))
        await newcomer.send("start", **LIVE)
        err = await newcomer.expect("error")
        assert err["code"] == "internal" and "unreachable" in err["message"] and err["retry_after_s"] > 0, err
        assert not newcomer.of_type("queued"), "a start the store could not take is not in line"

        redis_server.start()  # empty: the line is gone
        # the nodes register again within a heartbeat, keep their streaming sessions' slots, and
        # tell the waiting client that its place is lost
        lost = await waiter.expect("error", timeout=LEASE_S * 4)
        assert lost["code"] == "internal" and "start again" in lost["message"]
        deadline = time.monotonic() + LEASE_S * 4
        while (summary := queue_or_error(cluster)) is None or slots(summary) != (2, 2):
            assert time.monotonic() < deadline, summary
            await asyncio.sleep(0.1)

        # the line works again: both start again, the vip first; nobody is granted a busy slot
        await waiter.send("start", **LIVE)
        queued = await waiter.expect("queued", "error")
        assert (queued["type"], queued.get("position")) == ("queued", 1), queued
        await newcomer.send("start", **LIVE)
        queued = await newcomer.expect("queued", "error")
        assert (queued["type"], queued.get("position")) == ("queued", 1), queued
        await wait_position(waiter, 2)
        assert not waiter.of_type("granted") and not newcomer.of_type("granted")
        await h0.send("cancel")
        vip = await take_slot(cluster, newcomer, mint("newcomer", "vip"), LIVE)
        await asyncio.sleep(0.5)
        assert not waiter.of_type("granted") and not waiter.of_type("redirect"), "one slot, one grant"
        await h1.send("cancel")
        normal = await take_slot(cluster, waiter, mint("waiter", "normal"), LIVE)
        assert slots(cluster.queue(1)) == (2, 2)
        for client in (vip, normal, newcomer, waiter):
            assert len(client.of_type("granted")) + len(client.of_type("redirect")) <= 1
        for client in (vip, normal, h0, h1):
            await client.close()
