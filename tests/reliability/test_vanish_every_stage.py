"""A client vanishes (a reset, or a FIN with no websocket close) at every stage of a request:
queued, just granted, mid-MSE stream, mid-WebRTC stream, mid-cache-replay. After each: no
traceback in the server's log, the slot and every ticket handle freed, and the next client is
served a clip rendered in that slot."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json

import pytest
import websockets

from tests.reliability.clients import admin_stats, vanish, wait_holds_nothing
from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav
from tests.test_e2e_webrtc import negotiate

CLIP = {"avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}
LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse",
        "audio": {"format": "pcm_s16le", "sample_rate": 16000, "channels": 1}}
HOW = ["reset", "fin"]
USERS = itertools.count()
RENDERS = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("vanish"),
        MTS_ENGINE__SLOTS="1",
        MTS_QUEUE__RESUME_GRACE_S="1",
        MTS_LIMITS__START_BURST="1000",
    ) as running:
        yield running


def fresh_audio(seconds: float = 1.0) -> bytes:
    """A WAV no clip was made from yet (the voice stops at a new place each time), so that it is
    rendered in a slot, not answered from the clip store."""
    return tone_wav(seconds, speech=[(0.0, seconds / 2 + 0.001 * next(RENDERS))])


async def user(server: RunningServer) -> Client:
    client = await Client.connect(server)
    await client.hello(mint(f"vanisher-{next(USERS)}", "normal"))
    return client


async def start_clip(client: Client, audio: bytes) -> None:
    await client.send("start", **CLIP)
    await client.ws.send(audio)
    await client.send("audio_end")


async def media_arrives(client: Client, count: int) -> None:
    """Read until ``count`` media segments came (text is kept as usual)."""
    async with asyncio.timeout(60):
        while len(client.media) < count:
            raw = await client.ws.recv()
            if isinstance(raw, bytes):
                client.media.append((0.0, raw))
            else:
                client.messages.append(json.loads(raw))


async def next_client_is_served(server: RunningServer, log_from: int) -> None:
    """The vanished client holds nothing any more, and the slot renders the next clip."""
    await wait_holds_nothing(server)
    client = await user(server)
    await start_clip(client, fresh_audio())
    granted = await client.expect("granted", "error", timeout=30)
    assert granted["type"] == "granted", granted
    done = await client.expect("done", "error", timeout=60)
    assert done["type"] == "done" and done["frames"] == 25, done
    await client.close()
    await wait_holds_nothing(server)
    assert "Traceback" not in server.log()[log_from:]


@pytest.mark.parametrize("how", HOW)
async def test_vanish_while_queued(server: RunningServer, how: str) -> None:
    log_from = len(server.log())
    holder = await user(server)
    await holder.send("start", **LIVE)
    await holder.expect("granted")
    waiter = await user(server)
    await start_clip(waiter, fresh_audio())
    assert (await waiter.expect("queued"))["position"] == 1
    vanish(waiter.ws, how)
    async with asyncio.timeout(10):  # out of the line at once, parked for the resume grace
        while sum(t["size"] for t in admin_stats(server)["waiting"].values()):
            await asyncio.sleep(0.05)
    await holder.send("cancel")
    await holder.close()
    await next_client_is_served(server, log_from)


@pytest.mark.parametrize("how", HOW)
async def test_vanish_just_granted(server: RunningServer, how: str) -> None:
    log_from = len(server.log())
    client = await user(server)
    await start_clip(client, fresh_audio(8.0))
    await client.expect("granted")
    vanish(client.ws, how)
    await next_client_is_served(server, log_from)


@pytest.mark.parametrize("how", HOW)
async def test_vanish_mid_mse_stream(server: RunningServer, how: str) -> None:
    log_from = len(server.log())
    client = await user(server)
    await start_clip(client, fresh_audio(8.0))
    await client.expect("stream")
    await media_arrives(client, 3)  # the init segment and two media segments
    assert not client.of_type("done")
    vanish(client.ws, how)
    await next_client_is_served(server, log_from)


@pytest.mark.parametrize("how", HOW)
async def test_vanish_mid_webrtc_stream(server: RunningServer, how: str) -> None:
    log_from = len(server.log())
    client = await user(server)
    await client.send("start", **{**LIVE, "transport": "webrtc"})
    await client.expect("granted")
    pc, video, _, tasks = await negotiate(client)
    await client.expect("stream")
    async with asyncio.timeout(30):
        while len(video) < 10:
            await asyncio.sleep(0.05)
    vanish(client.ws, how)  # the peer connection stays up: only the session socket is gone
    await next_client_is_served(server, log_from)
    await pc.close()
    for task in tasks:
        await task


@pytest.mark.parametrize("how", HOW)
async def test_vanish_mid_cache_replay(server: RunningServer, how: str) -> None:
    log_from = len(server.log())
    audio = fresh_audio(4.0)
    first = await user(server)
    await start_clip(first, audio)
    assert (await first.expect("done", timeout=120))["clip"]
    await first.close()
    for i in range(10):  # the same clip again: answered from the store (a slot granted is given back)
        ws = await websockets.connect(server.ws_url, max_size=None)
        await ws.send(json.dumps({"type": "hello", "token": mint(f"vanisher-{next(USERS)}", "normal")}))
        await ws.send(json.dumps({"type": "start", **CLIP}))
        await ws.send(audio)
        await ws.send(json.dumps({"type": "audio_end"}))
        if i % 2:  # gone during the replay, which begins right after the first message
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.recv()
            await asyncio.sleep(0.01 * (i % 5))
        vanish(ws, how)  # else gone at once: the server reads the request, then finds no socket
    await next_client_is_served(server, log_from)
