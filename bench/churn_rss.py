"""Resident memory under churn: clients join, leave, resume, cancel and render short clips.

Reported: the server's RSS after warm-up and after the cycles, the growth per 1000 cycles, and
the tickets, slots and parked sessions left at the end (all should be 0). Run once per allocator
setting to compare them (the server process inherits the environment):

    python -m bench.churn_rss --cycles 1000                                # the server's own choice
    MTS_SERVER__MALLOC_ARENA_MAX=0 python -m bench.churn_rss --cycles 1000 # glibc's default arenas
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python -m bench.churn_rss --cycles 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import psutil

from bench.common import metric
from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav

CLIP = {"avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}


async def cycle(server: RunningServer, sub: str, kind: int, audio: bytes) -> None:
    client = await Client.connect(server)
    welcome = await client.hello(mint(sub, "normal"))
    await client.send("start", **CLIP)
    await client.ws.send(audio)
    if kind == 0:  # render
        await client.send("audio_end")
        await client.expect("done", "error", timeout=120)
    elif kind == 1:  # cancel
        await client.send("cancel")
        await client.send("ping")
        await client.expect("pong")
    elif kind == 2:  # leave, resume, cancel
        await client.expect("queued", "granted")
        await client.close()
        client = await Client.connect(server)
        await client.hello(mint(sub, "normal"), resume=welcome["resume"])
        await client.send("cancel")
        await client.send("ping")
        await client.expect("pong")
    await client.close()  # kind 3: just leave (parked, then expired)


async def worker(server: RunningServer, index: int, cycles: int, audio: bytes, render_every: int) -> None:
    for n in range(cycles):
        kind = 0 if n % render_every == 0 else 1 + n % 3
        await cycle(server, f"churn-{index}-{n if kind == 3 else 0}", kind, audio)


async def run(cycles: int, clients: int, render_every: int) -> dict[str, object]:
    audio = tone_wav(0.4)
    with tempfile.TemporaryDirectory() as tmp, run_server(
        Path(tmp),
        MTS_ENGINE__SLOTS="2",
        MTS_LIMITS__START_BURST="100000",
        MTS_LIMITS__START_RATE_PER_MINUTE="100000",
        MTS_QUEUE__RESUME_GRACE_S="2",
    ) as server:
        proc = psutil.Process(server.process.pid)
        per_client = cycles // clients
        warm_up = max(1, per_client // 10)
        await asyncio.gather(*(worker(server, i, warm_up, audio, render_every) for i in range(clients)))
        rss_warm = proc.memory_info().rss
        by_1000 = []
        block = max(1, 1000 // clients)
        for _ in range(max(1, per_client // block)):
            await asyncio.gather(*(worker(server, i, block, audio, render_every) for i in range(clients)))
            by_1000.append(proc.memory_info().rss / 2**20)
        await asyncio.sleep(3.0)
        rss_end = proc.memory_info().rss
        done = len(by_1000) * block * clients
        summary = server.get("/v1/queue").json()
        return {
            "cycles": done,
            "rss_warm_mib": rss_warm / 2**20,
            "rss_end_mib": rss_end / 2**20,
            "rss_growth_mib_per_1000_cycles": (rss_end - rss_warm) / 2**20 * 1000 / done,
            "rss_mib_after_each_1000": [round(r, 1) for r in by_1000],
            "slots_busy": summary["slots"]["busy"],
            "waiting": sum(t["size"] for t in summary["tiers"].values()),
            "sessions_active": metric(server, "mts_sessions_active"),
            "queued_audio_bytes": metric(server, "mts_queued_audio_bytes"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--render-every", type=int, default=8, help="one cycle in this many renders a clip")
    args = parser.parse_args()
    result = asyncio.run(run(args.cycles, args.clients, args.render_every))
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
