"""A churn soak: 100 concurrent clients, 2000 cycles of join, cancel, leave and resume, vanish,
and clips answered from the store. Afterwards the node holds nothing (no slot, ticket, parked
session, upload or identity), and its resident memory grew by a bounded amount per 1000 cycles.

Every ``ROUND`` cycles all 100 clients join at once and wait: the positions they were pushed must
then be 1..n, each once, with n the number of waiting tickets. Joining at once also shows that no
identity was left counted as active: a leaked one would be answered ``busy``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.reliability.clients import admin_stats, vanish, wait_holds_nothing
from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav

CLIENTS = 100
CYCLES = 2000
ROUND = 500
"""Cycles between two samples of every client's position."""
WARM_UP = 200
"""Cycles before the first RSS reading: imports, caches and pools fill up first."""
SLOTS = 2
RESUME_GRACE_S = 1.0
RSS_BOUND_MIB_PER_1000 = 150
TIERS = ("vip", "normal", "low")
CLIP = {"avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}
ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"
AUDIO = [tone_wav(0.2 + 0.04 * i) for i in range(4)]
"""The clips the render cycles ask for: each is rendered once, then answered from the store."""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("churn"),
        MTS_ENGINE__SLOTS=str(SLOTS),
        MTS_QUEUE__RESUME_GRACE_S=str(RESUME_GRACE_S),
        MTS_LIMITS__START_BURST="1000000",
        MTS_LIMITS__START_RATE_PER_MINUTE="1000000",
    ) as running:
        yield running


class Churner:
    """One of the 100 clients: its own identity and tier, one cycle at a time."""

    def __init__(self, server: RunningServer, index: int, tally: dict[str, int]) -> None:
        self.server = server
        self.index = index
        self.token = mint(f"soak-{index}", TIERS[index % len(TIERS)])
        self.tally = tally

    async def join(self, *, retry_busy: bool = True) -> tuple[Client, dict[str, Any], dict[str, Any]]:
        """A new socket, ``hello`` and ``start``: the welcome and the first answer (queued or
        granted). Right after a vanish the server may not have seen the old socket go yet, so a
        ``busy`` is tried again, for a while."""
        client = await Client.connect(self.server)
        welcome = await client.hello(self.token)
        for _ in range(200):
            await client.send("start", **CLIP)
            first = await client.expect("queued", "granted", "error")
            if first["type"] != "error":
                return client, welcome, first
            assert first["code"] == "busy" and retry_busy, first
            self.tally["busy_retries"] += 1
            await asyncio.sleep(0.05)
        raise AssertionError(f"soak-{self.index} stayed busy")

    async def cancel(self, client: Client) -> None:
        await client.send("cancel")
        await client.send("ping", id="after-cancel")
        assert (await client.expect("pong"))["id"] == "after-cancel"

    async def cycle(self, n: int) -> None:
        kind = (n + self.index) % 5
        client, welcome, _ = await self.join()
        if kind == 0:  # join, cancel, leave
            await self.cancel(client)
            await client.close()
        elif kind in (1, 2):  # join, leave (cleanly or by vanishing), resume, cancel
            if kind == 1:
                await client.close()
            else:
                vanish(client.ws)
            client = await Client.connect(self.server)
            await client.hello(self.token, resume=welcome["resume"])
            answer = await client.expect("queued", "granted", "error")
            # a ticket granted before its client left is not parked: its resume is refused
            if answer["type"] == "error":
                assert answer["code"] == "session_expired", answer
                self.tally["resume_refused"] += 1
            else:
                self.tally["resumed"] += 1
                await self.cancel(client)
            await client.close()
        elif kind == 3:  # join and vanish: parked, then expired (or superseded by the next join)
            vanish(client.ws, "reset" if n % 2 else "fin")
        else:  # a clip: rendered once, then answered from the clip store
            await client.ws.send(AUDIO[n % len(AUDIO)])
            await client.send("audio_end")
            done = await client.expect("done", timeout=120)
            assert done["frames"] > 0
            self.tally["clips"] += 1
            await client.close()
        for msg in client.of_type("queued"):
            assert 1 <= msg["position"] <= msg["queue_size"], msg
        self.tally["cycles"] += 1


