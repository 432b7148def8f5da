"""Admission steps per second: the in-memory store against the Redis store, and Redis commands
per grant.

One cycle is what one request costs the line: join (snapshot + conditional insert), the
dispatcher's grant (expire + pop-and-reserve), a view of the line (what every position push
reads), and the release. ``--waiting`` tickets wait behind it all along (the line's size changes
what a view and a snapshot carry). Redis commands are counted from ``INFO commandstats``
deltas: the scripts' calls (one round trip each) and the commands they run inside.

    python -m bench.admission_steps --cycles 2000 --waiting 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from stream_server.admission.admission import Admission
from stream_server.admission.memory import MemoryAdmissionStore
from stream_server.admission.owner import TicketOwner
from stream_server.admission.policy import AdmissionPolicy
from stream_server.admission.redis_store import RedisAdmissionStore
from stream_server.admission.store import AdmissionStore
from stream_server.settings import QueueSettings, TierSettings

TIERS = ["vip", "normal", "low"]


def queue_settings(waiting: int) -> QueueSettings:
    big = 1e9  # no estimate refusals: this measures the steps, not the policy's verdicts
    return QueueSettings(
        global_cap=waiting + 10,
        # low far behind: the tickets waiting behind never come first
        tiers={t: TierSettings(max_wait_s=big + i * 1e7, cap=waiting + 10) for i, t in enumerate(TIERS)},
    )


def commandstats(url: str) -> dict[str, int]:
    info: dict[str, Any] = redis.Redis.from_url(url).info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


def used_memory(url: str) -> int:
    info: dict[str, Any] = redis.Redis.from_url(url).info("memory")
    return int(info["used_memory"])


async def cycles(
    store: AdmissionStore, n: int, waiting: int, ready: Callable[[], None] = lambda: None
) -> float:
    """Cycles per second, with ``waiting`` tickets behind (``ready`` is called once they are in)."""
    q: Admission[TicketOwner] = Admission(AdmissionPolicy(queue_settings(waiting)), store)
    now = 1000.0
    for i in range(waiting):
        await q.join(f"w{i}", f"w{i}", "low", "a", now)  # low: every cycle's normal goes ahead
    ready()
    started = time.perf_counter()
    for i in range(n):
        now += 0.001
        await q.join(f"c{i}", f"c{i}", "normal", "a", now)
        grant = await q.grant(now)
        assert grant is not None and grant.ticket.id == f"c{i}"
        await q.view(now)
        await q.release(grant.ticket.id, now + 0.0005)
    return n / (time.perf_counter() - started)


async def run(n: int, waiting: int, url: str) -> dict[str, object]:
    memory = await cycles(MemoryAdmissionStore(TIERS, 1), n, waiting)
    prefix = f"mts-bench-{secrets.token_hex(4)}:"
    client = aioredis.Redis.from_url(url)
    store = RedisAdmissionStore(
        client, prefix=prefix, node_id="bench", tiers=TIERS, slots=1, resume_grace_s=30.0, grant_ttl_s=10.0
    )
    try:
        await store.heartbeat(0.0, 1e12)
        before: dict[str, int] = {}
        memory_before = used_memory(url)
        line_bytes: list[int] = []

        def ready() -> None:
            line_bytes.append(used_memory(url) - memory_before)
            before.update(commandstats(url))

        shared = await cycles(store, n, waiting, ready)
        after = commandstats(url)
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    scripts = delta.get("evalsha", 0) + delta.get("eval", 0)
    inner = sum(v for k, v in delta.items() if k not in ("evalsha", "eval", "info", "script|load", "script", "hello"))
    per_cycle_scripts = scripts / n
    return {
        "cycles": n,
        "waiting_behind": waiting,
        "memory_cycles_per_s": round(memory),
        "redis_cycles_per_s": round(shared),
        "memory_over_redis": round(memory / shared, 1),
        "redis_round_trips_per_cycle": round(per_cycle_scripts, 2),
        "redis_commands_per_cycle_in_scripts": round(inner / n, 1),
        "redis_bytes_per_waiting_ticket": round(line_bytes[0] / max(1, waiting)),
        "commands_by_name": {k: v for k, v in sorted(delta.items()) if v},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--waiting", type=int, default=100)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.cycles, args.waiting, args.redis_url)), indent=2))


if __name__ == "__main__":
    main()
