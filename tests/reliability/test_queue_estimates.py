"""The wait estimate behind live sessions, against the real wait: four live sessions hold the four
slots, a clip waits behind them, and every estimate it is pushed is compared with how long it
really waited. Clips have been measured before (one served clip), as on any server that has
been up a while: a live session must not count as a clip then."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav

SLOTS = 4
HOLD_S = 8.0
"""How long the live holders keep their slots; ``queue.live_expected_s`` is set to match."""
CLIP = {"avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}
LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse",
        "audio": {"format": "pcm_s16le", "sample_rate": 16000, "channels": 1}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("queue-estimates"),
        MTS_ENGINE__SLOTS=str(SLOTS),
        MTS_QUEUE__LIVE_EXPECTED_S=str(HOLD_S),
        MTS_LIMITS__START_BURST="50",
    ) as running:
        yield running


async def serve_clip(server: RunningServer, sub: str) -> None:
    client = await Client.connect(server)
    await client.hello(mint(sub, "normal"))
    await client.send("start", **CLIP)
    await client.ws.send(tone_wav(1.0, speech=[(0.0, 0.5)]))  # not the waiting clip's audio: no cache hit
    await client.send("audio_end")
    await client.expect("done", timeout=60)
    await client.close()


async def read_until_cancelled(client: Client) -> None:
    """Keep reading a live holder's media, so that it is a client that makes progress."""
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            await client.drain(1.0)


@pytest.mark.slow
async def test_a_clip_behind_four_live_sessions_is_told_about_its_real_wait(server: RunningServer) -> None:
    await serve_clip(server, "measure")  # the clip mean is known from now on (a second or two)
    holders, readers = [], []
    for n in range(SLOTS):
        holder = await Client.connect(server)
        await holder.hello(mint(f"live-{n}", "vip"))
        await holder.send("start", **LIVE)
        await holder.expect("granted")
        holders.append(holder)
        readers.append(asyncio.create_task(read_until_cancelled(holder)))
    release_at = time.monotonic() + HOLD_S  # the last holder ends HOLD_S after its grant, the others sooner

    async def end_holders() -> float:
        await asyncio.sleep(release_at - time.monotonic())
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers)
        for holder in holders:
            await holder.send("cancel")
        return time.monotonic()

    clip = await Client.connect(server)
    await clip.hello(mint("waiting-clip", "normal"))
    joined = time.monotonic()
    await clip.send("start", **CLIP)
    await clip.ws.send(tone_wav(1.0))
    await clip.send("audio_end")
    ended = asyncio.create_task(end_holders())
    granted = await clip.expect("granted", timeout=HOLD_S + 60)
    cancelled = await ended
    waited = granted["_t"] - joined
    assert granted["_t"] >= cancelled - 0.5, "granted before a live holder let go of its slot"

    estimates = [(m["_t"], m["eta_s"]) for m in clip.of_type("queued")]
    assert len(estimates) >= 3, f"a queued heartbeat every second while waiting {waited:.1f} s: {estimates}"
    # never unknown, never "0 s": the client's wait has not begun to end before its grant
    assert all(eta is not None and eta >= 1.0 for _, eta in estimates), (estimates, waited)
    # the first estimate is the live holders' expected remainder: of the order of the real wait
    first = estimates[0][1]
    assert waited / 2 <= first <= 2 * waited, f"first estimate {first} s, real wait {waited:.1f} s"
    # and each estimate pushed with more than 2 s still to wait is not below half of it
    for at, eta in estimates:
        left = granted["_t"] - at
        assert left < 2.0 or eta >= left / 2, f"told {eta} s with {left:.1f} s still to wait"

    await clip.expect("done", timeout=60)
    for client in (*holders, clip):
        await client.close()
    assert "Traceback" not in server.log()