async def positions_are_distinct(server: RunningServer, churners: list[Churner]) -> list[int]:
    """Every client joins and waits; the latest positions pushed to the waiting ones must settle
    on 1..n, n the waiting tickets. Returns them sorted. Then everyone leaves."""
    joined = await asyncio.gather(*(c.join(retry_busy=False) for c in churners))
    clients = [client for client, _, _ in joined]
    deadline = time.monotonic() + 30
    while True:
        await asyncio.gather(*(client.drain(0.2) for client in clients))
        waiting = [c for c in clients if not c.of_type("granted")]
        latest = sorted(c.of_type("queued")[-1]["position"] for c in waiting)
        if latest == list(range(1, len(waiting) + 1)):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"positions of {len(waiting)} waiting clients did not settle on 1..n: {latest}")
    assert len(waiting) == len(clients) - SLOTS
    stats = await asyncio.to_thread(admin_stats, server)
    assert sum(t["size"] for t in stats["waiting"].values()) == len(waiting)
    assert stats["slots"]["busy"] == SLOTS and stats["tickets"]["owned"] == len(waiting)
    for i, client in enumerate(clients):
        if i % 2:
            await client.close()
        else:
            vanish(client.ws)
    return latest


async def settled_rss_mib(server: RunningServer) -> float:
    """The server's RSS once the allocator had time to give freed pages back (jemalloc's
    background purge, ``server.jemalloc_conf``, works within a second)."""
    await asyncio.sleep(2.0)
    return float(psutil.Process(server.process.pid).memory_info().rss / 2**20)


async def quiet(server: RunningServer) -> None:
    """Until the node has seen every socket go (and the parked tickets expire)."""
    await wait_holds_nothing(server, timeout=30)


async def test_churn_leaks_nothing_and_memory_growth_is_bounded(server: RunningServer) -> None:
    tally = dict.fromkeys(("cycles", "resumed", "resume_refused", "clips", "busy_retries"), 0)
    churners = [Churner(server, i, tally) for i in range(CLIENTS)]

    async def churn(cycles: int, offset: int) -> None:
        """``cycles`` in all, each client doing its share one after the other."""

        async def one(churner: Churner) -> None:
            for n in range(offset, offset + cycles // CLIENTS):
                await churner.cycle(n)

        await asyncio.gather(*(one(c) for c in churners))

    started = time.monotonic()
    await churn(WARM_UP, 0)
    await quiet(server)
    rss_warm = await settled_rss_mib(server)
    done = WARM_UP
    samples = []
    while done < CYCLES:
        block = min(ROUND, CYCLES - done)
        await churn(block, done)
        done += block
        await quiet(server)
        samples.append(await positions_are_distinct(server, churners))
        await quiet(server)
    stats = await wait_holds_nothing(server)
    rss_end = await settled_rss_mib(server)
    measured = done - WARM_UP
    growth = (rss_end - rss_warm) * 1000 / measured
    report = (
        f"churn soak: {tally['cycles']} cycles by {CLIENTS} clients in {time.monotonic() - started:.0f} s "
        f"({tally['resumed']} resumed, {tally['resume_refused']} resumes of granted tickets refused, "
        f"{tally['clips']} clips, {tally['busy_retries']} busy retries right after a vanish); "
        f"RSS {rss_warm:.0f} MiB after {WARM_UP} cycles, {rss_end:.0f} MiB after {done}: "
        f"{growth:+.1f} MiB per 1000 cycles (bound {RSS_BOUND_MIB_PER_1000}); "
        f"{len(samples)} samples of {CLIENTS} positions, each 1..n"
    )
    print(report)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "churn_soak.txt").write_text(report + "\n")
    assert tally["cycles"] == CYCLES
    assert tally["resumed"] > 0 and tally["clips"] > 0
    assert stats["errors"].get("internal", 0) == 0
    assert growth < RSS_BOUND_MIB_PER_1000, report
    assert "Traceback" not in server.log()
